"""Deferred metadata: chmod/chown/utimes of closed files, stored later (META_DELAY).

A chmod/chown/utimes of a closed regular file whose object this mount stored itself
(`Node.stored_etag`; any other is stored at once, so that a refusal is chmod's errno)
changes its node at once (stat shows it) and is stored by the first of: a rename of
the file (its CopyObject carries the new metadata: one copy instead of one per setattr
plus the rename's), an open, truncate or fsync of it, the mount's shutdown, or
`DeferredMeta.store_meta_forever` once META_DELAY has passed. An unlink (or the object's
replacement, by this mount or another client) drops it.
Everything that stores, drops or carries a change holds the inode's metadata lock, so a
store in flight never interleaves with a rename, an unlink or another setattr of the
file. A change is stored only onto the object it was made for (its ETag as this mount
last saw it): a node that another client's object replaced, or that a writer of this
mount completed anew, has its change dropped, never copied onto the new object. A
store S3 refuses keeps the change pending and visible, retried with backoff
(`_store_failed`): a change the mount could not store is never silently reverted.

State owned here (`DeferredMeta`): the changes not yet stored (`_pending`, inode ->
`_PendingMeta`, oldest first), the per-inode metadata locks (`_locks`), whether the
mount's storing task runs (`_deferring`), the inodes whose store has started (`_storing`)
and that task's wakeup. The namespace asks through `pending`, `may_defer`, `defer`,
`drop`, `take`/`put_back` (a rename carries a change), `store_meta`, `store_under` and
`lock`/`lock_all`; it owns the paths, this only the stores of what was deferred.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .config import FsConfig
from .errors import FsError, NotFound, PreconditionFailed, error_reason
from .inode_table import InodeTable, Node
from .object_meta import (
    FileMeta,
    SetAttr,
    changed_meta,
    content_type,
    kept_type,
    rewrite_options,
)
from .object_store import ObjectStore, PutOptions
from .open_files import OpenFiles

log = logging.getLogger(__name__)

# chmod/chown/utimes of a closed file this mount stored are stored at most this many
# seconds later (unless a rename carries them first, an unlink makes them moot, or
# fsync/open/unmount stores them): rsync sets a temporary file's times and mode just before
# renaming it, and one CopyObject then does what three did. What a crash of the mount can lose.
META_DELAY = 1.0
META_STORE_CONCURRENCY = 16  # deferred attributes stored at once when their time comes
META_RETRY_MAX = 300.0  # a refused deferred store is retried after 2, 4, 8 ... s, then this


@dataclass
class _PendingMeta:
    """Attributes of a closed file applied to its node but not yet to its object."""

    node: Node
    meta: FileMeta  # what to store (the node shows it already)
    etag: str  # the object they belong to: never stored onto another one
    due: float  # trio time by which they are stored (the next retry after a failure)
    failures: int = 0  # stores that failed (refused): kept, retried with backoff
    logged: bool = False  # the ERROR line for its failure was written


def same_etag(a: str, b: str) -> bool:
    """SeaweedFS answers CopyObject with the ETag unquoted, HEAD and listings quoted."""
    return a.strip('"') == b.strip('"')


def meta_of(node: Node) -> FileMeta:
    """The attributes the node shows, as they would be stored."""
    return FileMeta(node.mode, node.uid, node.gid, node.mtime_ns, mtime_explicit=True,
                    atime_ns=node.atime_ns or None, ctime_ns=node.ctime_ns or None)


def apply_meta(node: Node, meta: FileMeta, config: FsConfig) -> None:
    node.mode, node.uid, node.gid, node.mtime_ns = meta.mode, meta.uid, meta.gid, \
        meta.mtime_ns
    node.atime_ns = meta.atime_ns or meta.mtime_ns
    node.ctime_ns = meta.ctime_ns or meta.mtime_ns
    node.expires = time.monotonic() + config.attr_timeout
    node.has_metadata = True


def stored_options(node: Node, meta: FileMeta, config: FsConfig) -> PutOptions:
    """`meta` stored on the node's object, with what else the object carries."""
    return rewrite_options(meta.to_headers(), node.kept,
                           kept_type(node.kept, content_type(node.path, config.content_type)))


