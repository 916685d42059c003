"""The thin pyfuse3 layer: requests in, FileSystem calls, EntryAttributes and errnos out.

It exists so that the file system can be tested without FUSE. Every exception is converted
here, at one boundary: an FsError becomes its errno (logged when it carries a message), and
anything unexpected is logged with its traceback and answered with EIO, because pyfuse3 takes
the whole mount down on any exception that is not a FUSEError.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import time

import pyfuse3
import trio

from .errors import FsError, first_error
from .filesystem import FileSystem
from .inode_table import Node
from .object_meta import SetAttr

log = logging.getLogger(__name__)

BLOCK_SIZE = 512
DOTS = 2  # readdir offsets of "." and ".."
NOTIFY_QUEUE = 1024  # invalidations waiting; more are dropped (the timeouts still apply)


class KernelNotifier:
    """Tells the kernel that entries and inodes it caches changed in S3 (another client
    replaced an object). pyfuse3's invalidate_entry waits for requests on the same directory
    and invalidate_inode for writeback of the inode, which only this daemon can answer: so
    they are never called from a request handler, but queued (`notify`, which never blocks)
    and sent one at a time from a worker thread; nothing is sent once requests are no longer
    answered (`stop`)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple](NOTIFY_QUEUE)
        self._running = False

    def notify(self, kind: str, *args) -> None:
        if not self._running:
            return
        try:
            self._send.send_nowait((kind, *args))
        except trio.WouldBlock:
            log.debug("kernel notification queue full; dropped %s %s", kind, args)

    def stop(self) -> None:
        self._running = False

    async def run(self) -> None:
        self._running = True
        async for kind, *args in self._receive:
            if not self._running:
                return
            try:
                if kind == "entry":
                    parent, name, old = args
                    await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent,
                                                  os.fsencode(name), old,
                                                  abandon_on_cancel=True)
                else:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, args[0],
                                                  abandon_on_cancel=True)
            except OSError as exc:
                # ENOENT: the kernel no longer knows it, which is just as good
                if exc.errno != errno.ENOENT:
                    log.debug("kernel notification %s %s failed: %s", kind, args, exc)


BAD_NAME_LOG_INTERVAL = 60.0  # seconds between warnings about names that are not UTF-8


