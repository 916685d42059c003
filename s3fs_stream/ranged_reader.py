"""Reads of one open object: ranged GETs with a read-ahead window that grows while reads are
sequential.

The window starts at `initial` bytes and doubles each time the reader consumes a segment,
up to `maximum`; it is fetched as segments of up to SEGMENT_MAX bytes (and half the
reader's share of the budget), several GETs in flight, each of whole 8 MiB pieces or within
one. Reads that land inside the window (the kernel's async reads arrive slightly out of
order) keep the stream; a jump far outside it resets the window, and such random reads fetch
only what they need plus a little. Read-ahead memory comes from the shared budget and is
only taken when free, at most an equal share per open reader; demand reads never wait (they
take budget when it is free, else they are bytes beside it: one READ's, kept KEEP_BEHIND).

Every GET carries If-Match with the ETag seen at open, so an object replaced under an open
handle gives ESTALE instead of mixed bytes.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass, field

import trio

from .errors import FsError, NotFound, PreconditionFailed
from .memory_budget import MemoryBudget
from .object_store import ObjectStore

log = logging.getLogger(__name__)

# 16 MiB GETs: botocore spends ~2 ms of CPU per call, half of the Python time of a read;
# 8 -> 16 MiB cut the daemon's user CPU per GiB read 0.50 -> 0.35 s (docs/internals.md
# "Where read time goes")
SEGMENT_MAX = 16 * 1024 * 1024
PIECE = 8 * 1024 * 1024  # how objects written in 8 MiB parts are stored (see _extend)
# a random read fetches at least this much: a 4 KiB read costs a 16 KiB GET, not 128 KiB
# (random 4 KiB reads/s 242 -> 256, `scripts/bench --size 256M --only read --skip-peers`);
# a following read nearby joins the stream and starts the read-ahead anyway
RANDOM_MIN = 16 * 1024
KEEP_BEHIND = 2 * 1024 * 1024  # bytes kept before the read position for backward jumps
MIN_SEGMENT = 1024 * 1024  # the smallest read-ahead segment (a kernel READ's size)


@dataclass
class Segment:
    start: int
    end: int
    reserved: int = 0
    buffer: bytearray | mmap.mmap | None = None  # recycled through the budget (read-ahead)
    data: bytes | memoryview | None = None
    error: FsError | None = None
    done: trio.Event = field(default_factory=trio.Event)
    dropped: bool = False


class RangedReader:
    def __init__(self, store: ObjectStore, key: str, name: str, size: int, etag: str,
                 budget: MemoryBudget, nursery: trio.Nursery, initial: int, maximum: int,
                 concurrency: int):
        self._store = store
        self._key = key
        self._name = name
        self.size = size
        self.etag = etag
        self._budget = budget
        self._nursery = nursery
        self._initial = initial
        self._maximum = max(initial, maximum)
        self._concurrency = max(1, concurrency)
        self.window = initial
        self._segments: list[Segment] = []  # contiguous, sorted by start
        self._held = 0  # read-ahead bytes reserved from the budget
        self._closed = False
        budget.readers += 1
        self.requests = 0  # GETs issued (for tests and statistics)

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        if offset >= self.size or length <= 0:
            return b""
        end = min(offset + length, self.size)
        if self._in_stream(offset):
            self._trim(offset)
            self._extend(end)
        elif self._segments and \
                self._segments[0].start - KEEP_BEHIND <= offset < self._segments[0].start:
            return await self._fetch_direct(offset, end)  # a small step back: keep the stream
        else:
            # a new stream or a random read: fetch what is needed plus a little
            self._drop_all()
            self.window = self._initial
            self._add(offset, min(self.size, max(end, offset + RANDOM_MIN)), demand=True)
        return await self._collect(offset, end)

    def close(self) -> None:
        self._drop_all()
        if not self._closed:
            self._closed = True
            self._budget.readers -= 1

    # -- the window ----------------------------------------------------------------------

    @property
    def _stream_end(self) -> int:
        return self._segments[-1].end if self._segments else 0

    def _in_stream(self, offset: int) -> bool:
        """Inside the window, or a little ahead of it: the kernel's concurrent reads arrive
        slightly out of order, and a read just past the window extends it."""
        return bool(self._segments) and (
            self._segments[0].start <= offset <= self._stream_end + self.window)

    def _extend(self, end: int) -> None:
        """Make sure [.., end) is requested and the read-ahead window beyond it is in flight."""
        if end > self._stream_end:
            self._add(self._stream_end, end, demand=True)
        # half the reader's share at most: with a share of 8 MiB (32M, 4 readers) 8 MiB
        # segments fit only when it held nothing, and 3 reads in 4 were demand reads (outside
        # the budget); 4 MiB segments: 4 readers at 32M read faster with 15 MiB less RSS
        segment = min(self.window, SEGMENT_MAX,
                      max(MIN_SEGMENT, self._budget.reader_share // 2 // MIN_SEGMENT * MIN_SEGMENT))
        target = min(self.size, end + self.window)
        in_flight = None
        while self._stream_end < target:
            start = self._stream_end
            if target - start < segment and target < self.size:
                break  # top up in whole segments, not in read-sized slivers
            if in_flight is None:  # counted only when a segment may be added
                in_flight = sum(1 for s in self._segments if not s.done.is_set())
            if in_flight >= self._concurrency:
                break
            # whole pieces, or within one: objects written in 8 MiB parts are stored as
            # 8 MiB chunks, and a GET of parts of two costs the server two whole reads
            stop = min(self.size, start + segment)
            if start % PIECE:
                stop = min(stop, (start // PIECE + 1) * PIECE)
            if not self._add(start, stop, demand=False):
                break  # no memory free for read-ahead right now
            in_flight += 1

    def _trim(self, offset: int) -> None:
        """Drop segments consumed long ago; each consumed segment grows the window."""
        while self._segments and self._segments[0].end <= offset - KEEP_BEHIND:
            segment = self._segments.pop(0)
            self._drop(segment)
            self.window = min(self.window * 2, self._maximum)

    def _add(self, start: int, end: int, demand: bool) -> bool:
        size = end - start
        # demand reads never wait: from the budget when it is free, else beside it (one
        # READ's bytes and the KEEP_BEHIND after them, per reader). Read-ahead: an equal
        # share of the budget per open reader, and only what is free now. The buffer comes
        # with the reservation, a recycled one when idle (`try_acquire_buffer`).
        buffer = None
        if demand or self._held + size <= self._budget.reader_share:
            buffer = self._budget.try_acquire_buffer(size, lazy=True)
        if buffer is None and not demand:
            return False
        reserved = size if buffer is not None else 0
        self._held += reserved
        segment = Segment(start, end, reserved, buffer)
        self._segments.append(segment)
        self.requests += 1
        self._nursery.start_soon(self._fetch, segment)
        return True

    async def _fetch(self, segment: Segment) -> None:
        try:
            segment.data = await self._get(segment.start, segment.end, segment.buffer)
        except FsError as exc:
            segment.error = exc
        except Exception as exc:  # never let a fetch take the mount down
            log.exception("%s: unexpected error reading bytes %d-%d", self._name,
                          segment.start, segment.end)
            segment.error = FsError(f"{self._name}: read failed: {exc!r}")
        finally:
            segment.done.set()
            if segment.dropped:
                self._release_in_task(segment)

    def _release_in_task(self, segment: Segment) -> None:
        """A fetch runs in the mount's nursery: whatever escapes it takes the mount down."""
        try:
            self._release(segment)
        except Exception:
            log.exception("%s: unexpected error releasing the read-ahead of bytes %d-%d",
                          self._name, segment.start, segment.end)

    async def _collect(self, offset: int, end: int) -> bytes | memoryview:
        needed = [s for s in self._segments if s.end > offset and s.start < end]
        for segment in needed:
            await segment.done.wait()
        # No await from here to the reply: a segment's buffer is recycled once it is dropped,
        # so the views below must reach pyfuse3 (which copies them) before anything else runs.
        pieces = []
        for segment in needed:
            if segment.error is not None:
                self._forget(segment)
                raise segment.error
            if segment.data is None:  # dropped by a concurrent jump while we waited
                return await self._fetch_direct(offset, end)
            pieces.append(memoryview(segment.data)[max(offset, segment.start) - segment.start:
                                                   min(end, segment.end) - segment.start])
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(data) != end - offset:  # the window changed under us: read it directly
            return await self._fetch_direct(offset, end)
        return data

    async def _fetch_direct(self, offset: int, end: int) -> bytes:
        self.requests += 1
        return await self._get(offset, end)

    async def _get(self, start: int, end: int, into: bytearray | mmap.mmap | None = None
                   ) -> bytes | memoryview:
        while True:
            key, etag = self._key, self.etag
            try:
                return await self._store.get_range(key, start, end, etag, into=into)
            except (NotFound, PreconditionFailed):
                # across the GET the file was removed and its object set aside (`move`):
                # again from there; else the object is gone or replaced
                if (key, etag) == (self._key, self.etag):
                    raise

    @property
    def key(self) -> str:
        return self._key

    def move(self, key: str, etag: str) -> None:
        """The same bytes now live at `key` (a file removed while open: `Namespace.unlink`).
        GETs in flight against the old key that fail are sent again here (`_get`)."""
        self._key, self.etag = key, etag

    # -- memory ---------------------------------------------------------------------------

    def _forget(self, segment: Segment) -> None:
        """A failed segment leaves the window so that a later read tries again."""
        index = self._segments.index(segment) if segment in self._segments else -1
        if index >= 0:
            for dropped in self._segments[index:]:
                self._drop(dropped)
            del self._segments[index:]

    def _drop_all(self) -> None:
        for segment in self._segments:
            self._drop(segment)
        self._segments.clear()

    def _drop(self, segment: Segment) -> None:
        segment.dropped = True
        if segment.done.is_set():
            self._release(segment)

    def _release(self, segment: Segment) -> None:
        self._held -= segment.reserved
        self._budget.release(segment.reserved)
        if segment.buffer is not None:
            self._budget.recycle(segment.buffer)
        segment.reserved = 0
        segment.buffer = segment.data = None
