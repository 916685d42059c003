"""One multipart upload of a writer's key: its id and the last successful upload of each part.

S3 cannot read the parts of an unfinished upload back, so the writer keeps what it may still
change in memory, and this session only remembers what each part number holds now. A part
number uploaded again replaces the old one; completion names exactly the last successful
ETag of each part (some servers -- SeaweedFS -- accept an older one and use its old bytes).
`copied` marks parts that are server-side copies of the writer's base object: the writer can
still read those bytes (from the base), unlike the ones it uploaded.
"""

from __future__ import annotations

import errno
import logging

from .errors import FsError
from .object_store import ObjectStore, PutOptions, UploadedPart

log = logging.getLogger(__name__)


class UploadSession:
    def __init__(self, store: ObjectStore, key: str, upload_id: str, options: PutOptions):
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self.options = options  # the metadata the upload was created with
        self.parts: dict[int, UploadedPart] = {}
        self.copied: set[int] = set()
        self.zeros: set[int] = set()  # parts copied from a zero object (the writer's gaps)
        self.closed = False  # completed or aborted: late results are not recorded

    @classmethod
    async def start(cls, store: ObjectStore, key: str, options: PutOptions) -> UploadSession:
        return cls(store, key, await store.create_upload(key, options), options)

    async def upload(self, number: int, data: bytes | bytearray) -> UploadedPart:
        result = await self.store.upload_part(self.key, self.upload_id, number, data)
        if not self.closed:
            self.parts[number] = result
            self.copied.discard(number)
            self.zeros.discard(number)
        return result

    async def copy(self, number: int, source_key: str, start: int, end: int,
                   source_etag: str) -> None:
        result = await self.store.upload_part_copy(self.key, self.upload_id, number,
                                                   source_key, start, end, source_etag)
        if not self.closed:
            self.parts[number] = result
            self.copied.add(number)
            self.zeros.discard(number)

    def has(self, number: int) -> bool:
        return number in self.parts

    async def complete(self, sizes: list[int], name: str) -> str:
        """Complete with parts 1..len(sizes), each of exactly its expected size."""
        parts = []
        for number, size in enumerate(sizes, start=1):
            part = self.parts.get(number)
            if part is None:
                raise FsError(f"{name}: part {number} of the upload never succeeded", errno.EIO)
            if part.size != size:
                raise FsError(f"{name}: part {number} is {part.size} bytes, expected {size}",
                              errno.EIO)
            parts.append(part)
        self.closed = True
        return await self.store.complete(self.key, self.upload_id, parts)

    async def abort(self, name: str) -> None:
        self.closed = True
        try:
            await self.store.abort(self.key, self.upload_id)
        except FsError as exc:
            log.warning("%s: could not abort upload: %s", name, exc)
