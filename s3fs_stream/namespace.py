"""Paths and keys: lookup, attributes, directories, create, unlink, rename.

Keys map to paths by "/"; common prefixes and "dir/" marker objects are directories, and a
directory hides an object of the same name. Files being written are part of the namespace
before their object exists (OpenFiles holds their writers). `.s3stream` at the mount's root
is the mount's own (spilled parts) and never shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable

import trio

from .attribute_fetcher import AttributeFetcher, listed_unchanged
from .config import FsConfig
from .deferred_meta import (
    DeferredMeta,
    apply_meta,
    meta_of,
    same_etag,
    stored_options,
)
from .dir_attributes import DirAttributes
from .directory_listing import (
    KEY_MAX,
    DirectoryStream,
    Entry,
    Warnings,
    invalid_name_reason,
    list_names,
)
from .errors import FsError, NotFound, PreconditionFailed, error_reason, run_parallel
from .inode_table import ROOT_INODE, InodeTable, Node, join, parent_of
from .known_names import KNOWN_DIR_MAX, KnownNames
from .object_meta import (
    OUR_KEYS,
    FileMeta,
    Kept,
    SetAttr,
    changed_meta,
    content_type,
    dir_attrs,
    file_attrs,
    kept_type,
    renamed_type,
    rewrite_options,
)
from .object_store import ObjectInfo, ObjectStore, PutOptions
from .open_files import OpenFiles
from .spill_area import RESERVED_NAME
from .writer import StreamingWriter

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# A symbolic link's object (s3fs-fuse's: the body is the target) is at most PATH_MAX - 1.
SYMLINK_MAX = 4095
READDIR_CHUNK = 256  # entries whose HEADs run together (a readdir call takes 30 to 1000s)


class _DirHandle:
    def __init__(self, node: Node, stream: DirectoryStream):
        self.node = node
        self.stream = stream
        self.known = False
        self.unsent: list[Node] = []  # looked at but not yet taken by the kernel


class Namespace:
    def __init__(self, store: ObjectStore, prefix: str, config: FsConfig, table: InodeTable,
                 files: OpenFiles, nursery: trio.Nursery | None = None,
                 notify: Callable[..., None] | None = None):
        self.store = store
        self.prefix = prefix
        self.config = config
        self.table = table
        self.files = files
        self._nursery = nursery
        # ("entry", parent inode, name, old inode or 0) / ("inode", inode): tell the kernel
        self._notify = notify or (lambda *args: None)
        table.on_replaced = self._replaced
        # chmod/chown/utimes of closed files not yet stored, and the per-inode metadata locks
        self.deferred = DeferredMeta(store, self.key, config, table, files)
        self._dir_handles: dict[int, _DirHandle] = {}
        # directories' attributes: on their markers, or where the server drops them there,
        # in objects of the mount's own
        self.dirs = DirAttributes(store, prefix, self.key)
        self._fh_numbers = iter(range(1, 1 << 62))
        self.warnings = Warnings()
        # names known missing, directories known whole (with negative_timeout)
        self.known = KnownNames(config, self._list_dir)
        # HEADs of listed and walked entries, ahead and in parallel
        self.fetcher = AttributeFetcher(store, self.key, table, files, nursery, self.dirs,
                                        self._took_head, self._took_dir, config.attr_timeout)

    # -- keys and nodes --------------------------------------------------------------------

    def key(self, path: str) -> str:
        return self.prefix + path

    def _child_path(self, parent: int, name: str, creating: bool = False) -> str:
        reason = invalid_name_reason(name)
        if reason is not None:  # at debug: any local user could flood the log with these
            log.debug("invalid name %r: %s", name, reason)
            raise FsError("", errno.ENAMETOOLONG if "longer" in reason else errno.EINVAL)
        path = join(self._node(parent).path, name)
        if path == RESERVED_NAME:
            raise FsError("", errno.EACCES if creating else errno.ENOENT)
        # a directory's marker adds "/": both must fit S3's key limit
        if len(self.key(path).encode("utf-8", "surrogateescape")) + 1 > KEY_MAX:
            if creating:
                raise FsError(f"{path!r}: the key would be longer than S3's {KEY_MAX} bytes",
                              errno.ENAMETOOLONG)
            raise FsError("", errno.ENOENT)
        return path

    def _node(self, inode: int) -> Node:
        node = self.table.get(inode)
        if node is None:
            raise FsError(f"inode {inode} is not known", errno.ENOENT)
        return node

    def _replaced(self, old: Node, new: Node) -> None:
        """Another client replaced the object (or its type) under an inode the kernel holds:
        its entry must lead to the new inode, and the old inode's cached pages go."""
        parent = self.table.by_path(parent_of(new.path))
        log.debug("%s changed in S3: inode %d replaces %d", new.path, new.inode, old.inode)
        if parent is not None:
            self._notify("entry", parent.inode, new.name, old.inode)
        self._notify("inode", old.inode)

    async def _list_dir(self, parent: str) -> set[str] | None:
        """Every name in the directory `parent` (those being written here too), or None
        when it has more than KNOWN_DIR_MAX: `KnownNames` refreshes a directory so."""
        key_prefix = self.key(parent) + "/" if parent else self.prefix
        names = await list_names(self.store, key_prefix, self.warnings, KNOWN_DIR_MAX)
        if names is None:
            return None
        names |= {n.name for i, _ in self.files.writers()
                  if (n := self.table.get(i)) is not None and parent_of(n.path) == parent}
        names.discard(RESERVED_NAME)
        return names

    # -- lookup, getattr, setattr ----------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Node:
        path = self._child_path(parent, name)
        node = await self._lookup_quiet(path)
        if self.table.get(node.inode) is not node:
            # the kernel forgot the node while a HEAD of it was out (FORGET dropped it from
            # the table): the inode it gets now must be one the table knows
            current = self.table.by_path(path)
            if current is None:
                if node.path != path:
                    raise FsError("", errno.ENOENT)  # removed or renamed meanwhile
                current = self.table.adopt(node)
            node = current
        node = self.files.view(node)
        node.lookups += 1
        return node

    async def _lookup_quiet(self, path: str) -> Node:
        """The node for `path` from the table while fresh (or being written), else from S3."""
        node = self.table.by_path(path)
        if node is not None and (node.fresh and node.has_metadata
                                 or self.files.writer(node.inode) is not None):
            return node
        if node is not None and node.is_dir and node.fresh:
            # listed just now: it exists; its marker may carry attributes the listing lacks
            return await self._with_meta(node)
        if node is None and await self.known.known_missing(path):
            raise FsError("", errno.ENOENT)
        if node is not None and not node.is_dir:
            if node.fetching is not None:  # a read-ahead HEAD of it is out: that one answers
                await node.fetching.wait()
                if node.fresh and self.table.by_path(path) is node:
                    return node
            if node.has_metadata and node.head_modified:
                # a LIST page may tell it unchanged, and the names after it with it (a walk:
                # `ls -l`, `rsync` again); across the await it may be replaced or written
                await self.fetcher.revalidate(node)
                if node.fresh and self.table.by_path(path) is node and node.has_metadata or \
                        self.files.writer(node.inode) is not None:
                    return node
            self.fetcher.read_ahead(path)
            # a file seen before: one HEAD answers unless it is gone
            try:
                info = await self.store.head(self.key(path))
            except NotFound:
                pass
            else:
                return self._upsert_file(path, info)
        return await self._resolve(path, was_dir=node is not None and node.is_dir)

    async def _resolve(self, path: str, was_dir: bool = False) -> Node:
        """Ask S3 what `path` is: a directory (prefix or marker) wins over an object. For a
        directory the table knows (`was_dir`: its entry expired, as the kernel's walk of a
        path through it asks again every entry timeout), the marker's attributes are asked
        for at the same time as the rest: one round trip instead of three (two where the
        server keeps a marker's metadata)."""
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
            found["marker"] = bool(page.objects) and page.objects[0].key == key + "/"

        async def head_marker():
            try:
                found["attrs"] = await self.dirs.head_marker(path)
            except FsError:
                pass  # asked again below if the listing shows the marker: that one reports

        # the three answers are of one moment; nothing here is taken from the table, which
        # may change meanwhile (the caller adopts what comes back)
        await run_parallel([head, list_prefix, *([head_marker] if was_dir else [])])
        if found.get("dir") or "info" in found:
            self.known.found(path)  # an earlier answer "missing" no longer holds
        if found.get("dir"):
            if "info" in found:
                self.warnings.once(key, "object %r is hidden by the directory of the same "
                                   "name", key)
            marker = None
            if found.get("marker"):
                marker = found["attrs"] if "attrs" in found else \
                    await self.dirs.head_marker(path)
            return self.table.upsert(path, True, **dir_attrs(self.config, marker))
        if "info" in found:
            return self._upsert_file(path, found["info"])
        self.table.remove_path(path)
        self.known.remember_missing(path)
        raise FsError("", errno.ENOENT)

    def _upsert_file(self, path: str, info: ObjectInfo) -> Node:
        """The node for the object `info` (a HEAD's or a listing's) at `path`. A node whose
        attributes changed here and are not stored yet keeps them while the object is still
        the one they belong to; another client's object replaces them."""
        node = self.table.by_path(path)
        pending = self.deferred.pending(node.inode) if node is not None else None
        if pending is not None and pending.node is node and same_etag(info.etag, pending.etag):
            node.expires = max(node.expires, time.monotonic() + self.config.attr_timeout)
            return node
        node = self.table.upsert(path, False, **file_attrs(info, self.config))
        if node.listing_shown and node.has_metadata:
            # the kernel holds the inode with a listing's attributes and keeps its own mtime
            # of a regular file whatever a getattr answers: it must drop the inode (unless
            # in use) and look the name up again, creating the inode with these attributes
            node.listing_shown = False
            parent = self.table.by_path(parent_of(path))
            if parent is not None:
                log.debug("%s: metadata after a listing's attributes; the kernel drops its "
                          "inode", path)
                self._notify("entry", parent.inode, node.name, 0)
        return node

    async def getattr(self, inode: int, by_list: bool = True) -> Node:
        """`by_list`: a stale file may be revalidated by a LIST page with its neighbours
        (a walk: `ls -l` stats after readdir); an open asks for its one file by a HEAD."""
        node = self._node(inode)
        if self.files.writer(inode) is not None:
            return self.files.view(node)
        if node.fresh and node.has_metadata or node.path.startswith("\0") or \
                inode == ROOT_INODE:
            return node
        if by_list and not node.is_dir and node.has_metadata and node.head_modified:
            # a LIST page may tell it unchanged, and its neighbours with it; a writer may
            # have opened it meanwhile (then its view answers)
            await self.fetcher.revalidate(node)
            if self.files.writer(inode) is not None:
                return self.files.view(node)
            if node.fresh:
                return node
        self.fetcher.demand(node)
        return await self._with_meta(node, raising=True)

    async def _with_meta(self, node: Node, raising: bool = False) -> Node:
        """The node once a HEAD told its metadata (a listing's attributes are never
        answered as if they were the object's: mode, owner and mtime live in x-amz-meta-*)."""
        if node.fetching is not None:  # a HEAD of it is out: that one answers
            await node.fetching.wait()
            if node.fresh and node.has_metadata:
                return node
        await self._fetch_meta(node, raising)
        return node

    async def _fetch_meta(self, node: Node, raising: bool = False) -> Node:
        """HEAD the node's object (or directory marker) and take what it says; the kernel
        keeps the node it asked about, a replaced object gets a new one (`_replaced`).
        While it is out, `node.fetching` lets whoever needs the node wait for it."""
        done = node.fetching = trio.Event()
        try:
            return await self._take_head(node, raising)
        finally:
            node.fetching = None
            done.set()

    async def _take_head(self, node: Node, raising: bool) -> Node:
        path = node.path  # may change while the HEAD is out: checked after it
        if node.is_dir:
            self._took_dir(node, path, await self.dirs.head_marker(path))
            return node
        try:
            info = await self.store.head(self.key(path))
        except NotFound:
            if raising:
                raise FsError("", errno.ENOENT) from None
            return node
        return self._took_head(node, path, info)

    def _took_dir(self, node: Node, path: str, marker: ObjectInfo | None) -> None:
        """What holds the attributes of the directory at `path` (the node's when its HEADs
        were sent): `DirAttributes.head_marker`."""
        if node.path == path:
            self.table.upsert(path, True, **dir_attrs(self.config, marker))

    def _took_head(self, node: Node, path: str, info: ObjectInfo) -> Node:
        """What a HEAD of `path` (the node's path when it was sent) found."""
        if node.path != path or self.files.writer(node.inode) is not None:
            return node
        if self._upsert_file(path, info) is not node:
            # a new inode for the new object; the kernel's stays as it was
            node.expires = time.monotonic() + self.config.attr_timeout
        return node

    # -- metadata of listed entries, fetched in parallel ------------------------------------

    # -- setattr -----------------------------------------------------------------------------

    async def setattr(self, inode: int, change: SetAttr, fh: int | None = None) -> Node:
        node = self._node(inode)
        log.debug("setattr %s: %s", node.path, change)
        if inode == ROOT_INODE:
            return self._set_times(node, change)  # the mount point's own times, in memory
        self._check_writable()
        if node.is_dir:
            return await self._setattr_dir(node, change)
        await self.files.wait_closed(inode)
        if change.size is not None:
            # a truncation continues the object as stored (or carries what S3 refused)
            await self.deferred.store_meta(inode, report=False)
        if self.files.writer(inode) is None and change.size is not None:
            await self.getattr(inode)
            if not node.has_metadata and not node.path.startswith("\0"):
                # a listed entry: the truncation keeps what the object carries (its HEAD)
                await self._fetch_meta(node, raising=True)
        if change.size is not None and (change.size != node.size
                                        or self.files.writer(inode) is not None):
            await self.files.truncate(fh, node, change.size)
        if self.files.writer(inode) is None and change.changes_meta and \
                not node.path.startswith("\0") and (not node.fresh or not node.has_metadata):
            await self._fetch_meta(node, raising=True)
        # after that HEAD: the file may have been unlinked, renamed or opened for writing
        writer = self.files.writer(inode)
        if writer is not None:
            writer.set_meta(changed_meta(writer.meta, change, writer.started_ns))
            node.ctime_ns = time.time_ns()
            if change.atime_ns is not None:
                node.atime_ns = change.atime_ns
            return self.files.view(node)
        if not change.changes_meta:
            return node
        if change.kernel_time_only(time.time_ns()):
            node.mtime_ns = change.mtime_ns  # in memory: not worth copying the object onto
            return node                      # itself (a rename would copy twice)
        async with self.deferred.lock(inode):
            # across the lock's wait: the file may have been renamed, unlinked, replaced or
            # opened for writing, and its deferred attributes stored
            if self.deferred.may_defer(node):
                return self.deferred.defer(node, change)
            # stored now, with whatever was deferred for this object: a refusal reaches the
            # program as its errno, the node keeps what it showed, and what was deferred
            # stays pending (shown, retried)
            pending = self.deferred.pending(inode)
            if pending is not None and not same_etag(pending.etag, node.etag):
                self.deferred.drop(inode)  # for an object no longer there
                pending = None
            await self._rewrite_meta(node, change, pending is not None)
            if pending is not None:
                self.deferred.drop(inode)  # stored with this change
            return node

    async def _rewrite_meta(self, node: Node, change: SetAttr, unstored: bool = False) -> Node:
        """Read, change and store a closed object's metadata (`unstored`: the node's are not
        stored yet). Callers hold the inode's metadata lock: with the writeback cache the
        kernel sends its own time updates while `chmod` or `touch` runs, and two overlapping
        rewrites would lose one change."""
        if node.path.startswith("\0"):  # deleted or replaced: nothing left to store it on
            apply_meta(node, changed_meta(meta_of(node), change, time.time_ns()), self.config)
            return node
        current = meta_of(node)
        meta = changed_meta(current, change, time.time_ns())
        if meta != current or unstored or not node.has_metadata:
            key = self.key(node.path)
            try:
                options = stored_options(node, meta, self.config)
                node.etag = await self.store.copy(key, key, options, node.size)
            except FsError as exc:  # S3's AccessDenied is EACCES: chmod says so
                raise FsError(f"{node.path}: its new attributes could not be stored "
                              f"({error_reason(exc)}); they are left as they were",
                              exc.errno) from None
            node.stored_etag = node.etag
            node.mtime_stored = True
        apply_meta(node, meta, self.config)
        return node

    def _set_times(self, node: Node, change: SetAttr) -> Node:
        meta = changed_meta(meta_of(node), change, time.time_ns())
        apply_meta(node, meta, self.config)
        node.expires = float("inf")
        return node

    async def _setattr_dir(self, node: Node, change: SetAttr) -> Node:
        """A directory's attributes live on its marker `dir/`, rewritten whole (servers that
        keep directories as such, SeaweedFS, cannot copy a marker onto itself); where the
        server drops a marker's metadata, in the object `DirAttributes.attrs_key` too. A
        refusal of either fails the change with the node as it was."""
        if not change.changes_meta:
            return node
        if not node.fresh or not node.has_metadata:
            # a listed directory shows defaults: the change applies to what is stored
            path = node.path
            await self._fetch_meta(node)
            if node.path != path:  # renamed or removed across the HEAD
                raise FsError("", errno.ENOENT)
        current = meta_of(node)
        meta = changed_meta(current, change, time.time_ns())
        if meta == current:
            # what it has already (tar and cp -a as root chown each directory to the owner
            # it was made with): nothing to store, as for a file (`_rewrite_meta`)
            return node
        await self.dirs.put(node.path, meta)
        apply_meta(node, meta, self.config)
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
        key_prefix = self.key(node.path) + "/" if node.path else self.prefix
        skip = frozenset({RESERVED_NAME}) if not node.path else frozenset()
        stream = DirectoryStream(self.store, key_prefix, self.warnings,
                                 functools.partial(self._unlisted_writers, node.path), skip)
        self._dir_handles[fh] = _DirHandle(node, stream)
        return fh

    def dir_nodes(self, fh: int) -> tuple[Node, Node]:
        """The open directory and its parent (the root's is itself): `.` and `..`."""
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise FsError("", errno.EBADF)
        directory = handle.node
        parent = None
        if directory.inode != ROOT_INODE:
            parent = self.table.by_path(parent_of(directory.path))
        return directory, parent or directory

    def _unlisted_writers(self, directory: str, listed: set[str]) -> list[Entry]:
        """Files being written here whose objects the listing did not show."""
        entries = []
        for writer_inode, _ in self.files.writers():
            node = self.table.get(writer_inode)
            if node is not None and parent_of(node.path) == directory and \
                    not node.path.startswith("\0") and node.name not in listed and \
                    node.path != RESERVED_NAME:
                entries.append(Entry(node.name, False, None))
        return entries

    async def readdir(self, fh: int, offset: int,
                      reply: Callable[[str, Node, int], bool]) -> None:
        """Hand entries from `offset` on to `reply(name, node, next_offset)` until it
        returns False (the kernel's buffer is full); each accepted entry is a lookup.

        Entries come as the pages do. Files are HEADed (pipelined, in parallel) before they
        are handed on: readdirplus makes each entry an inode with the attributes given, and
        with the writeback cache the kernel keeps the mtime it was first given, so a
        listing's (the upload time, the mount's default mode and owner) would stay. An entry
        whose HEAD failed goes with the listing's attributes (`listing_shown`); one found
        deleted is left out. Directories go as listed: the kernel takes each getattr's
        attributes of a directory, and getattr HEADs their markers (`AttributeFetcher.demand`)."""
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise FsError("", errno.EBADF)
        directory, stream = handle.node, handle.stream
        stream.seek(offset)
        # a two-stage pipeline: the HEADs of the next chunk are out while this one is handed
        # to the kernel (which may take thousands of entries per call)
        batch, need_head, position = await self._collect(directory.path, stream, offset)
        self.fetcher.head_soon(need_head)
        while True:
            following = None
            if len(batch) == READDIR_CHUNK:
                following = await self._collect(directory.path, stream, position)
                self.fetcher.head_soon(following[1])
            await self.fetcher.head_nodes(need_head)
            for index, (name, node, next_offset) in enumerate(batch):
                # across the awaits since it was listed: the kernel may have forgotten the
                # node (FORGET dropped it from the table), a HEAD replaced it with a new
                # inode, or this mount removed or renamed it
                path = join(directory.path, name)
                current = self.table.by_path(path)
                if current is None:
                    if node.path != path:
                        continue  # removed or renamed here, or found deleted: not listed
                    current = self.table.adopt(node)  # forgotten: the kernel gets it again
                node = current
                if not reply(name, self.files.view(node), next_offset):
                    # the next call starts here: keep what the HEADs found until then (nodes
                    # the last call kept and this one did not hand out either are kept on)
                    unsent = [later for _, later, _ in batch[index:]]
                    if following is not None:
                        unsent += [later for _, later, _ in following[0]]
                    kept = {id(later) for later in unsent}
                    handle.unsent = [old for old in handle.unsent if id(old) not in kept]
                    self._drop_unsent(handle)
                    handle.unsent = unsent
                    return
                node.lookups += 1
                if not node.has_metadata:
                    if not node.is_dir and self.files.writer(node.inode) is None:
                        node.listing_shown = True
                    self.fetcher.listed_without_meta(directory.path, node)
            if following is None:
                if stream.names is not None and not handle.known:
                    handle.known = True  # listed whole: other names need no request
                    self.known.know_dir(directory.path, set(stream.names))
                return
            batch, need_head, position = following

    async def _collect(self, directory: str, stream: DirectoryStream, position: int
                       ) -> tuple[list[tuple[str, Node, int]], list[Node], int]:
        """Up to READDIR_CHUNK entries from `position` on, as (name, node, next offset);
        the nodes among them that need a HEAD first; the offset after them."""
        batch: list[tuple[str, Node, int]] = []
        need_head: list[Node] = []
        while len(batch) < READDIR_CHUNK:
            item = await stream.entry_at(position)
            if item is None:
                break
            entry, position = item
            node = self._entry_node(directory, entry, stream)
            if node is None:
                continue
            batch.append((entry.name, node, position))
            # a listing carries no mode, owner or times: a file's HEAD, a directory's marker
            # (and where the server drops a marker's metadata, its attributes object) tell
            if (node.is_dir and not node.has_metadata or not node.is_dir
                    and not (node.fresh and node.has_metadata)) and \
                    self.files.writer(node.inode) is None:
                need_head.append(node)
        if self._nursery is not None:
            stream.prefetch_next(self._nursery)
        return batch, need_head, position

    def _entry_node(self, directory: str, entry: Entry, stream: DirectoryStream) -> Node | None:
        path = join(directory, entry.name)
        node = self.table.by_path(path)
        if entry.is_dir:
            if node is None or not node.is_dir:
                attrs = dir_attrs(self.config)
                attrs["has_metadata"] = False
                node = self.table.upsert(path, True, **attrs)
            return node
        if node is not None and self.files.writer(node.inode) is not None:
            stream.seen_writing.add(entry.name)
            return node
        if entry.info is None:
            return node  # a file being written, not listed: its writer knows
        if node is not None and not node.is_dir and node.has_metadata and \
                same_etag(node.etag, entry.info.etag) and node.size == entry.info.size:
            if listed_unchanged(node, entry.info):
                # the object a HEAD of this mount saw: its metadata is as fresh as a new
                # HEAD would make it, and `_collect` sends none
                node.expires = max(node.expires, time.monotonic() + self.config.attr_timeout)
                return node
            # the same content: its metadata stays until the HEAD (`_collect`) says more
            # (another client may have copied it onto itself with new metadata, same ETag)
            return node
        return self._upsert_file(path, entry.info)

    async def fsyncdir(self, fh: int) -> None:
        """fsync of a directory (coreutils' `sync DIR`): the uploads queued now are done
        (`-o queued_uploads`; FUSE delivers no sync(2) or syncfs(2) to its file systems)."""
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise FsError("", errno.EBADF)
        await self.files.sync_queued(handle.node.path)

    def releasedir(self, fh: int) -> None:
        handle = self._dir_handles.pop(fh, None)
        if handle is not None:
            self._drop_unsent(handle)

    def _drop_unsent(self, handle: _DirHandle) -> None:
        for node in handle.unsent:
            self.table.forget(node.inode, 0)  # dropped unless the kernel holds it
        handle.unsent = []

    async def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Node:
        self._check_writable()
        path = self._child_path(parent, name, creating=True)
        if await self._exists(path, creating=True):
            raise FsError("", errno.EEXIST)
        now = time.time_ns()
        meta = FileMeta(stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, now)
        try:
            await self.dirs.put(path, meta)
        except FsError:
            # the marker was stored but not the attributes: no directory showing others
            with contextlib.suppress(FsError):
                await self.store.delete(self.key(path) + "/")
            raise
        self.known.forget_missing(path)
        node = self.table.upsert(path, True, **dir_attrs(self.config))
        apply_meta(node, meta, self.config)
        self.known.know_dir(path, set())  # made here: empty, no lookup inside needs a request
        node.lookups += 1
        return node

    async def _exists(self, path: str, creating: bool = False) -> bool:
        """`creating`: the kernel's LOOKUP of the name, just before, may have found it
        missing in S3 (`KnownNames.take_asked_missing`): that answer is taken."""
        if creating and self._asked_missing(path):
            return False
        try:
            await self._lookup_quiet(path)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def _asked_missing(self, path: str) -> bool:
        """S3 answered `path` missing just now (a LOOKUP) and nothing here made it since."""
        return self.known.take_asked_missing(path) and self.table.by_path(path) is None

    async def rmdir(self, parent: int, name: str) -> None:
        self._check_writable()
        path = self._child_path(parent, name)
        node = await self._lookup_quiet(path)
        if not node.is_dir:
            raise FsError("", errno.ENOTDIR)
        if not await self._dir_is_empty(path):
            raise FsError("", errno.ENOTEMPTY)
        await self.store.delete(self.key(path) + "/")
        await self.dirs.delete(path)
        self.table.remove_path(path)
        self.known.gone(path)

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
        path = self._child_path(parent, name, creating=True)
        self.known.forget_missing(path)
        existing = self.table.by_path(path)
        if existing is not None:
            await self.files.wait_closed(existing.inode)
            existing = self.table.by_path(path)
        if existing is not None and self.files.writer(existing.inode) is not None:
            fh = await self.files.open(existing, flags | os.O_TRUNC)
            existing.lookups += 1  # a create reply is a lookup, whatever it found
            return fh, self.files.view(existing)
        now = time.time_ns()
        meta = FileMeta(stat.S_IFREG | stat.S_IMODE(mode), uid, gid, now)
        node = self.table.upsert(path, False, mode=meta.mode, uid=uid, gid=gid, mtime_ns=now,
                                 atime_ns=now, ctime_ns=now, size=0, etag="",
                                 has_metadata=True, kept=None, expires=0.0)
        node.lookups += 1
        return self.files.create(node, meta, flags), node

    async def open(self, inode: int, flags: int) -> int:
        node = self._node(inode)
        if node.is_dir:
            raise FsError("", errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._check_writable()
        await self.files.wait_closed(inode)  # a release still storing: see what it stores
        if flags & os.O_ACCMODE != os.O_RDONLY:
            # attributes set here and not yet stored go first: the writer pins the object's
            # ETag as it will stay. A reader stores them before its first read instead
            # (`OpenFiles.read`): rsync opens a file read-only only to fchmod it. If S3
            # refuses, they stay pending (not reverted): the writer starts from them
            await self.deferred.store_meta(inode, report=False)
            async with self.deferred.lock(inode):
                pass  # a rename of the file in progress moves it before a writer starts
        if self.files.writer(inode) is None and node.path.startswith("\0"):
            # unlinked (or replaced) after the kernel looked it up: nothing to open, no key
            # to read or write; the kernel looks the name up again
            raise FsError("", errno.ESTALE)
        if self.files.writer(inode) is None:
            node.expires = 0.0  # close-to-open consistency: see the object as it is now
            path = node.path
            try:
                # a HEAD: the names after it gain nothing from a LIST page (each open
                # asks again), and a page of up to 1,000 keys costs far more than a HEAD
                await self.getattr(inode, by_list=False)
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                # the object is gone (another client deleted it, or a queued upload of it
                # failed): ESTALE makes the kernel look the name up again, so an open with
                # O_CREAT creates the file anew and a plain open gets ENOENT
                raise FsError("", errno.ESTALE) from None
            if node.path != path and not path.startswith("\0"):
                # another client replaced the object: the kernel's inode (and its size) is
                # the old one; ESTALE makes the kernel look the path up again and open the
                # new inode (the VFS retries an open that fails so with LOOKUP_REVAL)
                raise FsError("", errno.ESTALE)
        return await self.files.open(node, flags)

    async def unlink(self, parent: int, name: str) -> None:
        self._check_writable()
        path = self._child_path(parent, name)
        node = await self._settled(path)
        if node.is_dir:
            raise FsError("", errno.EISDIR)
        # S3 first: a refused delete (bucket policy, Object Lock, read-only credentials)
        # fails the unlink with the file as it was -- its writer still uploading, its
        # deferred attributes still to be stored. Only then is a writer detached.
        first = self.files.writer(node.inode)
        first_stores = first.stores if first is not None else 0
        aside = None
        async with self.deferred.lock(node.inode):
            # under the lock: a store of its attributes in flight ended first, and none runs
            # during the delete; once the object is gone, deferred ones are never stored
            if first is None and not self.files.closing(node.inode):
                aside = await self._set_aside(node, path)
            try:
                await self._delete_file(path)
            except BaseException:
                if aside is not None:
                    with trio.CancelScope(shield=True):
                        await self._put_back(node, *aside)
                raise
            self.deferred.drop(node.inode)
        detached: list[StreamingWriter] = []
        while True:
            # across the delete (and each await below): an open of the node (looked up
            # before) may have made a writer, a writer may have completed and stored the
            # object again, or its last release begun. Each writer is detached once (its
            # upload aborted, later writes dropped); what it stored since the delete began
            # (a completion in flight, or one that came during the delete) is deleted again
            writer = self.files.writer(node.inode)
            if writer is not None and not any(writer is done for done in detached):
                before = first_stores if writer is first else 0  # a new one: nothing yet
                await writer.detach()  # waits for a completion in progress
                detached.append(writer)
                if writer.stores == before:
                    continue  # it stored nothing since the delete began
            elif self.files.closing(node.inode):
                await self.files.wait_closed(node.inode)  # what that release stored goes
            else:
                break
            await self._delete_file(path, again=True)
        if aside is not None:
            # readers opened across the delete (the node still had its path) read the
            # object set aside too; none can open it from here on
            self.files.set_aside(node, *aside)
        self.table.remove_path(path)
        self.known.gone(path)

    async def _set_aside(self, node: Node, path: str) -> tuple[str, str, str, str] | None:
        """A file open for reading keeps its bytes after `rm` until its last close: before
        the name is deleted, its object is copied to a key of the mount's own (pinned to
        the ETag the readers read), and they read from there with the copy's own ETag (a
        copy of a multipart object has another). Returns (the name's key, its ETag, the
        copy's key, the copy's ETag) once the readers were moved, None when none reads it.
        A refused copy fails the unlink with nothing changed."""
        readers = [r for r in self.files.readers_of(node) if same_etag(r.etag, node.etag)]
        if not readers or not node.etag:
            return None  # (readers of an older object get ESTALE anyway)
        key, etag = self.key(path), node.etag
        aside = self.files.aside_key(node.inode)
        try:
            copied = await self.store.copy(key, aside, PutOptions(temporary=True),
                                           readers[0].size, etag)
        except (NotFound, PreconditionFailed):
            return None  # deleted or replaced by another client: nothing to keep
        except FsError as exc:
            raise FsError(f"rm {path}: it is open for reading here, and keeping its bytes "
                          f"for its readers (a copy to {aside}) failed ({error_reason(exc)}); "
                          "nothing was changed", exc.errno) from None
        # across the copy: readers may have opened (those until the name is gone are moved
        # by the call after the delete) or closed, the last one too (the copy goes now)
        copied = '"' + copied.strip('"') + '"'
        if not self.files.set_aside(node, key, etag, aside, copied):
            await self.files.delete_aside(aside)
            return None
        return key, etag, aside, copied

    async def _put_back(self, node: Node, key: str, etag: str, aside: str, _: str) -> None:
        """The delete of the name failed: its readers read it again, the copy goes."""
        self.files.put_back(node, key, etag)
        await self.files.delete_aside(aside)

    async def _delete_file(self, path: str, again: bool = False) -> None:
        try:
            await self.store.delete(self.key(path))
        except NotFound:
            pass
        except FsError as exc:
            left = ("what a writer of it stored meanwhile is left; rm it again" if again else
                    "the file and its open writers are left as they were")
            raise FsError(f"rm {path}: the delete failed ({error_reason(exc)}); {left}",
                          exc.errno) from None

    async def _settled(self, path: str) -> Node:
        """The node at `path` once no last release of its writer is still storing it (an
        unlink or rename would act on the object before that release's changes land, and
        the release would then write to a deleted or moved key)."""
        while True:
            node = await self._lookup_quiet(path)
            if not self.files.closing(node.inode):
                return node
            await self.files.wait_closed(node.inode)

    async def rename(self, parent: int, name: str, new_parent: int, new_name: str,
                     flags: int) -> None:
        """Server-side copy, then delete: not atomic (a crash between leaves both)."""
        self._check_writable()
        if flags & RENAME_EXCHANGE:
            raise FsError("rename: RENAME_EXCHANGE is not supported", errno.EINVAL)
        old = self._child_path(parent, name)
        new = self._child_path(new_parent, new_name, creating=True)
        while not await self._rename_once(old, new, flags):
            pass  # the file was opened for writing meanwhile: again, moving its writer

    async def _rename_once(self, old: str, new: str, flags: int) -> bool:
        """False when a writer of the source appeared across the awaits before the move."""
        source = await self._settled(old)
        writer = self.files.writer(source.inode)
        replaced = None  # the target's writer: detached once the copy replaced its object
        target = None
        # the kernel's LOOKUP of the target, just before, may have found it missing: taken
        if not self._asked_missing(new):
            try:
                target = await self._settled(new)  # a release still storing it finishes first
            except FsError:
                pass
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError("", errno.EEXIST)
            if target.is_dir and not source.is_dir:
                raise FsError("", errno.EISDIR)
            if source.is_dir and not target.is_dir:
                raise FsError("", errno.ENOTDIR)
            if target.is_dir and not await self._dir_is_empty(new):
                raise FsError("", errno.ENOTEMPTY)
            replaced = self.files.writer(target.inode)
            if replaced is writer or target is source:
                replaced = None
        if source.is_dir:
            busy = [node.path for i, _ in self.files.writers()
                    if (node := self.table.get(i)) is not None
                    and node.path.startswith(old + "/")]
            if busy:
                log.warning("rename %s: %s is still open for writing; close it first", old,
                            busy[0])
                raise FsError("", errno.EBUSY)
            await self.deferred.store_under(old + "/")
            await self._rename_tree(old, new)
        elif writer is not None:
            # under the writer's lock: it completes first, and no write lands on the old key
            await writer.move(self.key(new), new,
                              functools.partial(self._move_object, old, new, source=source,
                                                replacing=replaced),
                              self._renamed_type(source, old, new))
        else:
            target_inode = target.inode if target is not None else None
            async with self.deferred.lock_all(source.inode, target_inode):
                # across the waits: a store of either's attributes may have run, or the
                # source been renamed or removed by a request that came first, or opened
                # for writing (opens for writing wait for this lock: none comes after)
                if source.path != old:
                    raise FsError("", errno.ENOENT)
                if self.files.writer(source.inode) is not None or \
                        self.files.closing(source.inode):
                    return False
                carried = self.deferred.take(source.inode)
                if carried is not None and not same_etag(carried.etag, source.etag):
                    carried = None  # for an object no longer there
                # the attributes the node shows and until when: still true of the copy if
                # it has the source's ETag (the same bytes; the metadata copied with them
                # or ours, `_move_object`) and the mtime is in that metadata (else it is
                # the LastModified, the copy's own)
                known = source.expires if source.fresh and source.has_metadata and \
                    source.mtime_stored else 0.0
                try:
                    etag = await self._move_object(old, new, source.size,
                                                   carried.meta if carried else None,
                                                   source=source, replacing=replaced)
                except BaseException:
                    # a refused copy changed nothing: the target keeps its deferred
                    # attributes, the source's are still to be stored under the old name
                    if carried is not None:
                        self.deferred.put_back(source.inode, carried)
                    raise
                if target_inode is not None:
                    self.deferred.drop(target_inode)  # its object was replaced
                self.table.move(old, new)
                source.stored_etag = etag  # the copy is this mount's: it may rewrite it
                if carried is not None:  # what the copy stored is known: no HEAD needed
                    source.etag = etag
                    source.expires = time.monotonic() + self.config.attr_timeout
                elif same_etag(etag, source.etag):
                    # as fresh as before the move: the kernel's SETATTR of its own times
                    # right after (writeback cache), or a stat, sends no HEAD of it
                    source.expires = known
                if source.meta_pending and self.deferred.pending(source.inode) is None:
                    self.table.meta_stored(source)
        if writer is not None or source.is_dir:
            self.table.move(old, new)
        self.known.gone(old)
        self.known.forget_missing(new)
        if source.is_dir:
            self.known.dir_moved(old, new)
        return True

    def _renamed_type(self, source: Node, old: str, new: str) -> str | None:
        """The content type of `source` once renamed (`_move_object` decides the same)."""
        choice = self.config.content_type
        return renamed_type(old, new, kept_type(source.kept, content_type(old, choice)), choice)

    async def _move_object(self, old: str, new: str, size: int,
                           meta: FileMeta | None = None, source: Node | None = None,
                           replacing: StreamingWriter | None = None) -> str:
        """`meta`: attributes deferred for the object, stored by this copy. The object keeps
        what it carries (`Kept`, which CopyObject alone does not for storage class and
        encryption): known from the source node's HEAD, or a HEAD now for a node that was
        only listed. A guessed content type follows the new name (`renamed_type`).
        `replacing`: the writer of a file open at `new`, detached once the copy has replaced
        its object (a refused copy leaves it writing, as if the rename had not been asked)."""
        ours = None  # our attributes as stored, where a HEAD tells them
        if source is None or not source.has_metadata:
            info = await self.store.head(self.key(old))
            kept = Kept.of(info)
            ours = {k: v for k, v in info.metadata.items() if k in OUR_KEYS}
        else:
            kept = source.kept
        choice = self.config.content_type
        stored = kept_type(kept, content_type(old, choice))
        wanted = renamed_type(old, new, stored, choice)
        if meta is None and wanted == stored:
            options = None  # metadata and content headers copied as they are
        else:
            if meta is not None:
                ours = meta.to_headers()
            elif ours is None:
                ours = meta_of(self.files.view(source)).to_headers()
            options = rewrite_options(ours, kept, wanted)
        # (class and encryption are sent either way: the object's own where known)
        headers = kept.headers if kept is not None else None
        stores = replacing.stores if replacing is not None else 0
        try:
            etag = await self.store.copy(self.key(old), self.key(new), options, size,
                                         headers=headers)
        except FsError as exc:
            raise FsError(f"mv {old} {new}: the copy failed ({error_reason(exc)}); nothing was "
                          "changed", exc.errno) from None
        if source is not None and source.kept is not None and wanted != stored:
            source.kept = dataclasses.replace(source.kept, content_type=wanted)
        if replacing is not None:
            # like an unlinked file's, its bytes must never land over the object renamed
            # here. Across the copy it may have completed, storing after the copy did: once
            # detached (which waits for a completion in flight) it stores nothing more, and
            # the copy is made again if it stored since the copy began. (A writer of the
            # source may hold its own lock here, in `move`: the kernel never runs two
            # renames of one file system at once over the same names, so no two renames
            # take these locks in opposite order.)
            await replacing.detach()
            self.table.remove_path(new)  # its node is unlinked, whatever comes next
            if replacing.stores != stores:
                etag = await self.store.copy(self.key(old), self.key(new), options, size,
                                             headers=headers)
        try:
            await self.store.delete(self.key(old))
        except FsError as exc:
            # the new name holds the copy now, whatever the table knew of it: asked again
            target = self.table.by_path(new)
            if target is not None:
                target.expires = 0.0
            self.known.forget_missing(new)
            raise FsError(f"mv {old} {new}: copied, but deleting {old} failed "
                          f"({error_reason(exc)}); both names are there now, as after a crash in "
                          f"between: rm {old} once allowed", exc.errno) from None
        return etag

    async def _rename_tree(self, old: str, new: str) -> None:
        """Every key under the directory, copied in parallel, then deleted (deepest last).
        The attributes objects of the directory and those inside (`DirAttributes.attrs_key`)
        are copied before and deleted after."""
        old_prefix, new_prefix = self.key(old) + "/", self.key(new) + "/"
        attrs = await self.dirs.copy(old, new)
        token = None
        while True:
            page = await self.store.list_page(old_prefix, None, token)
            # each object's storage class and encryption, which CopyObject does not keep,
            # and each marker's metadata (a marker is written anew): HEADs pipelined, far
            # cheaper than the copies
            files = [info.key for info in page.objects]
            heads = dict(zip(files, await self.store.head_many(files), strict=True)) \
                if files else {}
            await run_parallel(functools.partial(self._move_key, info, old_prefix, new_prefix,
                                                 heads.get(info.key))
                               for info in page.objects)
            for info in sorted(page.objects, key=lambda o: (o.key.endswith("/"), -len(o.key))):
                await self.store.delete(info.key)
            token = page.next_token
            if token is None:
                break
        for key in attrs:
            await self.store.delete(key)
        self.table.invalidate_subtree(old)

    async def _move_key(self, info: ObjectInfo, old_prefix: str, new_prefix: str,
                        head: ObjectInfo | FsError | None = None) -> None:
        target = new_prefix + info.key[len(old_prefix):]
        if info.key.endswith("/") and not info.size:
            # a directory marker: some servers (SeaweedFS) keep these as real directories
            # that CopyObject cannot read, so write a new marker instead, with the metadata
            # (the directory's attributes) the old one has (one holding bytes, written by
            # another tool, is copied: its bytes are data)
            await self.store.put(target, b"", PutOptions(
                head.metadata if isinstance(head, ObjectInfo) else {}, None))
        else:
            await self.store.copy(info.key, target, None, info.size, headers=head.headers
                                  if isinstance(head, ObjectInfo) else None)


    # -- symbolic links, and what an object store cannot be ----------------------------------

    async def symlink(self, parent: int, name: str, target: bytes, uid: int,
                      gid: int) -> Node:
        """Stored as s3fs-fuse stores links: the target is the body, the mode has S_IFLNK."""
        self._check_writable()
        path = self._child_path(parent, name, creating=True)
        if await self._exists(path, creating=True):
            raise FsError("", errno.EEXIST)
        now = time.time_ns()
        meta = FileMeta(stat.S_IFLNK | 0o777, uid, gid, now)
        etag = await self.store.put(self.key(path), target, PutOptions(meta.to_headers(), None))
        self.known.forget_missing(path)
        node = self.table.upsert(path, False, mode=meta.mode, uid=uid, gid=gid, mtime_ns=now,
                                 atime_ns=now, ctime_ns=now, size=len(target), etag=etag,
                                 has_metadata=True, kept=None, mtime_stored=True,
                                 expires=time.monotonic() + self.config.attr_timeout)
        node.target = bytes(target)
        node.lookups += 1
        return node

    async def readlink(self, inode: int) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise FsError("", errno.EINVAL)
        if node.target is None or not node.fresh:
            if node.size > SYMLINK_MAX:
                raise FsError(f"{node.path}: a link target of {node.size} bytes", errno.EIO)
            data = await self.store.get_range(self.key(node.path), 0, node.size,
                                              node.etag or None)
            node.target = bytes(data)
        return node.target

    async def link(self, inode: int, parent: int, name: str) -> Node:
        raise FsError("", errno.EOPNOTSUPP)  # an object has one key: no hard links

    async def mknod(self, parent: int, name: str, mode: int, uid: int,
                    gid: int) -> Node:
        """Regular files only (an empty object); devices, FIFOs and sockets have no object."""
        if not stat.S_ISREG(mode):
            raise FsError("", errno.EOPNOTSUPP)
        fh, node = await self.create(parent, name, mode, os.O_WRONLY | os.O_CREAT, uid, gid)
        try:
            await self.files.flush(fh)
        finally:
            await self.files.release(fh)
        return node
