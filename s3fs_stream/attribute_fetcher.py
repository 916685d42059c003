"""Attributes of listed and looked-up entries, fetched ahead in parallel.

A listing carries no mode, owner or times (they live in x-amz-meta-*): each entry's HEAD
tells them. This room sends those HEADs -- pipelined in batches on a few connections
(`head_nodes`), started ahead in the mount's nursery (`head_soon`), for the rest of a
directory once someone stats its listed entries (`demand`), and for the next names of a
directory that is being walked by lookups (`read_ahead`). A stale file the mount HEADed
before is revalidated by a LIST page instead, with the names after it (`revalidate`,
`listed_unchanged`: same ETag, size and LastModified). What a HEAD found is handed back
to the namespace (`took_head` for a file's object, `took_dir` for a directory's marker),
which owns the nodes' paths and decides what the answer means.

State owned here: the HEAD limiter shared by every caller (`_heads`), per directory the
listed nodes nobody asked about yet (`_backlog`) and whether a task drains them
(`_draining`), the walks seen (`_walks`), and per directory the revalidating LIST page
that is out (`_revalidating`) or until when none is sent (`_unconfirmed`). A node's `fetching` event says a HEAD of it
is out: whoever needs the node waits for that one instead of sending another.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import time
from collections.abc import Callable

import trio

from .deferred_meta import same_etag
from .dir_attributes import DirAttributes
from .errors import FsError, NotFound, Unreachable
from .inode_table import InodeTable, Node, join, parent_of
from .object_store import ObjectInfo, ObjectStore
from .open_files import OpenFiles

log = logging.getLogger(__name__)

HEAD_CONCURRENCY = 32  # parallel HEADs for a listing's attributes (the store's pool bounds it)
HEAD_BATCH = 16  # HEADs pipelined on one connection
WALK_WINDOW = 2.0  # seconds between lookups of stale names that make a walk of a directory
WALK_AHEAD = 64  # known names after the one looked up whose HEADs a walk sends ahead
WALK_DIRS = 256  # directories whose walks are followed at once
BACKLOG_MAX = 20_000  # listed nodes waiting for their metadata, per directory


def listed_unchanged(node: Node, info: ObjectInfo) -> bool:
    """A listing's entry `info` is the object whose metadata a HEAD of this mount told the
    node (`Node.head_modified`): the same ETag, size and LastModified. S3 changes metadata
    only by a rewrite (a copy onto itself too), which gives the object a later
    LastModified: the node's metadata is as fresh as a new HEAD would make it."""
    return not node.is_dir and node.has_metadata and node.head_modified != 0 and \
        node.head_modified == int(info.last_modified) and node.size == info.size and \
        same_etag(node.etag, info.etag)


