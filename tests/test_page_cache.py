"""The page-cache dropper's messages, written to a pipe instead of /dev/fuse."""

import os
import struct

import pytest
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


def fill(fd: int) -> int:
    """Fill the pipe behind `fd` so that the next write blocks; the bytes written."""
    os.set_blocking(fd, False)
    written = 0
    try:
        while True:
            written += os.write(fd, b"\0" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)
    return written


def drain(fd: int) -> int:
    os.set_blocking(fd, False)
    total = 0
    try:
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
    except BlockingIOError:
        pass
    return total


async def wait_for(condition) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.01)


@pytest.mark.parametrize("end", ["stop", "cancel"])
async def test_a_write_in_flight_at_stop_uses_and_then_closes_a_descriptor_of_its_own(end):
    """pyfuse3 closes /dev/fuse at unmount while a message may still wait in the kernel: the
    dropper writes to its own duplicate, closed only when that write returns, and writes
    nothing after stop."""
    read_end, write_end = os.pipe()
    try:
        filled = fill(write_end)
        dropper = PageCacheDropper()
        scope = trio.CancelScope()

        async def run():
            with scope:
                await dropper.run(write_end)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_for(lambda: dropper._running)
            dropper.drop(7, 0, 8 * MiB)  # blocks in the worker thread: the pipe is full
            await wait_for(lambda: dropper._writing)
            own = dropper._fd
            assert own not in (None, write_end)
            pipe = os.fstat(own).st_ino
            if end == "stop":
                dropper.stop()
            else:
                scope.cancel()
            dropper.drop(7, 8 * MiB, 8 * MiB)  # after stop: never sent
            os.close(write_end)  # what pyfuse3.close does; the duplicate stays open
            write_end = -1
            os.fstat(own)
            assert drain(read_end) >= filled  # the blocked write goes through now
            await wait_for(lambda: dropper._fd is None)
        try:  # closed by the thread once its write returned (the number may be reused)
            assert os.fstat(own).st_ino != pipe
        except OSError:
            pass
        await trio.sleep(0.05)
        assert drain(read_end) in (0, MESSAGE.size)  # at most the one message in flight
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
