"""Telling the kernel to forget cached pages of a stream once they are safely in S3.

With the writeback cache, every byte a program writes lands first in a page of the kernel's
page cache, and the kernel keeps those pages after the daemon has uploaded them: a 100 GiB
recording leaves up to 100 GiB of cache behind, and every new GiB goes into pages the kernel
must newly allocate. On the reference VM, with the server's own writes keeping ~2 GiB dirty,
that allocation cost the writing program 3.3 s of system time per GiB
(`copy_folio_from_iter_atomic` in perf), against 0.4 s when the pages of each uploaded part are
dropped and the kernel reuses them. A reader or a write there gets them back from S3
(`_rebase`) instead. While a read-only handle is open the writer keeps the last parts held
for it (`_kept_for_readers`), and their pages stay until they are freed.

pyfuse3 can only invalidate a whole inode, which would also write back the dirty pages of the
part still filling, one page per request. So this sends the ranged FUSE_NOTIFY_INVAL_INODE
itself: a 40-byte message written to the /dev/fuse descriptor, the same bytes libfuse writes.
The kernel handles it inside that write() and waits there for any page of the range under
writeback, which the daemon itself must answer; so the write runs in a worker thread, and
nothing is sent once the daemon stops answering (`stop`).

The kernel drops whole folios, which can be larger than a page (up to 2 MiB here) and are
aligned to their size. So only the 2 MiB blocks that lie wholly inside a range are dropped:
a folio shared with part 1 or with the part still filling must stay, or a partial-page write
there would need bytes of the freed neighbour read back. With the default 8 MiB parts the
whole range goes.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading

import trio

log = logging.getLogger(__name__)

FUSE_NOTIFY_INVAL_INODE = 2
# struct fuse_out_header {u32 len; s32 error (the notify code); u64 unique (0 = notify)}
# + struct fuse_notify_inval_inode_out {u64 ino; s64 off; s64 len}
_INVAL_INODE = struct.Struct("=IiQQqq")  # native byte order, as the kernel reads it
QUEUE = 64  # ranges waiting; more are dropped (best effort: they stay cached, nothing breaks)
FOLIO_MAX = 2 * 1024 * 1024  # the largest page-cache folio on x86-64 (a PMD)


def find_fuse_fd() -> int | None:
    """The descriptor pyfuse3 opened on /dev/fuse (one per mount process)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:  # the descriptor listdir itself used, now closed
            continue
    return None


class PageCacheDropper:
    """Best-effort, never blocking the caller: `drop` queues, `run` sends.

    Messages go to a duplicate of pyfuse3's descriptor, closed only once no write is in
    flight: pyfuse3 closes its own at unmount, and a write abandoned by cancellation must not
    land on whatever reuses that number. After `stop` nothing is written."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple[int, int, int]](QUEUE)
        self._running = False
        self._lock = threading.Lock()  # guards the three fields below, shared with the thread
        self._fd: int | None = None
        self._writing = False
        self._stopped = False

    def drop(self, inode: int, start: int, length: int) -> None:
        """Ask the kernel to forget the cached pages of `inode` in [start, start+length)."""
        first = -(-start // FOLIO_MAX) * FOLIO_MAX
        end = (start + length) // FOLIO_MAX * FOLIO_MAX
        if not self._running or end <= first:
            return
        try:
            self._send.send_nowait((inode, first, end - first))
        except trio.WouldBlock:
            pass

    def stop(self) -> None:
        """No more messages: once the daemon stops answering requests, a message that has
        to wait for writeback would wait forever. The descriptor is closed now, or by the
        write still in flight when it returns (the unmount ends its wait)."""
        self._running = False
        self._send.close()
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._stopped = True
            if not self._writing:
                self._close_fd()

    async def run(self, fuse_fd: int | None) -> None:
        """Send queued ranges until stopped or cancelled (owned by the mount's nursery)."""
        if fuse_fd is None:
            log.debug("no /dev/fuse descriptor found: uploaded pages stay in the page cache")
            return
        with self._lock:
            if self._stopped:
                return
            self._fd = os.dup(fuse_fd)
        self._running = True
        try:
            async for inode, start, length in self._receive:
                if not self._running:
                    return
                message = _INVAL_INODE.pack(_INVAL_INODE.size, FUSE_NOTIFY_INVAL_INODE, 0,
                                            inode, start, length)
                try:
                    await trio.to_thread.run_sync(self._write, message, abandon_on_cancel=True)
                except OSError as exc:
                    # ENOENT: the kernel has already forgotten the inode, and its pages too
                    if exc.errno != errno.ENOENT:
                        log.debug("page cache of inode %d not dropped: %s", inode, exc)
        finally:  # cancelled or stopped: the descriptor goes once no write is in flight
            self._running = False
            self._finish()

    def _write(self, message: bytes) -> None:
        """In a worker thread: one message, unless stopped meanwhile."""
        with self._lock:
            if self._stopped or self._fd is None:
                return
            self._writing = True
            fd = self._fd
        try:
            os.write(fd, message)
        finally:
            with self._lock:
                self._writing = False
                if self._stopped:
                    self._close_fd()

    def _close_fd(self) -> None:
        """With the lock held."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
