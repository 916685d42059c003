"""Open files: the handle table, one writer per inode, readers per handle.

A file opened for writing gets one StreamingWriter per inode, shared by all its handles (the
kernel's writeback cache may send a file's writes through any of them). Reads go through a
RangedReader per read-only handle, or through the writer while the file is being written.

Who completes an object: the flush of a handle opened for writing that changed the file (a
write, a truncation, O_TRUNC, a create), and the release of the last handle of a writer with
changes left. A read-only handle's close never completes anything: a player probing a
recording leaves it streaming (only its read of bytes uploaded and freed makes the writer
complete early, `StreamingWriter._read_part`).

What may change across an await here: the writer table (an open may bind to a writer, a
release may take it out), a handle's node path (rename), and the writer's own state. So the
check for an existing writer and the insert of a new one happen with no await in between,
and release takes a writer out of the table before it awaits anything. A writer whose last
release is still completing is in `_closing`: an open of its inode waits for it (the
namespace before it refreshes the attributes), so it starts from the object that release
stores instead of the one before it (whose ETag the release is about to make stale).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .config import FsConfig
from .errors import FsError, error_reason
from .inode_table import InodeTable, Node
from .memory_budget import MemoryBudget
from .object_meta import FileMeta, content_type, file_attrs, kept_type
from .object_store import ObjectInfo, ObjectStore
from .part_schedule import PartSchedule
from .ranged_reader import RangedReader
from .spill_area import SpillArea
from .upload_pool import UploadPool
from .upload_queue import UploadQueue
from .writer import Base, State, StreamingWriter

log = logging.getLogger(__name__)


@dataclass
class Handle:
    node: Node
    writer: StreamingWriter | None = None
    reader: RangedReader | None = None
    keep_cache: bool = False
    writing: bool = False  # opened for writing
    wrote: bool = False  # changed the file through this handle: its flush completes
    # opened for writing with the writeback cache on: the kernel reads through it to complete
    # a page before a partial-page write (a program's own read looks the same)
    patching: bool = False
    stale: bool = False  # the object was replaced while open: every read is ESTALE
    # the writer's `arrivals` at this handle's open or last flush (see `flush`)
    seen: int = 0


class OpenFiles:
    def __init__(self, store: ObjectStore, prefix: str, config: FsConfig, table: InodeTable,
                 nursery: trio.Nursery, pool: UploadPool, budget: MemoryBudget,
                 spill: SpillArea, drop_pages: Callable[[int, int, int], None] | None = None):
        self.store = store
        self.prefix = prefix
        self.config = config
        self.table = table
        self._nursery = nursery
        self._pool = pool
        self.budget = budget
        self._spill = spill
        self._drop_pages = drop_pages  # (inode, start, length): kernel cache, best effort
        self.schedule = PartSchedule.for_budget(config.part_size, config.max_memory)
        # `-o queued_uploads`: closes of files of one part queue their PutObject (the
        # writer stays in `_writers`, served from memory, until it is stored: see `release`)
        self.queue = UploadQueue(nursery) if config.queued_uploads else None
        self._handles: dict[int, Handle] = {}
        self._fh_numbers = itertools.count(1)
        self._writers: dict[int, StreamingWriter] = {}
        self._closing: dict[int, trio.Event] = {}  # inode -> set when its last release ends
        self._releasing: set[StreamingWriter] = set()  # writers completing at their release
        # inode -> the key its object was set aside to when it was removed while open for
        # reading (`Namespace.unlink`): deleted at its readers' last close
        self._aside: dict[int, str] = {}
        # set by the namespace: stores attributes deferred for an inode (DeferredMeta.store_meta)
        # ((the ETag before, the copy's) if it copied the object onto itself)
        self.before_read: Callable[[int], Awaitable[tuple[str, str] | None]] | None = None

    # -- what the namespace asks ------------------------------------------------------------

    def writer(self, inode: int) -> StreamingWriter | None:
        return self._writers.get(inode)

    def writers(self) -> list[tuple[int, StreamingWriter]]:
        return list(self._writers.items())

    def closing(self, inode: int) -> bool:
        return inode in self._closing

    async def wait_closed(self, inode: int) -> None:
        """Until no last release of a writer of `inode` is completing."""
        while (closing := self._closing.get(inode)) is not None:
            await closing.wait()

    def view(self, node: Node) -> Node:
        """The node with what its writer knows (size, attributes) while it is being written."""
        writer = self._writers.get(node.inode)
        if writer is not None:
            node.size = writer.size
            node.mode, node.uid, node.gid = writer.meta.mode, writer.meta.uid, writer.meta.gid
            node.mtime_ns = writer.meta.mtime_ns
        return node

    # -- files removed while open for reading -----------------------------------------------

    def readers_of(self, node: Node) -> list[RangedReader]:
        """The readers of `node`'s object (read-only handles not served by a writer)."""
        return [h.reader for h in self._handles.values()
                if h.node is node and h.reader is not None]

    def set_aside(self, node: Node, old_key: str, old_etag: str, key: str, etag: str) -> bool:
        """The object of `node`, removed while open, is now (also) at `key` with `etag`: its
        readers of that object read from there, and the copy goes at their last close.
        Called again (idempotent) for readers opened while the unlink was in progress.
        False when no reader reads it (all closed meanwhile: the caller deletes the copy)."""
        readers = self.readers_of(node)
        for reader in readers:
            if reader.key == old_key and reader.etag.strip('"') == old_etag.strip('"'):
                reader.move(key, etag)
        if any(reader.key == key for reader in readers):
            self._aside[node.inode] = key
            return True
        return False

    def aside_key(self, inode: int) -> str:
        return self._spill.aside_key(inode)

    def put_back(self, node: Node, old_key: str, old_etag: str) -> str | None:
        """The unlink failed after `set_aside`: readers read the name's object again.
        Returns the key set aside (for the caller to delete)."""
        key = self._aside.pop(node.inode, None)
        for reader in self.readers_of(node):
            if reader.key == key:
                reader.move(old_key, old_etag)
        return key

    async def delete_aside(self, key: str) -> None:
        try:
            await self.store.delete(key)
        except FsError as exc:  # a later mount deletes it after a day (`SpillArea`)
            log.warning("could not delete %s, the copy of a removed file kept for its "
                        "readers until their last close: %s; delete it, or a mount of this "
                        "prefix does after a day", key, exc)

    # -- opening -----------------------------------------------------------------------------

    def create(self, node: Node, meta: FileMeta, flags: int) -> int:
        """A new, empty file: a writer of its own and a handle that changed it."""
        writer = self._writers.get(node.inode)
        if writer is None:
            writer = self._writers[node.inode] = self._new_writer(node, meta, None)
        return self._add_handle(node, writer, writing=_for_writing(flags), wrote=True)

    async def open(self, node: Node, flags: int) -> int:
        """Open `node`, whose attributes the caller just refreshed (close-to-open)."""
        await self.wait_closed(node.inode)
        writer = self._writers.get(node.inode)
        if not _for_writing(flags):
            if writer is not None:
                return self._add_handle(node, writer)  # served from what the writer holds
            reader = RangedReader(self.store, self.prefix + node.path, node.path, node.size,
                                  node.etag, self.budget, self._nursery,
                                  self.config.read_ahead_initial, self.config.read_ahead_max,
                                  self.config.read_concurrency)
            keep_cache = node.cached_etag == node.etag
            node.cached_etag = node.etag
            return self._add_handle(node, reader=reader, keep_cache=keep_cache)
        if writer is None:
            # an existing object opened for writing continues it (append, in-place changes)
            # its attributes as stored; a change to its bytes makes the mtime "now"
            meta = FileMeta(node.mode, node.uid, node.gid, node.mtime_ns, mtime_explicit=True,
                            atime_ns=node.atime_ns or None, ctime_ns=node.ctime_ns or None)
            writer = self._writers[node.inode] = self._new_writer(
                node, meta, Base(node.etag, node.size))
        fh = self._add_handle(node, writer, writing=True, wrote=bool(flags & os.O_TRUNC))
        if flags & os.O_TRUNC:
            try:
                await writer.truncate(0)
            except BaseException:
                await self.release(fh)
                raise
        return fh

    def _new_writer(self, node: Node, meta: FileMeta, base: Base | None) -> StreamingWriter:
        def completed(etag: str, size: int) -> None:
            node.etag, node.size = etag, size
            node.stored_etag = etag  # this mount may rewrite it (`DeferredMeta.may_defer`)
            node.has_metadata = True
            node.mtime_stored = True  # a writer stores every attribute

        drop_pages = (functools.partial(self._drop_pages, node.inode) if self._drop_pages
                      else None)
        # an existing object keeps what it carries (its content type, other tools' headers,
        # tags ...): the open's HEAD just told them (`Namespace.open`)
        kept = node.kept if base is not None else None
        writer = StreamingWriter(self.prefix + node.path, node.path, self.store, self._pool,
                                 self.budget, self.schedule, self._spill, meta,
                                 kept_type(kept, content_type(node.path,
                                                              self.config.content_type)),
                                 base, completed, drop_pages, kept)
        writer.fsync_interval = self.config.fsync_interval
        writer.queue = self.queue
        return writer

    def _add_handle(self, node: Node, writer: StreamingWriter | None = None,
                    reader: RangedReader | None = None, keep_cache: bool = False,
                    writing: bool = False, wrote: bool = False) -> int:
        fh = next(self._fh_numbers)
        patching = writing and self.config.writeback_cache
        self._handles[fh] = Handle(node, writer, reader, keep_cache, writing, wrote, patching,
                                   seen=writer.arrivals if writer is not None else 0)
        node.open_handles += 1
        if writer is not None:
            writer.handles += 1
            if not writing:
                writer.readers += 1  # uploaded parts near the end stay held for it
        return fh

    def inode_of(self, fh: int) -> int | None:
        handle = self._handles.get(fh)
        return handle.node.inode if handle is not None else None

    def keep_cache(self, fh: int) -> bool:
        return self._handles[fh].keep_cache

    # -- requests on handles -------------------------------------------------------------

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError("", errno.EBADF)
        return handle

    async def read(self, fh: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        handle = self._handle(fh)
        if handle.stale:
            raise FsError("", errno.ESTALE)  # said once, at the first such read
        if handle.reader is not None:
            if handle.node.meta_pending and self.before_read is not None:
                # attributes set after the open and not yet stored: stored before reading, so
                # that the copy that stores them cannot change the ETag under this read
                copied = await self.before_read(handle.node.inode)
                # across that await the node may have taken another client's object: only
                # the ETag of our own copy (the same bytes) replaces the one read against
                if copied is not None and handle.reader.etag == copied[0]:
                    handle.reader.etag = copied[1]
            try:
                return await handle.reader.read(offset, length)
            except FsError as exc:
                if exc.errno not in (errno.ESTALE, errno.ENOENT):
                    raise
                # the old bytes are gone from the bucket (overwritten, or deleted by another
                # client: a GET of it finds no object): ESTALE, as NFS answers, for this
                # descriptor from now on; one line, not one per read
                handle.stale = True
                handle.node.expires = 0.0  # the next open sees the new object (or none)
                handle.node.cached_etag = None
                log.warning("%s: replaced or deleted while open here (by a rename over it or "
                            "another client); reads of this descriptor answer ESTALE, open "
                            "it again to read what the name holds now", handle.node.path)
                raise FsError("", errno.ESTALE) from None
        return await handle.writer.read_held(offset, length, handle.patching)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        writer = handle.writer if handle.writing else None
        if writer is None:
            raise FsError("", errno.EBADF)
        handle.wrote = True
        writer.arrivals += 1  # counted on arrival: a flush after it completes it (`flush`)
        return await writer.write(offset, data)  # the adapter logs what fails

    async def truncate(self, fh: int | None, node: Node, size: int) -> None:
        """ftruncate through a handle, or truncate(2) of a path (a writer of its own)."""
        handle = self._handles.get(fh) if fh is not None else None
        writer = self._writers.get(node.inode)
        if writer is not None:
            if handle is not None:
                handle.wrote = True
            await writer.truncate(size)
            return
        own = await self.open(node, os.O_WRONLY)
        try:
            self._handles[own].wrote = True
            await self._writers[node.inode].truncate(size)
            await self.flush(own)
        finally:
            await self.release(own)

    async def flush(self, fh: int) -> None:
        """close(): complete what this handle changed -- its writes, or attributes set
        through it (GNU touch opens for writing and sets times on the descriptor): the
        program's next command must see them, and RELEASE comes only after close returns."""
        handle = self._handles.get(fh)
        if handle is None or not handle.writing:
            return
        # With the writeback cache the kernel writes every program's dirty pages through
        # one writing handle of the file (the one opened last, until its release), even
        # after that handle's own FLUSH: a WRITE that arrived since this handle's open or
        # last flush may carry its program's bytes. Taken before the await: a WRITE still
        # in progress is ahead of this completion on the writer's lock, one arriving during
        # it comes after and counts for the next flush.
        seen, handle.seen = handle.seen, handle.writer.arrivals
        others = self.config.writeback_cache and handle.seen != seen
        if handle.wrote or others or handle.writer.meta_dirty:
            await self._reporting(handle.writer.flush(queue=self.queue is not None),
                                  handle.writer)
            handle.node.expires = time.monotonic() + self.config.attr_timeout
        self._report_queued(handle.node.path)

    async def fsync(self, fh: int) -> None:
        """Everything written is stored: held bytes uploaded, a queued upload of the file
        done (also for a read-only descriptor: coreutils' `sync FILE` opens it so)."""
        handle = self._handles.get(fh)
        if handle is None or handle.writer is None:
            return
        if handle.writing:
            await self._reporting(handle.writer.fsync(), handle.writer)
        else:
            await handle.writer.wait_stored()
            if handle.writer.queue_failed:
                handle.writer.queue_failed = False
                raise FsError("", handle.writer.failure_errno())
        self._report_queued(handle.node.path)

    async def _reporting(self, request: Awaitable[None], writer: StreamingWriter) -> None:
        """A request of `writer`: when it fails, a failed queued upload is reported."""
        try:
            await request
        except FsError:
            writer.queue_failed = False
            raise

    def _report_queued(self, path: str) -> None:
        """A queued upload of `path` failed after its writer was closed: this fsync or
        close reports it (once; the ERROR line was logged when it failed)."""
        if self.queue is not None:
            failed = self.queue.take_failure(path)
            if failed is not None:
                raise FsError("", failed)

    async def sync_queued(self, directory: str) -> None:
        """fsync of a directory (`sync DIR`): wait for every upload queued now, and report
        the failures not yet reported of files in `directory` (\"\": all)."""
        if self.queue is None:
            return
        for _, writer in self.writers():
            await writer.wait_stored()
        failed = self.queue.take_failures_under(directory)
        if failed is not None:
            raise FsError("", failed)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        handed_off = False  # to `_close_when_stored`, which tells the table at its end
        try:
            if handle.reader is not None:
                handle.reader.close()
                inode = handle.node.inode
                # the last reader of a file removed while open: its copy goes (no open can
                # add one: the node has no path any more)
                if inode in self._aside and not self.readers_of(handle.node):
                    await self.delete_aside(self._aside.pop(inode))
            writer = handle.writer
            if writer is not None:
                writer.handles -= 1
                if not handle.writing:
                    writer.reader_closed()
                if writer.handles == 0:
                    if writer.queued:  # its close waits for the upload, in the background
                        handed_off = True
                        self.queue.start(self._close_when_stored, handle.node, writer)
                    else:
                        await self._last_close(handle.node, writer)
        finally:
            if not handed_off:
                self.table.closed(handle.node)

    async def _close_when_stored(self, node: Node, writer: StreamingWriter) -> None:
        """The last close of a file whose upload is queued, once it is stored (a task of
        the queue). Until then the writer stays in `_writers`: stat and listings show the
        file with its size, reads are served from memory, an open binds to the writer (its
        writes, a truncation, a rename or an unlink wait for the upload first)."""
        try:
            await writer.wait_stored()
            # across the wait: the file may have been opened again (that handle's release
            # closes the writer), closed again (a second task: whichever finds the writer
            # still in the table closes it, the other finds it gone)
            if writer.handles == 0 and self._writers.get(node.inode) is writer:
                if writer.queue_failed:  # not reported to anyone yet: the next fsync or
                    writer.queue_failed = False  # close of the name does
                    self.queue.failed_upload(writer.name, writer.failure_errno(),
                                             error_reason(writer.error))
                await self._last_close(node, writer)
        finally:
            self.table.closed(node)

    async def _last_close(self, node: Node, writer: StreamingWriter) -> None:
        # out of the table before any await: an open that comes meanwhile gets a new writer
        # instead of one about to free its buffers
        if self._writers.get(node.inode) is writer:
            del self._writers[node.inode]
        done = self._closing[node.inode] = trio.Event()
        self._releasing.add(writer)
        try:
            if writer.state in (State.WRITING, State.COMPLETE):
                try:  # writes or attributes that came after the last flush
                    await writer.flush()
                except FsError as exc:
                    if writer.error is None:  # else `_fail` logged the cause already
                        log.error("%s: completing at release failed: %s", writer.name,
                                  error_reason(exc))
        finally:
            self._releasing.discard(writer)
            try:
                await writer.release()
            finally:
                # across the awaits above: no open, rename or unlink of the inode ran (they
                # wait for `_closing`); the writer's own completion set the node's ETag/size
                node.expires = 0.0
                stored = _stored_attrs(node, writer, self.config)
                if stored is not None:
                    # what this mount just stored is what a HEAD would answer: fresh for
                    # attr_timeout like any HEAD's answer (rsync's utimes and chmod of its
                    # closed temporary file need no HEAD first)
                    for name, value in stored.items():
                        setattr(node, name, value)
                if self._closing.get(node.inode) is done:
                    del self._closing[node.inode]
                done.set()

    async def sync_forever(self, seconds: float) -> None:
        """Store what every writer holds once its oldest unstored change is `seconds` old
        (the mount's `max_unsynced` bound on what a crash loses); owned by the mount."""
        while True:
            await trio.sleep(max(0.2, min(seconds / 4, 5.0)))
            for _, writer in self.writers():
                await writer.sync_if_older(seconds)

    def releasing(self) -> list[StreamingWriter]:
        """Writers completing at their last close (no longer in `writers`)."""
        return list(self._releasing)

    def stop_completions(self) -> None:
        """A signal, and the requests in progress had their time: completions still copying
        parts server-side stop (`StreamingWriter.stop`), their uploads left for recovery."""
        for writer in [writer for _, writer in self.writers()] + self.releasing():
            writer.stop()

    async def shutdown(self, seconds: float = 120.0) -> list[str]:
        """Unmounting: files still open have everything they wrote uploaded and are left as
        recoverable uploads, never completed. Returns their names; those not uploaded
        within `seconds` (all files together) are named too."""
        left = []
        deadline = trio.current_time() + seconds
        if self.queue is not None and self.queue.pending:
            log.info("unmounting: waiting for %d queued upload(s)", self.queue.queued)
            with trio.move_on_at(deadline):
                await self.queue.drain()  # each one's last close too
        for _, writer in self.writers():
            with trio.move_on_at(deadline) as scope:
                if await writer.abandon():
                    left.append(writer.name)
            if scope.cancelled_caught:
                left.append(writer.name)
        self._writers.clear()
        for key in list(self._aside.values()):  # nobody reads them once unmounted
            await self.delete_aside(key)
        self._aside.clear()
        if left:
            log.warning("%d file(s) still open at unmount (%s): everything written to them is "
                        "uploaded and left for 's3stream recover'", len(left),
                        ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))
        return left

def _stored_attrs(node: Node, writer: StreamingWriter, config: FsConfig) -> dict | None:
    """The node's attributes as the writer's last store left the object (its ETag, size
    and the metadata it sent), or None when not known for sure: nothing stored, a failure,
    attributes changed since and not stored, a copy by a rename, or the node showing
    another object (unlinked, replaced)."""
    if writer.state is not State.COMPLETE or writer.error is not None or writer.meta_dirty \
            or writer.stored_meta is None or writer.base is None or node.is_dir \
            or node.path.startswith("\0") or node.etag != writer.base.etag \
            or node.size != writer.size:
        return None
    info = ObjectInfo(writer.key, writer.size, writer.base.etag, time.time(),
                      writer.stored_meta)
    attrs = file_attrs(info, config)
    return {name: attrs[name] for name in ("mode", "uid", "gid", "mtime_ns", "atime_ns",
                                           "ctime_ns", "expires", "mtime_stored")} | \
        {"has_metadata": True}


def _for_writing(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_RDONLY
