#!/usr/bin/env python3
"""A do-nothing pyfuse3 file system: the physical ceiling of FUSE reads on this box.

One read-only file, `obj`, of SIZE bytes; read() returns a slice of one preallocated buffer
(a memoryview: no copy in Python, pyfuse3 copies it into its reply as it does for s3stream).
No S3, no trio work beside pyfuse3's own: what `scripts/bench` measures on it is the kernel,
libfuse and pyfuse3 with trio, the stack every s3stream READ also crosses.

Mounted like s3stream (mount.py): the same FUSE options and writeback-cache flag, the same
number of request tasks, and, once INIT is answered, the same kernel settings (read_ahead_kb
1024, max_background 4) through s3stream's own `tune_kernel_bdi`; opens wait for them as
s3stream's do.

    fuse_ceiling.py MOUNTPOINT SIZE     (runs until unmounted: fusermount3 -u MOUNTPOINT)
"""
from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

from s3fs_stream.mount import MAX_TASKS, limit_malloc_caching, tune_kernel_bdi

FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"obj"


class CeilingFs(pyfuse3.Operations):
    def __init__(self, size: int):
        super().__init__()
        self.size = size
        # a pattern, not zeros: the same bytes every run, and no zero-page tricks anywhere
        block = bytes(range(256)) * 4096
        self.data = memoryview((block * (size // len(block) + 1))[:size])
        self.initialized = trio.Event()
        self.tuned = trio.Event()
        self.enable_writeback_cache = True  # as FuseOperations: the same INIT flags

    def init(self):
        self.initialized.set()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 300
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o444, 1, self.size
        attr.st_blksize = 1 << 20
        attr.st_blocks = (attr.st_size + 511) // 512
        return attr

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        await self.tuned.wait()  # as s3stream: the read-ahead is sized when open returns
        return pyfuse3.FileInfo(fh=inode, keep_cache=False)

    async def read(self, fh, off, size):
        return self.data[off:off + size]


async def serve(fs: CeilingFs, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        async def tune():
            await fs.initialized.wait()
            try:
                await trio.to_thread.run_sync(tune_kernel_bdi, mountpoint)
            finally:
                fs.tuned.set()
        nursery.start_soon(tune)
        await pyfuse3.main(min_tasks=2, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def main() -> None:
    mountpoint, size = sys.argv[1], int(sys.argv[2])
    limit_malloc_caching()
    fs = CeilingFs(size)
    # s3stream's options (mount.fuse_options; pyfuse3's defaults for the rest: max_read and
    # max_write are libfuse's, as for s3stream); writes are refused at open
    pyfuse3.init(fs, mountpoint, {"fsname=fuse-ceiling", "subtype=ceiling",
                                  "default_permissions", "noatime"})
    try:
        trio.run(serve, fs, mountpoint)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
