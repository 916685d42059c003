"""The streaming writer against an in-memory store that enforces S3's rules: parts, patches
anywhere, fsync, continuation, and memory that decides speed but never success."""

import dataclasses
import errno
import os
import random
import time

import pytest
import trio

from s3fs_stream.errors import FsError
from s3fs_stream.memory_budget import MemoryBudget
from s3fs_stream.object_meta import FileMeta, SetAttr, changed_meta, format_mtime, parse_mtime
from s3fs_stream.part_schedule import PartSchedule
from s3fs_stream.spill_area import SpillArea
from s3fs_stream.upload_pool import UploadPool
from s3fs_stream.writer import Base, State, StreamingWriter
from tests.memory_store import MemoryStore

MiB = 1024 * 1024
PART = 5 * MiB


class Env:
    def __init__(self, nursery, limit=64 * MiB, workers=4):
        self.store = MemoryStore()
        self.budget = MemoryBudget(limit)
        self.pool = UploadPool(nursery, workers)
        self.spill = SpillArea(self.store, "")
        nursery.start_soon(self.budget.reclaim_forever)

    def make(self, key="f", schedule=None, drop_pages=None, base=None):
        return StreamingWriter(key, key, self.store, self.pool, self.budget,
                               schedule or PartSchedule(PART, 10 * MiB), self.spill,
                               FileMeta(0o100644, 1, 2, 1_700_000_000_000_000_000), None,
                               base, drop_pages=drop_pages)

    def data(self, key="f") -> bytes:
        return self.store.objects[key][0]

    def calls(self, name: str) -> list[tuple]:
        return [c for c in self.store.calls if c[0] == name]

    def spilled_left(self) -> list[str]:
        return [k for k in self.store.objects if k.startswith(".s3stream/spill/")]


@pytest.fixture
async def env(nursery):
    return Env(nursery)


async def write_all(writer, data, chunk=64 * 1024, offset=0):
    for start in range(0, len(data), chunk):
        await writer.write(offset + start, data[start:start + chunk])


async def close(writer):
    await writer.flush()
    await writer.release()


async def test_small_file_is_one_put(env):
    writer = env.make()
    await writer.write(0, b"hello")
    await close(writer)
    assert env.data() == b"hello"
    assert [c[0] for c in env.store.calls] == ["put"]
    assert env.store.objects["f"][1] == {"mode": "33188", "uid": "1", "gid": "2",
                                         "mtime": "1700000000"}
    assert env.budget.used == 0


async def test_large_file_streams_parts_before_close(env):
    writer = env.make()
    data = os.urandom(3 * PART + 123)
    await write_all(writer, data)
    await trio.sleep(0.01)
    assert [c[2] for c in env.calls("upload_part")] == [1, 2, 3]  # while still writing
    await close(writer)
    assert env.data() == data
    assert env.budget.used == 0 and not env.store.uploads


async def test_streaming_part_is_uploaded_as_soon_as_it_fills(env):
    """A part filling for the first time goes up at once, before any write lands in the
    next part (streaming speed and bounded memory depend on it)."""
    writer = env.make()
    await write_all(writer, os.urandom(2 * PART))
    await trio.sleep(0.01)
    assert [c[2] for c in env.calls("upload_part")] == [1, 2]
    await close(writer)
    assert [c[2] for c in env.calls("upload_part")] == [1, 2]


async def test_patch_in_held_part_one_is_reuploaded_once(env):
    writer = env.make()
    data = bytearray(os.urandom(2 * PART + 10))
    await write_all(writer, bytes(data))
    for offset in (4, 40):  # a WAV header's two sizes
        await writer.write(offset, b"WXYZ")
        data[offset:offset + 4] = b"WXYZ"
    await close(writer)
    assert env.data() == bytes(data)
    assert [c[2] for c in env.calls("upload_part")].count(1) == 2
    assert not env.calls("upload_part_copy")  # part 1 was held: no composition


