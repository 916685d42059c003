"""One file's streaming upload: part buffers, held parts, patching, fsync and completion.

Writes fill the current part ("filling"); a full part is handed to the upload pool at once and
its memory returns to the budget when the upload succeeds. Part 1 is held until the file is
complete, because recorders patch their header there at the end; a write into a part whose
upload is still in flight waits for that upload and re-uploads the part under the same
number. Writes into parts already uploaded and freed fail with EINVAL.

Concurrency rules: every public method takes `self._lock`, so at most one request changes
the writer at a time (trio's Lock is FIFO, which keeps the kernel's write order). Background
upload jobs never touch a buffer they were not given and only record results; a buffer is
not modified while its upload runs (writers wait on `Part.idle`).

States: a writer is "open" (changes not yet complete), "complete" (the object in S3 holds
every byte; part 1 and the tail stay in memory so later writes can continue it), "failed"
(an upload failed after retries: every later call says EIO, the multipart upload is left in
S3 for recovery), or "detached" (the file was unlinked: writes are accepted and dropped).
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .errors import FsError, run_parallel
from .memory_budget import MemoryBudget
from .object_store import ObjectStore, PutOptions, UploadedPart
from .part_schedule import PartSchedule
from .upload_pool import UploadPool

log = logging.getLogger(__name__)

GROW_STEP = 1024 * 1024  # buffers reserve budget in steps of this many bytes
SMALL_FILE = 1024 * 1024  # files up to this size borrow memory without admission
ZERO_CHUNK = bytes(1024 * 1024)


@dataclass
class Part:
    """One part's bytes: `buf[:length]`.

    A small file's part grows as it is written; once its writer is admitted, a part lives in
    a full-size buffer recycled through the budget (no page faults while it fills), and the
    bytes past `length` are leftovers that are never read or uploaded.
    """

    number: int
    capacity: int  # full size by the schedule
    buf: bytearray = field(default_factory=bytearray)
    length: int = 0
    reserved: int = 0  # budget bytes behind `buf`: `own` from the writer's working set, the
    own: int = 0       # rest borrowed from the shared budget
    idle: trio.Event = field(default_factory=trio.Event)  # set while no upload runs
    uploaded_len: int = -1  # length of the last successful upload of this buffer, -1: none
    dirty: bool = True
    pins: int = 0  # writes waiting to patch this part: keep it in memory after its upload

    def __post_init__(self):
        self.idle.set()

    @property
    def full(self) -> bool:
        return self.length == self.capacity

    @property
    def recycled(self) -> bool:
        """`buf` is a full-size buffer from the budget (a growing one stays small: only an
        admitted writer's parts get past SMALL_FILE)."""
        return len(self.buf) == self.capacity

    @property
    def uploading(self) -> bool:
        return not self.idle.is_set()

    def put(self, within: int, chunk: memoryview) -> None:
        """Write at `within` (at most `length`: gaps are zero-filled before)."""
        assert within <= self.length, "a gap inside a part"
        end = within + len(chunk)
        self.buf[within:end] = chunk  # grows a growing buffer; fits a full-size one
        self.length = max(self.length, end)

    def cut(self, length: int) -> None:
        self.length = length
        if not self.recycled:
            del self.buf[length:]

    def move_to(self, buf: bytearray) -> None:
        """Continue in a full-size recycled buffer."""
        buf[:self.length] = memoryview(self.buf)[:self.length]
        self.buf = buf

    def payload(self) -> bytes | bytearray:
        """What an upload sends: the buffer itself when it is all data (nothing changes it
        while the upload runs: writers wait for `idle`), else a copy of the data (botocore
        takes bytes, bytearrays or files, not views)."""
        if self.length == len(self.buf):
            return self.buf
        return bytes(memoryview(self.buf)[:self.length])


@dataclass
class FileMeta:
    """What the completed object carries as x-amz-meta-* (s3fs-fuse's names and formats)."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    mtime_explicit: bool = False  # set by utimes to a time other than "now"

    def to_headers(self, with_mtime: bool = True) -> dict[str, str]:
        headers = {"mode": str(self.mode), "uid": str(self.uid), "gid": str(self.gid)}
        if with_mtime:
            headers["mtime"] = format_mtime(self.mtime_ns)
        return headers


def format_mtime(mtime_ns: int) -> str:
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)
    return f"{seconds}.{nanos:09d}" if nanos else str(seconds)


def parse_mtime(text: str) -> int | None:
    """x-amz-meta-mtime as s3fs-fuse writes it ("1700000000" or "1700000000.123456789")."""
    try:
        seconds, _, fraction = text.strip().partition(".")
        nanos = int((fraction + "000000000")[:9]) if fraction else 0
        return int(seconds) * 1_000_000_000 + nanos
    except ValueError:
        return None


class StreamingWriter:
    def __init__(self, key: str, display_name: str, store: ObjectStore, pool: UploadPool,
                 budget: MemoryBudget, schedule: PartSchedule, meta: FileMeta,
                 content_type: str | None, memory_wait: float,
                 on_complete: Callable[[str, int], None] | None = None,
                 drop_pages: Callable[[int, int], None] | None = None):
        self.key = key
        self.name = display_name
        self._store = store
        self._pool = pool
        self._budget = budget
        self._schedule = schedule
        self.meta = meta
        self._content_type = content_type
        self._memory_wait = memory_wait
        self._on_complete = on_complete
        self._drop_pages = drop_pages  # (start, length) uploaded and out of memory
        self._lock = trio.Lock()
        self.handles = 0  # open file handles sharing this writer (owned by the file system)
        self.started_ns = time.time_ns()
        self.size = 0
        self.state = "open"
        self.changed = True  # a new file is a change: flush must create the object
        self.error: FsError | None = None
        self._parts: dict[int, Part] = {}  # held in memory: part 1, in-flight parts, filling
        self._filling = 1
        self._uploaded: dict[int, UploadedPart] = {}  # last successful upload per number
        self._upload_id: str | None = None
        self._upload_meta: dict[str, str] | None = None
        self._completed_etag: str | None = None
        self._completed_multipart = False
        self._working_set = 0  # admitted: budget reserved for part 1 plus one filling part
        self._meta_dirty = False  # chmod/chown/utimes after completion, not yet in S3
        self._working_free = 0

    # -- public API (each under the lock) ----------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        async with self._lock:
            if self.state == "detached":
                return len(data)
            self._check_failed()
            await self._continue_if_complete()
            if offset > self.size:
                await self._fill_zeros(offset)
            view = memoryview(data)
            position = offset
            while view:
                try:
                    number, within = self._schedule.locate(position)
                except ValueError as exc:
                    raise FsError(f"{self.name}: {exc}; raise max_memory or part_size to allow "
                                  "larger files", errno.EFBIG) from None
                room = self._schedule.size(number) - within
                chunk, view = view[:room], view[room:]
                await self._write_into(number, within, chunk, position)
                position += len(chunk)
            self.size = max(self.size, position)
            self.changed = True
            return len(data)

    async def read_held(self, offset: int, length: int,
                        for_writing: bool = False) -> bytearray:
        """Bytes served from what is still in memory.

        Elsewhere EBUSY for a reader. `for_writing`: the read comes through a handle opened
        for writing, where the kernel reads to complete a page before a partial-page write
        (its cached copy was dropped once uploaded, see page_cache.py). Such a write goes into
        a part no longer held: EINVAL, as the write itself would get. A program reading its
        own output through a read-write descriptor cannot be told apart and gets EINVAL too.
        """
        async with self._lock:
            end = min(offset + length, self.size)
            out = bytearray()
            position = offset
            while position < end:
                number, within = self._schedule.locate(position)
                part = self._parts.get(number)
                if part is None or within >= part.length:
                    if for_writing:
                        raise self._not_held(number, position, "a write next to")
                    raise FsError(f"{self.name}: bytes at offset {position} are being uploaded "
                                  "and no longer held in memory; read after close", errno.EBUSY)
                take = min(end - position, part.length - within)
                out += memoryview(part.buf)[within:within + take]
                position += take
            return out

    async def fsync(self) -> None:
        """Make every byte written so far durable as parts of the open upload."""
        async with self._lock:
            if self.state in ("detached", "complete") or self.size == 0:
                return
            self._check_failed()
            await self._ensure_upload()
            await self._upload_changed_parts()
            self._check_failed()

    async def flush(self) -> None:
        """Complete the object if anything changed since the last completion (EIO if not)."""
        async with self._lock:
            if self.state == "complete" and not self.changed and self._meta_dirty:
                await self._rewrite_meta()
                return
            if self.state == "detached" or not self.changed:
                return
            self._check_failed()
            if self.state == "complete":
                await self._continue_if_complete()
            try:
                await self._complete()
            except FsError as exc:
                self._fail(exc)
            self._check_failed()

    async def truncate(self, size: int) -> None:
        async with self._lock:
            if self.state == "detached":
                return
            self._check_failed()
            if size == self.size:
                self.changed = True
                return
            if size > self.size:
                await self._continue_if_complete()
                await self._fill_zeros(size)
                self.changed = True
                return
            if size == 0:
                await self._reset()
                return
            filling_start = self._schedule.start(self._filling)
            if size < filling_start or self.state == "complete":
                raise FsError(f"{self.name}: cannot shrink a streamed file to {size} bytes "
                              f"(only to 0, or within the part still being written, from "
                              f"{filling_start})", errno.EINVAL)
            part = self._parts[self._filling]
            await part.idle.wait()
            part.cut(size - filling_start)
            part.dirty = True
            self.size = size
            self.changed = True

    def set_meta(self, meta: FileMeta) -> None:
        if meta != self.meta:
            self.meta = meta
            if self.state == "complete":
                self._meta_dirty = True  # rewritten server-side at the next flush or release
            else:
                self.changed = True

    async def detach(self) -> None:
        """The file was unlinked while open: abort the upload, keep accepting writes."""
        async with self._lock:
            await self._wait_uploads()
            if self._upload_id:
                await self._abort_quietly()
            self._free_all()
            self.state = "detached"

    async def release(self) -> None:
        """The last handle closed: free memory; an unfinished upload stays for recovery."""
        async with self._lock:
            await self._wait_uploads()
            if self.state in ("open", "failed") and self._upload_id:
                log.error("%s: closed without a successful flush; its multipart upload %s is "
                          "left in S3: run 's3stream recover' to complete or abort it",
                          self.name, self._upload_id[:16])
            self._free_all()

    # -- writing -----------------------------------------------------------------------

    async def _write_into(self, number: int, within: int, chunk: memoryview,
                          position: int) -> None:
        while number > self._filling:
            # only reached when the filling part is full (gaps were zero-filled)
            await self._seal_filling()
        part = self._parts.get(number)
        if part is None:
            if number == self._filling:
                part = self._parts[number] = Part(number, self._schedule.size(number))
            else:
                raise self._not_held(number, position, f"a write of {len(chunk)} bytes at")
        part.pins += 1
        try:
            await part.idle.wait()
        finally:
            part.pins -= 1
        self._check_failed()
        end = within + len(chunk)
        if end > part.length:
            await self._reserve(part, end)
        if self._working_set and not part.recycled:
            # a full-size buffer is resident in full: reserve all of it before moving in
            await self._reserve(part, part.capacity)
            part.move_to(self._budget.buffer(part.capacity))
        part.put(within, chunk)
        part.dirty = True
        if number != self._filling and number != 1:
            await self._start_upload(part)  # a patched in-flight part goes up again now
        elif number == self._filling and part.full:
            await self._seal_filling()

    def _not_held(self, number: int, position: int, what: str) -> FsError:
        return FsError(
            f"{self.name}: {what} offset {position} goes into part {number}, which is already "
            f"uploaded and no longer held in memory; only part 1 (the first "
            f"{self._schedule.first >> 20} MiB, raise part_size to hold more) and the part "
            "being written can be changed", errno.EINVAL)

    async def _reserve(self, part: Part, needed: int) -> None:
        """Memory for `part` to hold `needed` bytes, without deadlock.

        Small files borrow from the shared budget when it is free. A larger file is admitted
        once: it reserves a working set of part 1 plus one filling part (waiting up to
        `memory_wait`, then ENOMEM). Admitted writers never wait on each other: extra parts
        in flight borrow shared memory when free, otherwise the writer waits for its own
        uploads to hand memory back to its working set.
        """
        if needed <= part.reserved:
            return
        amount = min(part.capacity, max(needed, part.reserved + GROW_STEP)) - part.reserved
        working_set = 2 * self._schedule.first
        # borrowing never leaves less than one working set free, so one admission can
        # always proceed
        if (not self._working_set and needed <= SMALL_FILE
                and self._budget.free - amount >= working_set):
            self._budget.try_acquire(amount)
            part.reserved += amount
            return
        if not self._working_set:
            borrowed = sum(p.reserved for p in self._parts.values())
            # a failure is sticky: the kernel's writeback would otherwise retry page by page
            await self._sticky(self._budget.acquire(working_set - borrowed, self._memory_wait,
                                                    self.name))
            for held in self._parts.values():
                held.own = held.reserved
            self._working_set = working_set
            self._working_free = working_set - borrowed
        while True:
            own = min(amount, self._working_free)
            if own == amount or self._budget.try_acquire(amount - own):
                break
            in_flight = [p for p in self._parts.values() if p.uploading]
            if not in_flight:  # a bigger part than the working set: wait for the budget
                await self._sticky(self._budget.acquire(amount - own, self._memory_wait,
                                                        self.name))
                break
            await in_flight[0].idle.wait()
        self._working_free -= own
        part.own += own
        part.reserved += amount

    async def _fill_zeros(self, target: int) -> None:
        """A write past the end fills the gap with zeros, as a local file would."""
        position = self.size
        while position < target:
            number, within = self._schedule.locate(position)
            take = min(target - position, self._schedule.size(number) - within, len(ZERO_CHUNK))
            await self._write_into(number, within, memoryview(ZERO_CHUNK)[:take], position)
            position += take
        self.size = max(self.size, target)

    async def _seal_filling(self) -> None:
        """The filling part is full: upload it now and start the next one."""
        part = self._parts[self._filling]
        assert part.full
        await self._ensure_upload()
        await self._start_upload(part)
        self._filling += 1

    # -- uploading ---------------------------------------------------------------------

    def _options(self, with_mtime: bool) -> PutOptions:
        return PutOptions(self.meta.to_headers(with_mtime), self._content_type)

    async def _ensure_upload(self) -> None:
        if self._upload_id is None:
            # mtime is the completion time unless the program set it explicitly
            options = self._options(with_mtime=self.meta.mtime_explicit)
            self._upload_id = await self._sticky(self._store.create_upload(self.key, options))
            self._upload_meta = options.metadata
            self._uploaded.clear()

    async def _sticky(self, awaitable):
        """Await a step whose failure fails the whole file (logged once, kept for later)."""
        try:
            return await awaitable
        except FsError as exc:
            self._fail(exc)
            raise FsError(str(exc), self._failure_errno()) from None

    async def _start_upload(self, part: Part) -> None:
        """Upload the part if it changed since its last upload (never overlapping itself)."""
        await part.idle.wait()
        self._check_failed()
        if self._parts.get(part.number) is not part:
            return  # uploaded and freed while we waited
        if not part.length or (not part.dirty and part.uploaded_len == part.length):
            return
        part.idle = trio.Event()
        part.dirty = False
        upload_id = self._upload_id
        length = part.length
        data = part.payload()

        async def job() -> None:
            try:
                result = await self._store.upload_part(self.key, upload_id, part.number, data)
            except FsError as exc:
                self._fail(exc)
            else:
                if upload_id == self._upload_id:
                    self._uploaded[part.number] = result
                    part.uploaded_len = length
                    if (not part.dirty and not part.pins and part.full
                            and part.number not in (1, self._filling)
                            and self._parts.get(part.number) is part):
                        self._free(part)
                        if self._drop_pages:
                            self._drop_pages(self._schedule.start(part.number), length)
            finally:
                part.idle.set()

        await self._pool.submit(job)

    async def _upload_changed_parts(self) -> None:
        """Upload every held part changed since its last upload (an empty one is skipped)."""
        for part in sorted(self._parts.values(), key=lambda p: p.number):
            await self._start_upload(part)
        await self._wait_uploads()

    async def _wait_uploads(self) -> None:
        for part in list(self._parts.values()):
            await part.idle.wait()

    async def _complete(self) -> None:
        await self._wait_uploads()
        self._check_failed()
        tail = self._parts.get(self._filling)
        last = self._filling if tail is not None and tail.length else self._filling - 1
        if self._upload_id is not None and last == 0:
            await self._abort_quietly()  # an fsync'd file truncated to 0: nothing to join
        if self._upload_id is None:
            data = self._parts[1].payload() if 1 in self._parts else b""
            etag = await self._store.put(self.key, data, self._options(with_mtime=True))
            self._completed_multipart = False
        else:
            await self._upload_changed_parts()
            self._check_failed()
            parts = [self._uploaded.get(n) for n in range(1, last + 1)]
            missing = [n for n, p in zip(range(1, last + 1), parts, strict=True) if p is None]
            if missing or not parts:
                raise FsError(f"{self.name}: parts {missing[:5]} of upload never succeeded",
                              errno.EIO)
            for number, part in enumerate(parts[:-1], start=1):
                if part.size != self._schedule.size(number):
                    raise FsError(f"{self.name}: part {number} is {part.size} bytes, expected "
                                  f"{self._schedule.size(number)}", errno.EIO)
            etag = await self._store.complete(self.key, self._upload_id, parts)
            self._completed_multipart = True
            wanted = self._options(with_mtime=self.meta.mtime_explicit)
            if wanted.metadata != self._upload_meta:
                # chmod/chown/utimes while writing: rewrite the metadata server-side
                etag = await self._store.copy(self.key, self.key, wanted, self.size)
        self._upload_id = None
        self._completed_etag = etag
        self.state = "complete"
        self.changed = False
        self._meta_dirty = False
        # keep part 1 and the tail for a later continuation; free anything else
        for number in list(self._parts):
            if number not in (1, self._filling):
                self._free(self._parts[number])
        if self._on_complete:
            self._on_complete(etag, self.size)

    async def _rewrite_meta(self) -> None:
        """The object is complete but its attributes changed: a server-side copy onto itself."""
        try:
            self._completed_etag = await self._store.copy(
                self.key, self.key, self._options(with_mtime=True), self.size)
        except FsError as exc:
            raise FsError(f"{self.name}: could not store new attributes: {exc}",
                          errno.EIO) from None
        self._meta_dirty = False
        if self._on_complete:
            self._on_complete(self._completed_etag, self.size)

    async def _continue_if_complete(self) -> None:
        """Writes after a completed flush continue the object as an append."""
        if self.state != "complete":
            return
        self.state = "open"
        if not self._completed_multipart:
            return  # all bytes are still in part 1: the next flush puts them again
        source_etag = self._completed_etag
        await self._ensure_upload()
        held = set(self._parts)
        copies = [n for n in range(2, self._filling + 1)
                  if n not in held and self._schedule.start(n) < self.size]
        results: dict[int, UploadedPart] = {}

        async def copy(number: int) -> None:
            start = self._schedule.start(number)
            end = min(start + self._schedule.size(number), self.size)
            results[number] = await self._store.upload_part_copy(
                self.key, self._upload_id, number, self.key, start, end, source_etag)

        await self._sticky(run_parallel(functools.partial(copy, n) for n in copies))
        self._uploaded.update(results)
        for part in self._parts.values():
            part.dirty = True
            part.uploaded_len = -1
        log.info("%s: continuing the completed object (%d parts copied server-side)",
                 self.name, len(copies))

    async def _reset(self) -> None:
        await self._wait_uploads()
        if self._upload_id:
            await self._abort_quietly()
        self._free_all()
        self._filling = 1
        self.size = 0
        self.state = "open"
        self.changed = True

    async def _abort_quietly(self) -> None:
        try:
            await self._store.abort(self.key, self._upload_id)
        except FsError as exc:
            log.warning("%s: could not abort upload: %s", self.name, exc)
        self._upload_id = None
        self._uploaded.clear()

    # -- failure and memory ------------------------------------------------------------

    def _fail(self, exc: FsError) -> None:
        if self.error is None:
            kept = (" Its multipart upload is left in S3: 's3stream recover' can complete or "
                    "abort it." if self._upload_id else "")
            log.error("%s: the object is not written: %s.%s", self.name, exc, kept)
            self.error = exc
        self.state = "failed"

    def _failure_errno(self) -> int:
        """ENOMEM/EFBIG for a writer that could not get its memory; EIO for the rest."""
        return self.error.errno if self.error.errno in (errno.ENOMEM, errno.EFBIG) else errno.EIO

    def _check_failed(self) -> None:
        if self.error is not None:
            raise FsError("", self._failure_errno())

    def _free(self, part: Part) -> None:
        self._working_free += part.own
        self._budget.release(part.reserved - part.own)
        if part.recycled:
            self._budget.recycle(part.buf)
        part.reserved = part.own = 0
        part.buf, part.length = bytearray(), 0
        self._parts.pop(part.number, None)

    def _free_all(self) -> None:
        for part in list(self._parts.values()):
            self._free(part)
        self._budget.release(self._working_free)
        self._working_set = self._working_free = 0
