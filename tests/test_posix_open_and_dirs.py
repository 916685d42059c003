"""POSIX behaviour programs rely on (issue 19): a file removed while open for reading keeps
its content until its last close; a directory's mode, owner and times hold (after the
attribute timeout and a remount) on every server, and the kernel enforces them."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from conftest import MiB, bucket_with, new_bucket, wait_until

UNLINKED = ".s3stream/unlinked/"


def _names(keys: list[str]) -> list[str]:
    """The keys but the mount's own (its lease, kept while it has objects set aside)."""
    return sorted(k for k in keys if not k.startswith(".s3stream/"))


@pytest.fixture(params=["seaweedfs", "moto"])
def server_and_size(request):
    """Each server, with the size of file to read: 3 MiB on SeaweedFS, smaller on moto."""
    if request.param == "seaweedfs":
        return request.getfixturevalue("seaweed"), 3 * MiB
    return request.getfixturevalue("moto_server"), 1 * MiB


def test_a_file_removed_while_open_for_reading_keeps_its_content(server_and_size,
                                                                  mount_factory):
    server, size = server_and_size
    data = os.urandom(size)
    # stored by another client: nothing of it is in the kernel's page cache
    m = mount_factory(server, bucket=bucket_with(server, {"f.bin": data, "other": b"x"}))
    path = m.path / "f.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        first = os.read(fd, 16 * 1024)
        os.unlink(path)
        # the name is gone at once, here and in the bucket
        assert "f.bin" not in os.listdir(m.path)
        with pytest.raises(FileNotFoundError):
            os.stat(path)
        keys = m.keys()
        assert "f.bin" not in keys
        aside = [k for k in keys if k.startswith(UNLINKED)]
        assert len(aside) == 1, keys
        assert _names(keys) == ["other"]
        # ... and the descriptor reads every byte, and says the file has no name
        rest = bytearray()
        while chunk := os.read(fd, 1 * MiB):
            rest += chunk
        assert first + rest == data
        assert os.pread(fd, 100, 5) == data[5:105]
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    # the last close deletes the copy
    assert wait_until(lambda: not [k for k in m.keys() if k.startswith(UNLINKED)], 5), \
        m.keys()
    assert os.listdir(m.path) == ["other"]


def test_shell_reads_a_removed_file_through_its_descriptor(seaweed, mount_factory):
    """The issue's reproduction: `exec 3< f; rm f; cat <&3`."""
    data = os.urandom(3 * MiB)
    m = mount_factory(seaweed, bucket=bucket_with(seaweed, {"f": data}))
    result = subprocess.run(["sh", "-c", 'exec 3< f; head -c 16384 <&3 >/dev/null; rm f; '
                             'cat <&3 > "$OUT"'], cwd=m.path, capture_output=True,
                            env={**os.environ, "OUT": str(m.path.parent / "out")}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (m.path.parent / "out").read_bytes() == data[16384:]
    assert not os.path.exists(m.path / "f")
    assert wait_until(lambda: _names(m.keys()) == [], 5), m.keys()


def test_a_file_open_for_writing_that_is_removed_is_dropped(seaweed, mount_factory):
    """Unchanged: the upload of a file removed while being written is aborted."""
    m = mount_factory(seaweed)
    with open(m.path / "w", "wb") as f:
        f.write(b"x" * 100)
        os.unlink(m.path / "w")
    assert m.keys() == []
