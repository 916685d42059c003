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
import re
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


def minor_faults(mount) -> int:
    """Page faults of the mount daemon so far (minflt of /proc/PID/stat)."""
    with open(f"/proc/{mount.process.pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.timeout(120)
def test_a_sequential_read_at_32m_reuses_its_read_ahead_buffers(seaweed, mount_factory):
    """256 MiB read in 1 MiB reads at max_memory=32M: 16 MiB GETs, and the daemon faults in
    fewer than half of the pages it reads. One reader's two 16 MiB segments fill a 32 MiB
    budget; each segment used to be a fresh mapping (its idle buffer was trimmed when the
    next reservation was taken), 65,536 faults for the 65,536 pages read and 1.28 against
    0.80 CPU-s per GiB at the default budget. Recycled: ~12,300 (the default: ~16,400)."""
    block = os.urandom(8 * MiB)
    parts = SIZE // len(block)
    writer = mount_factory(seaweed)
    client = seaweed.client()
    upload = client.create_multipart_upload(Bucket=writer.bucket, Key="big")["UploadId"]
    done = [{"PartNumber": n, "ETag": client.upload_part(
        Bucket=writer.bucket, Key="big", UploadId=upload, PartNumber=n, Body=block)["ETag"]}
        for n in range(1, parts + 1)]
    client.complete_multipart_upload(Bucket=writer.bucket, Key="big", UploadId=upload,
                                     MultipartUpload={"Parts": done})
    expected = hashlib.sha256(block * parts).hexdigest()
    reader = mount_factory(seaweed, "max_memory=32M", bucket=writer.bucket)
    idle, faults = peak_rss(reader), minor_faults(reader)
    assert run_with_timeout(lambda: read_sha(reader.path / "big"), 60, reader.log) == (
        SIZE, expected)
    faulted = minor_faults(reader) - faults
    assert faulted < SIZE // 4096 // 2, (
        f"{faulted} page faults reading {SIZE // 4096} pages: fresh read-ahead buffers")
    # 22 GETs: the window's ramp (1, 1, 1, 1, 2, 2, 8 MiB) then 16 MiB ones. 32 at most (8
    # MiB on average): segments cut to a smaller share would be twice as many
    gets = re.findall(r"S3 GetObject s3://\S+/big Range=bytes=(\d+)-(\d+) -> 206",
                      reader.log())
    assert sum(int(last) - int(first) + 1 for first, last in gets) == SIZE
    assert len(gets) <= 32, f"{len(gets)} GETs for {SIZE // MiB} MiB"
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
