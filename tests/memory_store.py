"""An in-memory ObjectStore for unit tests of pure logic (never for integration tests).

It enforces the S3 rules the file system must live with: parts of at least 5 MiB except the
last, part numbers 1..10,000, copy ranges within the source, and listings in pages of at
most `page_size` entries. Like SeaweedFS, it keeps every upload of a part number: ListParts
lists each one (newest first within a number), and CompleteMultipartUpload with the ETag of
an older upload uses that upload's old bytes -- so a writer completing with a stale ETag
produces wrong bytes, which the tests comparing final bytes catch.

`refuse(...)` makes it answer chosen requests as S3 answers a bucket policy's Deny, Object
Lock or read-only credentials: AccessDenied (403), before anything changes."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable

import trio

from s3fs_stream.errors import (
    AccessDenied,
    FsError,
    NoSuchUpload,
    NotFound,
    PreconditionFailed,
    StoreError,
)
from s3fs_stream.object_store import ListPage, ObjectInfo, PendingUpload, PutOptions, UploadedPart

MIN_PART = 5 * 1024 * 1024  # S3's minimum for every part but the last


class MemoryStore:
    def __init__(self, bucket: str = "unit"):
        self.bucket = bucket
        self.objects: dict[str, tuple[bytes, dict, str]] = {}
        # upload id -> (key, part number -> every upload of it (bytes, ETag, time), options)
        self.uploads: dict[str, tuple[str, dict[int, list[tuple[bytes, str, float]]],
                                      PutOptions]] = {}
        self._ids = itertools.count(1)
        self._part_clock = itertools.count(1)  # LastModified of part uploads, increasing
        self.calls: list[tuple] = []
        self.fail_parts = False  # make every UploadPart fail (a dead server)
        self.delay = 0.0
        self.in_flight = 0  # requests in their `delay` now, and the most at once
        self.most_in_flight = 0
        self.page_size = 1000  # ListObjectsV2 pages (smaller to test pagination)
        self.modified: dict[str, float] = {}  # LastModified of each object (seconds)
        self._refusals: list[tuple[frozenset[str] | None, str | None]] = []
        self.refused: list[tuple] = []  # the calls answered AccessDenied
        # called with each request as it arrives (a test acting while one is in flight)
        self.on_call: Callable[[tuple], None] | None = None

    def refuse(self, *methods: str, key: str | None = None) -> None:
        """Answer these methods (all when none is named) AccessDenied, for keys starting
        with `key` (all when None); a copy is refused by its destination key, as a Deny on
        s3:PutObject refuses it. Until `allow()`."""
        self._refusals.append((frozenset(methods) or None, key))

    def allow(self) -> None:
        self._refusals.clear()

    async def _step(self, *call):
        self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        target = call[2] if call[0] == "copy" else (call[1] if len(call) > 1 else "")
        for methods, key in self._refusals:
            if (methods is None or call[0] in methods) and \
                    (key is None or str(target).startswith(key)):
                self.refused.append(call)
                raise AccessDenied(f"{call[0]} {target}: AccessDenied (refused by the test)")

    async def check_bucket(self):
        await self._step("check_bucket")

    async def head(self, key):
        await self._step("head", key)
        if key not in self.objects:
            raise NotFound(key)
        data, meta, etag = self.objects[key]
        return ObjectInfo(key, len(data), etag, self.modified.get(key, 0.0), dict(meta))

    async def head_many(self, keys):
        found = []
        for key in keys:
            try:
                found.append(await self.head(key))
            except FsError as exc:
                found.append(exc)
        return found

    async def get_range(self, key, start, end, etag, into=None):
        await self._step("get_range", key, start, end)
        if key not in self.objects:
            raise NotFound(key)
        data, _, current = self.objects[key]
        if etag and etag != current:
            raise PreconditionFailed(key)
        if into is None:
            return data[start:end]
        into[:end - start] = data[start:end]
        return memoryview(into)[:end - start]

    async def list_page(self, prefix, delimiter="/", token=None, max_keys=1000,
                        start_after=None):
        """Paginated like S3: at most `max_keys` objects and prefixes per page, in key order;
        the token is the last key or prefix returned."""
        await self._step("list_page", prefix)
        max_keys = min(max_keys, self.page_size)
        entries: dict[str, ObjectInfo | None] = {}
        for key in sorted(self.objects):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                entries.setdefault(prefix + rest.split(delimiter)[0] + delimiter, None)
            else:
                data, _, etag = self.objects[key]
                entries[key] = ObjectInfo(key, len(data), etag,
                                          self.modified.get(key, 0.0),
                                          has_metadata=False)
        names = sorted(name for name in entries if (token is None or name > token)
                       and (start_after is None or name > start_after))
        page = names[:max_keys]
        more = len(names) > max_keys
        return ListPage([entries[n] for n in page if entries[n] is not None],
                        [n for n in page if entries[n] is None], page[-1] if more else None)

    def _store(self, key, data, meta, etag=None):
        etag = etag or '"' + hashlib.md5(data).hexdigest() + '"'
        self.objects[key] = (bytes(data), dict(meta), etag)
        self.modified[key] = time.time()
        return etag

    async def put(self, key, data, options):
        await self._step("put", key, len(data))
        return self._store(key, bytes(data), options.metadata)

    async def create_upload(self, key, options):
        await self._step("create_upload", key)
        upload_id = f"u{next(self._ids)}"
        self.uploads[upload_id] = (key, {}, options)
        return upload_id

    async def upload_part(self, key, upload_id, number, data):
        data = bytes(data)
        if not 1 <= number <= 10_000:
            raise StoreError(f"InvalidArgument: part number {number}")
        await self._step("upload_part", key, number, len(data))
        if self.fail_parts:
            raise StoreError("injected failure")
        if upload_id not in self.uploads:
            raise NoSuchUpload(upload_id)
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        self._add_part(upload_id, number, data, etag)
        return UploadedPart(number, etag, len(data))

    def _add_part(self, upload_id, number, data, etag):
        self.uploads[upload_id][1].setdefault(number, []).append(
            (data, etag, float(next(self._part_clock))))

    async def upload_part_copy(self, key, upload_id, number, source_key, start, end,
                               source_etag):
        await self._step("upload_part_copy", key, number, start, end)
        if upload_id not in self.uploads:
            raise NoSuchUpload(upload_id)
        if source_key not in self.objects:
            raise NotFound(source_key)
        data, _, etag = self.objects[source_key]
        if end > len(data) or end - start > 5 * 1024**3:
            raise StoreError("InvalidRange")
        if source_etag and source_etag != etag:
            raise PreconditionFailed(source_key)
        piece = data[start:end]
        part_etag = '"' + hashlib.md5(piece).hexdigest() + '"'
        self._add_part(upload_id, number, piece, part_etag)
        return UploadedPart(number, part_etag, len(piece))

    async def complete(self, key, upload_id, parts):
        await self._step("complete", key, [p.number for p in parts])
        _, stored, options = self.uploads[upload_id]
        numbers = [p.number for p in parts]
        if numbers != sorted(set(numbers)) or not numbers:
            raise StoreError("InvalidPartOrder")
        chosen = {}
        for part in parts:
            # any upload of the number whose ETag is named, the newest such (SeaweedFS)
            matching = [data for data, etag, _ in stored.get(part.number, [])
                        if etag == part.etag]
            if not matching:
                raise StoreError(f"InvalidPart: {part.number}")
            chosen[part.number] = matching[-1]
        for part in parts[:-1]:
            if len(chosen[part.number]) < MIN_PART:
                raise StoreError(f"EntityTooSmall: part {part.number}")
        del self.uploads[upload_id]
        data = b"".join(chosen[p.number] for p in sorted(parts, key=lambda p: p.number))
        # S3's multipart ETag (MD5 of the parts' MD5s, "-N"): a copy of the object gets
        # another ETag (the MD5 of its bytes), so a writer that keeps the old one is caught
        digests = b"".join(hashlib.md5(chosen[p.number]).digest() for p in parts)
        etag = f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'
        return self._store(key, data, options.metadata, etag)

    async def abort(self, key, upload_id):
        await self._step("abort", key)
        self.uploads.pop(upload_id, None)

    async def list_parts(self, key, upload_id):
        return [UploadedPart(n, e, len(d), t) for n, uploads in
                sorted(self.uploads[upload_id][1].items()) for d, e, t in reversed(uploads)]

    async def list_uploads(self, prefix="", max_uploads=None):
        return [PendingUpload(k, u, 0.0) for u, (k, _, _) in self.uploads.items()
                if k.startswith(prefix)]

    async def copy(self, source_key, dest_key, options, size, source_etag=None, headers=None):
        await self._step("copy", source_key, dest_key)
        if source_key not in self.objects:
            raise NotFound(source_key)
        data, meta, etag = self.objects[source_key]
        if source_etag and source_etag.strip('"') != etag.strip('"'):
            raise PreconditionFailed(source_key)
        return self._store(dest_key, data, options.metadata if options else meta)

    async def get_tags(self, key):
        await self._step("get_tags", key)
        return ""

    async def delete(self, key):
        await self._step("delete", key)
        self.objects.pop(key, None)
        self.modified.pop(key, None)
