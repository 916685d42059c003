"""One part's bytes while the mount holds them: a buffer, and spilled segments before it.

A part is `capacity` bytes when full (its size by the schedule). Its first `mem_start` bytes
may have been spilled to temporary objects in the bucket (`segments`, contiguous from 0) to
free memory; the buffer holds bytes [mem_start, length). Writes append to or change the
buffer; a write before `mem_start`, an upload and a completion first gather the segments back.

A part is *stored* when its current bytes are also in S3 where the writer can read them back
or use them: "session" (uploaded to the open multipart upload) or "base" (equal to the object
the writer continues). Only then may its memory be dropped without a spill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of a part, kept in a temporary object while memory is short."""

    key: str
    etag: str
    start: int
    end: int


@dataclass(eq=False)
class Part:
    number: int
    capacity: int
    buf: bytearray = field(default_factory=bytearray)
    mem_start: int = 0
    length: int = 0
    reserved: int = 0  # budget bytes behind `buf`
    segments: list[Segment] = field(default_factory=list)
    stored: str | None = None  # "session" | "base" | None (changed since last stored)
    version: int = 0  # bumped by every change: an upload knows whether it sent the latest
    pins: int = 0  # requests using the buffer across an await: the reclaimer leaves it alone
    idle: trio.Event = field(default_factory=trio.Event)  # set while no upload/spill/load runs
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.idle.set()

    @property
    def full(self) -> bool:
        return self.length == self.capacity

    @property
    def in_memory(self) -> int:
        return self.length - self.mem_start

    @property
    def busy(self) -> bool:
        return not self.idle.is_set()

    @property
    def whole(self) -> bool:
        """All its bytes are in the buffer (nothing spilled)."""
        return not self.segments

    def room(self, end: int) -> int:
        """Buffer bytes needed to hold the part up to `end` (within the part)."""
        return max(end, self.length) - self.mem_start

    def put(self, within: int, chunk: memoryview) -> None:
        """Write at `within` (at least `mem_start`, at most `length`: gaps are zero-filled
        before). The buffer grows, or is a full-size one with leftovers past `length`."""
        assert self.mem_start <= within <= self.length, "a write outside the held bytes"
        index = within - self.mem_start
        self.buf[index:index + len(chunk)] = chunk
        self.length = max(self.length, within + len(chunk))
        self.changed()

    def cut(self, length: int) -> None:
        """Shorten to `length` (not before `mem_start`). A growing buffer shrinks with it; a
        full-size one keeps its leftovers past `length`, never read or uploaded."""
        assert self.mem_start <= length <= self.length
        self.length = length
        if len(self.buf) < self.capacity:
            del self.buf[length - self.mem_start:]
        self.changed()

    def changed(self) -> None:
        self.stored = None
        self.version += 1
        self.last_used = time.monotonic()

    def view(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) of the part; both within the buffer."""
        return memoryview(self.buf)[start - self.mem_start:end - self.mem_start]

    def payload(self) -> bytes | bytearray:
        """What an upload or spill sends: the buffer itself (nothing changes it while the
        upload runs; botocore takes bytes or bytearrays, not views). A full-size buffer
        with leftovers past the data is cut to the data first, in place (the allocator
        returns the tail without copying), instead of a copy beside it that the budget
        would not count; it is then a growing buffer, released but not recycled."""
        held = self.length - self.mem_start
        if held < len(self.buf):
            try:
                del self.buf[held:]
            except BufferError:  # a view of it is still alive somewhere: copy after all
                return bytes(memoryview(self.buf)[:held])
        return self.buf
