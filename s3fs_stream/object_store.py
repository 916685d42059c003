"""The object store interface the file system is written against, and its value types.

Keys here are full S3 keys (the mount's prefix included). Implementations raise the errors in
`errors.py`; nothing above this layer sees a botocore type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .errors import FsError

# What a HEAD shows of an object besides its size, times and x-amz-meta-*, and a rewrite of
# it (a copy onto itself, an upload that continues it) must send again or lose: S3 keeps
# none of these on a CopyObject with MetadataDirective=REPLACE or a new upload, and storage
# class and encryption not even on a plain CopyObject (docs/SEMANTICS.md "Objects written
# by other tools"). Lower-case header names, as ObjectInfo.headers holds them.
KEPT_HEADERS = (
    "content-encoding", "cache-control", "content-disposition", "content-language",
    "expires", "x-amz-website-redirect-location", "x-amz-storage-class",
    "x-amz-server-side-encryption", "x-amz-server-side-encryption-aws-kms-key-id",
    "x-amz-server-side-encryption-bucket-key-enabled",
)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: float  # seconds since the epoch
    metadata: dict[str, str] = field(default_factory=dict)  # x-amz-meta-*, names lower case
    has_metadata: bool = True  # False when it came from a listing (no x-amz-meta-* there)
    content_type: str | None = None  # from HEAD only
    headers: dict[str, str] = field(default_factory=dict)  # KEPT_HEADERS it has (HEAD only)
    tag_count: int = 0  # x-amz-tagging-count (HEAD only): GetObjectTagging has them
    answered: float = 0.0  # the server's Date of the HEAD's answer (0: unknown, a listing)


@dataclass(frozen=True)
class ListPage:
    objects: list[ObjectInfo]
    prefixes: list[str]  # common prefixes, each ending in the delimiter
    next_token: str | None


@dataclass(frozen=True)
class UploadedPart:
    number: int
    etag: str
    size: int
    last_modified: float = 0.0  # from ListParts only (seconds since the epoch)


@dataclass(frozen=True)
class PendingUpload:
    key: str
    upload_id: str
    initiated: float


@dataclass(frozen=True)
class PutOptions:
    """What every new object carries: metadata, content type and the mount's storage options.

    A rewrite of an existing object carries that object's own instead: its KEPT_HEADERS in
    `headers` (sent in place of the mount's storage class and encryption; the mount's
    canned ACL still applies, grants cannot be read from a HEAD) and, for an upload, its
    tags (URL-encoded, as x-amz-tagging); a CopyObject keeps the tags by itself."""

    metadata: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    headers: dict[str, str] | None = None  # None: a new object, the mount's options
    tags: str | None = None
    # a short-lived object of the mount's own (a spilled part): stored as STANDARD whatever
    # the mount's storage class, and without a canned ACL that grants anyone beyond the
    # bucket owner; encryption as for every object (`BotocoreStore._storage_args`)
    temporary: bool = False


class ObjectStore(Protocol):
    bucket: str

    async def check_bucket(self) -> None: ...

    async def head(self, key: str) -> ObjectInfo: ...

    async def head_many(self, keys: list[str]) -> list[ObjectInfo | FsError]:
        """Each key's HEAD: its ObjectInfo or the error it ended with (NotFound, ...)."""

    async def get_range(self, key: str, start: int, end: int, etag: str | None,
                        into: bytearray | None = None) -> bytes | memoryview:
        """Bytes [start, end) of the object; raises PreconditionFailed if the ETag changed.

        With `into` (at least end - start bytes) they are read into it and a view of it is
        returned."""

    async def list_page(self, prefix: str, delimiter: str | None = "/",
                        token: str | None = None, max_keys: int = 1000,
                        start_after: str | None = None) -> ListPage: ...

    async def put(self, key: str, data: bytes | bytearray | memoryview,
                  options: PutOptions) -> str: ...

    async def create_upload(self, key: str, options: PutOptions) -> str: ...

    async def upload_part(self, key: str, upload_id: str, number: int,
                          data: bytes | bytearray | memoryview) -> UploadedPart: ...

    async def upload_part_copy(self, key: str, upload_id: str, number: int, source_key: str,
                               start: int, end: int, source_etag: str | None) -> UploadedPart: ...

    async def complete(self, key: str, upload_id: str, parts: list[UploadedPart]) -> str: ...

    async def abort(self, key: str, upload_id: str) -> None: ...

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]: ...

    async def list_uploads(self, prefix: str = "",
                           max_uploads: int | None = None) -> list[PendingUpload]:
        """Incomplete multipart uploads under `prefix`; with `max_uploads`, one request."""

    async def copy(self, source_key: str, dest_key: str, options: PutOptions | None,
                   size: int, source_etag: str | None = None,
                   headers: dict[str, str] | None = None) -> str:
        """Server-side copy; options=None keeps the metadata (and content headers), with
        the source's storage class and encryption from `headers` (its ObjectInfo.headers)
        where given, else the mount's; otherwise replaces them with `options`. Tags are
        kept either way. With `source_etag`, raises PreconditionFailed if the source is no
        longer that object."""

    async def get_tags(self, key: str) -> str:
        """The object's tags, URL-encoded as x-amz-tagging takes them ("" when none)."""

    async def delete(self, key: str) -> None: ...


async def read_into(store: ObjectStore, key: str, start: int, end: int, etag: str | None,
                    into: bytearray | memoryview) -> None:
    """Bytes [start, end) of the object into `into`, keeping no view of it: a buffer with a
    live view cannot grow, and a part buffer loaded here is appended to afterwards."""
    view = await store.get_range(key, start, end, etag, into=into)
    if isinstance(view, memoryview):
        view.release()