async def test_write_into_uploaded_and_freed_part_lands(env):
    """Part 3 of a file whose parts 1-5 are uploaded: completed early, part 3 read back,
    patched, composed with server-side copies of the rest."""
    writer = env.make()
    data = bytearray(os.urandom(5 * PART + 100))
    await write_all(writer, bytes(data))
    await writer.fsync()
    await writer.write(2 * PART + 7, b"patch")
    data[2 * PART + 7:2 * PART + 12] = b"patch"
    await close(writer)
    assert env.data() == bytes(data)
    assert env.calls("upload_part_copy")
    assert env.budget.used == 0 and not env.store.uploads


async def test_reads_of_freed_parts(env):
    """A reader of bytes uploaded and freed gets them: the upload is completed early and they
    are read back from that object (once: later reads of earlier bytes are ranged GETs); so
    does the kernel completing a page for a write."""
    dropped = []
    writer = env.make(drop_pages=lambda start, length: dropped.append((start, length)))
    data = os.urandom(4 * PART + 10)
    await write_all(writer, data)
    await writer.fsync()
    assert (PART, PART) in dropped  # freed parts leave the kernel's cache too
    assert await writer.read_held(PART + 4096, 4096) == data[PART + 4096:PART + 8192]
    assert len(env.calls("complete")) == 1 and writer.reader_rebases == 1
    assert await writer.read_held(2 * PART - 10, 20) == data[2 * PART - 10:2 * PART + 10]
    assert await writer.read_held(4 * PART, 10) == data[4 * PART:]
    assert await writer.read_held(PART + 4096, 4096, True) == data[PART + 4096:PART + 8192]
    assert len(env.calls("complete")) == 1
    more = os.urandom(PART)
    await write_all(writer, more, offset=len(data))
    await writer.fsync()
    data += more
    assert await writer.read_held(0, len(data)) == data
    await close(writer)
    assert env.data() == data
    assert env.budget.used == 0 and not env.store.uploads


async def test_reader_keeps_the_end_of_a_recording_held(env):
    """While a read-only handle is open, uploaded parts near the end stay in memory (a player
    following a recording reads them without completing anything); memory pressure frees
    them first, and the last reader's close frees them."""
    writer = env.make()
    writer.readers += 1
    data = os.urandom(5 * PART)
    await write_all(writer, data)
    await writer.fsync()
    assert writer.holds >= 4 * PART  # part 1 and the last 32 MiB (parts 2-5 here)
    assert await writer.read_held(PART, 3 * PART) == data[PART:4 * PART]
    assert not env.calls("complete") and writer.reader_rebases == 0
    writer.drop_stored()  # what the reclaimer does first when someone waits for memory
    assert writer.holds <= 2 * PART
    assert await writer.read_held(2 * PART, 10) == data[2 * PART:2 * PART + 10]
    assert writer.reader_rebases == 1
    writer.reader_closed()
    assert writer.holds <= 2 * PART
    await close(writer)
    assert env.data() == data


async def test_a_lagging_reader_forces_few_completions(nursery):
    """A reader that follows the writer a steady distance behind, farther than the parts kept
    for it: each completion it forces doubles what is kept (up to half the budget), so it
    forces a few, not one per part (each one copies every earlier part server-side)."""
    env = Env(nursery, limit=256 * MiB)
    writer = env.make(schedule=PartSchedule(PART, 10 * MiB))
    writer.readers += 1
    lag = 12 * PART
    total = 40 * PART
    data = os.urandom(total)
    position = 0
    for start in range(0, total, PART):
        await write_all(writer, data[start:start + PART], chunk=MiB, offset=start)
        await writer.fsync()
        while position + MiB <= start + PART - lag:
            assert await writer.read_held(position, MiB) == data[position:position + MiB]
            position += MiB
    assert await writer.read_held(position, total - position) == data[position:]
    assert 1 <= writer.reader_rebases <= 3, writer.reader_rebases
    writer.reader_closed()
    await close(writer)
    assert env.data() == data


