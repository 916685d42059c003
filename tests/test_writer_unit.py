"""The streaming writer against an in-memory store: parts, patches, fsync, continuation."""

import errno
import os

import pytest
import trio

from s3fs_stream.errors import FsError
from s3fs_stream.memory_budget import MemoryBudget
from s3fs_stream.multipart_writer import FileMeta, StreamingWriter, format_mtime, parse_mtime
from s3fs_stream.part_schedule import PartSchedule
from s3fs_stream.upload_pool import UploadPool
from tests.memory_store import MemoryStore

MiB = 1024 * 1024
PART = 5 * MiB


@pytest.fixture
async def env(nursery):
    store = MemoryStore()
    budget = MemoryBudget(64 * MiB)
    pool = UploadPool(nursery, 4)

    def make(key="f", memory_wait=2.0, schedule=None, drop_pages=None):
        return StreamingWriter(key, key, store, pool, budget,
                               schedule or PartSchedule(PART, 10 * MiB),
                               FileMeta(0o100644, 1, 2, 1_700_000_000_000_000_000), None,
                               memory_wait, drop_pages=drop_pages)

    return store, budget, make


async def write_all(writer, data, chunk=64 * 1024, offset=0):
    for start in range(0, len(data), chunk):
        await writer.write(offset + start, data[start:start + chunk])


async def test_small_file_is_one_put(env):
    store, budget, make = env
    writer = make()
    await writer.write(0, b"hello")
    await writer.flush()
    assert store.objects["f"][0] == b"hello"
    assert [c[0] for c in store.calls] == ["put"]
    assert store.objects["f"][1] == {"mode": "33188", "uid": "1", "gid": "2",
                                     "mtime": "1700000000"}
    await writer.release()
    assert budget.used == 0


async def test_large_file_streams_parts_before_close(env):
    store, budget, make = env
    writer = make()
    data = os.urandom(3 * PART + 123)
    await write_all(writer, data)
    await trio.sleep(0.01)
    uploaded = [c for c in store.calls if c[0] == "upload_part"]
    assert [c[2] for c in uploaded] == [1, 2, 3]  # uploaded while still writing
    await writer.flush()
    assert store.objects["f"][0] == data
    await writer.release()
    assert budget.used == 0 and not store.uploads


async def test_patch_in_part_one_is_reuploaded(env):
    store, _, make = env
    writer = make()
    data = bytearray(os.urandom(2 * PART + 10))
    await write_all(writer, bytes(data))
    await writer.write(4, b"WXYZ")
    data[4:8] = b"WXYZ"
    await writer.flush()
    assert store.objects["f"][0] == bytes(data)
    assert [c[2] for c in store.calls if c[0] == "upload_part"].count(1) == 2


async def test_write_into_freed_part_is_einval(env):
    store, _, make = env
    writer = make()
    await write_all(writer, os.urandom(3 * PART))
    await writer.fsync()
    with pytest.raises(FsError) as info:
        await writer.write(PART + 10, b"x")
    assert info.value.errno == errno.EINVAL
    assert "part 2" in str(info.value)


async def test_freed_parts_are_dropped_and_read_back_refused(env):
    """Each part uploaded and freed is reported once, for the kernel to drop its pages; a
    read there is EBUSY for a reader, EINVAL for the kernel completing a page for a write."""
    store, _, make = env
    dropped = []
    writer = make(drop_pages=lambda start, length: dropped.append((start, length)))
    data = os.urandom(4 * PART + 10)
    await write_all(writer, data)
    await writer.fsync()
    # part 1 is held until completion and part 5 is still filling: parts 2 to 4 left memory
    assert sorted(dropped) == [(PART, PART), (2 * PART, PART), (3 * PART, PART)]
    for for_writing, code in ((False, errno.EBUSY), (True, errno.EINVAL)):
        with pytest.raises(FsError) as info:
            await writer.read_held(PART + 4096, 4096, for_writing)
        assert info.value.errno == code
    assert await writer.read_held(4 * PART, 10, True) == data[4 * PART:]
    await writer.flush()
    assert store.objects["f"][0] == data
    assert len(dropped) == 3  # completion keeps part 1 and the tail cached


async def test_gap_is_zero_filled(env):
    store, _, make = env
    writer = make()
    await writer.write(0, b"a")
    await writer.write(10, b"b")
    await writer.flush()
    assert store.objects["f"][0] == b"a" + bytes(9) + b"b"


async def test_fsync_uploads_tail_as_provisional_part(env):
    store, _, make = env
    writer = make()
    data = os.urandom(PART + 100)
    await write_all(writer, data)
    await writer.fsync()
    (upload_id, (key, parts, _)), = store.uploads.items()
    assert b"".join(parts[n][0] for n in sorted(parts)) == data  # all durable
    more = os.urandom(PART)
    await write_all(writer, more, offset=len(data))
    await writer.flush()
    assert store.objects["f"][0] == data + more


async def test_writes_after_flush_continue_small_object(env):
    store, _, make = env
    writer = make()
    for i in range(5):
        await writer.write(i * 2, f"{i}\n".encode())
        await writer.flush()
        assert store.objects["f"][0] == b"".join(f"{j}\n".encode() for j in range(i + 1))