class BadNames:
    """Names from the kernel must be UTF-8, as S3 keys are: other bytes would reach botocore
    as surrogates and fail deep inside it. They are refused with EILSEQ; the log gets one
    warning a minute at most (any local user can send such names), the rest at debug."""

    def __init__(self) -> None:
        self._last_warning = -BAD_NAME_LOG_INTERVAL
        self._quiet = 0  # refusals since the last warning

    def decode(self, raw: bytes, operation: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._log(raw, operation)
            raise pyfuse3.FUSEError(errno.EILSEQ) from None

    def _log(self, raw: bytes, operation: str) -> None:
        now = time.monotonic()
        if now - self._last_warning < BAD_NAME_LOG_INTERVAL:
            self._quiet += 1
            log.debug("%s: name %r is not UTF-8; answering EILSEQ", operation, raw)
            return
        more = f" ({self._quiet} more since the last such line)" if self._quiet else ""
        log.warning("%s: name %r is not UTF-8 (S3 keys are); answering EILSEQ%s", operation,
                    raw, more)
        self._last_warning, self._quiet = now, 0


def _answer(operation: str, exc: FsError) -> pyfuse3.FUSEError:
    """The kernel's answer to an FsError, logged when it carries a message."""
    if exc.message:
        log.log(logging.DEBUG if exc.errno == errno.ENOENT else logging.WARNING,
                "%s: %s", operation, exc.message)
    return pyfuse3.FUSEError(exc.errno)


def _converted(method):
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        self.in_flight += 1
        self.kernel_requests[method.__name__] += 1
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise _answer(method.__name__, exc) from None
        except ExceptionGroup as group:
            if group.split(FsError)[1] is not None:  # something else went wrong in there
                log.exception("unexpected error in %s; answering EIO", method.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            # parallel work (a nursery) that failed with our own errors: the first one
            raise _answer(method.__name__, first_error(group)) from None
        except Exception:
            log.exception("unexpected error in %s; answering EIO", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.in_flight -= 1
            self.last_request = time.monotonic()

    return wrapper


class FuseOperations(pyfuse3.Operations):
    def __init__(self, fs: FileSystem, writeback_cache: bool = True):
        super().__init__()
        self.fs = fs
        self.namespace = fs.namespace
        self.files = fs.files
        # the kernel coalesces small writes into up to 1 MiB requests: 4 KiB writers stream
        # at full speed instead of one FUSE round trip per write (README "Writeback cache")
        self.enable_writeback_cache = writeback_cache
        self._entry_timeout = fs.config.entry_timeout
        self._negative_timeout = fs.config.negative_timeout
        self._attr_timeout = fs.config.attr_timeout
        self.initialized = trio.Event()  # set once the kernel's INIT has been answered
        # set once the mount's kernel settings are in force (mount.tune_kernel): a file
        # opened before would keep the kernel's default read-ahead (128 KiB requests)
        self.tuned = trio.Event()
        self.reads: dict[int, list[int]] = {}  # fh -> [READs, bytes, largest] (debug log)
        self._names = BadNames()
        self.in_flight = 0  # requests being handled
        # the kernel's requests by kind (`s3stream status`): what a program's syscalls cost
        self.kernel_requests: collections.Counter[str] = collections.Counter()
        self.last_request = time.monotonic()  # when the last one ended

    async def quiet(self, pause: float, limit: float) -> None:
        """Return once no request is in flight and none came for `pause` seconds, or after
        `limit`: a close() in progress sends its writeback, FLUSH and RELEASE first."""
        with trio.move_on_after(limit):
            while self.in_flight or time.monotonic() - self.last_request < pause:
                await trio.sleep(0.05)

    def init(self):
        # called while pyfuse3 answers INIT; the reply is sent before any other task runs
        self.initialized.set()

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = self._entry_timeout
        # attributes from a listing lack mtime/mode metadata: let the kernel ask again
        attr.attr_timeout = self._attr_timeout if node.has_metadata else 0
        attr.st_mode = node.mode
        # a file removed while open (fstat of its descriptor) has no name left
        attr.st_nlink = 0 if node.path.startswith("\0") else 2 if node.is_dir else 1
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_size = node.size
        attr.st_blksize = 1 << 20
        attr.st_blocks = (node.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        attr.st_mtime_ns = node.mtime_ns
        attr.st_atime_ns = node.atime_ns or node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns or node.mtime_ns
        return attr

    @_converted
    async def lookup(self, parent_inode, name, ctx=None):
        name = self._names.decode(name, "lookup")
        try:
            node = await self.namespace.lookup(parent_inode, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT or exc.message:
                raise
            missing = pyfuse3.EntryAttributes()  # a negative entry the kernel caches
            missing.st_ino = 0
            missing.entry_timeout = self._negative_timeout
            return missing
        return self._attributes(node)

    async def forget(self, inode_list):
        self.kernel_requests["forget"] += 1
        for inode, count in inode_list:
            try:  # forget has no reply: nothing may escape to pyfuse3
                self.fs.forget(inode, count)
            except Exception:
                log.exception("unexpected error forgetting inode %d", inode)

    @_converted
    async def getattr(self, inode, ctx=None):
        return self._attributes(await self.namespace.getattr(inode))

    @_converted
    async def setattr(self, inode, attr, fields, fh, ctx):
        change = SetAttr(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None)
        return self._attributes(await self.namespace.setattr(inode, change, fh))

    @_converted
    async def opendir(self, inode, ctx):
        return await self.namespace.opendir(inode)

    @_converted
    async def readdir(self, fh, start_id, token):
        # "." and ".." at offsets 0 and 1, the directory's entries from DOTS on. The kernel
        # links no inode for either in a readdirplus reply (no lookup to count)
        if start_id < DOTS:
            directory, parent = self.namespace.dir_nodes(fh)
            for offset, name, node in ((0, b".", directory), (1, b"..", parent)):
                if offset >= start_id and \
                        not pyfuse3.readdir_reply(token, name, self._attributes(node),
                                                  offset + 1):
                    return

        def reply(name: str, node: Node, next_id: int) -> bool:
            # readdirplus: the namespace counts a lookup for each accepted entry
            return pyfuse3.readdir_reply(token, os.fsencode(name), self._attributes(node),
                                         next_id + DOTS)

        await self.namespace.readdir(fh, max(start_id - DOTS, 0), reply)

    @_converted
    async def fsyncdir(self, fh, datasync):
        await self.namespace.fsyncdir(fh)

    @_converted
    async def releasedir(self, fh):
        self.namespace.releasedir(fh)

    @_converted
    async def mkdir(self, parent_inode, name, mode, ctx):
        name = self._names.decode(name, "mkdir")
        node = await self.namespace.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid)
        return self._attributes(node)

    @_converted
    async def rmdir(self, parent_inode, name, ctx):
        await self.namespace.rmdir(parent_inode, self._names.decode(name, "rmdir"))

    @_converted
    async def unlink(self, parent_inode, name, ctx):
        await self.namespace.unlink(parent_inode, self._names.decode(name, "unlink"))

    @_converted
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.namespace.rename(parent_inode_old, self._names.decode(name_old, "rename"),
                                    parent_inode_new, self._names.decode(name_new, "rename"),
                                    flags)

    @_converted
    async def symlink(self, parent_inode, name, target, ctx):
        name = self._names.decode(name, "symlink")
        node = await self.namespace.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return self._attributes(node)

    @_converted
    async def readlink(self, inode, ctx):
        return await self.namespace.readlink(inode)

    @_converted
    async def link(self, inode, new_parent_inode, new_name, ctx):
        new_name = self._names.decode(new_name, "link")
        return self._attributes(await self.namespace.link(inode, new_parent_inode, new_name))

    @_converted
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        name = self._names.decode(name, "mknod")
        return self._attributes(await self.namespace.mknod(parent_inode, name, mode, ctx.uid,
                                                           ctx.gid))

    @_converted
    async def create(self, parent_inode, name, mode, flags, ctx):
        name = self._names.decode(name, "create")
        if not self.tuned.is_set():
            await self.tuned.wait()
        fh, node = await self.namespace.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._attributes(node)

    @_converted
    async def open(self, inode, flags, ctx):
        # the kernel sizes a file's read-ahead from the device's setting when the open
        # returns: the first opens of a fresh mount wait until it is raised
        if not self.tuned.is_set():
            await self.tuned.wait()
        fh = await self.namespace.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.files.keep_cache(fh))

    @_converted
    async def read(self, fh, off, size):
        counts = self.reads.get(fh)
        if counts is None:
            counts = self.reads[fh] = [0, 0, 0]
        counts[0] += 1
        counts[1] += size
        counts[2] = max(counts[2], size)
        return await self.files.read(fh, off, size)

    @_converted
    async def write(self, fh, off, buf):
        return await self.files.write(fh, off, buf)

    @_converted
    async def flush(self, fh):
        await self.files.flush(fh)

    @_converted
    async def fsync(self, fh, datasync):
        await self.files.fsync(fh)
        inode = self.files.inode_of(fh)
        if inode is not None:  # attributes set on a closed file and not yet stored
            await self.namespace.deferred.store_meta(inode)

    @_converted
    async def release(self, fh):
        counts = self.reads.pop(fh, None)
        if counts is not None:
            log.debug("fh %d: the kernel sent %d READs asking for %d bytes, at most %d at once",
                      fh, *counts)
        await self.files.release(fh)

    @_converted
    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        stats.f_blocks = stats.f_bfree = stats.f_bavail = 1 << 40
        stats.f_files = stats.f_ffree = stats.f_favail = 1 << 30
        stats.f_namemax = 255
        return stats