async def test_gap_is_zero_filled(env):
    writer = env.make()
    await writer.write(0, b"a")
    await writer.write(10, b"b")
    await writer.write(3 * PART, b"c")  # across whole parts
    await close(writer)
    assert env.data() == b"a" + bytes(9) + b"b" + bytes(3 * PART - 11) + b"c"


async def test_fsync_uploads_tail_as_provisional_part(env):
    writer = env.make()
    data = os.urandom(PART + 100)
    await write_all(writer, data)
    await writer.fsync()
    (_, (_, parts, _)), = env.store.uploads.items()
    assert b"".join(parts[n][-1][0] for n in sorted(parts)) == data  # all durable (newest)
    more = os.urandom(PART)
    await write_all(writer, more, offset=len(data))
    await close(writer)
    assert env.data() == data + more


async def test_writes_after_flush_continue_small_object(env):
    writer = env.make()
    for i in range(5):
        await writer.write(i * 2, f"{i}\n".encode())
        await writer.flush()
        assert env.data() == b"".join(f"{j}\n".encode() for j in range(i + 1))
    await writer.release()


async def test_writes_after_flush_continue_multipart_object(env):
    writer = env.make()
    first = os.urandom(2 * PART + 7)
    await write_all(writer, first)
    await writer.flush()
    writer.drop_stored()  # memory is short: nothing held, continuing reads the object
    second = os.urandom(PART)
    await write_all(writer, second, offset=len(first))
    await close(writer)
    assert env.data() == first + second
    assert env.calls("upload_part_copy")


async def test_flush_without_change_does_nothing(env):
    writer = env.make()
    await writer.write(0, b"x")
    await writer.flush()
    calls = len(env.store.calls)
    await writer.flush()
    assert len(env.store.calls) == calls
    await writer.release()


async def test_failed_part_gives_eio_and_leaves_upload(env):
    writer = env.make()
    env.store.fail_parts = True
    with pytest.raises(FsError):
        await write_all(writer, os.urandom(3 * PART))
        await writer.flush()
    with pytest.raises(FsError) as info:
        await writer.flush()
    assert info.value.errno == errno.EIO
    assert "f" not in env.store.objects
    assert env.store.uploads  # left for recovery
    await writer.release()
    assert env.budget.used == 0


async def test_detached_writer_drops_writes(env):
    writer = env.make()
    await write_all(writer, os.urandom(2 * PART))
    await writer.detach()
    await writer.write(2 * PART, b"more")
    await close(writer)
    assert "f" not in env.store.objects and not env.store.uploads
    assert env.budget.used == 0


async def test_truncate_to_zero_restarts(env):
    writer = env.make()
    await write_all(writer, os.urandom(2 * PART))
    await writer.truncate(0)
    await writer.write(0, b"new")
    await close(writer)
    assert env.data() == b"new"
    assert not env.store.uploads


async def test_truncate_into_an_uploaded_part(env):
    writer = env.make()
    data = os.urandom(4 * PART)
    await write_all(writer, data)
    await writer.fsync()
    await writer.truncate(PART + 3)
    await writer.write(PART + 3, b"tail")
    await close(writer)
    assert env.data() == data[:PART + 3] + b"tail"


async def test_existing_object_append_inplace_and_truncate(env):
    original = os.urandom(3 * PART + 11)
    etag = env.store._store("f", original, {})
    writer = env.make(base=Base(etag, len(original)))
    assert writer.state is State.COMPLETE
    await writer.write(len(original), b"appended")
    await writer.write(PART + 5, b"in place")
    await close(writer)
    expected = bytearray(original + b"appended")
    expected[PART + 5:PART + 13] = b"in place"
    assert env.data() == bytes(expected)
    # parts 1 and 3 were never read: copied server-side
    assert {c[2] for c in env.calls("upload_part_copy")} == {1, 3}
    assert len(env.calls("get_range")) == 2  # part 2 for the patch, part 4 for the append


