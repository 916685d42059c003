"""Paths and keys: lookup, attributes, directories, create, unlink, rename.

Keys map to paths by "/"; common prefixes and "dir/" marker objects are directories, and a
directory hides an object of the same name. Files being written are part of the namespace
before their object exists (OpenFiles holds their writers). `.s3stream` at the mount's root
is the mount's own (spilled parts) and never shown.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

from .config import FsConfig
from .directory_listing import Entry, invalid_name_reason, list_directory
from .errors import FsError, NotFound, run_parallel
from .inode_table import InodeTable, Node, join, parent_of
from .object_meta import (
    FileMeta,
    SetAttr,
    changed_meta,
    content_type,
    dir_attrs,
    file_attrs,
)
from .object_store import ObjectInfo, ObjectStore, PutOptions
from .open_files import OpenFiles
from .spill_area import RESERVED_NAME

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Namespace:
    def __init__(self, store: ObjectStore, prefix: str, config: FsConfig, table: InodeTable,
                 files: OpenFiles):
        self.store = store
        self.prefix = prefix
        self.config = config
        self.table = table
        self.files = files
        self._dir_handles: dict[int, Node] = {}
        self._listings: dict[int, list[Entry]] = {}
        self._fh_numbers = iter(range(1, 1 << 62))

    # -- keys and nodes --------------------------------------------------------------------

    def key(self, path: str) -> str:
        return self.prefix + path

    def _child_path(self, parent: int, name: str) -> str:
        reason = invalid_name_reason(name)
        if reason is not None:  # at debug: any local user could flood the log with these
            log.debug("invalid name %r: %s", name, reason)
            raise FsError("", errno.ENAMETOOLONG if "longer" in reason else errno.EINVAL)
        path = join(self._node(parent).path, name)
        if path == RESERVED_NAME:
            raise FsError("", errno.ENOENT)
        return path

    def _node(self, inode: int) -> Node:
        node = self.table.get(inode)
        if node is None:
            raise FsError(f"inode {inode} is not known", errno.ENOENT)
        return node

    # -- lookup, getattr, setattr ----------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Node:
        node = self.files.view(await self._lookup_quiet(self._child_path(parent, name)))
        node.lookups += 1
        return node

    async def _lookup_quiet(self, path: str) -> Node:
        """The node for `path` from the table while fresh (or being written), else from S3."""
        node = self.table.by_path(path)
        if node is not None and (node.fresh or self.files.writer(node.inode) is not None):
            return node
        return await self._resolve(path)

    async def _resolve(self, path: str) -> Node:
        """Ask S3 what `path` is: a directory (prefix or marker) wins over an object."""
        key = self.key(path)
        found: dict[str, object] = {}

        async def head():
            try:
                found["info"] = await self.store.head(key)
            except NotFound:
                pass

        async def list_prefix():
            page = await self.store.list_page(key + "/", "/", max_keys=1)
            found["dir"] = bool(page.objects or page.prefixes)

        await run_parallel([head, list_prefix])
        if found.get("dir"):
            if "info" in found:
                log.warning("object %r is hidden by the directory of the same name", key)
            return self.table.upsert(path, True, **dir_attrs(self.config))
        if "info" in found:
            return self.table.upsert(path, False, **file_attrs(found["info"], self.config))
        self.table.remove_path(path)
        raise FsError("", errno.ENOENT)

    async def getattr(self, inode: int) -> Node:
        node = self._node(inode)
        if self.files.writer(inode) is not None:
            return self.files.view(node)
        if node.fresh or node.is_dir or node.path.startswith("\0"):
            return node
        try:
            info = await self.store.head(self.key(node.path))
        except NotFound:
            raise FsError("", errno.ENOENT) from None
        for name, value in file_attrs(info, self.config).items():
            setattr(node, name, value)
        return node

    async def setattr(self, inode: int, change: SetAttr, fh: int | None = None) -> Node:
        node = self._node(inode)
        self._check_writable()
        if node.is_dir:
            return node  # directory markers carry no attributes we could keep (SeaweedFS)
        if self.files.writer(inode) is None and change.size is not None:
            await self.getattr(inode)
        if change.size is not None and (change.size != node.size
                                        or self.files.writer(inode) is not None):
            await self.files.truncate(fh, node, change.size)
        writer = self.files.writer(inode)
        if writer is not None:
            writer.set_meta(changed_meta(writer.meta, change, writer.started_ns))
            return self.files.view(node)
        if change.mode is None and change.uid is None and change.gid is None and \
                change.mtime_ns is None:
            return node
        await self.getattr(inode)
        current = FileMeta(node.mode, node.uid, node.gid, node.mtime_ns, mtime_explicit=True)
        meta = changed_meta(current, change, time.time_ns())
        if meta != current or not node.has_metadata:
            key = self.key(node.path)
            options = PutOptions(meta.to_headers(), content_type(node.path,
                                                                 self.config.content_type))
            node.etag = await self.store.copy(key, key, options, node.size)
        node.mode, node.uid, node.gid, node.mtime_ns = meta.mode, meta.uid, meta.gid, \
            meta.mtime_ns
        node.expires = time.monotonic() + self.config.attr_timeout
        node.has_metadata = True
        return node

    def _check_writable(self) -> None:
        if self.config.read_only:
            raise FsError("", errno.EROFS)

    # -- directories -------------------------------------------------------------------

    async def opendir(self, inode: int) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise FsError("", errno.ENOTDIR)
        fh = next(self._fh_numbers)
        self._dir_handles[fh] = node
        return fh

    async def readdir(self, fh: int, offset: int) -> list[tuple[str, Node, int]]:
        """Entries from `offset` on, each with the offset of the one after it. The caller
        takes one lookup on each entry it passes to the kernel (readdirplus)."""
        directory = self._dir_handles[fh]
        entries = self._listings.get(fh)
        if entries is None or offset == 0:
            entries = await self._snapshot(directory)
            self._listings[fh] = entries
        result = []
        for index in range(offset, len(entries)):
            entry = entries[index]
            path = join(directory.path, entry.name)
            node = self.table.by_path(path)
            if entry.is_dir:
                if node is None or not node.is_dir:
                    node = self.table.upsert(path, True, **dir_attrs(self.config))
            elif node is None or node.is_dir or (not node.fresh and
                                                 self.files.writer(node.inode) is None):
                if entry.info is not None:
                    node = self.table.upsert(path, False, **file_attrs(entry.info, self.config))
            result.append((entry.name, self.files.view(node), index + 1))
        return result

    async def _snapshot(self, directory: Node) -> list[Entry]:
        key_prefix = self.key(directory.path) + "/" if directory.path else self.prefix
        entries = await list_directory(self.store, key_prefix)
        if not directory.path:
            entries = [entry for entry in entries if entry.name != RESERVED_NAME]
        listed = {entry.name for entry in entries}
        for writer_inode, _ in self.files.writers():
            node = self.table.get(writer_inode)
            if node is not None and parent_of(node.path) == directory.path and \
                    not node.path.startswith("\0") and node.name not in listed:
                entries.append(Entry(node.name, False, None))
        entries.sort(key=lambda e: e.name)
        return entries

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)
        self._listings.pop(fh, None)

    async def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Node:
        self._check_writable()
        path = self._child_path(parent, name)
        if self.table.by_path(path) is not None or await self._exists(path):
            raise FsError("", errno.EEXIST)
        meta = FileMeta(stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, time.time_ns())
        await self.store.put(self.key(path) + "/", b"", PutOptions(meta.to_headers(), None))
        node = self.table.upsert(path, True, **dir_attrs(self.config))
        node.lookups += 1
        return node

    async def _exists(self, path: str) -> bool:
        try:
            await self._resolve(path)
        except FsError:
            return False
        return True

    async def rmdir(self, parent: int, name: str) -> None:
        self._check_writable()
        path = self._child_path(parent, name)
        node = await self._lookup_quiet(path)
        if not node.is_dir:
            raise FsError("", errno.ENOTDIR)
        if not await self._dir_is_empty(path):
            raise FsError("", errno.ENOTEMPTY)
        await self.store.delete(self.key(path) + "/")
        self.table.remove_path(path)

    async def _dir_is_empty(self, path: str) -> bool:
        """No key under the directory but its own marker, and no file being written in it."""
        marker = self.key(path) + "/"
        page = await self.store.list_page(marker, None, max_keys=2)
        if any(o.key != marker for o in page.objects):
            return False
        if any(o.key == marker and o.size for o in page.objects):
            log.warning("directory %r: its marker object %r holds %d bytes (written by "
                        "another tool); not deleting it", path, marker, page.objects[0].size)
            return False
        return not any((node := self.table.get(i)) is not None and parent_of(node.path) == path
                       for i, _ in self.files.writers())

    # -- files ---------------------------------------------------------------------------

    async def create(self, parent: int, name: str, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[int, Node]:
        self._check_writable()
        path = self._child_path(parent, name)
        existing = self.table.by_path(path)
        if existing is not None and self.files.writer(existing.inode) is not None:
            fh = await self.files.open(existing, flags | os.O_TRUNC)
            existing.lookups += 1  # a create reply is a lookup, whatever it found
            return fh, self.files.view(existing)
        now = time.time_ns()
        meta = FileMeta(stat.S_IFREG | stat.S_IMODE(mode), uid, gid, now)
        node = self.table.upsert(path, False, mode=meta.mode, uid=uid, gid=gid, mtime_ns=now,
                                 size=0, etag="", has_metadata=True, expires=0.0)
        node.lookups += 1
        return self.files.create(node, meta, flags), node

    async def open(self, inode: int, flags: int) -> int:
        node = self._node(inode)
        if node.is_dir:
            raise FsError("", errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._check_writable()
        if self.files.writer(inode) is None:
            node.expires = 0.0  # close-to-open consistency: see the object as it is now
            await self.getattr(inode)
        return await self.files.open(node, flags)

    async def unlink(self, parent: int, name: str) -> None:
        self._check_writable()
        path = self._child_path(parent, name)
        node = await self._lookup_quiet(path)
        if node.is_dir:
            raise FsError("", errno.EISDIR)
        writer = self.files.writer(node.inode)
        if writer is not None:
            await writer.detach()
        try:
            await self.store.delete(self.key(path))
        except NotFound:
            pass
        self.table.remove_path(path)

    async def rename(self, parent: int, name: str, new_parent: int, new_name: str,
                     flags: int) -> None:
        """Server-side copy, then delete: not atomic (a crash between leaves both)."""
        self._check_writable()
        if flags & RENAME_EXCHANGE:
            raise FsError("rename: RENAME_EXCHANGE is not supported", errno.EINVAL)
        old = self._child_path(parent, name)
        new = self._child_path(new_parent, new_name)
        source = await self._lookup_quiet(old)
        writer = self.files.writer(source.inode)
        try:
            target = await self._lookup_quiet(new)
        except FsError:
            target = None
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError("", errno.EEXIST)
            if target.is_dir and not source.is_dir:
                raise FsError("", errno.EISDIR)
            if source.is_dir and not target.is_dir:
                raise FsError("", errno.ENOTDIR)
            if target.is_dir and not await self._dir_is_empty(new):
                raise FsError("", errno.ENOTEMPTY)
        if source.is_dir:
            busy = [node.path for i, _ in self.files.writers()
                    if (node := self.table.get(i)) is not None
                    and node.path.startswith(old + "/")]
            if busy:
                log.warning("rename %s: %s is still open for writing; close it first", old,
                            busy[0])
                raise FsError("", errno.EBUSY)
            await self._rename_tree(old, new)
        elif writer is not None:
            # under the writer's lock: it completes first, and no write lands on the old key
            await writer.move(self.key(new), new,
                              functools.partial(self._move_object, old, new))
        else:
            await self._move_object(old, new, source.size)
        self.table.move(old, new)

    async def _move_object(self, old: str, new: str, size: int) -> str:
        etag = await self.store.copy(self.key(old), self.key(new), None, size)
        await self.store.delete(self.key(old))
        return etag

    async def _rename_tree(self, old: str, new: str) -> None:
        """Every key under the directory, copied in parallel, then deleted (deepest last)."""
        old_prefix, new_prefix = self.key(old) + "/", self.key(new) + "/"
        token = None
        while True:
            page = await self.store.list_page(old_prefix, None, token)
            await run_parallel(functools.partial(self._move_key, info, old_prefix, new_prefix)
                               for info in page.objects)
            for info in sorted(page.objects, key=lambda o: (o.key.endswith("/"), -len(o.key))):
                await self.store.delete(info.key)
            token = page.next_token
            if token is None:
                break
        self.table.invalidate_subtree(old)

    async def _move_key(self, info: ObjectInfo, old_prefix: str, new_prefix: str) -> None:
        target = new_prefix + info.key[len(old_prefix):]
        if info.key.endswith("/") and not info.size:
            # a directory marker: some servers (SeaweedFS) keep these as real directories
            # that CopyObject cannot read, so write a new marker instead (one holding bytes,
            # written by another tool, is copied: its bytes are data)
            await self.store.put(target, b"", PutOptions({}, None))
        else:
            await self.store.copy(info.key, target, None, info.size)

