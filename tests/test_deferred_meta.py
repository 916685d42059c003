"""chmod/chown/utimes of a closed file are stored with its next copy (deferred_meta.META_DELAY):
rsync's temporary file is copied once, by its rename; otherwise the attributes reach S3
within the delay, at fsync, or before the mount exits. Real mounts on SeaweedFS."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest
from conftest import require, wait_until

from s3fs_stream.deferred_meta import META_DELAY

OLD = 1_600_000_000  # seconds: "an old mtime"


def requests(mount, operation: str) -> list[str]:
    """Keys of the mount's S3 requests of one operation, from its debug log."""
    return re.findall(rf" S3 {operation} s3://[^/\s]+/(\S+) -> ", mount.log())


def stored_mode(mount, key: str) -> int:
    return int(mount.head(key)["Metadata"]["mode"])


def written(mount, name: str, data: bytes = b"x" * 4096) -> str:
    path = mount.path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.timeout(240)
def test_rsync_copies_each_temporary_file_once(seaweed, mount_factory, tmp_path):
    require(shutil.which("rsync") is not None, "rsync")
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    expected = {}
    for i in range(100):
        name = f"f{i:03d}.txt" if i < 60 else f"sub/g{i:03d}.bin"
        path = source / name
        path.write_bytes(os.urandom(64 + i * 40))
        mode = 0o600 if i % 2 else 0o755
        path.chmod(mode)
        os.utime(path, (OLD + i, OLD + i))
        expected[name] = (mode, OLD + i)
    m = mount_factory(seaweed)
    first = subprocess.run(["rsync", "-a", f"{source}/", f"{m.path}/dst/"],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    for name, (mode, mtime) in expected.items():
        meta = m.head(f"dst/{name}")["Metadata"]
        assert int(meta["mode"]) == stat.S_IFREG | mode, (name, meta)
        assert int(float(meta["mtime"])) == mtime, (name, meta)
    time.sleep(META_DELAY + 1)  # nothing left for the background task to store
    temporary = re.compile(r"(^|/)\.[^/]+\.[A-Za-z0-9]{6}$")
    copies = requests(m, "CopyObject")
    assert not [key for key in copies if temporary.search(key)], copies
    assert sorted(copies) == sorted(f"dst/{name}" for name in expected)  # the renames only
    again = subprocess.run(["rsync", "-a", "--itemize-changes", f"{source}/", f"{m.path}/dst/"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    # SeaweedFS keeps no metadata on directory markers: directory times may differ
    changes = [line for line in again.stdout.splitlines() if not line.startswith(".d..t")]
    assert changes == []


@pytest.mark.timeout(120)
def test_chmod_of_a_closed_file_is_stored_within_the_delay(seaweed, mount_factory):
    m = mount_factory(seaweed)
    path = written(m, "f")
    assert stored_mode(m, "f") == stat.S_IFREG | 0o644
    os.chmod(path, 0o640)
    os.utime(path, (OLD, OLD))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # shown at once
    assert os.stat(path).st_mtime == OLD
    assert stored_mode(m, "f") == stat.S_IFREG | 0o644  # not stored yet
    assert wait_until(lambda: stored_mode(m, "f") == stat.S_IFREG | 0o640, META_DELAY + 1)
    assert m.head("f")["Metadata"]["mtime"] == str(OLD)
    assert requests(m, "CopyObject") == ["f"]  # both changes in one copy
    fresh = mount_factory(seaweed, bucket=m.bucket)
    status = os.stat(fresh.path / "f")
    assert stat.S_IMODE(status.st_mode) == 0o640 and status.st_mtime == OLD


@pytest.mark.timeout(60)
def test_chmod_then_unlink_stores_nothing(seaweed, mount_factory):
    m = mount_factory(seaweed)
    path = written(m, "f")
    os.chmod(path, 0o600)
    os.unlink(path)
    time.sleep(META_DELAY + 1)
    assert requests(m, "CopyObject") == []
    assert m.keys() == []


@pytest.mark.timeout(60)
def test_fsync_stores_it(seaweed, mount_factory):
    m = mount_factory(seaweed)
    path = written(m, "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o604)
        os.fsync(fd)
        assert stored_mode(m, "f") == stat.S_IFREG | 0o604
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_chmod_then_sigterm_stores_it(seaweed, mount_factory):
    m = mount_factory(seaweed)
    path = written(m, "f")
    os.chmod(path, 0o700)
    os.chown(path, 1234, 5678)
    m.process.send_signal(signal.SIGTERM)
    assert m.process.wait(30) == 0
    meta = m.head("f")["Metadata"]
    assert int(meta["mode"]) == stat.S_IFREG | 0o700, meta
    assert (meta["uid"], meta["gid"]) == ("1234", "5678")