async def test_rewrite_of_existing_object_uploads_each_part_once(env):
    """An in-place rewrite of every byte (ffmpeg's faststart shift, dd conv=notrunc): a full
    part being changed goes up once, when the writes move on to the next part, not once per
    write (each of which also waited for the upload before)."""
    original = os.urandom(4 * PART)
    etag = env.store._store("f", original, {})
    writer = env.make(base=Base(etag, len(original)))
    data = os.urandom(len(original))
    await write_all(writer, data, chunk=256 * 1024)
    await trio.sleep(0.01)
    uploaded = [c[2] for c in env.calls("upload_part")]
    assert uploaded == [1, 2, 3]  # while still writing: each as the writes left it
    await close(writer)
    assert env.data() == data
    uploaded = [c[2] for c in env.calls("upload_part")]
    assert sorted(uploaded) == [1, 2, 3, 4], uploaded
    assert not env.calls("upload_part_copy")
    assert env.budget.used == 0 and not env.store.uploads


async def test_rewrite_under_memory_pressure(nursery):
    """The same rewrite with memory for two parts: the reclaimer may upload the part being
    rewritten; the bytes are right, each part still goes up at most twice, nothing is left."""
    env = Env(nursery, limit=2 * PART)
    original = os.urandom(4 * PART)
    etag = env.store._store("f", original, {})
    writer = env.make(base=Base(etag, len(original)))
    data = os.urandom(len(original))
    await write_all(writer, data, chunk=256 * 1024)
    await close(writer)
    assert env.data() == data
    uploaded = [c[2] for c in env.calls("upload_part")]
    assert all(uploaded.count(n) <= 2 for n in range(1, 5)), uploaded
    assert env.budget.used == 0 and not env.store.uploads and not env.spilled_left()


async def test_rewritten_part_is_stored_by_fsync(env):
    """A full part whose upload waits for the writer to move on is stored by fsync (and
    so by `max_unsynced`, which stores the same way), and only once."""
    original = os.urandom(2 * PART + 10)
    etag = env.store._store("f", original, {})
    writer = env.make(base=Base(etag, len(original)))
    await writer.write(PART + 5, b"first")
    await writer.write(PART + 50, b"second")
    assert not env.calls("upload_part")  # still being changed: not uploaded yet
    await writer.fsync()
    assert [c[2] for c in env.calls("upload_part")] == [2]
    await close(writer)
    expected = bytearray(original)
    expected[PART + 5:PART + 10] = b"first"
    expected[PART + 50:PART + 56] = b"second"
    assert env.data() == bytes(expected)
    assert [c[2] for c in env.calls("upload_part")] == [2]  # unchanged since the fsync


async def test_existing_object_changed_by_another_client_fails_cleanly(env):
    original = os.urandom(2 * PART)
    etag = env.store._store("f", original, {})
    writer = env.make(base=Base(etag, len(original)))
    env.store._store("f", b"someone else", {})
    with pytest.raises(FsError) as info:
        await writer.write(10, b"x")
    assert info.value.errno == errno.EIO
    await writer.release()
    assert env.data() == b"someone else"


async def round_robin(writers, part_size, parts, chunk=256 * 1024):
    """One task writes every file a chunk at a time, in turn, as a single-threaded program
    that opened them all first would."""
    contents = {w.key: bytearray() for w in writers}
    for offset in range(0, parts * part_size, chunk):
        for writer in writers:
            piece = random.randbytes(chunk)
            await writer.write(offset, piece)
            contents[writer.key] += piece
    for writer in writers:
        await close(writer)
    return contents


async def test_round_robin_beyond_the_budget_completes(nursery):
    """Eight files filled in turn by one task with room for only three parts: the budget
    spills partly filled parts to the bucket instead of deadlocking or failing."""
    env = Env(nursery, limit=16 * MiB)
    writers = [env.make(f"f{i}") for i in range(8)]
    with trio.fail_after(30):
        contents = await round_robin(writers, PART, 3)
    for key, data in contents.items():
        assert env.data(key) == data
    assert env.budget.spills > 0
    assert env.budget.peak <= 16 * MiB and env.budget.used == 0
    assert not env.spilled_left() and not env.store.uploads


