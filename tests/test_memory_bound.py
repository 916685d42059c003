"""`max_memory` means what it says: 1 GiB written by 4 files at once, then read back by 4
readers, through a mount at max_memory=32M, and the daemon's peak resident memory (VmHWM)
stays within its idle size plus the budget plus the fixed overhead docs/SEMANTICS.md states.

FIXED is that overhead, the bound on request buffers (mount.py): pyfuse3 runs at most
MAX_TASKS = 16 requests at once, each task keeping libfuse's receive buffer (1 MiB + 4 KiB,
resident once a 1 MiB WRITE filled it) and each request in progress holding at most one more
MiB (pyfuse3's copy of a WRITE's data, or a READ's reply): 16 x 2 MiB. Part buffers,
read-ahead and their upload bodies are all inside the budget. Measured: writing peaks at
idle + 52 MiB, reading at idle + 51 MiB (the budget, 4 WRITEs in flight, heap slack); before
the fix writing peaked at idle + 116 MiB.
"""

from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import peak_rss, run_with_timeout

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