async def test_writes_after_flush_continue_multipart_object(env):
    store, _, make = env
    writer = make()
    first = os.urandom(2 * PART + 7)
    await write_all(writer, first)
    await writer.flush()
    second = os.urandom(PART)
    await write_all(writer, second, offset=len(first))
    await writer.flush()
    assert store.objects["f"][0] == first + second
    assert any(c[0] == "upload_part_copy" for c in store.calls)


async def test_flush_without_change_does_nothing(env):
    store, _, make = env
    writer = make()
    await writer.write(0, b"x")
    await writer.flush()
    calls = len(store.calls)
    await writer.flush()
    assert len(store.calls) == calls


async def test_failed_part_gives_eio_and_leaves_upload(env):
    store, _, make = env
    writer = make()
    store.fail_parts = True
    with pytest.raises(FsError):
        await write_all(writer, os.urandom(3 * PART))
        await writer.flush()
    with pytest.raises(FsError) as info:
        await writer.flush()
    assert info.value.errno == errno.EIO
    assert "f" not in store.objects
    assert store.uploads  # left for recovery
    await writer.release()


async def test_detached_writer_drops_writes(env):
    store, _, make = env
    writer = make()
    await write_all(writer, os.urandom(2 * PART))
    await writer.detach()
    await writer.write(2 * PART, b"more")
    await writer.flush()
    assert "f" not in store.objects and not store.uploads


async def test_truncate_to_zero_restarts(env):
    store, _, make = env
    writer = make()
    await write_all(writer, os.urandom(2 * PART))
    await writer.truncate(0)
    await writer.write(0, b"new")
    await writer.flush()
    assert store.objects["f"][0] == b"new"
    assert not store.uploads


async def test_more_writers_than_budget_get_enomem_not_deadlock(nursery):
    store = MemoryStore()
    budget = MemoryBudget(12 * MiB)
    pool = UploadPool(nursery, 2)
    schedule = PartSchedule(PART, PART)
    writers = [StreamingWriter(f"f{i}", f"f{i}", store, pool, budget, schedule,
                               FileMeta(0o100644, 0, 0, 0), None, 0.5) for i in range(4)]
    outcomes = {}

    async def fill(index, writer):
        try:
            for offset in range(0, 2 * PART, MiB):  # round-robin, never closing
                await writer.write(offset, bytes(MiB))
                await trio.sleep(0)
            await writer.flush()
            outcomes[index] = "ok"
        except FsError as exc:
            outcomes[index] = exc.errno
        finally:
            await writer.release()

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            for index, writer in enumerate(writers):
                inner.start_soon(fill, index, writer)
    assert set(outcomes.values()) <= {"ok", errno.ENOMEM}
    assert "ok" in outcomes.values()
    for index, outcome in outcomes.items():
        if outcome == "ok":
            assert store.objects[f"f{index}"][0] == bytes(2 * PART)
    assert budget.used == 0


def test_mtime_format_matches_s3fs():
    assert format_mtime(1_700_000_000_000_000_000) == "1700000000"
    assert parse_mtime("1700000000") == 1_700_000_000_000_000_000
    assert parse_mtime(format_mtime(1_700_000_000_123_456_789)) == 1_700_000_000_123_456_789
    assert parse_mtime("garbage") is None


async def test_recycled_buffers_never_leak_old_bytes(env):
    """A part buffer reused from an earlier file holds that file's bytes past the new data:
    only the new data may reach S3 (a short tail after truncation)."""
    store, budget, make = env
    first = make("first")
    await write_all(first, b"\xaa" * (4 * PART), chunk=MiB)
    await first.flush()
    second = make("second")  # opened while the first still holds its working set
    tail = os.urandom(PART + 3 * MiB + 17)
    await write_all(second, tail, chunk=MiB)
    await second.truncate(PART + MiB)  # shrink inside the filling part
    await second.flush()
    assert store.objects["second"][0] == tail[:PART + MiB]
    await first.release()
    await second.release()
    assert budget.used == 0


async def test_buffers_are_recycled_while_streaming_and_let_go_after(env):
    store, budget, make = env
    writer = make()
    handed_out: list = []  # keeps every buffer alive, so their ids stay distinct
    original = budget.buffer

    def counting(size):
        handed_out.append(original(size))
        return handed_out[-1]

    budget.buffer = counting
    await write_all(writer, os.urandom(12 * PART), chunk=MiB)
    await writer.flush()
    distinct = len({id(buf) for buf in handed_out})
    assert distinct < len(handed_out) / 2  # most parts reuse an earlier buffer
    await writer.release()
    assert budget.used == 0 and budget._idle_bytes == 0  # nothing kept once all is closed


async def test_full_size_buffers_are_reserved_in_full(env):
    """A recycled buffer is resident in full, so the budget must count all of it."""
    store, budget, make = env
    writers = [make(f"w{i}") for i in range(3)]
    for writer in writers:
        await write_all(writer, b"x" * (2 * PART + 1), chunk=MiB)
    held = [part for writer in writers for part in writer._parts.values() if part.recycled]
    assert held and all(part.reserved == part.capacity for part in held)
    assert budget.used >= sum(len(part.buf) for part in held)
    for writer in writers:
        await writer.flush()
        await writer.release()
    assert budget.used == 0