async def crowd(env) -> list:
    """Four more files of 3.25 MiB each, written in turn in 64 KiB writes: memory short."""
    chunk = 64 * 1024
    others = [env.make(f"f{k}") for k in range(4)]
    for i in range(52):
        for writer in others:
            await writer.write(i * chunk, bytes([2]) * chunk)
    return others


def limit_gets(env, why: str, limit: int = 20) -> None:
    """Fail the test (`why`) once the store has answered `limit` ranged GETs."""
    get_range = env.store.get_range
    gets = 0

    async def counted(*args, **kwargs):
        nonlocal gets
        gets += 1
        assert gets < limit, why
        return await get_range(*args, **kwargs)

    env.store.get_range = counted


async def test_appending_to_a_completed_file_when_memory_is_short_loads_its_part_once(
        nursery, autojump_clock):
    """A completed file's part was dropped to make room (its bytes are in the base); then
    it is appended to while other files' partly filled parts hold nearly all the budget: its
    part is loaded once and a spill makes room for the append. The load used to take the
    memory the append had reserved, so the append waited again, unpinned, and the reclaimer
    dropped the loaded part to grant it: a ranged GET and a drop in a loop, forever."""
    env = Env(nursery, limit=16 * MiB)
    chunk = 64 * 1024
    appended = env.make("appended")
    for i in range(40):  # 2.5 MiB, one part
        await appended.write(i * chunk, bytes([1]) * chunk)
    await appended.flush()
    others = await crowd(env)  # the appended file's held part is dropped for them
    assert "appended" in env.store.objects and not appended.holds
    limit_gets(env, "the appended file's part is loaded again and again")
    with trio.fail_after(30):
        await appended.write(40 * chunk, bytes([3]) * chunk)
        await close(appended)
    assert env.data("appended") == bytes([1]) * 40 * chunk + bytes([3]) * chunk
    assert env.budget.spills > 0
    for writer in others:
        await close(writer)
    assert env.budget.used == 0 and not env.spilled_left()


async def test_a_write_across_the_end_of_a_spilled_part_gathers_it_once(nursery,
                                                                        autojump_clock):
    """A partly filled part was spilled; a write starting before the spilled end and
    growing the part, while memory is short, gathers it back once. The gather used to take
    the memory the write had reserved to grow it, so the write waited again and the
    reclaimer spilled the gathered part to grant it: a spill and a GET in a loop."""
    env = Env(nursery, limit=16 * MiB)
    chunk = 64 * 1024
    spilled = env.make("spilled")
    for i in range(40):  # 2.5 MiB of a 5 MiB part
        await spilled.write(i * chunk, bytes([1]) * chunk)
    others = await crowd(env)  # the oldest part, the first file's, is spilled
    assert env.budget.spills == 1 and not spilled.holds
    limit_gets(env, "the spilled part is gathered and spilled again and again")
    with trio.fail_after(30):
        await spilled.write(39 * chunk, bytes([3]) * 2 * chunk)
        await close(spilled)
    assert env.data("spilled") == bytes([1]) * 39 * chunk + bytes([3]) * 2 * chunk
    for writer in others:
        await close(writer)
    assert env.budget.used == 0 and not env.spilled_left()


