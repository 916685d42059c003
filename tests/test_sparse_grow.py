"""Growing a file moves no zeros through the daemon: `truncate -s 2G` of a small object and
a write at 1.5 GiB of a new file come back at once with small memory, the gap's parts copied
server-side from the mount's zero objects (`.s3stream/zeros/`), and reads of the gap while
the file is open are zeros. (Before: the zeros streamed through part buffers, 2 GiB of
uploads, uninterruptible.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import VENV_BIN, MiB, bucket_with, budget_of, peak_rss, status_document, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GiB = 1024 * MiB


def requests(mount) -> dict[str, int]:
    """The mount's requests by operation so far (`s3stream status --json`)."""
    return status_document(mount.path)["requests"]


def test_truncate_to_2g_and_a_write_far_past_the_end(seaweed, mount_factory):
    bucket = bucket_with(seaweed, {"old": b"hello world"})
    m = mount_factory(seaweed, bucket=bucket)
    start = time.monotonic()
    subprocess.run(["truncate", "-s", "2G", m.path / "old"], check=True, timeout=120)
    took = time.monotonic() - start
    # the close completes the object: SeaweedFS copies the 2 GiB of the gap on its side
    # (10-20 s on the shared test machine); the daemon uploads the part of the old end
    # and the zero object (one part each), the 256 parts of the gap are copies
    assert took < 60, f"truncate -s 2G took {took:.1f} s"
    counts = requests(m)
    assert counts.get("UploadPart", 0) <= 2 and counts["UploadPartCopy"] >= 255, counts
    assert m.head("old")["ContentLength"] == 2 * GiB
    ranged = m.client.get_object(Bucket=m.bucket, Key="old", Range=f"bytes={GiB}-{GiB + 4095}")
    assert ranged["Body"].read() == bytes(4096)
    ranged = m.client.get_object(Bucket=m.bucket, Key="old", Range="bytes=0-15")
    assert ranged["Body"].read() == b"hello world" + bytes(5)
    assert (m.path / "old").stat().st_size == 2 * GiB

    fd = os.open(m.path / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"start")
        os.pwrite(fd, b"end", 3 * GiB // 2)
    finally:
        os.close(fd)
    assert m.head("new")["ContentLength"] == 3 * GiB // 2 + 3
    ranged = m.client.get_object(Bucket=m.bucket, Key="new",
                                 Range=f"bytes={3 * GiB // 2 - 5}-{3 * GiB // 2 + 2}")
    assert ranged["Body"].read() == bytes(5) + b"end"
    assert m.client.get_object(Bucket=m.bucket, Key="new", Range="bytes=0-7")["Body"].read() \
        == b"start" + bytes(3)
    # nothing like the gigabytes of the gaps passed through the daemon: the first part and
    # the last one uploaded
    assert requests(m).get("UploadPart", 0) - counts.get("UploadPart", 0) <= 2, requests(m)
    assert peak_rss(m) < budget_of(m) + 200 * MiB, f"peak RSS {peak_rss(m) // MiB} MiB"
    assert m.uploads() == []


def test_reading_the_gap_while_open(seaweed, mount_factory):
    bucket = bucket_with(seaweed, {"f": b"abc"})
    m = mount_factory(seaweed, bucket=bucket)
    fd = os.open(m.path / "f", os.O_RDWR)
    try:
        start = time.monotonic()
        os.ftruncate(fd, 2 * GiB)
        assert time.monotonic() - start < 5
        assert os.pread(fd, 3, 0) == b"abc"
        assert os.pread(fd, 65536, GiB) == bytes(65536)
        with open(m.path / "f", "rb") as reader:  # another handle, as a reader
            reader.seek(GiB + 12345)
            assert reader.read(100_000) == bytes(100_000)
        assert m.head("f")["ContentLength"] == 3  # not completed by the reads
        assert peak_rss(m) < budget_of(m) + 200 * MiB
    finally:
        os.close(fd)
    assert m.head("f")["ContentLength"] == 2 * GiB


@pytest.mark.expect_log_errors("the mount is stopping")
def test_sigterm_during_a_long_completion_stops_it(seaweed, mount_factory):
    """`truncate -s 16G`: its close copies 16 GiB server-side (SeaweedFS takes minutes).
    `s3stream status` counts the copies meanwhile; SIGTERM stops them once the requests in
    progress had their 10 s, and the upload is left for `s3stream recover`."""
    bucket = bucket_with(seaweed, {"big": b"head"})
    m = mount_factory(seaweed, bucket=bucket)
    grow = subprocess.Popen(["truncate", "-s", "16G", m.path / "big"],
                            stderr=subprocess.PIPE, text=True)
    try:
        def copied() -> int:
            result = subprocess.run([str(VENV_BIN / "s3stream"), "status", str(m.path),
                                     "--json"], capture_output=True, text=True, timeout=30)
            files = json.loads(result.stdout)[0]["files"] if result.returncode == 0 else []
            return sum(entry.get("parts_copied", 0) for entry in files)

        assert wait_until(lambda: copied() > 0, 60), "no copy progress in status"
        assert grow.poll() is None
        start = time.monotonic()
        m.process.send_signal(signal.SIGTERM)
        code = m.process.wait(60)
        assert time.monotonic() - start < 30
        m.expected_exit = code
        assert code in (0, 3)
        assert grow.wait(30) != 0  # its close failed
    finally:
        if grow.poll() is None:
            grow.kill()
            grow.wait()
    assert [u["Key"] for u in m.uploads()] == ["big"]
    assert m.get("big") == b"head"
    assert "the mount is stopping" in m.log()
