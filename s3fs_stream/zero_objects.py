"""Objects of zeros under the mount's hidden area, the source of a sparse file's zero parts.

Growing a file (truncate, fallocate, a write far past the end) moves no zeros through the
daemon: the parts wholly inside the gap hold no buffer (the writer's `_zeros`) and completion
puts each into the upload server-side, an UploadPartCopy of `PREFIX.s3stream/zeros/<size>`.
One such object per part size is created the first time a completion needs it (one PutObject
of at most SMALLEST bytes; a larger one is itself a multipart upload of copies of that one),
found again by HEAD by later mounts of the prefix, and kept: it is a few part sizes of zeros,
and another mount of the prefix may be copying from it at any time. Deleting
`PREFIX.s3stream/zeros/` while no mount of the prefix is running is safe.
"""

from __future__ import annotations

import logging

import trio

from .errors import FsError, NotFound
from .object_store import ObjectStore, PutOptions

log = logging.getLogger(__name__)

SMALLEST = 8 * 1024 * 1024  # put whole; a larger object is copies of this one
KEPT = PutOptions(temporary=True)


class ZeroObjects:
    def __init__(self, store: ObjectStore, root: str):
        self._store = store
        self.root = root  # PREFIX.s3stream/zeros/
        self._known: dict[int, str] = {}  # size -> ETag of an object of that many zeros
        self._lock = trio.Lock()  # one creation at a time: concurrent completions share it

    async def source(self, size: int) -> tuple[str, str]:
        """(key, ETag) of an object of exactly `size` zero bytes, created if missing."""
        if size not in self._known:
            async with self._lock:  # across the awaits: another caller may create it
                if size not in self._known:
                    self._known[size] = await self._find_or_create(size)
        return self._key(size), self._known[size]

    def _key(self, size: int) -> str:
        return f"{self.root}{size}"

    async def _find_or_create(self, size: int) -> str:
        key = self._key(size)
        try:
            info = await self._store.head(key)
            if info.size == size:
                return info.etag
        except NotFound:
            pass
        if size <= SMALLEST:
            return await self._store.put(key, bytes(size), KEPT)
        chunk_key = self._key(SMALLEST)
        if SMALLEST not in self._known:
            self._known[SMALLEST] = await self._find_or_create(SMALLEST)
        chunk_etag = self._known[SMALLEST]
        upload_id = await self._store.create_upload(key, KEPT)
        try:
            parts = []
            for number, start in enumerate(range(0, size, SMALLEST), start=1):
                end = min(start + SMALLEST, size)
                parts.append(await self._store.upload_part_copy(
                    key, upload_id, number, chunk_key, 0, end - start, chunk_etag))
            etag = await self._store.complete(key, upload_id, parts)
        except BaseException:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                try:
                    await self._store.abort(key, upload_id)
                except FsError as exc:
                    log.warning("could not abort the upload of %s: %s", key, exc)
            raise
        log.info("created %s (%d zero bytes, the source of sparse files' zero parts)",
                 key, size)
        return etag