async def test_requests_needing_more_memory_never_wait_holding_what_they_reserved(
        nursery, autojump_clock):
    """Two requests have reserved half the budget each and need a little more: each waits
    with its reservation given back, for the total in one piece, so one gets it and then
    the other. Waiting while holding it (memory the reclaimer cannot take: it is in no part)
    they held the budget between them for good -- as six writers in 12 MiB did, each
    holding a part's memory and waiting for another part's to gather a spilled part
    (test_many_concurrent_writers_share_a_small_budget hung about one run in five)."""
    env = Env(nursery, limit=12 * MiB)
    granted = []

    async def request(writer):
        async with writer._request():
            await writer._reserve(6 * MiB)
            await trio.sleep(1)  # both hold their half
            await writer._reserve(MiB)
            granted.append((writer.key, writer._credit))
            await trio.sleep(1)

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            for key in ("a", "b"):
                inner.start_soon(request, env.make(key))
    assert sorted(granted) == [("a", 7 * MiB), ("b", 7 * MiB)]
    assert env.budget.used == 0


async def test_many_concurrent_writers_share_a_small_budget(nursery):
    env = Env(nursery, limit=12 * MiB, workers=2)
    outcomes = {}

    async def fill(index):
        writer = env.make(f"f{index}")
        data = random.randbytes(2 * PART + index)
        for offset in range(0, len(data), MiB):
            await writer.write(offset, data[offset:offset + MiB])
            await trio.sleep(0)
        await close(writer)
        outcomes[index] = env.data(f"f{index}") == data

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            for index in range(6):
                inner.start_soon(fill, index)
    assert outcomes == {i: True for i in range(6)}
    assert env.budget.used == 0 and not env.spilled_left()


async def test_header_patch_when_part_one_was_dropped(nursery):
    env = Env(nursery, limit=16 * MiB)
    writer = env.make()
    data = bytearray(os.urandom(4 * PART))
    await write_all(writer, bytes(data))
    await writer.fsync()
    writer.drop_stored()  # memory pressure took part 1
    assert 1 not in writer._parts
    await writer.write(4, b"SIZE")
    data[4:8] = b"SIZE"
    await close(writer)
    assert env.data() == bytes(data)


def test_mtime_format_matches_s3fs():
    assert format_mtime(1_700_000_000_000_000_000) == "1700000000"
    assert parse_mtime("1700000000") == 1_700_000_000_000_000_000
    assert parse_mtime(format_mtime(1_700_000_000_123_456_789)) == 1_700_000_000_123_456_789
    assert parse_mtime("garbage") is None


async def test_recycled_buffers_never_leak_old_bytes(env):
    """A part buffer reused from an earlier file holds that file's bytes past the new data:
    only the new data may reach S3 (a short tail after truncation)."""
    first = env.make("first")
    await write_all(first, b"\xaa" * (4 * PART), chunk=MiB)
    await first.flush()
    second = env.make("second")
    tail = os.urandom(PART + 3 * MiB + 17)
    await write_all(second, tail, chunk=MiB)
    await second.truncate(PART + MiB)  # shrink inside the filling part
    await close(second)
    assert env.data("second") == tail[:PART + MiB]
    await first.release()
    assert env.budget.used == 0


async def test_buffers_are_recycled_while_streaming_and_let_go_after(env):
    writer = env.make()
    handed_out: list = []  # keeps every buffer alive, so their ids stay distinct
    original = env.budget.buffer

    def counting(size):
        handed_out.append(original(size))
        return handed_out[-1]

    env.budget.buffer = counting
    await write_all(writer, os.urandom(12 * PART), chunk=MiB)
    await close(writer)
    distinct = len({id(buf) for buf in handed_out})
    assert distinct < len(handed_out) / 2  # most parts reuse an earlier buffer
    assert env.budget.used == 0 and env.budget._idle_bytes == 0  # nothing kept after


async def test_budget_counts_every_held_buffer(env):
    writers = [env.make(f"w{i}") for i in range(3)]
    for writer in writers:
        await write_all(writer, b"x" * (2 * PART + 1), chunk=MiB)
    held = [part for writer in writers for part in writer._parts.values()]
    assert held and all(part.reserved >= len(part.buf) for part in held)
    assert env.budget.used == sum(writer.holds for writer in writers)
    for writer in writers:
        await close(writer)
    assert env.budget.used == 0


