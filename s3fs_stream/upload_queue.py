"""Queued uploads (`-o queued_uploads`): close() of a file of one part returns once its bytes
are held in the memory budget; its PutObject runs here, in the background, many at once.

The queue owns every task it runs, in the mount's nursery: the PutObjects (at most
`concurrency` at once) and the closes that wait for them (`OpenFiles._close_when_stored`).
`drain` waits for all of them: the unmount (and so SIGTERM) calls it before anything else
stops. Queued files hold their bytes in the budget until their upload ends, so writers wait
for room as they always do; `max_queued` bounds the number of files queued at once (each one
also costs some memory outside the budget: its writer, its node).

A failed upload fails its writer (one ERROR line) and is remembered here by name until the
next fsync or close of that name reports it (`take_failure`), as a local file system reports
a failed writeback at the next fsync. `s3stream status` shows the counts and the last
failures.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

CONCURRENCY = 32  # PutObjects of queued files at once
MAX_QUEUED = 4096  # files queued at once; the next close waits for room
KEEP_FAILURES = 1000  # failed names remembered until reported (the oldest forgotten first)


class UploadQueue:
    def __init__(self, nursery: trio.Nursery, concurrency: int = CONCURRENCY,
                 max_queued: int = MAX_QUEUED):
        self._nursery = nursery
        self.limiter = trio.CapacityLimiter(concurrency)  # held by each PutObject
        self._room = trio.Semaphore(max_queued)
        self.pending = 0  # tasks not yet done (uploads and the closes waiting for them)
        self.queued = 0  # uploads not yet done
        self.stored = 0  # uploads that succeeded
        self.failed = 0  # ... and that failed
        self._idle = trio.Event()
        self._idle.set()
        # name -> errno of a failed upload, until the next fsync or close of that name
        self._failures: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.recent: collections.deque[tuple[str, str]] = collections.deque(maxlen=10)

    async def room(self) -> None:
        """Wait until fewer than `max_queued` files are queued, and take a place (given
        back by `upload`'s job when it ends)."""
        await self._room.acquire()

    def give_back(self) -> None:
        """A place taken by `room()` that no upload used."""
        self._room.release()

    def upload(self, job: Callable[[], Awaitable[bool]]) -> None:
        """Run `job` (one PutObject and its bookkeeping; True when it stored the file) in
        the background, once a place in the limiter is free. The caller took `room()`."""
        self.queued += 1

        async def run() -> None:
            try:
                async with self.limiter:
                    ok = await job()
                if ok:
                    self.stored += 1
                else:
                    self.failed += 1
            finally:
                self.queued -= 1
                self._room.release()
        self.start(run)

    def start(self, task: Callable[..., Awaitable[None]], *args) -> None:
        """Run `task(*args)` in the background; `drain` waits for it."""
        self.pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle

        async def run() -> None:
            try:
                await task(*args)
            except Exception:  # a task records its own failures: this is a bug
                log.exception("queued upload task failed unexpectedly")
            finally:
                self.pending -= 1
                if not self.pending:
                    self._idle.set()
        self._nursery.start_soon(run)

    async def drain(self) -> None:
        """Until every queued upload and the close waiting for it are done."""
        while self.pending:
            await self._idle.wait()

    def failed_upload(self, name: str, err: int, reason: str) -> None:
        self._failures[name] = err
        self._failures.move_to_end(name)
        while len(self._failures) > KEEP_FAILURES:
            self._failures.popitem(last=False)
        self.recent.append((name, reason))

    def take_failure(self, name: str) -> int | None:
        """The errno of a failed upload of `name` not yet reported (reported once)."""
        return self._failures.pop(name, None)

    def take_failures_under(self, directory: str) -> int | None:
        """`take_failure` for every name in `directory` and below (\"\": all): the errno
        of the first."""
        first = None
        for name in [name for name in self._failures
                     if not directory or name.startswith(directory + "/")]:
            failed = self._failures.pop(name)
            first = failed if first is None else first
        return first

    def snapshot(self) -> dict:
        return {"queued": self.queued, "stored": self.stored, "failed": self.failed,
                "unreported": list(self._failures)[-10:],
                "recent_failures": [{"name": n, "reason": r} for n, r in self.recent]}
