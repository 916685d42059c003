"""The file system's semantics in plain trio, with no pyfuse3 import (the adapter converts).

Paths map to keys by "/"; common prefixes and "dir/" marker objects are directories. A file
opened for writing gets one StreamingWriter per inode (the kernel's writeback cache may send
a file's writes through any of its handles); reads of an object go through a RangedReader per
handle. Every failure is raised as an FsError carrying its errno.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import mimetypes
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from .config import FsConfig
from .directory_listing import Entry, invalid_name_reason, list_directory
from .errors import FsError, NotFound, run_parallel
from .inode_table import InodeTable, Node, join, parent_of
from .memory_budget import MemoryBudget
from .multipart_writer import FileMeta, StreamingWriter, parse_mtime
from .object_store import ObjectInfo, ObjectStore, PutOptions
from .part_schedule import PartSchedule
from .ranged_reader import RangedReader
from .upload_pool import UploadPool

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass
class Handle:
    node: Node
    writer: StreamingWriter | None = None
    reader: RangedReader | None = None
    keep_cache: bool = False
    # opened for writing with the writeback cache on: the kernel reads through it to complete
    # a page before a partial-page write (a program's own read looks the same)
    patching: bool = False


@dataclass
class SetAttr:
    """The attributes a setattr request changes (None: unchanged)."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None