class DeferredMeta:
    def __init__(self, store: ObjectStore, key: Callable[[str], str], config: FsConfig,
                 table: InodeTable, files: OpenFiles):
        self.store = store
        self.key = key
        self.config = config
        self.table = table
        self.files = files
        files.before_read = functools.partial(self.store_meta, report=False)
        self._locks: dict[int, trio.Lock] = {}  # one metadata rewrite per inode at once
        # inode -> attributes not yet stored, oldest first (see META_DELAY); only while a
        # mount-owned task stores them (`store_meta_forever`), else setattr stores at once
        self._pending: dict[int, _PendingMeta] = {}
        self._deferring = False
        self._storing: set[int] = set()  # inodes whose deferred store has started
        self._wakeup = trio.Event()  # a change deferred, or a store done

    def pending(self, inode: int) -> _PendingMeta | None:
        """The change deferred for `inode`, if any."""
        return self._pending.get(inode)

    def take(self, inode: int) -> _PendingMeta | None:
        """A rename carries the change in its copy (under the inode's lock): no longer
        pending; `put_back` if the copy fails."""
        return self._pending.pop(inode, None)

    def put_back(self, inode: int, pending: _PendingMeta) -> None:
        self._pending[inode] = pending

    def may_defer(self, node: Node) -> bool:
        """A closed regular file whose object and metadata this mount knows as they are now,
        and whose object this mount stored itself (rsync's temporary file, a file it just
        copied or chmod'ed): writing it has just shown that S3 lets the mount rewrite it.
        Anything else -- another tool's object, where a policy, Object Lock or read-only
        credentials may refuse the copy, symbolic links, writers, a release still storing,
        a file whose deferred store was refused -- is stored at once, so that a refusal
        reaches the program as an errno instead of being reported done."""
        pending = self._pending.get(node.inode)
        return (self._deferring and stat.S_ISREG(node.mode) and node.has_metadata
                and bool(node.etag) and same_etag(node.stored_etag, node.etag)
                and not node.path.startswith("\0")
                and self.table.by_path(node.path) is node and not self.busy(node)
                and (pending is None or not pending.failures))

    def busy(self, node: Node) -> bool:
        """A writer holds the object (its base pinned by ETag): a copy now would break it."""
        return self.files.writer(node.inode) is not None or self.files.closing(node.inode)

    def defer(self, node: Node, change: SetAttr) -> Node:
        """Apply `change` to the node now and leave its storing to later (no await here)."""
        pending = self._pending.get(node.inode)
        if pending is not None and not same_etag(pending.etag, node.etag):
            self.drop(node.inode)  # for an object no longer there
            pending = None
        current = pending.meta if pending is not None else meta_of(node)
        meta = changed_meta(current, change, time.time_ns())
        if meta == current:
            return node  # changes nothing: nothing to store
        if pending is None:
            self._pending[node.inode] = _PendingMeta(node, meta, node.etag,
                                                     trio.current_time() + META_DELAY)
            node.meta_pending = True
            self._wakeup.set()
        else:
            pending.meta = meta  # stored by the first change's deadline
        apply_meta(node, meta, self.config)
        return node

    def drop(self, inode: int) -> _PendingMeta | None:
        pending = self._pending.pop(inode, None)
        if pending is not None:
            self.table.meta_stored(pending.node)
        return pending

    async def store_meta(self, inode: int, report: bool = True) -> tuple[str, str] | None:
        """Store deferred attributes of `inode` now (at fsync, before a directory rename
        copies it: a failure raises its errno; `report=False` before an open for writing, a
        truncation or a reader's first read: a failure leaves them pending, and a writer
        then carries them). Left deferred while a writer holds the object: that writer's
        completion stores them (it started from the node's attributes). Returns (the ETag
        before, the copy's) when it copied."""
        pending = self._pending.get(inode)
        if pending is None:
            return None
        if not report and pending.failures and pending.due > trio.current_time():
            return None  # refused before: retried at its time, not at every read
        async with self.lock(inode):
            # across the wait: the change may have been stored, carried or dropped
            pending = self._pending.get(inode)
            if pending is not None and not self.busy(pending.node):
                return await self._store_pending(pending, raising=report)
        return None

    async def _store_pending(self, pending: _PendingMeta, raising: bool,
                             final: bool = False) -> tuple[str, str] | None:
        """The caller holds the inode's metadata lock. Returns (the ETag before, the
        copy's) when it copied. A failure keeps the change (see `_store_failed`)."""
        node = pending.node
        if node.path.startswith("\0") or self.table.by_path(node.path) is not node or \
                not same_etag(node.etag, pending.etag):
            self.drop(node.inode)
            log.debug("%s: attributes set here not stored: the file was removed or replaced",
                      node.path)
            return None
        key = self.key(node.path)
        options = stored_options(node, pending.meta, self.config)
        try:
            # across the copy (the lock is held): no rename, unlink or setattr of the file
            # runs, an open for writing waits; the change stays registered, so a HEAD or a
            # listing that sees the object before the copy leaves the node as it is
            # (`Namespace._upsert_file`), and one after it finds the attributes stored
            etag = await self.store.copy(key, key, options, node.size, pending.etag)
        except (NotFound, PreconditionFailed):
            self.drop(node.inode)
            log.info("%s: deleted or replaced by another client before its new attributes "
                     "were stored", node.path)
            return None
        except FsError as exc:
            self._store_failed(pending, exc, raising, final)
            return None
        # (cancelled: the mount is going, and `store_all_meta` stores it)
        self.drop(node.inode)
        if pending.failures:
            log.info("%s: its new attributes are stored, after %d refused attempt(s)",
                     node.path, pending.failures)
        node.stored_etag = etag
        node.mtime_stored = True  # (the copy's metadata holds every attribute)
        if node.cached_etag is not None and same_etag(node.cached_etag, node.etag):
            node.cached_etag = etag  # the same bytes: the kernel's cached pages stay valid
        node.etag = etag
        node.expires = time.monotonic() + self.config.attr_timeout
        return pending.etag, etag

    def _store_failed(self, pending: _PendingMeta, exc: FsError, raising: bool,
                      final: bool) -> None:
        """A deferred change S3 refused (or failed to store): never silently reverted. It
        stays pending -- the node shows it, the kernel enforces it, HEADs and listings of
        the same object leave it -- and is retried with backoff (2, 4, 8 ... s up to
        META_RETRY_MAX); the next setattr of the file is stored at once (`may_defer`), so
        its program sees the errno, and so does an fsync (`raising`: the adapter logs that
        one). Otherwise one ERROR line per file says what to do; at unmount (`final`)
        another says it is lost."""
        node = pending.node
        pending.failures += 1
        pending.due = trio.current_time() + min(META_DELAY * 2 ** pending.failures,
                                                META_RETRY_MAX)
        reason = error_reason(exc)
        if final:
            log.error("%s: its new attributes (mode %o, uid %d, gid %d) were never stored "
                      "and are lost at unmount: %s; set them again once S3 allows copying "
                      "the object onto itself", node.path, stat.S_IMODE(pending.meta.mode),
                      pending.meta.uid, pending.meta.gid, reason)
        elif raising:
            pending.logged = True
            raise FsError(f"{node.path}: its new attributes are not stored ({reason}); this "
                          "mount keeps them and retries", exc.errno)
        elif not pending.logged:
            pending.logged = True
            log.error("%s: could not store its new attributes (%s); this mount keeps showing "
                      "them and retries with backoff, but S3 and other mounts have the old "
                      "ones until it succeeds: allow CopyObject of the key onto itself (bucket "
                      "policy, Object Lock, credentials), or chmod/touch it again to see the "
                      "error", node.path, reason)
        else:
            log.debug("%s: attributes still not stored (attempt %d, next in %.0f s): %s",
                      node.path, pending.failures, pending.due - trio.current_time(), reason)

    async def store_meta_forever(self) -> None:
        """Owned by the mount: stores each deferred change once META_DELAY has passed, each
        in a task of its own (one waiting for its file's lock, during a long rename say,
        holds up no other). While it runs, setattr defers; without it setattr stores at
        once (unit tests that do not start it)."""
        self._deferring = True
        limiter = trio.CapacityLimiter(META_STORE_CONCURRENCY)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    self._wakeup = trio.Event()
                    now = trio.current_time()
                    later = math.inf
                    for inode, pending in list(self._pending.items()):
                        if inode in self._storing:
                            continue
                        if pending.due <= now:
                            self._storing.add(inode)
                            nursery.start_soon(self._store_due, pending, limiter)
                        else:
                            later = min(later, pending.due)
                    with trio.move_on_at(later):
                        await self._wakeup.wait()
        finally:
            self._deferring = False

    async def _store_due(self, pending: _PendingMeta, limiter: trio.CapacityLimiter) -> None:
        inode = pending.node.inode
        try:
            async with limiter, self.lock(inode):
                # across the waits: the change may have been stored, carried or dropped
                if self._pending.get(inode) is not pending:
                    return
                if self.busy(pending.node):  # opened for writing meanwhile: after its close
                    del self._pending[inode]
                    pending.due = trio.current_time() + META_DELAY
                    self._pending[inode] = pending
                    return
                await self._store_pending(pending, raising=False)
        except Exception:  # never let one file's surprise take the mount down
            log.exception("storing the attributes of %s failed", pending.node.path)
        finally:
            self._storing.discard(inode)
            self._wakeup.set()

    async def store_all_meta(self) -> None:
        """Unmounting: every deferred change is stored before the process exits."""
        self._deferring = False
        if not self._pending:
            return
        log.debug("storing the attributes of %d file(s) before unmounting", len(self._pending))
        limiter = trio.CapacityLimiter(META_STORE_CONCURRENCY)

        async def one(inode: int) -> None:
            async with limiter, self.lock(inode):
                pending = self._pending.get(inode)
                if pending is not None:
                    await self._store_pending(pending, raising=False, final=True)

        async with trio.open_nursery() as nursery:
            for inode in list(self._pending):
                nursery.start_soon(one, inode)

    async def store_under(self, prefix: str) -> None:
        """Before a directory's keys are copied: what was deferred for files inside it."""
        for inode in [i for i, p in self._pending.items() if p.node.path.startswith(prefix)]:
            await self.store_meta(inode)  # a failure fails the rename: the copy would lose it

    @contextlib.asynccontextmanager
    async def lock_all(self, *inodes: int | None):
        """The metadata locks of several inodes, in inode order (no deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for inode in sorted({i for i in inodes if i is not None}):
                await stack.enter_async_context(self.lock(inode))
            yield

    @contextlib.asynccontextmanager
    async def lock(self, inode: int):
        lock = self._locks.setdefault(inode, trio.Lock())
        async with lock:
            yield
        if not lock.locked() and not lock.statistics().tasks_waiting:
            self._locks.pop(inode, None)
