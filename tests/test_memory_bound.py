"""`max_memory` means what it says: 1 GiB written by 4 files at once, then read back by 4
readers, through a mount at max_memory=32M, and the daemon's peak resident memory (VmHWM)
stays within its idle size plus the budget plus the fixed overhead docs/SEMANTICS.md states.

FIXED is that overhead, the bound on request buffers (mount.py): pyfuse3 runs at most
MAX_TASKS = 16 requests at once, each task keeping libfuse's receive buffer (1 MiB + 4 KiB,
resident once a 1 MiB WRITE filled it) and each request in progress holding at most one more
MiB (pyfuse3's copy of a WRITE's data, or a READ's reply): 16 x 2 MiB. Part buffers,
read-ahead, demand reads (while the budget has room) and upload bodies are all inside the
budget. Measured: writing peaks at idle + 52 to 57 MiB, reading at idle + 34 to 37 MiB (the
budget, requests in flight, heap slack); before the fix writing peaked at idle + 116 MiB and
reading at up to idle + 66 MiB.
"""

from __future__ import annotations

import gc
import hashlib
import os
import struct
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from conftest import peak_rss, run_with_timeout

from s3fs_stream.part_buffer import Part
from s3fs_stream.upload_pool import UploadPool

MiB = 1024 * 1024
BUDGET = 32 * MiB
FIXED = 32 * MiB
FILES = 4
SIZE = 256 * MiB
CHUNK = MiB


def chunk(block: bytes, k: int, i: int) -> bytes:
    """File k's i-th MiB: tagged with (k, i) over a random block, so a MiB in the wrong file
    or place is caught without a GiB of random data."""
    return struct.pack("<QQ", k, i) + block[16:]


def expected_sha(block: bytes, k: int) -> str:
    digest = hashlib.sha256()
    for i in range(SIZE // CHUNK):
        digest.update(chunk(block, k, i))
    return digest.hexdigest()


def write_one(path, block: bytes, k: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(SIZE // CHUNK):
            os.write(fd, chunk(block, k, i))
    finally:
        os.close(fd)


def read_sha(path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(CHUNK):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


def within_bound(mount, idle: int, what: str) -> None:
    peak = peak_rss(mount)
    assert peak <= idle + BUDGET + FIXED, (
        f"{what}: peak RSS {peak / MiB:.0f} MiB > idle {idle / MiB:.0f} + max_memory "
        f"{BUDGET // MiB} + fixed overhead {FIXED // MiB} MiB")


@pytest.mark.timeout(150)
def test_4_writers_then_4_readers_of_256mib_at_32m(seaweed, mount_factory):
    block = os.urandom(CHUNK)
    writer = mount_factory(seaweed, "max_memory=32M")
    idle = peak_rss(writer)

    def write_all() -> None:
        with ThreadPoolExecutor(FILES) as pool:
            list(pool.map(lambda k: write_one(writer.path / f"f{k}", block, k), range(FILES)))

    run_with_timeout(write_all, 90, writer.log)
    within_bound(writer, idle, "writing")
    assert writer.unmount() == 0
    expected = [expected_sha(block, k) for k in range(FILES)]

    # a fresh mount: the kernel's page cache of the first would serve the reads itself
    reader = mount_factory(seaweed, "max_memory=32M", bucket=writer.bucket)
    idle = peak_rss(reader)

    def read_all() -> list[tuple[int, str]]:
        with ThreadPoolExecutor(FILES) as pool:
            return list(pool.map(lambda k: read_sha(reader.path / f"f{k}"), range(FILES)))

    got = run_with_timeout(read_all, 60, reader.log)
    for k, (size, digest) in enumerate(got):
        assert size == SIZE, f"f{k}: read {size} bytes"
        assert digest == expected[k], f"f{k}: content differs"
    within_bound(reader, idle, "reading")


def test_payload_of_a_part_with_leftovers_is_its_buffer_cut_not_a_copy():
    """A file's last part in a full-size (recycled) buffer: the upload sends the buffer
    itself, cut to the data, not an 8 MiB copy beside the budget."""
    part = Part(2, 8 * MiB, buf=bytearray(8 * MiB), reserved=8 * MiB)
    part.put(0, memoryview(b"x" * (3 * MiB)))
    body = part.payload()
    assert body is part.buf and len(body) == 3 * MiB
    part.put(3 * MiB, memoryview(b"y"))  # still writable: a growing buffer now
    assert part.length == len(part.buf) == 3 * MiB + 1


async def test_an_idle_upload_worker_keeps_no_finished_job():
    """The job's closure holds the part's bytes, which the budget has already given to the
    next part: a worker waiting for its next job must not keep it alive."""
    class Body(bytearray):  # bytearrays take no weak references; a subclass does
        pass

    async with trio.open_nursery() as nursery:
        pool = UploadPool(nursery, 2)
        body = Body(MiB)
        alive = weakref.ref(body)

        async def job(data=body) -> None:
            await trio.sleep(0)

        await pool.submit(job)
        del job, body
        await trio.sleep(0.1)
        gc.collect()
        assert alive() is None, "an idle upload worker still holds its last job's bytes"
        await pool.close()
