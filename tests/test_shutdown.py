"""Stopping the mount: closed files complete, files still open keep every byte written as a
recoverable upload, and the exit code says so."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import VENV_BIN, run_with_timeout, sha, wait_until

from s3fs_stream.part_schedule import recoverable_prefix

MiB = 1024 * 1024


def close_after_crash(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # the mount is gone


def recoverable_bytes(mount) -> int:
    """Bytes `s3stream recover` would join from the one upload left in the bucket."""
    sizes = upload_parts(mount)
    return sum(sizes[n] for n in recoverable_prefix(sizes))


def upload_parts(mount) -> dict[int, int]:
    """Part sizes of the one upload left in the bucket."""
    (upload,) = mount.uploads()
    listed = mount.client.list_parts(Bucket=mount.bucket, Key=upload["Key"],
                                     UploadId=upload["UploadId"]).get("Parts", [])
    return {p["PartNumber"]: p["Size"] for p in listed}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_a_file_open_uploads_everything(mount, signum):
    data = os.urandom(20 * MiB + 3 * MiB + 12345)
    fd = os.open(mount.path / "open.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), MiB):
            os.write(fd, data[start:start + MiB])
        os.fdatasync(fd)  # the kernel's cache has handed every byte to the daemon
        mount.expected_exit = 3
        mount.process.send_signal(signum)
        assert mount.process.wait(60) == 3
    finally:
        close_after_crash(fd)
    assert recoverable_bytes(mount) == len(data), upload_parts(mount)
    assert "still open at unmount (open.bin)" in mount.log()


def test_unsynced_data_is_uploaded_within_max_unsynced(seaweed, mount_factory):
    """A program that never calls fsync: after max_unsynced seconds its tail is a part of
    the open upload, so a crash loses at most that much."""
    m = mount_factory(seaweed, "max_unsynced=1")
    data = os.urandom(9 * MiB + 777)
    fd = os.open(m.path / "slow.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        assert wait_until(lambda: m.uploads() and sum(upload_parts(m).values()) == len(data),
                          10, 0.2), "the tail was not uploaded"
        m.expected_exit = -signal.SIGKILL
        m.process.kill()  # a crash: nothing more reaches S3
        m.process.wait(10)
    finally:
        close_after_crash(fd)
    assert recoverable_bytes(m) == len(data)


def test_close_in_progress_when_sigterm_arrives_completes(mount):
    data = os.urandom(96 * MiB)
    outcome: list[object] = []
    fd = os.open(mount.path / "closing.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for start in range(0, len(data), MiB):
        os.write(fd, data[start:start + MiB])

    def close() -> None:
        try:
            os.close(fd)
            outcome.append("ok")
        except OSError as exc:
            outcome.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    time.sleep(0.05)  # close() is writing back and completing
    mount.process.send_signal(signal.SIGTERM)
    run_with_timeout(closer.join, 60, mount.log)
    assert outcome == ["ok"], outcome
    assert mount.process.wait(60) == 0
    assert sha(mount.get("closing.bin")) == sha(data)
    assert mount.uploads() == []


def test_fsynced_bytes_survive_a_crash(any_server, mount_factory):
    """Write 18 MiB, fsync, 5 MiB more, fsync, a little more, kill -9: `s3stream recover
    --complete` gives back exactly the 23 MiB fsynced. Part 4 went up twice under its number
    (3 MiB at the first fsync, 5 MiB at the second): recovery takes its last upload."""
    m = mount_factory(any_server, "max_unsynced=0", "part_size=5M")
    data = os.urandom(23 * MiB + 4096)
    fd = os.open(m.path / "rec.wav", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data[:18 * MiB])
        os.fsync(fd)
        os.write(fd, data[18 * MiB:23 * MiB])
        os.fsync(fd)
        os.write(fd, data[23 * MiB:])
        m.expected_exit = -signal.SIGKILL
        m.process.kill()
        m.process.wait(10)
    finally:
        close_after_crash(fd)
    done = subprocess.run([str(VENV_BIN / "s3stream"), "recover", m.bucket, "--complete",
                           "--older-than", "0", "-o",
                           f"endpoint_url={any_server.endpoint_url},force_path_style"],
                          env=any_server.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    got = m.get("rec.wav")
    assert len(got) == 23 * MiB and sha(got) == sha(data[:23 * MiB]), len(got)
