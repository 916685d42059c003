"""Reference-model test of the writer: random sequences of writes, seeks, truncations, fsyncs,
flushes and memory pressure against a bytearray, over the in-memory store that enforces S3's
rules. After every flush the object must equal the model; reads see the model's bytes
(uploaded and freed ones too); nothing is left behind at the end."""

from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3fs_stream.memory_budget import MemoryBudget
from s3fs_stream.object_meta import FileMeta
from s3fs_stream.part_schedule import PartSchedule
from s3fs_stream.spill_area import SpillArea
from s3fs_stream.upload_pool import UploadPool
from s3fs_stream.writer import Base, StreamingWriter
from tests.memory_store import MemoryStore

MiB = 1024 * 1024
PART = 5 * MiB
LIMIT = 4 * PART  # 4 parts of 5 MiB: files up to 4 parts make memory tight
SPAN = 4 * PART  # offsets fall within the first four parts (and a little past them)

offsets = st.one_of(st.integers(0, SPAN), st.sampled_from([0, 4, 40, PART - 1, PART,
                                                           2 * PART + 3, 3 * PART]))
operations = st.lists(st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(1, 3 * MiB)),
    st.tuples(st.just("append"), st.integers(1, 2 * MiB)),
    st.tuples(st.just("truncate"), st.integers(0, SPAN)),
    st.tuples(st.just("read"), offsets, st.integers(1, MiB), st.booleans()),
    st.tuples(st.just("fsync")),
    st.tuples(st.just("flush")),
    st.tuples(st.just("drop")),
    st.tuples(st.just("evict")),
    st.tuples(st.just("reader")),  # a read-only handle opens (or the one open closes)
), min_size=1, max_size=14)


def pattern(seed: int, length: int) -> bytes:
    block = bytes((seed * 31 + i) % 251 for i in range(4096))
    return (block * (length // 4096 + 1))[:length]


async def scenario(files: list[list], initial: bytes | None, limit: int = LIMIT) -> None:
    """Each file's operations run in a task of its own, all at once, sharing one budget."""
    store = MemoryStore()
    budget = MemoryBudget(limit)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(budget.reclaim_forever)
        pool = UploadPool(nursery, 3)
        spill = SpillArea(store, "")
        with trio.fail_after(60):
            async with trio.open_nursery() as files_nursery:
                for index, ops in enumerate(files):
                    files_nursery.start_soon(run_file, f"k{index}", ops, initial, store, pool,
                                             budget, spill)
        assert budget.used == 0, f"{budget.used} bytes of budget leaked"
        assert not [k for k in store.objects if k.startswith(".s3stream/spill/")], "spills left"
        assert not store.uploads, "an upload was left open"
        nursery.cancel_scope.cancel()


async def run_file(key, ops, initial, store, pool, budget, spill) -> None:
    model = bytearray(initial or b"")
    base = None
    if initial is not None:
        base = Base(store._store(key, initial, {}), len(initial))
    writer = StreamingWriter(key, key, store, pool, budget, PartSchedule(PART, PART), spill,
                             FileMeta(0o100644, 0, 0, 0), None, base)
    for step, op in enumerate(ops):
        await apply(op, step, writer, model, store)
        await trio.sleep(0)
    if writer.readers:
        writer.reader_closed()
    await writer.flush()
    assert store.objects[key][0] == bytes(model), f"{key}: final object differs"
    await writer.release()


async def apply(op, step: int, writer: StreamingWriter, model: bytearray, store) -> None:
    kind = op[0]
    if kind in ("write", "append"):
        offset, length = (op[1], op[2]) if kind == "write" else (len(model), op[1])
        data = pattern(step, length)
        await writer.write(offset, data)
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset:offset + length] = data
    elif kind == "truncate":
        await writer.truncate(op[1])
        del model[op[1]:]
        model.extend(bytes(op[1] - len(model)))
    elif kind == "read":
        offset, length, for_writing = op[1], op[2], op[3]
        got = await writer.read_held(offset, length, for_writing)
        assert got == bytes(model[offset:offset + length]), f"read at {offset}"
    elif kind == "fsync":
        await writer.fsync()
    elif kind == "flush":
        await writer.flush()
        assert store.objects[writer.key][0] == bytes(model), f"object after flush, step {step}"
    elif kind == "reader":
        if writer.readers:
            writer.reader_closed()
        else:
            writer.readers += 1
    elif kind == "drop":
        writer.drop_stored()
    elif kind == "evict":
        while (candidate := writer.eviction_candidate()) is not None:
            await writer.evict(candidate[2])
    assert writer.size == len(model)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_new_file_matches_the_model(ops):
    trio.run(scenario, [ops], None)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, size=st.integers(0, 3 * PART))
def test_existing_object_matches_the_model(ops, size):
    trio.run(scenario, [ops], pattern(999, size))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(operations, min_size=2, max_size=4))
def test_files_written_at_once_share_a_tight_budget(files):
    """Two to four files at once with room for two parts: waits, drops and spills happen
    on their own, and every file still matches its model."""
    trio.run(scenario, files, None, 2 * PART)