async def test_frequent_fsyncs_upload_the_tail_once_per_interval(env, autojump_clock):
    """A program that fsyncs after every small write: each fsync returns with every byte
    stored, but the tail part is uploaded at most once per `fsync_interval`."""
    writer = env.make()
    writer.fsync_interval = 1.0
    data = b""
    started = trio.current_time()
    for _i in range(20):
        piece = os.urandom(1000)
        await writer.write(len(data), piece)
        data += piece
        await writer.fsync()
        (_, (_, parts, _)), = env.store.uploads.items()
        assert b"".join(parts[n][-1][0] for n in sorted(parts)) == data  # durable now
        await trio.sleep(0.1)  # the program's own pace: 10 fsyncs a second
    elapsed = trio.current_time() - started
    uploads = len(env.calls("upload_part"))
    assert uploads <= elapsed / 1.0 + 1, (uploads, elapsed)
    assert elapsed < 20 * 1.1 + 1  # waits stretch the program, not beyond one interval each
    await close(writer)
    assert env.data() == data


async def test_in_place_change_of_a_base_part_loads_it_once(env):
    """The kernel reads the pages around a partial-page write through the writing handle,
    then writes: a base part is loaded once and held for what follows (it used to be freed
    after each read and loaded again), and a later write into it, after its upload, does
    not complete the object early to read it back."""
    original = os.urandom(3 * PART)
    etag = env.store._store("f", original, {})
    writer = env.make(base=Base(etag, len(original)))
    writer.handles = 1
    expected = bytearray(original)
    for offset, data in ((PART + 4096 * 3 + 5, b"x" * 5000), (PART + 7, b"later")):
        first_page = offset // 4096 * 4096
        await writer.read_held(first_page, 4096, for_writing=True)
        await writer.read_held((offset + len(data)) // 4096 * 4096, 4096, for_writing=True)
        await writer.write(offset, data)
        expected[offset:offset + len(data)] = data
        await trio.sleep(0.01)  # the part's upload finishes
    readback = await writer.read_held(PART, PART)  # a reader sees the held, changed part
    assert readback == bytes(expected[PART:2 * PART])
    await close(writer)
    assert env.data() == bytes(expected)
    assert len(env.calls("get_range")) == 1, env.calls("get_range")
    assert len(env.calls("complete")) == 1


async def test_attributes_changed_while_completing_are_stored_after(env, autojump_clock):
    """chmod during the PUT of a close (set_meta takes no lock): the PUT carries the old
    mode, so the new one is copied on after, never lost."""
    writer = env.make()
    await writer.write(0, b"hello")
    env.store.delay = 1.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.flush)
        await trio.sleep(0.5)  # the PUT is out
        writer.set_meta(dataclasses.replace(writer.meta, mode=0o100600))
    assert env.store.objects["f"][1]["mode"] == str(0o100644)  # what the PUT carried
    assert writer.meta_dirty
    await close(writer)
    assert env.store.objects["f"][1]["mode"] == str(0o100600)
    assert [c[0] for c in env.store.calls] == ["put", "copy"]


async def test_a_future_mtime_is_stored(env):
    """touch -d 2030-01-01 through a descriptor: an explicit time, not the kernel's "now"."""
    writer = env.make()
    await writer.write(0, b"x")
    await writer.flush()  # complete: a "now" from the kernel would stay in memory only
    future = time.time_ns() + 3 * 365 * 86400 * 10**9
    writer.set_meta(changed_meta(writer.meta, SetAttr(mtime_ns=future), time.time_ns()))
    await close(writer)
    assert parse_mtime(env.store.objects["f"][1]["mtime"]) == future


def uploaded_bytes(env) -> int:
    return sum(c[3] for c in env.calls("upload_part")) + sum(
        c[2] for c in env.calls("put") if not c[1].startswith(".s3stream/zeros/"))


