"""Directory attributes: mode, owner and times of a directory, kept on its marker `dir/`.

A directory's attributes live in its marker's x-amz-meta-* (rewritten whole: servers that
keep directories as such, SeaweedFS, cannot copy a marker onto itself). Some servers drop a
marker's metadata; there they are also kept in an empty object of the mount's own,
`.s3stream/dirs/<path>` (`attrs_key`), which is read where the marker has none, deleted at
rmdir and moved with a renamed directory.

State owned here: whether the server keeps a marker's metadata (`_markers_keep_meta`:
None until a marker shows, then True or False for the mount's lifetime). The namespace
asks through `head_marker`, `put`, `delete` and `copy`; the nodes stay its own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

from .errors import FsError, NotFound, error_reason, run_parallel
from .object_meta import FileMeta
from .object_store import ObjectInfo, ObjectStore, PutOptions
from .spill_area import RESERVED_NAME

log = logging.getLogger(__name__)


class DirAttributes:
    def __init__(self, store: ObjectStore, prefix: str, key: Callable[[str], str]):
        self.store = store
        self.prefix = prefix
        self.key = key
        # whether the server keeps x-amz-meta-* on directory markers `dir/` (AWS, moto,
        # MinIO do; SeaweedFS drops them): None until a marker shows, else False once a
        # marker stored with them comes back without. While not True, a directory's
        # attributes are also kept in an object of the mount's own (`attrs_key`)
        self._markers_keep_meta: bool | None = None

    async def head_marker(self, path: str) -> ObjectInfo | None:
        """What holds the directory's attributes: its marker, or where the server drops a
        marker's metadata, the object `attrs_key` (one more HEAD, only on such servers
        and for markers without metadata). Once the server is known to drop them, both
        HEADs go at once: one round trip, not two."""
        if self._markers_keep_meta is False and path:
            found: dict[str, ObjectInfo | None] = {}

            async def head(name: str, key: str) -> None:
                try:
                    found[name] = await self.store.head(key)
                except NotFound:
                    found[name] = None

            await run_parallel([functools.partial(head, "marker", self.key(path) + "/"),
                                functools.partial(head, "attrs", self.attrs_key(path))])
            marker = found["marker"]
            if marker is not None and "mode" in marker.metadata:
                return marker  # (the server stays known to drop them: see `holders`)
            return found["attrs"] or marker
        try:
            marker = await self.store.head(self.marker_key(path))
        except NotFound:
            marker = None
        (found,) = await self.holders([path], [marker])
        if isinstance(found, FsError):
            raise found
        return found

    def marker_key(self, path: str) -> str:
        return self.key(path) + "/"

    async def holders(self, paths: list[str], markers: list[ObjectInfo | FsError | None]
                      ) -> list[ObjectInfo | FsError | None]:
        """Given what the HEADs of these directories' markers found (`marker_key`, sent by
        the caller, pipelined with others), what holds each one's attributes, as
        `head_marker` says; the `attrs_key` HEADs this needs go pipelined too. A HEAD that
        failed (not NotFound) leaves its error in the answer."""
        found: list[ObjectInfo | FsError | None] = []
        for marker in markers:
            if isinstance(marker, NotFound):
                marker = None
            if isinstance(marker, ObjectInfo) and "mode" in marker.metadata and \
                    self._markers_keep_meta is None:
                # a server that drops them shows none. Once seen dropping them (the probe
                # after the first PUT), it stays known so: a later marker that shows some
                # must not turn the attributes objects off, which a directory rename then
                # would not copy. (A full-suite run once showed a renamed directory with the
                # default mode on SeaweedFS, which drops every marker's metadata in a direct
                # probe; how a marker showed some there is not known.)
                self._markers_keep_meta = True
            found.append(marker)
        if self._markers_keep_meta:
            return found
        fallback = [index for index, (path, marker) in enumerate(zip(paths, found, strict=True))
                    if path and not isinstance(marker, FsError)
                    and (marker is None or "mode" not in marker.metadata)]
        if fallback:
            kept = await self.store.head_many([self.attrs_key(paths[i]) for i in fallback])
            for index, attrs in zip(fallback, kept, strict=True):
                if not isinstance(attrs, NotFound):
                    found[index] = attrs
        return found

    def attrs_key(self, path: str) -> str:
        """Where a directory's attributes are kept on a server that drops them from its
        marker: an ordinary (empty) object, which keeps its x-amz-meta-*."""
        return f"{self.prefix}{RESERVED_NAME}/dirs/{path}"

    async def put(self, path: str, meta: FileMeta) -> None:
        """Store a directory's attributes on its marker (made if missing) and, where the
        server drops them there (found out once per mount: the marker's HEAD after the
        first such PUT), in `attrs_key` as well."""
        marker = self.key(path) + "/"
        headers = meta.to_headers()
        await self.store.put(marker, b"", PutOptions(headers, None))
        if self._markers_keep_meta is None:
            try:
                info = await self.store.head(marker)
            except NotFound:
                info = None  # removed at once by another client: ask again next time
            if info is not None:
                self._markers_keep_meta = "mode" in info.metadata
                if not self._markers_keep_meta:
                    log.info("s3://%s drops the metadata of directory markers: directory "
                             "attributes are kept in %s%s/dirs/ as well", self.store.bucket,
                             self.prefix, RESERVED_NAME)
        if self._markers_keep_meta:
            return
        # stored like a spilled part (STANDARD, no public ACL): tiny, read at each lookup
        try:
            await self.store.put(self.attrs_key(path), b"",
                                 PutOptions(headers, None, temporary=True))
        except FsError as exc:
            raise FsError(f"{path}: its attributes could not be stored in "
                          f"{self.attrs_key(path)} ({error_reason(exc)}); this server drops them "
                          "from directory markers, so they are left as they were",
                          exc.errno) from None

    async def delete(self, path: str) -> None:
        """rmdir: the directory's attributes object goes with it (where there may be one)."""
        if self._markers_keep_meta:
            return
        try:
            await self.store.delete(self.attrs_key(path))
        except NotFound:
            pass
        except FsError as exc:  # the directory is gone; a new one of its name gets its own
            log.warning("rmdir %s: could not delete %s, which held its attributes: %s; "
                        "delete it, or a directory made there by another tool shows them",
                        path, self.attrs_key(path), exc)

    async def copy(self, old: str, new: str) -> list[str]:
        """A directory renamed on a server that drops markers' metadata: the attributes
        objects of it and of the directories inside go to the new name. Where the moved
        directory has none, a replaced (empty) target's goes. Returns the old keys."""
        if self._markers_keep_meta:
            return []
        old_key, new_key = self.attrs_key(old), self.attrs_key(new)
        keys = [old_key]
        token = None
        while True:
            page = await self.store.list_page(old_key + "/", None, token)
            keys += [info.key for info in page.objects]
            token = page.next_token
            if token is None:
                break
        found = []
        for key in keys:
            try:
                await self.store.copy(key, new_key + key[len(old_key):], None, 0)
            except NotFound:
                if key == old_key:
                    with contextlib.suppress(NotFound):
                        await self.store.delete(new_key)
                continue
            found.append(key)
        return found
