"""The one byte budget shared by every writer's part buffers and every reader's read-ahead.

Writers wait for memory (backpressure: uploads in flight give it back); read-ahead only takes
what is free right now and shrinks otherwise. A wait is bounded: a writer that cannot get its
memory within `timeout` gets ENOMEM with a line saying who holds the budget, instead of a
deadlock when every open file holds a partly filled part.
"""

from __future__ import annotations

import errno
import math

import trio

from .errors import FsError


class MemoryBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._released = trio.Event()  # replaced after every release; waiters re-check
        self.readers = 0  # open readers: each may hold at most an equal share in read-ahead

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

    def release(self, amount: int) -> None:
        if amount <= 0:
            return
        self.used -= amount
        assert self.used >= 0, "memory budget released more than it gave"
        self._released.set()
        self._released = trio.Event()