async def test_a_large_grow_moves_no_zeros(env):
    """truncate -s 200M of a small file: the gap's whole parts are copied server-side from
    the mount's zero objects; no zero byte of them passes through an upload, and reads of
    the gap while open make no request."""
    writer = env.make()
    head = os.urandom(PART + 1000)
    await write_all(writer, head)
    size = 200 * MiB + 12345
    with trio.fail_after(5):
        await writer.truncate(size)
    assert writer.size == size
    assert writer.holds <= 2 * 10 * MiB  # the old end's part and the new end's, at most
    await trio.sleep(0.01)  # the part uploads in flight
    calls = len(env.store.calls)
    assert await writer.read_held(100 * MiB, 4096) == bytes(4096)
    assert len(env.store.calls) == calls  # zeros of the gap: no request (and no completion)
    await close(writer)
    data = env.data()
    assert len(data) == size
    assert data[:len(head)] == head
    assert data[len(head):] == bytes(size - len(head))
    # the first part, the old end's part, the new end's part: nothing of the gap
    assert uploaded_bytes(env) <= len(head) + PART + 10 * MiB
    assert env.calls("upload_part_copy")
    assert [k for k in env.store.objects if k.startswith(".s3stream/zeros/")]
    assert env.budget.used == 0


async def test_a_write_far_past_the_end_and_changes_inside_the_gap(env):
    writer = env.make()
    await writer.write(0, b"start")
    far = 150 * MiB + 7
    await writer.write(far, b"end")
    await writer.write(60 * MiB + 3, b"middle")  # into a part of the gap: held again
    assert await writer.read_held(60 * MiB, 12) == bytes(3) + b"middle" + bytes(3)
    await writer.flush()
    data = env.data()
    expected = bytearray(far + 3)
    expected[0:5] = b"start"
    expected[far:] = b"end"
    expected[60 * MiB + 3:60 * MiB + 9] = b"middle"
    assert data == bytes(expected)
    assert uploaded_bytes(env) <= 3 * 10 * MiB + PART
    # continue: shrink into the gap, grow again, fsync then close
    await writer.truncate(100 * MiB + 5)
    await writer.truncate(120 * MiB)
    await writer.fsync()
    await writer.write(120 * MiB, b"x")
    await close(writer)
    data = env.data()
    assert len(data) == 120 * MiB + 1 and data[-1:] == b"x"
    assert data[:5] == b"start" and data[60 * MiB + 3:60 * MiB + 9] == b"middle"
    assert data[100 * MiB:120 * MiB].count(0) == 20 * MiB


async def test_stop_ends_a_long_completion_and_leaves_the_upload(env):
    """The mount stopping (SIGTERM) during the completion of a large sparse file: its copies
    end at once, the file fails (EIO) and its upload stays for `s3stream recover`."""
    writer = env.make()
    await writer.write(0, b"x")
    await writer.truncate(400 * MiB)
    env.store.delay = 0.2  # 80 copies, 16 at a time: a second at least
    outcome = []

    async def flush():
        try:
            await writer.flush()
        except FsError as exc:
            outcome.append(exc.errno)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        await trio.sleep(0.5)
        assert writer.completing
        with trio.fail_after(1):
            writer.stop()
            while not outcome:
                await trio.sleep(0.01)
    assert outcome == [errno.EIO]
    assert writer.state is State.FAILED
    assert env.store.uploads and "f" not in env.store.objects
    env.store.delay = 0
    await writer.release()


async def test_attributes_of_a_file_removed_meanwhile_are_dropped_quietly(env, caplog):
    """`echo > f; rm f` racing: the last close stores a chmod made through the handle, but
    the unlink's DELETE came first. Nothing is left to store the attributes on: no error
    (the close must not fail, and no ERROR line for what the program asked)."""
    writer = env.make()
    await write_all(writer, b"small")
    await writer.flush()
    writer.set_meta(dataclasses.replace(writer.meta, mode=0o100600))
    await env.store.delete("f")
    await writer.flush()  # no exception
    assert "f" not in env.store.objects
    assert "could not store" not in caplog.text
    await writer.release()