class AttributeFetcher:
    def __init__(self, store: ObjectStore, key: Callable[[str], str], table: InodeTable,
                 files: OpenFiles, nursery: trio.Nursery | None,
                 dirs: DirAttributes, took_head: Callable[[Node, str, ObjectInfo], Node],
                 took_dir: Callable[[Node, str, ObjectInfo | None], None],
                 attr_timeout: float = 1.0):
        self.store = store
        self.key = key
        self.table = table
        self.files = files
        self._nursery = nursery
        self._took_head = took_head  # what a HEAD of a file's path (then) found
        self.dirs = dirs
        self._attr_timeout = attr_timeout
        # directory path -> set once the LIST page of a `revalidate` there is in and taken
        self._revalidating: dict[str, trio.Event] = {}
        # directory path -> until when `revalidate` sends no page there (one did not help)
        self._unconfirmed: dict[str, float] = {}
        self._took_dir = took_dir  # what holds a directory's attributes (its path then)
        # directory path -> listed nodes whose metadata nobody has asked for yet
        self._backlog: dict[str, collections.deque[Node]] = {}
        self._draining: set[str] = set()
        self._heads = trio.CapacityLimiter(HEAD_CONCURRENCY)
        # directory -> (expiry, its known names sorted, once a walk is seen): `read_ahead`
        self._walks: dict[str, tuple[float, list[str] | None]] = {}

    def head_soon(self, nodes: list[Node]) -> None:
        """Start HEADs of these nodes in the mount's nursery; `head_nodes` waits for them."""
        nodes = [node for node in nodes if node.fetching is None]
        if nodes and self._nursery is not None:
            self._nursery.start_soon(self.head_nodes, nodes)

    async def head_nodes(self, nodes: list[Node]) -> None:
        """HEAD these nodes in parallel (HEAD_CONCURRENCY at most, over every caller);
        returns when each has its metadata or failed. A node whose HEAD is already out
        waits for that one. A few workers take the nodes in turn: a task per node costs
        as much CPU as the HEAD itself."""
        busy = [node.fetching for node in nodes if node.fetching is not None]
        # once each (a backlog may list a node twice)
        todo = list({id(node): node for node in nodes
                     if node.fetching is None and not (node.fresh and node.has_metadata)
                     }.values())
        for node in todo:  # claimed at once: others wait instead of sending another HEAD
            node.fetching = trio.Event()
        queue = iter(todo)

        async def worker() -> None:
            async with self._heads:
                while batch := list(itertools.islice(queue, HEAD_BATCH)):
                    try:
                        await self._batch(batch)
                    finally:
                        for node in batch:
                            done, node.fetching = node.fetching, None
                            if done is not None:
                                done.set()

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(-(-len(todo) // HEAD_BATCH), HEAD_CONCURRENCY)):
                    nursery.start_soon(worker)
        finally:
            for node in queue:  # cancelled: let go of what was claimed and not sent
                done, node.fetching = node.fetching, None
                if done is not None:
                    done.set()
        for event in busy:
            await event.wait()

    async def _batch(self, nodes: list[Node]) -> None:
        """HEAD these nodes' objects and directory markers in one go (pipelined), then
        where the server drops markers' metadata, the directories' attributes objects."""
        files = [node for node in nodes if not node.is_dir]
        dirs = [node for node in nodes if node.is_dir]
        # may change across the awaits: checked after
        paths, dir_paths = [node.path for node in files], [node.path for node in dirs]
        keys = [self.key(path) for path in paths] + \
            [self.dirs.marker_key(path) for path in dir_paths]
        found = await self.store.head_many(keys) if keys else []
        for node, path, result in zip(files, paths, found[:len(files)], strict=True):
            if isinstance(result, ObjectInfo):
                self._took_head(node, path, result)
            elif not isinstance(result, NotFound):
                log.debug("HEAD for %s failed: %s", path, result)
            elif not node.has_metadata and node.path == path and \
                    self.files.writer(node.inode) is None:
                self.table.remove_path(path)  # listed, deleted since: readdir skips it
        if not dirs:
            return
        markers = await self.dirs.holders(dir_paths, found[len(files):])
        for node, path, marker in zip(dirs, dir_paths, markers, strict=True):
            if isinstance(marker, FsError):
                log.debug("HEAD for %s failed: %s", path, marker)
            else:
                self._took_dir(node, path, marker)

    async def revalidate(self, node: Node) -> None:
        """A stale file whose metadata a HEAD of this mount told (`Node.head_modified`): one
        LIST page from its name on tells whether it and the names after it (up to 1,000)
        are still those objects (`listed_unchanged`); those are fresh again. `ls -l` of a
        large directory stats the entries after readdir handed them over, often after the
        attribute timeout: a LIST per 1,000 of them instead of a HEAD each. Whoever finds
        the node still stale HEADs it."""
        parent = parent_of(node.path)
        if self._unconfirmed.get(parent, 0.0) > time.monotonic():
            return  # a page here just now confirmed nothing: HEADs
        if any(ord(char) < 32 for char in node.path):
            return  # a control character in StartAfter: moto fails the LIST (a HEAD asks)
        out = self._revalidating.get(parent)
        if out is not None:  # a page of this directory is out: it may cover this node
            await out.wait()
            if node.fresh:
                return
        path = node.path  # may change across the await: nodes are taken by path after it
        prefix = self.key(parent) + "/" if parent else self.key("")
        done = self._revalidating[parent] = trio.Event()
        try:
            # every key from this one on: a prefix of a key sorts before it
            page = await self.store.list_page(prefix, "/", None, 1000, self.key(path)[:-1])
            hidden = {p[len(prefix):-1] for p in page.prefixes}  # directories hide objects
            now = time.monotonic()
            confirmed = 0
            for info in page.objects:
                name = info.key[len(prefix):]
                sibling = self.table.by_path(join(parent, name))
                if sibling is not None and name not in hidden and \
                        listed_unchanged(sibling, info) and \
                        self.files.writer(sibling.inode) is None:
                    sibling.expires = max(sibling.expires, now + self._attr_timeout)
                    confirmed += 1
            if not confirmed:  # all changed (another client rewrote the directory?): a walk
                if len(self._unconfirmed) > WALK_DIRS:  # of it HEADs, a LIST at most
                    self._unconfirmed.clear()  # every WALK_WINDOW
                self._unconfirmed[parent] = now + WALK_WINDOW
        except FsError as exc:
            log.debug("LIST from %s failed: %s", path, exc)
            if isinstance(exc, Unreachable):  # no answer for the whole retry budget: the
                raise  # stat fails now, not after a HEAD's budget as well
        finally:
            if self._revalidating.get(parent) is done:
                del self._revalidating[parent]
            done.set()

    def demand(self, node: Node) -> None:
        """Someone stats listed entries of this directory (ls -l, find -printf, rsync): HEAD
        the rest of what was listed in parallel instead of one getattr at a time."""
        parent = parent_of(node.path)
        backlog = self._backlog.get(parent)
        if backlog is None or parent in self._draining or self._nursery is None:
            return
        self._draining.add(parent)
        self._nursery.start_soon(self._drain, parent, backlog)

    async def _drain(self, parent: str, backlog: collections.deque[Node]) -> None:
        try:
            while backlog:
                batch = [backlog.popleft() for _ in range(min(len(backlog), 256))]
                await self.head_nodes([n for n in batch if n.lookups and not n.has_metadata
                                        and not n.path.startswith("\0")])
        finally:
            self._draining.discard(parent)
            if self._backlog.get(parent) is backlog and not backlog:
                del self._backlog[parent]

    def listed_without_meta(self, parent: str, node: Node) -> None:
        backlog = self._backlog.get(parent)
        if backlog is None:
            if len(self._backlog) > 64:  # directories listed long ago and never stat'ed
                for path in [p for p in self._backlog if p not in self._draining][:32]:
                    del self._backlog[path]
            backlog = self._backlog[parent] = collections.deque(maxlen=BACKLOG_MAX)
        backlog.append(node)

    def read_ahead(self, path: str) -> None:
        """A second stale name of one directory looked up within WALK_WINDOW is a walk
        (`rsync` again, `find -newer`, `stat *`): HEAD the next known names of the directory
        ahead of it, pipelined in the background, so that their lookups find them fresh."""
        parent, name = parent_of(path), path.rpartition("/")[2]
        now = time.monotonic()
        walk = self._walks.get(parent)
        if walk is None or walk[0] < now:
            if len(self._walks) > WALK_DIRS:
                self._walks.clear()
            self._walks[parent] = (now + WALK_WINDOW, None)  # one lookup is not a walk yet
            return
        names = walk[1]
        if names is None:
            names = sorted(self.table.children(parent))
        self._walks[parent] = (now + WALK_WINDOW, names)
        start = bisect.bisect_right(names, name)
        ahead = [node for sibling in names[start:start + WALK_AHEAD]
                 if (node := self.table.by_path(join(parent, sibling))) is not None
                 and not node.is_dir and not (node.fresh and node.has_metadata)
                 and self.files.writer(node.inode) is None]
        self.head_soon(ahead)  # those whose HEAD is not out yet
