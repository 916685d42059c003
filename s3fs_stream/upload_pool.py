"""A fixed number of upload workers fed through a zero-capacity channel.

`submit` blocks until a worker takes the job, so a writer that produces parts faster than the
network drains them waits here (backpressure by construction; no queue grows). The workers
run in the nursery of whoever owns the pool (the mount), and `close` lets them finish the
jobs they hold.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class UploadPool:
    def __init__(self, nursery: trio.Nursery, workers: int):
        self._send, receive = trio.open_memory_channel[Job](0)
        for _ in range(workers):
            nursery.start_soon(self._worker, receive.clone())
        receive.close()

    async def submit(self, job: Job) -> None:
        """Hand `job` to the next free worker. Jobs report their own results."""
        await self._send.send(job)

    async def close(self) -> None:
        await self._send.aclose()

    @staticmethod
    async def _worker(receive: trio.MemoryReceiveChannel[Job]) -> None:
        async with receive:
            async for job in receive:
                try:
                    await job()
                except Exception:  # a job must record its own failure; this is a bug
                    log.exception("upload job failed unexpectedly")
                # let go of it now, not when the next job comes: its closure holds the
                # part's bytes, which the budget has already given to someone else
                del job
