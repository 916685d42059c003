"""The one byte budget shared by every writer's part buffers and every reader's read-ahead.

Writers wait for memory (backpressure: uploads in flight give it back); read-ahead only takes
what is free right now and shrinks otherwise. A wait is bounded: a writer that cannot get its
memory within `timeout` gets ENOMEM with a line saying who holds the budget, instead of a
deadlock when every open file holds a partly filled part.

The budget also recycles the large buffers behind reserved memory (part buffers, read-ahead
segments). A fresh multi-MiB buffer costs a page fault per 4 KiB the first time it is
filled -- measured at a tenth of the daemon's CPU while streaming -- so freed buffers are
kept for the next part or segment of the same size, as long as idle buffers plus
reservations stay within the limit, and all of them are let go once nothing is reserved.
"""

from __future__ import annotations

import errno
import math

import trio

from .errors import FsError

RECYCLE_MIN = 1024 * 1024  # smaller buffers come from malloc's heap, which reuses them anyway


class MemoryBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._released = trio.Event()  # replaced after every release; waiters re-check
        self.readers = 0  # open readers: each may hold at most an equal share in read-ahead
        self._idle: dict[int, list[bytearray]] = {}  # recycled buffers by size
        self._idle_bytes = 0

    @property
    def reader_share(self) -> int:
        return self.limit // max(1, self.readers)

    @property
    def free(self) -> int:
        return self.limit - self.used

    def try_acquire(self, amount: int) -> bool:
        if amount > self.free:
            return False
        self._take(amount)
        return True

    async def acquire(self, amount: int, timeout: float = math.inf, what: str = "") -> None:
        """Take `amount` bytes, waiting up to `timeout` s for others to release them."""
        if amount > self.limit:
            raise FsError(f"{what}: needs {amount >> 20} MiB but max_memory is "
                          f"{self.limit >> 20} MiB; raise max_memory", errno.EFBIG)
        with trio.move_on_after(timeout):
            while amount > self.free:
                await self._released.wait()
            self._take(amount)
            return
        raise FsError(f"{what}: no memory for {amount >> 20} MiB within {timeout:.0f} s: "
                      f"{self.used >> 20} of {self.limit >> 20} MiB max_memory is held by other "
                      f"open files; raise max_memory or write fewer files at once", errno.ENOMEM)

    def _take(self, amount: int) -> None:
        self.used += amount
        self._trim_idle()

    def release(self, amount: int) -> None:
        if amount <= 0:
            return
        self.used -= amount
        assert self.used >= 0, "memory budget released more than it gave"
        self._released.set()
        self._released = trio.Event()
        if not self.used:
            self._trim_idle(keep=0)

    # -- recycled buffers --------------------------------------------------------------

    def buffer(self, size: int) -> bytearray | None:
        """A buffer of `size` bytes for memory already reserved; recycled when one is idle.

        Its contents are whatever the last user left: callers track their own lengths.
        None below RECYCLE_MIN: small buffers are left to malloc.
        """
        if size < RECYCLE_MIN:
            return None
        idle = self._idle.get(size)
        if idle:
            self._idle_bytes -= size
            return idle.pop()
        return bytearray(size)

    def recycle(self, buf: bytearray) -> None:
        """Keep a buffer for reuse while something is reserved and idle buffers and
        reservations still fit in the limit."""
        size = len(buf)
        if (size < RECYCLE_MIN or not self.used
                or self.used + self._idle_bytes + size > self.limit):
            return
        self._idle.setdefault(size, []).append(buf)
        self._idle_bytes += size

    def _trim_idle(self, keep: int | None = None) -> None:
        """Let idle buffers go until they fit beside the reservations (or down to `keep`)."""
        room = self.limit - self.used if keep is None else keep
        if self._idle_bytes <= room:
            return
        for size in sorted(self._idle):
            idle = self._idle[size]
            while idle and self._idle_bytes > room:
                idle.pop()
                self._idle_bytes -= size
            if not idle:
                del self._idle[size]
