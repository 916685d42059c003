"""Temporary objects that hold partly filled parts while memory is short.

When every byte of the budget sits in parts that are waiting for more data, and the kernel
has parked that data behind a request that needs memory, only storing a part elsewhere lets
anyone move. The bucket is that elsewhere: a spilled part's bytes go to
`PREFIX.s3stream/spill/MOUNT-ID/N` and come back (ranged GET) when the part is uploaded or
changed, after which the temporary object is deleted. The namespace hides `.s3stream` at
the mount's root. Objects left by a crashed mount are deleted by the next mount of the prefix
once they are a day old.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid

from .errors import FsError
from .object_store import ObjectStore, PutOptions, read_into
from .part_buffer import Segment

log = logging.getLogger(__name__)

RESERVED_NAME = ".s3stream"  # hidden at the mount's root
STALE_AFTER = 24 * 3600


class SpillArea:
    def __init__(self, store: ObjectStore, prefix: str):
        self._store = store
        self.root = f"{prefix}{RESERVED_NAME}/spill/"
        self._prefix = f"{self.root}{uuid.uuid4().hex[:12]}-{os.getpid()}/"
        self._numbers = itertools.count(1)

    async def put(self, data: bytes | bytearray | memoryview, start: int) -> Segment:
        key = f"{self._prefix}{next(self._numbers)}"
        etag = await self._store.put(key, data, PutOptions())
        return Segment(key, etag, start, start + len(data))

    async def read_into(self, segment: Segment, into: memoryview) -> None:
        await read_into(self._store, segment.key, 0, segment.end - segment.start, segment.etag,
                        into)

    async def read(self, segment: Segment, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) of the part, all within the segment."""
        return await self._store.get_range(segment.key, start - segment.start,
                                           end - segment.start, segment.etag)

    async def delete(self, segments: list[Segment]) -> None:
        for segment in segments:
            try:
                await self._store.delete(segment.key)
            except FsError as exc:
                log.warning("could not delete temporary object %s: %s", segment.key, exc)

    async def delete_stale(self) -> None:
        """Delete what crashed mounts of this prefix left behind (a day old or more)."""
        token = None
        cutoff = time.time() - STALE_AFTER
        while True:
            page = await self._store.list_page(self.root, None, token)
            for info in page.objects:
                if info.last_modified < cutoff:
                    await self.delete([Segment(info.key, info.etag, 0, info.size)])
            token = page.next_token
            if token is None:
                return
