"""Inode numbers ↔ paths, the kernel's lookup counts, and attribute freshness.

Paths are keys relative to the mount's prefix, without a trailing slash ("" is the root).
An inode lives while the kernel holds lookups on it or a handle is open; its number is never
reused for another path during the mount.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .object_meta import Kept

ROOT_INODE = 1


@dataclass
class Node:
    inode: int
    path: str
    is_dir: bool
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    etag: str = ""
    has_metadata: bool = False  # False: attributes came from a listing, HEAD for the rest
    expires: float = 0.0  # monotonic time until which the attributes are fresh
    lookups: int = 0
    open_handles: int = 0
    cached_etag: str | None = None  # ETag whose data the kernel page cache may hold
    atime_ns: int = 0  # 0: the mtime
    ctime_ns: int = 0  # 0: the mtime
    target: bytes | None = None  # a symbolic link's target, once read
    fetching: object = None  # trio.Event while a HEAD for these attributes is in flight
    # what the object carries besides our attributes (object_meta.Kept), from its HEAD;
    # None for a listing's entry (has_metadata False) or an object this mount made
    kept: Kept | None = None
    # attributes changed here and not yet stored (Namespace's deferred metadata): the node
    # stays in the table even when the kernel forgets it, or the change would be lost
    meta_pending: bool = False
    # the ETag of the object as this mount last stored it (a completion, a copy): while it is
    # still the node's, S3 has just shown that the mount may rewrite it (deferred metadata)
    stored_etag: str = ""
    # the kernel was handed this inode with a listing's attributes (its HEAD failed): with
    # the writeback cache it keeps that mtime for as long as it holds the inode, so the
    # metadata, once known, must make it drop the inode (Namespace._upsert_file)
    listing_shown: bool = False
    # the object's LastModified (whole seconds) when a HEAD answered at least a second after
    # it, else 0: a listing that shows this LastModified, the ETag and the size shows the
    # object that HEAD saw -- any rewrite since (a copy onto itself with new metadata too)
    # has a later LastModified -- so its metadata needs no new HEAD (`Namespace._entry_node`)
    head_modified: int = 0
    # the object's metadata holds its mtime (x-amz-meta-mtime), so a copy keeps it; the
    # mtime of one without is its LastModified, which a copy changes (`Namespace.rename`)
    mtime_stored: bool = False

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires


def _replaces(node: Node, attrs: dict) -> bool:
    size, mode = attrs.get("size"), attrs.get("mode")
    return (size is not None and size != node.size and attrs.get("etag") != node.etag) or \
        (mode is not None and stat.S_IFMT(mode) != stat.S_IFMT(node.mode))


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


class InodeTable:
    def __init__(self, uid: int, gid: int, dir_mode: int):
        self._next = ROOT_INODE + 1
        # the mount point's attributes live here only (nothing in S3 changes them): known, so
        # the kernel keeps them for attr_timeout -- with 0 it asked a GETATTR of the root
        # for each path it walked (two per entry of an `ls -l`)
        root = Node(ROOT_INODE, "", True, stat.S_IFDIR | dir_mode, uid, gid, time.time_ns(),
                    has_metadata=True)
        root.lookups = 1
        self._by_inode: dict[int, Node] = {ROOT_INODE: root}
        self._by_path: dict[str, Node] = {"": root}
        # parent path -> {name: node}, kept beside _by_path: a walk of a tree asks for each
        # directory's children, and a scan of the table per directory (200,000 nodes: 79 ms)
        # blocked the event loop for minutes in a second rsync of 2,000 directories
        self._children: dict[str, dict[str, Node]] = {}
        # (old, new): the kernel may still hold `old` for the path; the namespace tells it
        self.on_replaced = None

    def __getitem__(self, inode: int) -> Node:
        return self._by_inode[inode]

    def get(self, inode: int) -> Node | None:
        return self._by_inode.get(inode)

    def by_path(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def children(self, directory: str) -> dict[str, Node]:
        """The nodes directly in `directory` that the table holds, by name (a copy)."""
        return dict(self._children.get(directory, {}))

    def __len__(self) -> int:
        return len(self._by_inode)

    def upsert(self, path: str, is_dir: bool, **attrs) -> Node:
        """The node for `path`, created or updated with fresh attributes. An object that
        another client replaced (a new ETag) under a node the kernel holds gets a new inode:
        with the writeback cache the kernel trusts its own size of a cached inode, so the old
        one must not come back for the new object. A new object of the same size keeps the
        inode: its new ETag makes the next open drop the cached pages, and readers of the old
        one get ESTALE from If-Match."""
        node = self._by_path.get(path)
        replaced = node is not None and not is_dir and (node.lookups or node.open_handles) \
            and _replaces(node, attrs)
        if node is None or node.is_dir != is_dir or replaced:
            old = node
            if node is not None:
                self._unlink_path(node)
            node = Node(self._next, path, is_dir, **attrs)
            self._next += 1
            self._by_inode[node.inode] = node
            self._set_path(node)
            if old is not None and self.on_replaced is not None:
                self.on_replaced(old, node)
        else:
            for name, value in attrs.items():
                setattr(node, name, value)
        return node

    def adopt(self, node: Node) -> Node:
        """`node` back in the table under its inode number and path after it was dropped
        (the kernel forgot it while a readdir that is about to hand it out again waited);
        the node now at its path, if another took it meanwhile."""
        current = self._by_path.get(node.path)
        if current is not None:
            return current
        self._by_inode[node.inode] = node  # numbers are never reused: no other has it
        self._set_path(node)
        return node

    def forget(self, inode: int, count: int) -> None:
        node = self._by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def closed(self, node: Node) -> None:
        node.open_handles -= 1
        self._maybe_drop(node)

    def meta_stored(self, node: Node) -> None:
        """Its deferred attributes were stored (or dropped): it may go like any node."""
        node.meta_pending = False
        self._maybe_drop(node)

    def remove_path(self, path: str) -> None:
        """The path is gone (unlink, rename): open handles keep the node, lookups miss it."""
        node = self._by_path.get(path)
        if node is not None:
            self._unlink_path(node)

    def move(self, old: str, new: str) -> None:
        self.remove_path(new)
        node = self._by_path.get(old)
        if node is not None:
            self._del_path(node)
            node.path = new
            self._set_path(node)
            node.expires = 0.0

    def invalidate_subtree(self, path: str) -> None:
        prefix = path + "/"
        for key in [k for k in self._by_path if k.startswith(prefix)]:
            self._unlink_path(self._by_path[key])

    def _set_path(self, node: Node) -> None:
        self._by_path[node.path] = node
        parent, _, name = node.path.rpartition("/")
        self._children.setdefault(parent, {})[name] = node

    def _del_path(self, node: Node) -> None:
        """Take the node's path out of both indexes (if the path is still the node's)."""
        if self._by_path.get(node.path) is not node:
            return
        del self._by_path[node.path]
        parent, _, name = node.path.rpartition("/")
        siblings = self._children.get(parent)
        if siblings is not None and siblings.get(name) is node:
            del siblings[name]
            if not siblings:
                del self._children[parent]

    def _unlink_path(self, node: Node) -> None:
        self._del_path(node)
        node.path = f"\0unlinked/{node.inode}"
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups == 0 and node.open_handles == 0 and not node.meta_pending and \
                node.inode != ROOT_INODE:
            self._by_inode.pop(node.inode, None)
            self._del_path(node)
