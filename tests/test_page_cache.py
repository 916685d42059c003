"""The page-cache dropper's messages, written to a pipe instead of /dev/fuse."""

import os
import struct

import trio
import trio.testing

from s3fs_stream.page_cache import PageCacheDropper

MiB = 1024 * 1024
MESSAGE = struct.Struct("=IiQQqq")  # fuse_out_header + fuse_notify_inval_inode_out


async def read_messages(fd: int, count: int) -> list[tuple]:
    data = b""
    while len(data) < count * MESSAGE.size:
        await trio.lowlevel.wait_readable(fd)
        data += os.read(fd, 4096)
    return [MESSAGE.unpack_from(data, i * MESSAGE.size) for i in range(count)]


async def test_whole_folios_inside_each_range_become_inval_inode_notifications(nursery):
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(read_end, False)
        dropper = PageCacheDropper()
        nursery.start_soon(dropper.run, write_end)
        await trio.testing.wait_all_tasks_blocked()
        dropper.drop(7, 8 * MiB, 8 * MiB)  # default parts: the whole range
        dropper.drop(7, 5 * MiB, 5 * MiB)  # 5 MiB parts: only the 2 MiB blocks inside, 6-10
        dropper.drop(7, 5 * MiB, 2 * MiB)  # no whole 2 MiB block inside: nothing
        assert await read_messages(read_end, 2) == [(40, 2, 0, 7, 8 * MiB, 8 * MiB),
                                                    (40, 2, 0, 7, 6 * MiB, 4 * MiB)]
        dropper.stop()  # the daemon no longer answers the kernel: nothing more is sent
        dropper.drop(7, 16 * MiB, 8 * MiB)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)
        try:
            assert os.read(read_end, 4096) == b""
        except BlockingIOError:
            pass
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_without_a_fuse_descriptor_nothing_is_queued():
    dropper = PageCacheDropper()
    await dropper.run(None)
    dropper.drop(7, 0, 8 * MiB)  # must not raise nor block
