"""Writes when things go wrong, and memory over a long stream (real mounts, real servers)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

import pytest
from conftest import VENV_BIN, new_bucket, run_with_timeout

MiB = 1024 * 1024


@pytest.mark.expect_log_errors("the object is not written", "closed without a successful")
def test_server_killed_mid_upload_gives_eio_and_leaves_upload(mount_factory,
                                                             restartable_seaweed):
    """An outage longer than the retry budget (here 2 attempts, retry_time 3 s): EIO and a
    recoverable upload."""
    server = restartable_seaweed.server
    bucket = new_bucket(server)
    m = mount_factory(server, "retries=2", "retry_time=3", bucket=bucket)
    chunk = os.urandom(MiB)

    def write_through_outage():
        fd = os.open(m.path / "rec.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        errors = []
        try:
            for _i in range(24):  # parts 1 to 3 fill and upload while the server is up
                os.write(fd, chunk)
            os.fsync(fd)
            restartable_seaweed.stop()
            for _i in range(24):
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    errors.append(exc.errno)
                    break
            try:
                os.fsync(fd)
            except OSError as exc:
                errors.append(exc.errno)
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                errors.append(exc.errno)
        return errors

    errors = run_with_timeout(write_through_outage, 120)
    assert errors and set(errors) <= {errno.EIO}, errors
    assert m.process.poll() is None, "mount process died"
    restartable_seaweed.restart()
    assert "rec.bin" not in m.keys(), "a half-written object appeared"
    assert [u["Key"] for u in m.uploads()] == ["rec.bin"], "the upload must be left to recover"
    assert "rec.bin" in m.log() and "recover" in m.log()
    # the mount stays usable
    run_with_timeout(lambda: (m.path / "after.txt").write_bytes(b"fine"), 60)
    assert m.get("after.txt") == b"fine"
    # and `s3stream recover --complete` joins the fsynced parts into an object
    result = subprocess.run(
        [str(VENV_BIN / "s3stream"), "recover", bucket, "--complete",
         "--older-than", "0", "-o",
         f"endpoint_url={server.endpoint_url},force_path_style"],
        env=server.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    recovered = m.head("rec.bin")["ContentLength"]
    assert recovered == 24 * MiB, recovered
    m.unmount()


def test_outage_within_the_retry_budget_is_survived(mount_factory, restartable_seaweed):
    """The server goes away mid-upload and comes back within `retry_time`: the writes wait,
    close() returns 0 and the object is whole."""
    server = restartable_seaweed.server
    bucket = new_bucket(server)
    m = mount_factory(server, "retries=2", "retry_time=30", bucket=bucket)
    blocks = [os.urandom(MiB) for _ in range(40)]
    timings = {}

    def outage(seconds: float) -> None:
        restartable_seaweed.stop()
        stopped = time.monotonic()
        time.sleep(seconds)
        restartable_seaweed.restart()  # returns once S3 answers
        timings["outage"] = time.monotonic() - stopped

    def write_through_outage():
        fd = os.open(m.path / "rec.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for block in blocks[:12]:  # part 1 uploads while the server is up
                os.write(fd, block)
            os.fsync(fd)
            server_away = threading.Thread(target=outage, args=(3,))
            server_away.start()
            started = time.monotonic()
            for block in blocks[12:]:  # parts 2 to 5 are retried until the server is back
                os.write(fd, block)
        finally:
            os.close(fd)  # raises on EIO
            server_away.join()
        timings["close"] = time.monotonic() - started

    run_with_timeout(write_through_outage, 120, m.log)
    print(timings)
    assert m.get("rec.bin") == b"".join(blocks)
    assert not m.uploads()
    assert "retrying for up to" in m.log() and "succeeded after" in m.log()


def test_long_stream_keeps_memory_bounded(mount):
    """2 GiB written 4 KiB at a time with the defaults: peak RSS stays under 150 MiB."""
    started = time.monotonic()
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={mount.path / 'long.bin'}", "bs=4k",
         f"count={2 * 1024 * 256}", "status=none"], timeout=600, capture_output=True)
    assert result.returncode == 0, result.stderr
    with open(f"/proc/{mount.process.pid}/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    print(f"2 GiB in {time.monotonic() - started:.1f} s, peak RSS {peak_kib // 1024} MiB")
    assert mount.head("long.bin")["ContentLength"] == 2 * 1024 * MiB
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib // 1024} MiB"