class FileSystem:
    def __init__(self, store: ObjectStore, prefix: str, config: FsConfig,
                 nursery: trio.Nursery, pool: UploadPool, budget: MemoryBudget,
                 drop_pages: Callable[[int, int, int], None] | None = None):
        self.store = store
        self.prefix = prefix
        self.config = config
        self._nursery = nursery
        self._pool = pool
        self.budget = budget
        self._drop_pages = drop_pages  # (inode, start, length): kernel cache, best effort
        self.schedule = PartSchedule.for_budget(config.part_size, config.max_memory)
        self.table = InodeTable(config.uid, config.gid, config.dir_mode)
        self._handles: dict[int, Handle] = {}
        self._fh_numbers = itertools.count(1)
        self._writers: dict[int, StreamingWriter] = {}
        self._listings: dict[int, list[Entry]] = {}

    # -- keys and attributes -------------------------------------------------------------

    def key(self, path: str) -> str:
        return self.prefix + path

    def _file_attrs(self, info: ObjectInfo) -> dict:
        meta = info.metadata
        mode = _int(meta.get("mode"))
        if mode is None:
            mode = self.config.file_mode
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        mtime_ns = parse_mtime(meta["mtime"]) if "mtime" in meta else None
        return dict(mode=mode,
                    uid=_int(meta.get("uid"), self.config.uid),
                    gid=_int(meta.get("gid"), self.config.gid),
                    mtime_ns=mtime_ns if mtime_ns is not None else
                    int(info.last_modified * 1e9),
                    size=info.size, etag=info.etag, has_metadata=info.has_metadata,
                    expires=time.monotonic() + self.config.attr_timeout
                    if info.has_metadata else 0.0)

    def _dir_attrs(self) -> dict:
        return dict(mode=stat.S_IFDIR | self.config.dir_mode, uid=self.config.uid,
                    gid=self.config.gid, mtime_ns=time.time_ns(),
                    expires=time.monotonic() + self.config.attr_timeout, has_metadata=True)

    def _child_path(self, parent: int, name: str) -> str:
        reason = invalid_name_reason(name)
        if reason is not None:
            raise FsError(f"invalid name {name!r}: {reason}",
                          errno.ENAMETOOLONG if "longer" in reason else errno.EINVAL)
        return join(self._node(parent).path, name)

    def _node(self, inode: int) -> Node:
        node = self.table.get(inode)
        if node is None:
            raise FsError(f"inode {inode} is not known", errno.ENOENT)
        return node

    def _writer_view(self, node: Node) -> Node:
        writer = self._writers.get(node.inode)
        if writer is not None:
            node.size = writer.size
            node.mode, node.uid, node.gid = writer.meta.mode, writer.meta.uid, writer.meta.gid
            node.mtime_ns = writer.meta.mtime_ns
        return node

    # -- lookup, getattr, setattr ----------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Node:
        node = self._writer_view(await self._lookup_quiet(self._child_path(parent, name)))
        node.lookups += 1
        return node

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
            return self.table.upsert(path, True, **self._dir_attrs())
        if "info" in found:
            return self.table.upsert(path, False, **self._file_attrs(found["info"]))
        self.table.remove_path(path)
        raise FsError("", errno.ENOENT)

    async def getattr(self, inode: int) -> Node:
        node = self._node(inode)
        if inode in self._writers:
            return self._writer_view(node)
        if node.fresh or node.is_dir or node.path.startswith("\0"):
            return node
        try:
            info = await self.store.head(self.key(node.path))
        except NotFound:
            raise FsError("", errno.ENOENT) from None
        for name, value in self._file_attrs(info).items():
            setattr(node, name, value)
        return node

    async def setattr(self, inode: int, change: SetAttr) -> Node:
        node = self._node(inode)
        self._check_writable()
        writer = self._writers.get(inode)
        if writer is not None:
            if change.size is not None:
                await writer.truncate(change.size)
            writer.set_meta(self._changed_meta(writer.meta, change, writer))
            return self._writer_view(node)
        if node.is_dir:
            return node  # directory markers carry no attributes we could keep (SeaweedFS)
        await self.getattr(inode)
        key = self.key(node.path)
        if change.size is not None and change.size != node.size:
            if change.size != 0:
                raise FsError(f"{node.path}: truncating a stored object to {change.size} bytes "
                              "would rewrite it; only truncation to 0 is supported",
                              errno.EOPNOTSUPP)
            meta = self._changed_meta(self._meta_of(node), change, None)
            node.etag = await self.store.put(key, b"", self._options(node.path, meta))
            node.size = 0
        else:
            meta = self._changed_meta(self._meta_of(node), change, None)
            if meta != self._meta_of(node) or not node.has_metadata:
                node.etag = await self.store.copy(key, key, self._options(node.path, meta),
                                                  node.size)
        node.mode, node.uid, node.gid, node.mtime_ns = meta.mode, meta.uid, meta.gid, \
            meta.mtime_ns
        node.expires = time.monotonic() + self.config.attr_timeout
        node.has_metadata = True
        return node

    def _meta_of(self, node: Node) -> FileMeta:
        return FileMeta(node.mode, node.uid, node.gid, node.mtime_ns, mtime_explicit=True)

    @staticmethod
    def _changed_meta(meta: FileMeta, change: SetAttr, writer: StreamingWriter | None) -> FileMeta:
        updates: dict = {}
        if change.mode is not None:
            updates["mode"] = stat.S_IFREG | stat.S_IMODE(change.mode)
        if change.uid is not None:
            updates["uid"] = change.uid
        if change.gid is not None:
            updates["gid"] = change.gid
        if change.mtime_ns is not None:
            updates["mtime_ns"] = change.mtime_ns
            # a "now" mtime (the kernel's own, or touch) is the completion time anyway
            started = writer.started_ns if writer is not None else time.time_ns()
            updates["mtime_explicit"] = change.mtime_ns < started - 2_000_000_000
        return replace(meta, **updates) if updates else meta

    def _options(self, path: str, meta: FileMeta) -> PutOptions:
        return PutOptions(meta.to_headers(), self._content_type(path))

    def _content_type(self, path: str) -> str | None:
        choice = self.config.content_type
        if choice == "none":
            return None
        if choice == "auto":
            return mimetypes.guess_type(path)[0] or "application/octet-stream"
        return choice

    def _check_writable(self) -> None:
        if self.config.read_only:
            raise FsError("", errno.EROFS)

    # -- directories -------------------------------------------------------------------

    async def opendir(self, inode: int) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise FsError("", errno.ENOTDIR)
        fh = next(self._fh_numbers)
        self._handles[fh] = Handle(node)
        return fh

    async def readdir(self, fh: int, offset: int) -> list[tuple[str, Node, int]]:
        """Entries from `offset` on, each with the offset of the one after it. The caller
        takes one lookup on each entry it passes to the kernel (see `accept_entry`)."""
        handle = self._handles[fh]
        entries = self._listings.get(fh)
        if entries is None or offset == 0:
            entries = await self._snapshot(handle.node)
            self._listings[fh] = entries
        result = []
        for index in range(offset, len(entries)):
            entry = entries[index]
            path = join(handle.node.path, entry.name)
            node = self.table.by_path(path)
            if entry.is_dir:
                if node is None or not node.is_dir:
                    node = self.table.upsert(path, True, **self._dir_attrs())
            elif node is None or node.is_dir or (not node.fresh and node.inode not in
                                                 self._writers):
                if entry.info is not None:
                    node = self.table.upsert(path, False, **self._file_attrs(entry.info))
            result.append((entry.name, self._writer_view(node), index + 1))
        return result

    async def _snapshot(self, directory: Node) -> list[Entry]:
        key_prefix = self.key(directory.path) + "/" if directory.path else self.prefix
        entries = await list_directory(self.store, key_prefix)
        listed = {entry.name for entry in entries}
        for writer_inode in self._writers:
            node = self.table.get(writer_inode)
            if node is not None and parent_of(node.path) == directory.path and \
                    not node.path.startswith("\0") and node.name not in listed:
                entries.append(Entry(node.name, False, None))
        entries.sort(key=lambda e: e.name)
        return entries

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)
        self._listings.pop(fh, None)

    async def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Node:
        self._check_writable()
        path = self._child_path(parent, name)
        if self.table.by_path(path) is not None or await self._exists(path):
            raise FsError("", errno.EEXIST)
        meta = FileMeta(stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, time.time_ns())
        await self.store.put(self.key(path) + "/", b"", PutOptions(meta.to_headers(), None))
        node = self.table.upsert(path, True, **self._dir_attrs())
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
        return not any((node := self.table.get(i)) is not None and parent_of(node.path) == path
                       for i in self._writers)

    async def _lookup_quiet(self, path: str) -> Node:
        """The node for `path` from the table while fresh (or being written), else from S3."""
        node = self.table.by_path(path)
        if node is not None and (node.fresh or node.inode in self._writers):
            return node
        return await self._resolve(path)

    async def unlink(self, parent: int, name: str) -> None:
        self._check_writable()
        path = self._child_path(parent, name)
        node = await self._lookup_quiet(path)
        if node.is_dir:
            raise FsError("", errno.EISDIR)
        writer = self._writers.get(node.inode)
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
        if source.inode in self._writers:
            await self._writers[source.inode].flush()
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
            busy = [node.path for i in self._writers
                    if (node := self.table.get(i)) is not None
                    and node.path.startswith(old + "/")]
            if busy:
                log.warning("rename %s: %s is still open for writing; close it first", old,
                            busy[0])
                raise FsError("", errno.EBUSY)
            await self._rename_tree(old, new)
        else:
            await self.store.copy(self.key(old), self.key(new), None, source.size)
            await self.store.delete(self.key(old))
        writer = self._writers.get(source.inode)
        if writer is not None:
            writer.key = self.key(new)
            writer.name = new
        self.table.move(old, new)

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
        if info.key.endswith("/"):
            # a directory marker: some servers (SeaweedFS) keep these as real directories
            # that CopyObject cannot read, so write a new marker instead
            await self.store.put(target, b"", PutOptions({}, None))
        else:
            await self.store.copy(info.key, target, None, info.size)

    # -- files ---------------------------------------------------------------------------

    async def create(self, parent: int, name: str, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[int, Node]:
        self._check_writable()
        path = self._child_path(parent, name)
        existing = self.table.by_path(path)
        if existing is not None and existing.inode in self._writers:
            return await self.open(existing.inode, flags | os.O_TRUNC), existing
        now = time.time_ns()
        meta = FileMeta(stat.S_IFREG | stat.S_IMODE(mode), uid, gid, now)
        node = self.table.upsert(path, False, mode=meta.mode, uid=uid, gid=gid, mtime_ns=now,
                                 size=0, etag="", has_metadata=True, expires=0.0)
        node.lookups += 1
        self._writers[node.inode] = self._new_writer(node, meta)
        return self._add_handle(node, self._writers[node.inode],
                                writing=_for_writing(flags)), node

    def _new_writer(self, node: Node, meta: FileMeta) -> StreamingWriter:
        def completed(etag: str, size: int) -> None:
            node.etag, node.size = etag, size
            node.has_metadata = True

        drop_pages = (functools.partial(self._drop_pages, node.inode) if self._drop_pages
                      else None)
        return StreamingWriter(self.key(node.path), node.path, self.store, self._pool,
                               self.budget, self.schedule, meta, self._content_type(node.path),
                               self.config.memory_wait, completed, drop_pages)

    def _add_handle(self, node: Node, writer: StreamingWriter | None = None,
                    reader: RangedReader | None = None, keep_cache: bool = False,
                    writing: bool = False) -> int:
        fh = next(self._fh_numbers)
        patching = writing and self.config.writeback_cache
        self._handles[fh] = Handle(node, writer, reader, keep_cache, patching)
        node.open_handles += 1
        if writer is not None:
            writer.handles += 1
        return fh

    async def open(self, inode: int, flags: int) -> int:
        node = self._node(inode)
        if node.is_dir:
            raise FsError("", errno.EISDIR)
        writer = self._writers.get(inode)
        if _for_writing(flags):
            self._check_writable()
            if writer is not None:
                if flags & os.O_TRUNC:
                    await writer.truncate(0)
                return self._add_handle(node, writer, writing=True)
            await self.getattr(inode)
            if not flags & os.O_TRUNC and node.size > 0:
                log.warning("%s: opening an existing %d-byte object for writing without "
                            "O_TRUNC (in-place change or append) is not supported; write a new "
                            "file or truncate it", node.path, node.size)
                raise FsError("", errno.EPERM)
            meta = FileMeta(node.mode, node.uid, node.gid, time.time_ns())
            writer = self._writers[inode] = self._new_writer(node, meta)
            return self._add_handle(node, writer, writing=True)
        if writer is not None:
            return self._add_handle(node, writer)  # served from held data where possible
        node.expires = 0.0  # close-to-open consistency: see the object as it is now
        await self.getattr(inode)
        reader = RangedReader(self.store, self.key(node.path), node.path, node.size, node.etag,
                              self.budget, self._nursery, self.config.read_ahead_initial,
                              self.config.read_ahead_max, self.config.read_concurrency)
        keep_cache = node.cached_etag == node.etag
        node.cached_etag = node.etag
        return self._add_handle(node, reader=reader, keep_cache=keep_cache)

    def keep_cache(self, fh: int) -> bool:
        return self._handles[fh].keep_cache

    async def read(self, fh: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        handle = self._handles[fh]
        if handle.reader is not None:
            try:
                return await handle.reader.read(offset, length)
            except FsError as exc:
                if exc.errno == errno.ESTALE:
                    handle.node.expires = 0.0  # the next open sees the new object
                    handle.node.cached_etag = None
                raise
        if handle.writer is not None:
            return await handle.writer.read_held(offset, length, handle.patching)
        raise FsError("", errno.EBADF)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handles[fh]
        writer = handle.writer or self._writers.get(handle.node.inode)
        if writer is None:
            raise FsError("", errno.EBADF)
        return await writer.write(offset, data)  # the adapter logs what fails

    async def flush(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if handle is None or handle.writer is None:
            return
        await handle.writer.flush()
        handle.node.expires = time.monotonic() + self.config.attr_timeout

    async def fsync(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if handle is not None and handle.writer is not None:
            await handle.writer.fsync()

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        if handle.reader is not None:
            handle.reader.close()
        writer = handle.writer
        if writer is not None:
            writer.handles -= 1
            if writer.handles == 0:
                # forget the writer before awaiting: an open that comes meanwhile must not
                # join a writer that is about to free its buffers
                if self._writers.get(handle.node.inode) is writer:
                    del self._writers[handle.node.inode]
                if writer.state in ("open", "complete"):
                    try:  # writes or attributes that came after the last flush
                        await writer.flush()
                    except FsError as exc:
                        log.error("%s: completing at release failed: %s", writer.name, exc)
                await writer.release()
                handle.node.expires = 0.0
        self.table.closed(handle.node)

    def forget(self, inode: int, count: int) -> None:
        self.table.forget(inode, count)

    async def shutdown(self) -> None:
        """Unmounting: files still open are left as recoverable uploads, never completed."""
        for writer in list(self._writers.values()):
            if writer.state == "open" and writer.changed:
                log.warning("%s: still open at unmount; its upload is left for "
                            "'s3stream recover'", writer.name)
            with trio.move_on_after(30):
                await writer.release()
        self._writers.clear()


def _for_writing(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_RDONLY


def _int(text: str | None, default: int | None = None) -> int | None:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
