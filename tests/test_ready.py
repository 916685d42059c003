"""Ready means tuned: when mount.s3stream returns, the kernel settings are in force, so a
program that reads at once gets the same READ requests as one that waits."""

from __future__ import annotations

import os
import re
import subprocess
import time

from conftest import VENV_BIN, bucket_with, fuse_available, log_errors, require, wait_until

MiB = 1024 * 1024
SIZE = 24 * MiB
READS = re.compile(r"fh (\d+): the kernel sent (\d+) READs asking for (\d+) bytes, at most "
                   r"(\d+) at once")


def _daemon_pid(mountpoint: str) -> int | None:
    """The background mount process of `mountpoint` (a path unique to this test)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"mount.s3stream") for arg in argv) and \
                mountpoint.encode() in argv:
            return int(name)
    return None


def _read_all(path: str) -> int:
    """Read like `cat` does, in 128 KiB pieces: how large the kernel's READs are is then up
    to its read-ahead, which the mount raises."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, 128 * 1024):
            total += len(chunk)
    finally:
        os.close(fd)
    return total


def test_read_at_once_after_the_helper_returns_gets_tuned_requests(seaweed, tmp_path):
    require(fuse_available(), "/dev/fuse and fusermount3")
    data = os.urandom(MiB) * (SIZE // MiB)
    bucket = bucket_with(seaweed, {"now": data, "later": data})
    mnt, log_path = tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    result = subprocess.run(
        [str(VENV_BIN / "mount.s3stream"), bucket, str(mnt), "-o",
         f"endpoint_url={seaweed.endpoint_url},force_path_style,log_file={log_path},"
         "log_level=debug"], env=seaweed.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pid = _daemon_pid(str(mnt))
    try:
        assert _read_all(str(mnt / "now")) == SIZE  # no wait at all after the helper
        time.sleep(5)
        assert _read_all(str(mnt / "later")) == SIZE
        # RELEASE reaches the daemon after close() returns
        assert wait_until(lambda: len(READS.findall(log_path.read_text())) == 2, 10)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if pid is not None and not wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30):
            os.kill(pid, 9)
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    text = log_path.read_text()
    now, later = [tuple(map(int, match[1:])) for match in READS.findall(text)]
    assert now == later  # (READs, bytes, largest)
    if os.geteuid() == 0:  # the read-ahead can only be raised by root
        assert now[2] == MiB
        assert now[0] <= SIZE // MiB + 4
    assert not log_errors(text)
