"""One file's writer: writes stream into a multipart upload, any byte can be changed, and
memory decides only the speed.

States (`self.state`):
  WRITING   changes since the last completion (or none yet); full parts stream into `session`
            as they fill; a full part changed again goes up once the writes move on
            (`_rewriting`), not per write
  COMPLETE  the object at `key` holds every byte and is the writer's `base`; held parts stay
            until memory is short, so that later writes continue cheaply
  FAILED    an upload or the completion failed after retries: every later call fails (EIO;
            EFBIG, ENOSPC or EACCES -- S3 refused the write -- where that was the cause) and
            the multipart upload stays in S3
            for `s3stream recover`
  DETACHED  the file was unlinked while open: writes are accepted and dropped

Transitions:
  WRITING  --flush or release with changes-->  COMPLETE  (or FAILED)
  COMPLETE --write or truncate-->              WRITING   (continuing from the base)
  WRITING  --an upload fails-->                FAILED
  any      --unlink-->                         DETACHED

Where part n's current bytes are, in the order `_hold` looks:
  1. held: `_parts[n]`, a buffer (and spilled segments before it when memory was short);
  2. past the end of the file: nowhere yet, a new empty part;
  3. uploaded to the session and freed: S3 cannot read those back, so `_rebase` completes
     the upload as it stands (the object becomes visible with the bytes so far) and they are
     then in the base (for a write there, and for a reader: see `_read_part`);
  4. in the base (the object this writer continues, pinned by its ETag): a ranged GET.
At completion every part 1..last is put in the session: held ones uploaded, base ones copied
server-side (UploadPartCopy), the rest are there already. A file of one part is one PutObject.

Concurrency. Every request method takes `_lock` (trio's Lock is FIFO: the kernel's write
order is kept). The budget's reclaimer runs without the lock and touches only parts that are
idle (no upload, spill or load running) and not pinned: across any await below, such a part
may be dropped (if stored) or spilled (its buffer moves into a segment). So code re-looks
parts up after an await (`_hold`) instead of trusting a reference, pins a part or marks it
busy while its buffer is used across an await, and never waits for memory while it pins
anything (the pinned part could be the memory the wait needs) or holds reserved memory not
yet in a part (`_reserve` gives the request's credit back and waits for the total). Upload
jobs run in the pool and only record their result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .errors import AccessDenied, FsError, NotFound, PreconditionFailed, error_reason, first_error
from .memory_budget import MemoryBudget
from .object_meta import FileMeta, Kept, rewrite_options
from .object_store import ObjectStore, PutOptions, read_into
from .part_buffer import Part, Segment
from .part_schedule import PartSchedule
from .spill_area import SpillArea
from .upload_pool import UploadPool
from .upload_queue import UploadQueue
from .upload_session import UploadSession

log = logging.getLogger(__name__)

GRAIN = 1024 * 1024  # a part that cannot have its whole buffer at once grows in these steps
COPY_CONCURRENCY = 16  # UploadPartCopy requests of one completion at a time
ZERO_CHUNK = bytes(1024 * 1024)
# while a read-only handle is open, the uploaded parts in the last this many bytes of the file
# stay held (memory allowing): a player following a recording reads them from memory and the
# kernel's cache. Each completion a reader forces doubles it, up to half the budget
READER_WINDOW = 32 * 1024 * 1024


class State(enum.Enum):
    WRITING = "writing"
    COMPLETE = "complete"
    FAILED = "failed"
    DETACHED = "detached"


@dataclass(frozen=True)
class Base:
    """The object a writer continues: its ETag (every read and copy is pinned to it) and size."""

    etag: str
    size: int


class StreamingWriter:
    def __init__(self, key: str, name: str, store: ObjectStore, pool: UploadPool,
                 budget: MemoryBudget, schedule: PartSchedule, spill: SpillArea,
                 meta: FileMeta, content_type: str | None, base: Base | None = None,
                 on_complete: Callable[[str, int], None] | None = None,
                 drop_pages: Callable[[int, int], None] | None = None,
                 kept: Kept | None = None):
        self.key = key
        self.name = name
        self._store = store
        self._pool = pool
        self._budget = budget
        self._schedule = schedule
        self._spill = spill
        self.meta = meta
        self._content_type = content_type
        # what the object this writer continues carries besides our metadata (None: a new
        # object, the mount's options): every completion stores it again. Its tags, when
        # it has any, are read once (GetObjectTagging) for the first new upload or put.
        self._kept = kept
        self._tags: str | None = None
        self._on_complete = on_complete
        self._drop_pages = drop_pages  # (start, length) stored and out of memory
        self._lock = trio.Lock()
        self.handles = 0  # open file handles sharing this writer (owned by OpenFiles)
        self.readers = 0  # ... of which read-only (owned by OpenFiles, see `reader_closed`)
        self.arrivals = 0  # WRITEs received through any handle (owned by OpenFiles: `flush`)
        self._reader_window = min(READER_WINDOW, budget.limit // 2)
        self.reader_rebases = 0  # completions forced by readers (for tests and status)
        self.started_ns = time.time_ns()
        self.base = base
        self.size = base.size if base is not None else 0
        # an existing object opened for writing is complete until something changes it
        self.state = State.COMPLETE if base is not None else State.WRITING
        self.changed = base is None  # a new file is a change: flush must create the object
        self.error: FsError | None = None
        self._session: UploadSession | None = None
        self._parts: dict[int, Part] = {}
        # parts wholly inside a gap a grow left (truncate, a write past the end): all zeros,
        # no buffer; completion copies them from a zero object (`_copy_zeros`)
        self._zeros: set[int] = set()
        self._copies: trio.CancelScope | None = None  # a completion's copies (see `stop`)
        self._dead_segments: list[Segment] = []  # spills of parts freed once failed
        self._credit = 0  # budget reserved by the request in progress, not yet in a part
        # a full part being changed again (an in-place rewrite): uploaded once the writes
        # move on to another part (or by fsync, completion, the reclaimer), not per write
        self._rewriting: int | None = None
        self._meta_dirty = False  # chmod/chown/utimes after completion, not yet in S3
        self._meta_version = 0  # counts those changes: one during a completion is not lost
        self._unsynced_since: float | None = None  # first change not yet stored in S3
        self.fsync_interval = 0.0  # seconds between tail uploads of fsync (set by OpenFiles)
        self._last_fsync = -float("inf")
        # read only outside this class (`s3stream status`)
        self.bytes_written = 0  # bytes accepted by write() since the file was opened
        self.parts_uploaded = 0  # UploadParts that succeeded
        self.bytes_uploaded = 0  # ... and their bytes
        self.parts_in_flight = 0  # UploadParts handed to the pool, not yet done
        self.parts_copied = 0  # UploadPartCopies that succeeded (from the base or zeros)
        self.completing = False  # a completion (flush, release, rename) is in progress
        # times this writer wrote the object at its key (a completion, an attribute rewrite):
        # an unlink or a rename over the file compares it across its own request
        self.stores = 0
        # our x-amz-meta-* as the object at the key holds them after this writer's last
        # store (a completion, an attribute rewrite); None while not known (nothing stored,
        # or moved by a copy the namespace made). With the ETag and size this is what a HEAD
        # would answer: the node stays fresh after the last close (`OpenFiles._last_close`)
        self.stored_meta: dict[str, str] | None = None
        # queued uploads (`-o queued_uploads`, set by OpenFiles): a flush of a file of one
        # part queues its PutObject (`_queue_put`); `_queued` is set while it runs
        self.queue: UploadQueue | None = None
        self._queued: trio.Event | None = None
        self.queue_failed = False  # a queued upload failed and nobody was told yet
        budget.register(self)

    # -- requests (each under the lock) ------------------------------------------------

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        async with self._request():
            if self.state is State.DETACHED:
                return len(data)
            self._check_size(offset + len(data))
            self._reopen()
            if offset > self.size:
                await self._fill_zeros(offset)
            await self._write_at(offset, memoryview(data))
            self.bytes_written += len(data)
            return len(data)

    async def truncate(self, size: int) -> None:
        async with self._request():
            if self.state is State.DETACHED:
                return
            self._check_size(size)
            self._reopen()
            if size > self.size:
                await self._fill_zeros(size)
            elif size == 0:
                await self._reset()
            elif size < self.size:
                await self._shrink(size)
            self._zeros = {n for n in self._zeros if self._schedule.start(n) < self.size}

    async def read_held(self, offset: int, length: int, for_writing: bool = False) -> bytes:
        """Bytes of the file as written so far.

        Held bytes come from memory, spilled and base bytes with a ranged GET, bytes uploaded
        to the open upload and freed by completing the upload early (`_read_part`).
        `for_writing`: the kernel reads through a writing handle to complete a page before a
        partial-page write (README "Writeback cache"); the part is then brought back into
        memory for the write that follows, completing the upload early if it must.
        """
        # a queued upload in progress: its bytes are read from memory meanwhile (the PUT
        # only reads the buffer; a read for writing waits in `_hold` for the part)
        async with self._request(wait_queued=False):
            end = min(offset + length, self.size)
            pieces = []
            position = offset
            while position < end:
                number, within = self._locate(position)
                take = min(end - position, self._schedule.size(number) - within)
                if for_writing:
                    part = await self._hold(number, within)
                    pieces.append(bytes(part.view(within, within + take)))
                    self._unpin(part)
                else:
                    pieces.append(await self._read_part(number, within, within + take))
                position += take
            return b"".join(pieces)

    async def fsync(self) -> None:
        """Make every byte written so far durable as parts of the open upload.

        Each fsync uploads the tail part again (up to a part's size), so one that comes
        within `fsync_interval` of the last fsync that stored everything first waits until
        the interval has passed (without the lock: writes go on meanwhile, and are stored
        too). At most one tail upload per interval, and every byte written before the call
        is stored when it returns."""
        wait = self._last_fsync + self.fsync_interval - trio.current_time()
        if wait > 0:
            await trio.sleep(wait)
        await self._store_all()
        self._last_fsync = trio.current_time()

    async def _store_all(self) -> None:
        async with self._request():
            if self.state is not State.WRITING or not self.changed or self.size == 0:
                return
            await self._sticky(self._materialize())

    async def sync_if_older(self, seconds: float) -> None:
        """Store what was written if the oldest change not yet in S3 is `seconds` old: a
        program that never calls fsync loses at most that much in a crash. A writer busy
        with a request is left for the next round."""
        since = self._unsynced_since
        if since is None or time.monotonic() - since < seconds or self._lock.locked() \
                or self.state is not State.WRITING or not self.size or self.queued:
            return
        try:
            await self._store_all()
        except FsError:
            pass  # logged once by the writer; the program sees it at its next call

    async def abandon(self) -> bool:
        """Unmounting with the file still open: upload everything written (the tail as a
        short last part) and leave the upload for `s3stream recover`. Returns whether an
        upload was left."""
        async with self._lock:
            await self.wait_stored()  # (`OpenFiles.shutdown` drained the queue before)
            try:
                if self.state is State.WRITING and self.changed and self.size \
                        and self.error is None:
                    try:
                        await self._sticky(self._materialize())
                    except FsError:
                        pass  # logged by _fail: what was uploaded before stays
                left = self.changed and self._session is not None
                segments = await self._drop_all_parts()
                await self._spill.delete(segments)
                return left
            finally:
                self._budget.unregister(self)

    async def flush(self, queue: bool = False) -> None:
        """Complete the object if anything changed since the last completion. `queue`: a
        close with queued uploads on; a file of one part then only queues its PutObject."""
        async with self._request():  # (a queued upload of it ended first)
            if self.state is State.COMPLETE and self._meta_dirty:
                await self._rewrite_meta()
                return
            if self.state is State.DETACHED or not self.changed:
                return
            if queue and self.queue is not None and self._session is None \
                    and self._last_part() == 1:
                await self._queue_put()
                return
            await self._sticky(self._complete())

    @property
    def queued(self) -> bool:
        """A queued PutObject of this file is in progress."""
        return self._queued is not None

    async def wait_stored(self) -> None:
        """Until no queued upload of this file runs (no lock: used by a close that waits
        in the background, and under the lock by requests that change or store the file)."""
        while self._queued is not None:
            await self._queued.wait()

    async def _queue_put(self) -> None:
        """Queue the PutObject of this file of one part (under the lock). Part 1 stays
        held, pinned and busy until the PUT ends: no write, spill or drop changes its buffer
        meanwhile, and reads are served from it."""
        await self.queue.room()  # at most MAX_QUEUED files at once
        try:
            version = self._meta_version  # set_meta may come during the PUT: see `_done`
            options = await self._new_object_options()
            part = await self._hold(1, 0) if self.size else None
        except BaseException:
            self.queue.give_back()
            raise
        # no await from here to the job's start: nothing else sees part 1 idle
        if part is not None:
            assert part.whole
            part.idle = trio.Event()
        self._queued = trio.Event()
        self.completing = True
        self.queue.upload(lambda: self._send_queued(part, options, version))

    async def _send_queued(self, part: Part | None, options: PutOptions,
                           version: int) -> bool:
        """The queued PutObject (a task of the queue, without the lock: every request but
        a plain read waits for `_queued`). Across the PUT only attributes may change
        (set_meta, no lock): `_done` keeps them dirty as a completion does."""
        try:
            etag = await self._store.put(self.key, part.payload() if part else b"", options)
            self.stored_meta = dict(options.metadata)
        except FsError as exc:
            self.queue_failed = True
            self._fail(FsError(f"its queued upload failed ({error_reason(exc)}); close() had "
                               "returned, so only an fsync or a later close of it reports "
                               "this: write the file again", exc.errno))
            return False
        else:
            self._done(etag, version)
            return True
        finally:
            if part is not None:
                part.idle.set()
                self._unpin(part)
            self.completing = False
            stored, self._queued = self._queued, None
            stored.set()

    def set_meta(self, meta: FileMeta) -> None:
        if meta == self.meta:
            return
        # the kernel's writeback sends its own "now" mtime after the last write: kept in
        # memory only (the stored mtime is the writer's start), not worth a server-side copy
        # of a complete object; an explicit time, a mode or an owner is
        kernel_time = not meta.mtime_explicit and dataclasses.replace(
            meta, mtime_ns=self.meta.mtime_ns, ctime_ns=self.meta.ctime_ns,
            mtime_explicit=self.meta.mtime_explicit) == self.meta
        self.meta = meta
        if not kernel_time:
            self._meta_version += 1
        if self.state is not State.COMPLETE:
            self.changed = True
        elif not kernel_time:
            self._meta_dirty = True  # rewritten server-side at the next flush or release

    async def move(self, key: str, name: str, copy: Callable[[int], Awaitable[str]],
                   content_type: str | None = None) -> None:
        """Rename: complete what changed, let `copy(size)` move the object (it returns the new
        ETag) and continue from it under the new key (and the new name's content type)."""
        async with self._request():
            if self.state is State.WRITING and self.changed:
                await self._sticky(self._complete())
            if self.state is not State.DETACHED:
                etag = await copy(self.size)
                self.base = Base(etag, self.size)
                self.stored_meta = None  # what the copy stored is the namespace's choice
            self.key, self.name = key, name
            if content_type is not None:
                self._content_type = content_type

    async def detach(self) -> None:
        """The object was deleted or replaced (unlink, a rename over the file) while open:
        abort the upload, keep accepting writes and drop them. Called only once S3 did that
        (a refused delete or copy leaves the writer as it was); waits for a completion in
        progress, after which nothing of this writer reaches S3."""
        async with self._lock:
            await self.wait_stored()  # a queued upload ends first (then deleted again)
            segments = await self._drop_all_parts()  # (uploads in flight end first)
            session, self._session = self._session, None
            self.base = None
            self.state = State.DETACHED
            if session is not None:
                await session.abort(self.name)  # a failure is a warning: the file is gone
            await self._spill.delete(segments)

    async def release(self) -> None:
        """The last handle closed: free memory; an unfinished upload stays for recovery."""
        async with self._lock:
            await self.wait_stored()  # (`OpenFiles` waits for it before; this is a guard)
            try:
                segments = await self._drop_all_parts()
                # a failure logged its cause and what is left already (`_fail`)
                if self.changed and self.state in (State.WRITING, State.FAILED) and \
                        self.error is None:
                    kept = (f"its multipart upload {self._session.upload_id[:16]} is left in "
                            "S3: run 's3stream recover' to complete or abort it"
                            if self._session is not None else "nothing was stored")
                    log.error("%s: closed without a successful completion; %s", self.name, kept)
                await self._spill.delete(segments)
            finally:
                self._budget.unregister(self)

    def stop(self) -> None:
        """The mount is stopping (a signal, once requests had their time): server-side copies
        of a completion in progress (a sparse file's zero parts, a large base) end now and the
        file fails, its upload left for `s3stream recover`. No lock: it must not wait for the
        request it stops."""
        if self._copies is not None:
            self._copies.cancel()

    @property
    def meta_dirty(self) -> bool:
        """Attributes changed after the object was complete (touch, chmod through a handle)."""
        return self._meta_dirty

    @property
    def holds(self) -> int:
        """Bytes of memory this writer holds (for tests and status)."""
        return sum(part.reserved for part in self._parts.values())

    # -- the request frame ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _request(self, wait_queued: bool = True):
        """Lock the writer for one request: a failed writer answers at once, and budget the
        request reserved but did not put into a part goes back when it ends. A queued upload
        of the file ends first unless `wait_queued` is False (a read)."""
        async with self._lock:
            try:
                if wait_queued:
                    await self.wait_stored()
                if self.error is not None and self.state is not State.DETACHED:
                    raise FsError("", self._failure_errno())
                yield
            finally:
                self._budget.release(self._credit)
                self._credit = 0

    def _reopen(self) -> None:
        """A change to a completed object continues it (its bytes are the base)."""
        if self.state is State.COMPLETE:
            self.state = State.WRITING
            # new bytes: modified now (a time the program sets afterwards still wins)
            self.meta = dataclasses.replace(self.meta, mtime_ns=time.time_ns(),
                                            mtime_explicit=False)
        self.changed = True
        if self._unsynced_since is None:
            self._unsynced_since = time.monotonic()

    # -- writing -----------------------------------------------------------------------

    def _check_size(self, size: int) -> None:
        """A size past the largest object the part schedule allows is refused before anything
        changes: growing toward it would stream zeros into the bucket until the limit."""
        if size > self._schedule.max_object_size:
            raise FsError(f"{self.name}: {size} bytes is past the largest object this mount "
                          f"can write ({self._schedule.max_object_size} bytes); raise "
                          "max_memory or part_size to allow larger files", errno.EFBIG)

    def _locate(self, position: int) -> tuple[int, int]:
        try:
            return self._schedule.locate(position)
        except ValueError as exc:
            raise FsError(f"{self.name}: {exc}; raise max_memory or part_size to allow "
                          "larger files", errno.EFBIG) from None

    async def _fill_zeros(self, target: int) -> None:
        """Grow to `target` with zeros, as a local file would, moving no zeros through the
        daemon: the part holding the old end is zero-filled in memory, the parts wholly
        inside the gap join `_zeros` (no buffer, copied server-side at completion), the part
        holding the new end holds its zeros. At most two parts of zeros pass through memory
        however large the gap (`truncate -s 50G` returns at once)."""
        number, within = self._locate(self.size)
        if within:
            await self._zero_to(min(target, self._schedule.start(number)
                                    + self._schedule.size(number)))
            number += 1
        # across the awaits above: the size moved only forward, to the end of `number - 1`
        while self.size < target:
            end = self._schedule.start(number) + self._schedule.size(number)
            if end > target:
                break
            self._zeros.add(number)
            self.size = end
            number += 1
        await self._zero_to(target)

    async def _zero_to(self, target: int) -> None:
        """Zeros in memory from the end to `target` (within one part)."""
        while self.size < target:
            take = min(target - self.size, len(ZERO_CHUNK))
            await self._write_at(self.size, memoryview(ZERO_CHUNK)[:take])

    async def _write_at(self, offset: int, view: memoryview) -> None:
        position = offset
        while view:
            number, within = self._locate(position)
            room = self._schedule.size(number) - within
            chunk, view = view[:room], view[room:]
            await self._write_into(number, within, chunk)
            position += len(chunk)
            self.size = max(self.size, position)

    async def _write_into(self, number: int, within: int, chunk: memoryview) -> None:
        if self._rewriting is not None and self._rewriting != number:
            await self._upload_rewritten()
        end = within + len(chunk)
        while True:
            part = await self._hold(number, within)
            needed = part.room(end)
            if needed <= part.reserved + self._credit:
                break
            if not part.reserved and not part.in_memory and not part.mem_start \
                    and (number > 1 or end > GRAIN) \
                    and self._budget.try_acquire(part.capacity):
                # memory is plentiful: a whole (recycled) buffer, no growing, no page faults.
                # Not for a file's first small write: a 4 KiB file would zero 8 MiB (2/3 of
                # the daemon's time in `cp -r` of small files)
                part.buf = self._budget.buffer(part.capacity)
                part.reserved = part.capacity
                break
            part.pins -= 1  # no pins while waiting for memory (the reclaimer may take it)
            # Across the wait the reclaimer may drop or spill the part; `_hold` then loads
            # or gathers it with memory of its own, never this credit, and the part comes
            # back as buffer [0, length) reserving `length`, however often that happens. The
            # credit only grows meanwhile, so once it was reserved against the part in that
            # state it covers the write: at most a second wait, no GET-and-drop loop
            deficit = needed - part.reserved - self._credit
            room = part.capacity - part.mem_start - part.reserved - self._credit
            await self._reserve(min(max(deficit, -(-deficit // GRAIN) * GRAIN), room))
        taken = max(0, needed - part.reserved)
        self._credit -= taken
        part.reserved += taken
        was_full = part.full
        part.put(within, chunk)
        self.size = max(self.size, self._schedule.start(number) + end)
        self._unpin(part)
        if part.full and (number != 1 or self._session is None or not self._session.has(1)):
            # (part 1 once: a recorder patches its header there, completion uploads it again)
            if not was_full:
                await self._seal(number)  # it filled: streaming uploads it at once
            else:
                # a full part changed again (a part of the base, a rewrite): the next write
                # likely lands here too, so it goes up once the writes move on. The session
                # exists meanwhile, so that the reclaimer can upload it instead of spilling
                self._rewriting = number
                await self._ensure_session()

    async def _upload_rewritten(self) -> None:
        """The writes moved on from the full part they were changing: upload it now."""
        number, self._rewriting = self._rewriting, None
        # across `_seal`'s awaits the reclaimer may upload or spill the part: it looks again
        part = self._parts.get(number)
        # gone, cut short, stored already (fsync, a completion, the reclaimer), or part 1
        # in the session (changed again, it goes up at completion): nothing to do
        if part is not None and part.full and part.stored is None and not (
                number == 1 and self._session is not None and self._session.has(1)):
            await self._seal(number)

    async def _reserve(self, amount: int) -> None:
        """Raise this request's credit by `amount` (the caller holds no pins). Refused
        (ENOSPC) when nothing can make room, spilling being impossible: the file fails (its
        bytes so far are lost to the object, which is never completed without them) and
        the reclaimer frees its memory for the others.

        It never waits holding credit: when the amount is not free at once, the credit goes
        back to the budget and the new total is waited for in one piece. Credit is memory
        the reclaimer cannot take (it is in no part), so writers each holding some while
        waiting for more could hold the budget between them for good (6 writers in 12 MiB,
        each with 5 MiB of credit and waiting for a part's 5 MiB to gather it). Waiting with
        nothing of its own but idle, unpinned parts (which the reclaimer can drop, upload or
        spill), every request in line is granted in turn: what is not free is held by
        requests that are not waiting for memory and end on their own, or by parts the
        reclaimer frees (ENOSPC instead when they can only be spilled and spilling is
        impossible). The credit of a request that waits stays at most about a part's size
        (`_load`, `_gather` and growing a part each need at most the part's capacity)."""
        if self._budget.try_acquire(amount):  # nobody in line: holding meanwhile is harmless
            self._credit += amount
            return
        total, self._credit = self._credit + amount, 0
        self._budget.release(total - amount)  # the head of the line may take it
        try:
            await self._budget.acquire(total, self.name)
        except FsError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise self._fail(FsError(f"{exc}; {self._spill.why_not()}", errno.ENOSPC)) from None
        self._credit = total

    async def _seal(self, number: int) -> None:
        part = self._parts.get(number)
        if part is None or part.stored is not None:
            return  # the reclaimer uploaded it already
        part = await self._hold(number, 0)
        try:
            await self._ensure_session()
            if part.stored is None and not part.busy:
                await self._start_upload(part)
        finally:
            self._unpin(part)

    async def _shrink(self, size: int) -> None:
        number, within = self._locate(size - 1)
        part = await self._hold(number, within + 1)
        part.cut(within + 1)
        self._unpin(part)
        self.size = size
        segments: list[Segment] = []
        for later in [p for n, p in self._parts.items() if n > number]:
            while later.busy:  # re-checked after every wait: a spill may start meanwhile
                await later.idle.wait()
            if self._parts.get(later.number) is later:
                segments += later.segments
                self._free(later)
        await self._spill.delete(segments)

    async def _reset(self) -> None:
        segments = await self._drop_all_parts()
        if self._session is not None:
            await self._session.abort(self.name)
            self._session = None
        self.base = None
        self.size = 0
        self._zeros.clear()
        await self._spill.delete(segments)

    # -- where part bytes are --------------------------------------------------------------

    async def _hold(self, number: int, within: int) -> Part:
        """Part `number` in memory, idle and pinned (the caller unpins), its buffer reaching
        back to byte `within`: loaded, gathered or rebased as `where` in the docstring says."""
        while True:
            self._check_failed()  # a failed writer's parts may be freed across any await
            part = self._parts.get(number)
            if part is not None:
                if part.busy:
                    part.pins += 1  # keep it in memory once its upload is done: we change it
                    try:
                        await part.idle.wait()
                    finally:
                        part.pins -= 1  # we look again at once
                    continue
                if within < part.mem_start:
                    await self._gather(part)
                    continue
                part.pins += 1
                return part
            start = self._schedule.start(number)
            if start >= self.size:
                self._parts[number] = Part(number, self._schedule.size(number))
            elif number in self._zeros:
                await self._load_zeros(number)
            elif (self._session is not None and self._session.has(number)
                  and number not in self._session.copied):
                await self._rebase("changing bytes already uploaded")
            elif self.base is not None and start < self.base.size:
                await self._load(number)
            else:
                raise FsError(f"{self.name}: bytes at offset {start} are lost (part {number} "
                              "is neither held nor stored)", errno.EIO)

    async def _read_part(self, number: int, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) of part `number` for a reader, without holding them.

        Bytes uploaded to the open upload and freed: S3 cannot read them back from there, so
        the upload is completed as it stands (`_rebase`, under this request's lock) and they
        are read from that object, the new base. Every byte written so far is then readable
        from S3, so a reader behind the writer forces this again only once it passes what was
        written by then; and each time it does, the part kept for readers doubles (see
        `_kept_for_readers`): a player that lags a recording by a steady amount costs a few
        completions, not one per part (each copies every earlier part server-side)."""
        while True:
            part = self._parts.get(number)
            if part is not None:
                # the held bytes first, with no await: the reclaimer may spill them afterwards
                split = min(max(start, part.mem_start), end)
                held = bytes(part.view(split, end)) if split < end else b""
                pieces = [await self._spill.read(segment, max(start, segment.start),
                                                 min(split, segment.end))
                          for segment in list(part.segments)
                          if segment.start < split and segment.end > start]
                return b"".join([*pieces, held])
            if number in self._zeros:
                return bytes(end - start)  # a gap of a grow: no request
            if self._session is None or not self._session.has(number) or \
                    number in self._session.copied:
                break
            self._reader_window = max(self._reader_window,
                                      min(2 * self._reader_window, self._budget.limit // 2))
            self.reader_rebases += 1
            await self._rebase("a reader needs bytes already uploaded")
            # across the completion the reclaimer may have dropped or spilled the part again
            # (it is in the base now): look again
        first = self._schedule.start(number)
        if self.base is None or first + end > self.base.size:
            raise FsError(f"{self.name}: bytes at offset {first + start} are lost (part "
                          f"{number} is neither held nor stored)", errno.EIO)
        try:
            return await self._store.get_range(self.key, first + start, first + end,
                                               self.base.etag)
        except PreconditionFailed:
            # a read of an object changed by another client: ESTALE, as for any reader
            raise FsError(f"{self.name}: the object was replaced by another client while "
                          "open here", errno.ESTALE) from None

    async def _load_zeros(self, number: int) -> None:
        """A part of a zero gap about to change: a buffer of its zeros, as `_load` would."""
        length = self._schedule.size(number)  # gap parts are whole parts
        if self._credit < length:
            await self._reserve(length - self._credit)
        # across the wait: `_zeros` and the size change only under our lock; the reclaimer
        # touches parts in `_parts` alone
        self._zeros.discard(number)
        self._parts[number] = Part(number, length, bytearray(length), reserved=length,
                                   length=length)
        self._credit -= length

    async def _load(self, number: int) -> None:
        """Bring a part of the base into memory (a ranged GET pinned to the base's ETag)."""
        start = self._schedule.start(number)
        length = min(start + self._schedule.size(number), self.size, self.base.size) - start
        # its own memory on top of the request's credit, which is what a write reserved to
        # grow the part past the base: taken for the load, the write would wait for it
        # again, unpinned, and the reclaimer would drop the loaded part (stored in the base)
        # to grant it -- or spill a gathered one again: a GET and a drop (or a spill) in a
        # loop for as long as memory stays short. `_reserve` waits for both in one piece,
        # holding neither (no hold-and-wait). Across the wait: `_parts[number]` is created
        # only under our lock, and the size and base change only under it too
        await self._reserve(length)
        part = self._parts[number] = Part(number, self._schedule.size(number),
                                          bytearray(length), reserved=length)
        self._credit -= length
        part.idle = trio.Event()
        try:
            await self._base_call(read_into(self._store, self.key, start, start + length,
                                            self.base.etag, part.buf))
        except BaseException:
            part.idle.set()
            self._free(part)
            raise
        part.idle.set()
        part.length = length
        part.stored = "base"

    async def _gather(self, part: Part) -> None:
        """Bring a part's spilled segments back into one buffer with its held tail."""
        length = part.length  # (what is reserved: given back as it was if the part changed)
        await self._reserve(length)  # its own memory, not the write's: see `_load`
        # across the wait the reclaimer may have started spilling the held tail (busy; the
        # tail is spilled then, so it cannot happen twice), or a failure freed the part
        if self._parts.get(part.number) is not part or part.busy or not part.segments:
            # the caller looks again: this memory goes back, or a second gather would
            # wait for the part's length again on top of it, holding it
            self._credit -= length
            self._budget.release(length)
            return
        whole = (self._budget.buffer(part.capacity) if part.length == part.capacity
                 else bytearray(part.length))
        part.idle = trio.Event()
        segments = list(part.segments)
        try:
            for segment in segments:
                await self._spill.read_into(segment, memoryview(whole)[segment.start:
                                                                      segment.end])
        except FsError as exc:
            raise self._fail(FsError(f"{self.name}: could not read back spilled bytes: {exc}")) from None
        finally:
            part.idle.set()
        whole[part.mem_start:part.length] = part.view(part.mem_start, part.length)
        self._budget.release(part.reserved)
        self._credit -= part.length
        part.buf, part.reserved, part.mem_start, part.segments = whole, part.length, 0, []
        await self._spill.delete(segments)

    async def _base_call(self, awaitable):
        try:
            return await awaitable
        except PreconditionFailed:
            raise FsError(f"{self.name}: the object was replaced by another client while open "
                          "here; this file's changes cannot be applied to it", errno.EIO) from None

    # -- uploading ---------------------------------------------------------------------

    def _options(self, with_mtime: bool) -> PutOptions:
        """Our metadata and what the object carries (a copy onto itself keeps its tags)."""
        return rewrite_options(self.meta.to_headers(with_mtime), self._kept,
                               self._content_type, self._tags)

    async def _new_object_options(self) -> PutOptions:
        """`_options` for a new upload or put, which keeps no tags unless sent: those of
        the object continued, read the first time they are needed (one GetObjectTagging,
        only when its HEAD counted some)."""
        if self._kept is not None and self._kept.tag_count and self._tags is None:
            try:
                # across the await: only this writer's own state, under its lock
                self._tags = await self._store.get_tags(self.key)
            except AccessDenied as exc:
                self._tags = ""
                log.warning("%s: its tags cannot be read (%s; s3:GetObjectTagging is "
                            "needed): stored again without them", self.name, exc)
        return self._options(with_mtime=True)

    async def _ensure_session(self) -> None:
        if self._session is None:
            # every object carries its mtime: the upload's start unless the program sets one
            options = await self._sticky(self._new_object_options())
            self._session = await self._sticky(UploadSession.start(self._store, self.key,
                                                                   options))

    async def _start_upload(self, part: Part) -> None:
        """Upload a whole, idle part to the session; returns once a worker has taken it."""
        session = self._session
        version = part.version
        part.idle = trio.Event()  # busy: nobody changes, spills or frees the buffer
        assert part.whole
        data = part.payload()

        async def job() -> None:
            self.parts_in_flight += 1
            try:
                await session.upload(part.number, data)
            except FsError as exc:
                if not session.closed:
                    self._fail(exc)
            else:
                self.parts_uploaded += 1
                self.bytes_uploaded += len(data)
                if part.version == version and self._session is session:
                    part.stored = "session"
            finally:
                self.parts_in_flight -= 1
                part.idle.set()
                self._free_if_done(part)
                if self.readers:  # an earlier part may have left the readers' window
                    self._free_unkept()

        try:
            await self._pool.submit(job)
        except BaseException:
            part.idle.set()
            raise

    async def _copy_from_base(self, number: int, last: int,
                              limiter: trio.CapacityLimiter) -> None:
        """Put part `number` of the base into the session server-side. Copies move no
        bytes through the daemon: they run COPY_CONCURRENCY at a time, beside the pool's
        uploads (an append to a 1 GiB object copies 128 parts)."""
        session = self._session
        base = self.base
        start = self._schedule.start(number)
        end = min(start + self._schedule.size(number), self.size) if number == last else \
            start + self._schedule.size(number)
        async with limiter:
            try:
                await self._base_call(session.copy(number, self.key, start, end, base.etag))
            except FsError as exc:
                if not session.closed:
                    self._fail(exc)
            else:
                self.parts_copied += 1

    async def _copy_zeros(self, number: int, limiter: trio.CapacityLimiter) -> None:
        """Put part `number`, all zeros (`_zeros`), into the session server-side: a copy of
        the mount's zero object of the part's size (created the first time it is needed)."""
        session = self._session
        size = self._schedule.size(number)
        async with limiter:
            try:
                key, etag = await self._spill.zeros.source(size)
            except FsError as exc:
                if not session.closed:
                    self._fail(FsError(f"{self.name}: could not create {self._spill.zeros.root}"
                                       f"{size}, the zeros of its sparse parts ({exc}); allow "
                                       "PutObject and GetObject there"))
                return
            try:
                await session.copy(number, key, 0, size, etag)
            except FsError as exc:
                if not session.closed:
                    self._fail(exc)
                return
            if not session.closed:
                session.copied.discard(number)  # not readable from the base
                session.zeros.add(number)
                self.parts_copied += 1

    def _unpin(self, part: Part) -> None:
        part.pins -= 1
        self._free_if_done(part)

    def _free_if_done(self, part: Part) -> None:
        """Free a stored part (after its upload, or once the last request using it let go)
        unless it is worth keeping -- part 1 for header patches, the part still filling, a
        part of the base (an in-place change: the kernel's page reads and the writes that
        follow, and readers, find it held instead of loading it again or, once uploaded,
        completing the object to read it back) -- and memory is not short."""
        keep = part.number == 1 or part.number == self._last_part() and not part.full \
            or self.base is not None and self._schedule.start(part.number) < self.base.size \
            or self._kept_for_readers(part)
        if self._droppable(part) and (self._budget.under_pressure or not keep) \
                and self._parts.get(part.number) is part:
            self._free(part)

    def _kept_for_readers(self, part: Part) -> bool:
        """A read-only handle is open and the part lies in the last `_reader_window` bytes:
        a reader following the writer (a player behind a recording) finds it in memory, and
        its pages stay in the kernel's cache, instead of forcing a completion to read it.
        Such parts are droppable: the reclaimer frees them first when memory is short."""
        return self.readers > 0 and \
            self._schedule.start(part.number) + part.capacity > self.size - self._reader_window

    def _free_unkept(self) -> None:
        """Free the stored parts no longer worth keeping (no lock: as the reclaimer)."""
        for part in list(self._parts.values()):
            self._free_if_done(part)

    def reader_closed(self) -> None:
        """A read-only handle closed (OpenFiles): with the last one, the parts kept for
        readers go."""
        self.readers -= 1
        if not self.readers:
            self._free_unkept()

    def _last_part(self) -> int:
        return self._locate(self.size - 1)[0] if self.size else 1

    async def _materialize(self) -> None:
        """Every part 1..last in the session: held ones uploaded, base ones copied."""
        last = self._last_part()
        await self._ensure_session()
        session = self._session
        limiter = trio.CapacityLimiter(COPY_CONCURRENCY)
        self._copies = stoppable = trio.CancelScope()
        try:
            with stoppable:
                await self._put_all(last, session, limiter)
        finally:
            self._copies = None
        if stoppable.cancelled_caught:
            raise self._fail(FsError(f"{self.name}: the mount is stopping: its completion "
                                     "was interrupted", errno.EIO))
        for part in list(self._parts.values()):
            await part.idle.wait()
        self._check_failed()
        self._unsynced_since = None

    async def _put_all(self, last: int, session: UploadSession,
                       limiter: trio.CapacityLimiter) -> None:
        """`_materialize`'s loop: uploads handed to the pool, copies run here."""
        try:
            async with trio.open_nursery() as copies:
                for number in range(1, last + 1):
                    if number in self._parts:
                        part = await self._hold(number, 0)
                        try:
                            if part.stored != "session" or not session.has(number):
                                await self._start_upload(part)
                        finally:
                            self._unpin(part)
                    elif number in self._zeros:
                        if number not in session.zeros:
                            copies.start_soon(self._copy_zeros, number, limiter)
                    elif not session.has(number):
                        if self.base is None or self._schedule.start(number) >= self.base.size:
                            raise FsError(f"{self.name}: part {number} is neither held nor "
                                          "stored", errno.EIO)
                        copies.start_soon(self._copy_from_base, number, last, limiter)
        except* FsError as group:  # raised in the nursery's body too: not as a group
            raise first_error(group) from None

    async def _complete_upload(self) -> str:
        await self._materialize()
        last = self._last_part()
        sizes = [self._schedule.size(n) for n in range(1, last)]
        sizes.append(self.size - self._schedule.start(last))
        session = self._session
        etag = await session.complete(sizes, self.name)
        self._session = None
        wanted = self._options(with_mtime=True)
        stored = session.options.metadata
        if not self.meta.mtime_explicit:  # a "now" from the kernel: the start time stays
            wanted.metadata["mtime"] = stored.get("mtime", "")
        self.stored_meta = dict(stored)
        if _without_ctime(wanted.metadata) != _without_ctime(stored):
            # chmod/chown/utimes while writing: rewrite the metadata server-side
            self.stored_meta = None  # unknown until that copy answers
            etag = await self._store.copy(self.key, self.key, wanted, self.size, etag)
            self.stored_meta = dict(wanted.metadata)
        return etag

    async def _put_small(self) -> str:
        """A file of at most one part is one PutObject (its metadata with it)."""
        options = await self._new_object_options()
        if self.size == 0:
            etag = await self._store.put(self.key, b"", options)
            self.stored_meta = dict(options.metadata)
            return etag
        part = await self._hold(1, 0)
        assert part.whole
        part.idle = trio.Event()
        try:
            etag = await self._store.put(self.key, part.payload(), options)
            self.stored_meta = dict(options.metadata)
            return etag
        finally:
            part.idle.set()
            self._unpin(part)

    async def _complete(self) -> None:
        version = self._meta_version  # set_meta takes no lock: it may come during the awaits
        self.completing = True
        try:
            if self._session is None and self._last_part() == 1:
                etag = await self._put_small()
            else:
                etag = await self._complete_upload()
        finally:
            self.completing = False
        self._done(etag, version)

    def _done(self, etag: str, version: int) -> None:
        """The object at the key holds every byte (`version`: of the attributes stored)."""
        self._became_base(etag)
        self.state = State.COMPLETE
        self.changed = False
        self._unsynced_since = None
        # attributes changed while completing may not be in what was stored
        self._meta_dirty = version != self._meta_version
        if self._on_complete:
            self._on_complete(etag, self.size)

    async def _rebase(self, why: str) -> None:
        """Complete the upload as it stands so that its parts can be read back (the base).

        Needed to change or read bytes that were uploaded and freed. Until the final
        completion the object shows the bytes written so far; a recorder's header patch under
        memory pressure costs this one server-side copy of the file.
        """
        log.info("%s: %s: completing the upload at %d bytes and continuing from the stored "
                 "object", self.name, why, self.size)
        etag = await self._sticky(self._complete_upload())
        self._became_base(etag)

    def _became_base(self, etag: str) -> None:
        """The object at the key now holds every byte: held parts are stored there."""
        self.base = Base(etag, self.size)
        self._session = None
        self.stores += 1
        last = self._last_part()
        for part in list(self._parts.values()):
            part.stored = "base"
            if part.number not in (1, last) and self._droppable(part) \
                    and not self._kept_for_readers(part):
                self._free(part)

    async def _rewrite_meta(self) -> None:
        """The object is complete but its attributes changed: a server-side copy onto itself."""
        version = self._meta_version  # set_meta takes no lock: it may come during the copy
        options = self._options(with_mtime=True)
        try:
            # onto the object this writer stored, never another client's replacement
            etag = await self._store.copy(self.key, self.key, options,
                                          self.size, self.base.etag if self.base else None)
        except (NotFound, PreconditionFailed):
            # removed (an unlink racing this last close: it detaches the writer once its
            # DELETE is done) or replaced by another client: the attributes belonged to an
            # object that is no longer there, and nothing is left to store them on
            log.info("%s: removed or replaced before its new attributes were stored",
                     self.name)
            self._meta_dirty = False
            self.stored_meta = None  # the object at the key is not ours
            return
        except FsError as exc:  # S3's AccessDenied stays EACCES, anything else is EIO
            raise FsError(f"{self.name}: could not store new attributes: {exc}",
                          exc.errno if exc.errno == errno.EACCES else errno.EIO) from None
        self.base = Base(etag, self.size)
        self.stores += 1
        self.stored_meta = dict(options.metadata)
        self._meta_dirty = version != self._meta_version
        if self._on_complete:
            self._on_complete(etag, self.size)

    # -- memory: what the reclaimer may do (no lock; see the module docstring) -------------

    def _droppable(self, part: Part) -> bool:
        """Its bytes can come back from S3: idle, unpinned, stored where the writer can read
        (the base, or the session for full parts: a short one there is a provisional tail
        that only a spill keeps readable)."""
        return (not part.busy and not part.pins and part.whole and part.stored is not None
                and (part.stored == "base" or part.full))

    def drop_stored(self) -> None:
        failed = self.state is State.FAILED  # nothing of it will be stored: free it all
        for part in list(self._parts.values()):
            if failed and not part.busy and not part.pins:
                self._dead_segments += part.segments  # deleted at release
                self._release_buffer(part)
                self._parts.pop(part.number, None)
            elif self._droppable(part):
                self._free(part)

    def busy(self) -> bool:
        return any(part.busy for part in self._parts.values())

    def pinned(self) -> bool:
        return any(part.pins for part in self._parts.values())

    def blocked(self) -> bool:
        return self.state is not State.FAILED and not self._spill.ready() and any(
            not part.busy and not part.pins and part.in_memory and not self._droppable(part)
            and not self._uploadable(part) for part in self._parts.values())

    def eviction_candidate(self) -> tuple[int, float, Part] | None:
        if self.state is State.FAILED:
            return None  # `drop_stored` frees its parts
        best = None
        spill = self._spill.ready()
        for part in self._parts.values():
            if part.busy or part.pins or not part.in_memory or self._droppable(part):
                continue
            cost = 0 if self._uploadable(part) else 1
            if cost and not spill:
                continue  # paused after a refusal, or off: `blocked` tells the budget
            if best is None or (cost, part.last_used) < best[:2]:
                best = (cost, part.last_used, part)
        return best

    def _uploadable(self, part: Part) -> bool:
        return part.full and part.whole and self._session is not None \
            and not self._session.closed

    async def evict(self, part: Part) -> None:
        if part.busy or part.pins or self._parts.get(part.number) is not part:
            return
        if self._uploadable(part):
            await self._start_upload(part)
        else:
            await self._spill_part(part)

    async def _spill_part(self, part: Part) -> None:
        """Move a part's held bytes to a temporary object and free its buffer."""
        part.idle = trio.Event()
        try:
            data = part.payload()
            segment = await self._spill.put(data, part.mem_start)
        except FsError as exc:  # the spill area logs refusals (at most one line a minute)
            log.debug("%s: could not spill %d bytes: %s", self.name, part.in_memory, exc)
        else:
            part.segments.append(segment)
            part.mem_start = part.length
            self._release_buffer(part)
            self._budget.spills += 1
            log.debug("%s: spilled bytes %d-%d of part %d to free memory", self.name,
                      segment.start, segment.end, part.number)
        finally:
            part.idle.set()

    def _release_buffer(self, part: Part) -> None:
        self._budget.release(part.reserved)
        if len(part.buf) == part.capacity:
            self._budget.recycle(part.buf)
        part.buf = bytearray()
        part.reserved = 0

    def _free(self, part: Part) -> None:
        assert not part.busy, "freeing a part whose buffer is in use"
        if part.stored is not None and part.full and self._drop_pages:
            self._drop_pages(self._schedule.start(part.number), part.length)
        self._release_buffer(part)
        self._parts.pop(part.number, None)

    async def _drop_all_parts(self) -> list[Segment]:
        """Free every part once no upload runs; their spilled segments are returned for the
        caller to delete."""
        while any(part.busy for part in self._parts.values()):
            await next(p for p in self._parts.values() if p.busy).idle.wait()
        segments = [segment for part in self._parts.values() for segment in part.segments]
        segments += self._dead_segments
        self._dead_segments = []
        for part in list(self._parts.values()):
            self._release_buffer(part)
        self._parts.clear()
        return segments

    # -- failure ---------------------------------------------------------------------------

    async def _sticky(self, awaitable):
        """Await a step whose failure fails the whole file (logged once, kept for later)."""
        try:
            return await awaitable
        except FsError as exc:
            raise self._fail(exc) from None

    def _fail(self, exc: FsError) -> FsError:
        if self.error is None:
            kept = (" Its multipart upload is left in S3: 's3stream recover' can complete or "
                    "abort it." if self._session is not None else "")
            log.error("%s: the object is not written: %s.%s", self.name, exc, kept)
            self.error = exc
            self.state = State.FAILED
        return FsError("", self._failure_errno())

    def failure_errno(self) -> int:
        return self._failure_errno()

    def _failure_errno(self) -> int:
        # a refused write (AccessDenied: the policy changed since the mount's check) is EACCES
        return self.error.errno if self.error.errno in (errno.EFBIG, errno.ENOSPC,
                                                        errno.EACCES) else errno.EIO

    def _check_failed(self) -> None:
        if self.error is not None:
            raise FsError("", self._failure_errno())


def _without_ctime(metadata: dict[str, str]) -> dict[str, str]:
    """ctime alone (moved by the kernel's own time updates) is not worth a server-side copy
    of the whole object; it is stored with the next change that is."""
    return {name: value for name, value in metadata.items() if name != "ctime"}
