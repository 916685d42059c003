"""The one byte budget shared by every writer's part buffers and every reader's read-ahead.

Memory decides how fast writers go, never whether they succeed:

- `acquire` waits, in FIFO order, and never fails for lack of memory (only a request larger
  than the whole budget is refused, with EFBIG). A writer asking for its next buffer queues
  behind the ones that asked first, so one fast writer cannot starve slow ones.
- `try_acquire` (read-ahead, and writers taking a whole buffer when memory is plentiful)
  succeeds only when nobody is waiting: extras never jump the queue.
- While anyone waits, the reclaimer (`reclaim_forever`, a task of the mount's nursery) frees
  memory from the registered holders (the writers), cheapest first: parts whose bytes are
  already stored in S3 are dropped at once; while uploads are in flight it lets them finish
  (each one returns its part); when nothing is in flight it evicts one part -- a full part is
  uploaded, a partly filled one is spilled to a temporary object in the bucket. Spilling is
  what keeps any number of writers from deadlocking: the kernel can park every writer's data
  behind memory that only more data could free (README "Many files at once").
- When spilling is impossible (the bucket refuses it, spill_area.py) and nothing else can
  make room -- nothing in flight, nothing uploadable, nothing pinned by a request in
  progress -- for STUCK_GRACE seconds, the longest waiting request is refused with ENOSPC
  (its writer fails and its memory is freed: the next in line may then fit), one at a time.

The budget also recycles the large buffers behind reserved memory (part buffers, read-ahead
segments). A fresh multi-MiB buffer costs a page fault per 4 KiB the first time it is filled,
so freed buffers are kept for the next part or segment of the same size, as long as idle
buffers plus reservations stay within the limit, and all of them are let go once nothing is
reserved.
"""

from __future__ import annotations

import errno
import logging
import mmap
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .errors import FsError

log = logging.getLogger(__name__)

RECYCLE_MIN = 1024 * 1024  # smaller buffers come from malloc's heap, which reuses them anyway
# Read-ahead of all open readers together takes at most this much of the budget: one reader
# never holds more than its 32 MiB window and a few segments in flight, and 32 readers at
# the default budget (3 GiB here: 96 MiB shares) held 530 MiB of read-ahead, a 628 MiB peak
# RSS; 8 MiB each reads them as fast (docs/SEMANTICS.md "Memory").
READ_AHEAD_TOTAL = 256 * 1024 * 1024
# Idle read-ahead buffers kept for reuse. Readers of many sizes (the window ramps up 1, 2,
# 4 ... MiB; demand reads) left idle buffers of every size, up to the whole budget: 32
# readers of 64 MiB peaked at 555-659 MiB RSS with 260 MiB of it reserved; 434-448 MiB with
# this bound (64 MiB: 376, but fresh mappings cost 32 readers of 20 MiB +0.2 s/GiB of system
# time in page faults, against 0.7).
IDLE_READ_AHEAD = 128 * 1024 * 1024
SETTLE = 0.05  # seconds the reclaimer lets in-flight uploads return memory before it evicts
STUCK_GRACE = 2.0  # seconds nothing can make room before the longest waiter gets ENOSPC


class MemoryHolder(Protocol):
    """What the reclaimer needs from a writer. None of these take the writer's lock: they
    only touch parts that are idle (no upload, spill or load running) and not pinned by a
    request in progress."""

    def drop_stored(self) -> None:
        """Free every part whose bytes are stored in S3 and that can be read back."""

    def busy(self) -> bool:
        """An upload or spill is running: memory will come back without our help."""

    def pinned(self) -> bool:
        """A request in progress uses one of its parts: it lets go on its own."""

    def blocked(self) -> bool:
        """It holds memory that only a spill could free, and spilling is not possible now."""

    def eviction_candidate(self) -> tuple[int, float, object] | None:
        """(cost class, last use, part) of the part `evict` would free next, if any."""

    async def evict(self, part: object) -> None:
        """Store the part's bytes in S3 and free its memory (errors are the holder's)."""


@dataclass(eq=False)
class _Waiter:
    amount: int
    granted: trio.Event = field(default_factory=trio.Event)
    refused: FsError | None = None  # granted nothing: nothing could make room


class MemoryBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.readers = 0  # open readers: each may hold an equal share in read-ahead
        self.peak = 0
        self.spills = 0  # parts spilled to the bucket so far (reported in the log and status)
        self.refusals = 0  # requests refused with ENOSPC: nothing could make room
        self._stuck_since: float | None = None  # trio time since which nothing can make room
        self._waiters: deque[_Waiter] = deque()
        self._holders: set[MemoryHolder] = set()
        self._pressure = trio.Event()  # set while someone waits
        self._released = trio.Event()  # replaced after every release
        # recycled buffers by (size, lazy): read-ahead's are anonymous mappings (`buffer`)
        self._idle: dict[tuple[int, bool], list[bytearray | mmap.mmap]] = {}
        self._idle_bytes = 0
        self._idle_lazy_bytes = 0  # of which read-ahead's (lazy) buffers

    @property
    def reader_share(self) -> int:
        """The read-ahead one open reader may hold: an equal share of READ_AHEAD_TOTAL (or
        of the whole budget when that is smaller)."""
        return min(self.limit, READ_AHEAD_TOTAL) // max(1, self.readers)

    @property
    def free(self) -> int:
        return self.limit - self.used

    @property
    def under_pressure(self) -> bool:
        return bool(self._waiters)

    # -- taking and giving back ----------------------------------------------------------

    def try_acquire(self, amount: int) -> bool:
        """Take `amount` now if it is free and nobody is queued for memory."""
        if self._waiters or amount > self.free:
            return False
        self._take(amount)
        return True

    async def acquire(self, amount: int, what: str = "") -> None:
        """Take `amount`, waiting in line as long as it takes (the reclaimer makes room)."""
        if amount > self.limit:
            raise FsError(f"{what}: needs {amount >> 20} MiB but max_memory is "
                          f"{self.limit >> 20} MiB; raise max_memory", errno.EFBIG)
        if self.try_acquire(amount):
            return
        waiter = _Waiter(amount)
        self._waiters.append(waiter)
        self._pressure.set()
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.refused is not None:
                pass  # took nothing, no longer in line
            elif waiter.granted.is_set():
                self.release(amount)
            else:
                self._waiters.remove(waiter)
                self._grant()  # the next in line may fit now
            raise
        if waiter.refused is not None:
            raise waiter.refused

    def release(self, amount: int) -> None:
        if amount <= 0:
            return
        self.used -= amount
        assert self.used >= 0, "memory budget released more than it gave"
        self._grant()
        self._released.set()
        self._released = trio.Event()
        if not self.used:
            self._trim_idle(keep=0)

    def _grant(self) -> None:
        while self._waiters and self._waiters[0].amount <= self.free:
            waiter = self._waiters.popleft()
            self._take(waiter.amount)
            waiter.granted.set()

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)
        self._trim_idle()

    # -- reclaiming ------------------------------------------------------------------------

    def register(self, holder: MemoryHolder) -> None:
        self._holders.add(holder)

    def unregister(self, holder: MemoryHolder) -> None:
        self._holders.discard(holder)

    async def reclaim_forever(self) -> None:
        """Make room for waiters for as long as the mount runs."""
        while True:
            if not self._waiters:
                self._pressure = trio.Event()
                await self._pressure.wait()
            await self.reclaim_once()

    async def reclaim_once(self) -> None:
        """One round: drop what is stored, else let uploads return memory, else evict."""
        for holder in list(self._holders):
            holder.drop_stored()
        if not self._waiters:
            return
        if any(holder.busy() for holder in self._holders):
            self._stuck_since = None
            with trio.move_on_after(SETTLE):
                await self._released.wait()
            return
        candidates = [(found, holder) for holder in list(self._holders)
                      if (found := holder.eviction_candidate()) is not None]
        if candidates:
            self._stuck_since = None
            (_, _, part), holder = min(candidates, key=lambda c: c[0][:2])
            await holder.evict(part)
            return
        if any(holder.pinned() for holder in self._holders) \
                or not any(holder.blocked() for holder in self._holders):
            # requests in progress hold what is left: they finish on their own
            self._stuck_since = None
            with trio.move_on_after(SETTLE):
                await self._released.wait()
            return
        self._when_stuck()
        with trio.move_on_after(SETTLE):
            await self._released.wait()

    def _when_stuck(self) -> None:
        """Nothing can make room: after STUCK_GRACE, refuse the longest waiter (ENOSPC)."""
        now = trio.current_time()
        if self._stuck_since is None:
            self._stuck_since = now
        if now - self._stuck_since < STUCK_GRACE or not self._waiters:
            return
        self._stuck_since = now  # the next refusal after another grace, if still stuck
        waiter = self._waiters.popleft()
        waiter.refused = FsError(
            f"no memory for its next {-(-waiter.amount // 1024)} KiB: all of max_memory "
            f"({self.limit >> 20} MiB) is held by partly filled parts that can be neither "
            "uploaded nor spilled", errno.ENOSPC)
        waiter.granted.set()
        self.refusals += 1
        self._grant()  # the next in line may fit now

    # -- recycled buffers --------------------------------------------------------------

    def try_acquire_buffer(self, size: int, lazy: bool = False) -> bytearray | mmap.mmap | None:
        """`try_acquire(size)` and a buffer for it (see `buffer`), or None when not free now.

        The idle buffer is taken out before the reservation: reserving first would trim it
        (idle + reserved no longer fit the limit) and the caller would fault in a fresh one.
        At max_memory=32M a reader's two 16 MiB segments fill the budget, so every segment
        was a fresh mapping: 4 KiB page faults for every byte read and ~0.5 s more CPU per
        GiB (docs/internals.md "Where read time goes")."""
        if self._waiters or size > self.free:
            return None
        buf = self._pop_idle(size, lazy)
        self._take(size)
        return buf if buf is not None else self._fresh(size, lazy)

    def buffer(self, size: int, lazy: bool = False) -> bytearray | mmap.mmap:
        """A buffer of `size` bytes for memory already reserved; recycled when one is idle.

        Its contents are whatever the last user left: callers track their own lengths.
        `lazy`: a fresh one is an anonymous mapping whose pages come in as they are first
        written, by whoever writes them (a worker thread reading a GET's body into it, with
        the GIL released), where bytearray(size) zeroes every page at once in the event
        loop's thread (20 % of the time the GIL was held while reading 512 MiB on a fresh
        mount: docs/internals.md "Where read time goes"). Its pages go back at once when
        it is let go.
        """
        buf = self._pop_idle(size, lazy)
        return buf if buf is not None else self._fresh(size, lazy)

    def _pop_idle(self, size: int, lazy: bool) -> bytearray | mmap.mmap | None:
        idle = self._idle.get((size, lazy))
        if not idle:
            return None
        self._idle_bytes -= size
        self._idle_lazy_bytes -= size if lazy else 0
        return idle.pop()

    @staticmethod
    def _fresh(size: int, lazy: bool) -> bytearray | mmap.mmap:
        return mmap.mmap(-1, size) if lazy else bytearray(size)

    def recycle(self, buf: bytearray | mmap.mmap) -> None:
        """Keep a buffer for reuse while something is reserved and idle buffers and
        reservations still fit in the limit (read-ahead's: IDLE_READ_AHEAD at most)."""
        size = len(buf)
        lazy = isinstance(buf, mmap.mmap)
        if lazy and self._idle_lazy_bytes + size > IDLE_READ_AHEAD:
            # sizes the windows ramped through early would fill the room for good
            self._drop_idle_lazy(IDLE_READ_AHEAD - size, but=size)
        # not while anyone waits: the room is theirs (a writer that waits gives its unused
        # reservation back meanwhile, `StreamingWriter._reserve`, and an idle buffer kept in
        # that room would be resident beside what the budget counts)
        if (size < RECYCLE_MIN or not self.used or self._waiters
                or self.used + self._idle_bytes + size > self.limit
                or lazy and self._idle_lazy_bytes + size > IDLE_READ_AHEAD):
            return
        self._idle.setdefault((size, lazy), []).append(buf)
        self._idle_bytes += size
        self._idle_lazy_bytes += size if lazy else 0

    def _drop_idle_lazy(self, room: int, but: int) -> None:
        """Let idle read-ahead buffers of other sizes than `but` go until `room` is left."""
        for key in [key for key in self._idle if key[1] and key[0] != but]:
            idle = self._idle[key]
            while idle and self._idle_lazy_bytes > room:
                idle.pop()
                self._idle_bytes -= key[0]
                self._idle_lazy_bytes -= key[0]
            if not idle:
                del self._idle[key]

    def _trim_idle(self, keep: int | None = None) -> None:
        """Let idle buffers go until they fit beside the reservations (or down to `keep`)."""
        room = self.limit - self.used if keep is None else keep
        if self._idle_bytes <= room:
            return
        for key in sorted(self._idle):
            idle = self._idle[key]
            while idle and self._idle_bytes > room:
                idle.pop()
                self._idle_bytes -= key[0]
                self._idle_lazy_bytes -= key[0] if key[1] else 0
            if not idle:
                del self._idle[key]
