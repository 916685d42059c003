"""mkdir, rmdir, rename and attributes through a real mount, on both servers."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from conftest import wait_until

from s3fs_stream.deferred_meta import META_DELAY


def test_mkdir_rmdir_and_rename(any_server, mount_factory):
    m = mount_factory(any_server)
    root = m.path
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "g").write_bytes(b"gee")
    (root / "a" / "b" / "f").write_bytes(b"eff")
    with pytest.raises(OSError) as info:
        os.rmdir(root / "a" / "b")
    assert info.value.errno == errno.ENOTEMPTY

    os.rename(root / "a" / "b" / "f", root / "a" / "f2")  # file rename
    assert m.get("a/f2") == b"eff"
    assert "a/b/f" not in m.keys()

    result = subprocess.run(["mv", str(root / "a"), str(root / "z")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(root)) == ["z"]
    assert sorted(os.listdir(root / "z")) == ["b", "f2", "g"]
    assert (root / "z" / "g").read_bytes() == b"gee"
    assert m.get("z/g") == b"gee" and m.get("z/f2") == b"eff"
    assert not [k for k in m.keys() if k.startswith("a/") and not k.endswith("/")]

    os.rmdir(root / "z" / "b")
    with pytest.raises(FileExistsError):
        os.mkdir(root / "z")


def test_chmod_and_utime_on_a_stored_object(any_server, mount_factory):
    m = mount_factory(any_server)
    path = m.path / "f.txt"
    path.write_bytes(b"data")
    os.chmod(path, 0o600)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    # stored within META_DELAY (SEMANTICS.md: attributes of a closed file are deferred)
    assert wait_until(lambda: m.head("f.txt")["Metadata"].get("mode") == "33152",
                      META_DELAY + 1)
    meta = m.head("f.txt")["Metadata"]
    assert int(meta["mode"]) & 0o777 == 0o600
    assert meta["mtime"] == "1600000000.123456789"
    assert m.get("f.txt") == b"data"
    m.unmount()
    again = mount_factory(any_server, bucket=m.bucket)
    st = os.stat(again.path / "f.txt")
    assert st.st_mode & 0o777 == 0o600
    assert st.st_mtime_ns == 1_600_000_000_123_456_789


def test_a_file_open_for_writing_is_listed_once(seaweed, mount_factory):
    """A file being appended to has an object and a writer: the listing shows it once, in
    a one-page directory too (its writer was once added again after the last page)."""
    m = mount_factory(seaweed)
    (m.path / "d").mkdir()
    for name in ("a", "b", "c"):
        (m.path / "d" / name).write_bytes(b"x")
    with open(m.path / "d" / "b", "ab") as f:
        f.write(b"more")
        f.flush()
        assert sorted(os.listdir(m.path / "d")) == ["a", "b", "c"]
        with open(m.path / "d" / "new", "wb") as g:  # not in S3 yet: listed from its writer
            g.write(b"y")
            assert sorted(os.listdir(m.path / "d")) == ["a", "b", "c", "new"]
    assert m.get("d/b") == b"xmore" and m.get("d/new") == b"y"


def test_rename_over_a_file_open_for_writing_keeps_the_renamed_file(seaweed, mount_factory):
    """mv log.new log while a program still writes log: the program's file is unlinked,
    as on a local disk; its later writes and its close never overwrite the new log."""
    m = mount_factory(seaweed)
    with open(m.path / "log", "wb") as f:
        f.write(b"old " * 1000)
        f.flush()
        (m.path / "log.new").write_bytes(b"new")
        os.rename(m.path / "log.new", m.path / "log")
        f.write(b"more")
        f.flush()
        os.fsync(f.fileno())
    assert m.get("log") == b"new"
    assert (m.path / "log").read_bytes() == b"new"
    assert "log.new" not in m.keys()


def test_a_walk_of_known_names_reads_their_metadata_ahead(seaweed, mount_factory):
    """rsync's second run stats every file it wrote, one at a time: after the attribute
    timeout each needs its metadata again, and a walk sends those HEADs ahead, pipelined,
    instead of one round trip per name."""
    m = mount_factory(seaweed)
    (m.path / "d").mkdir()
    names = [f"f{i:03d}" for i in range(200)]
    for name in names:
        (m.path / "d" / name).write_bytes(name.encode())
    time.sleep(2.5)  # every attribute and entry timeout has passed
    before = m.log().count("HeadObject")
    for name in names:
        assert os.stat(m.path / "d" / name).st_size == 4
    walk = [line for line in m.log().splitlines() if "HeadObject" in line][before:]
    one_by_one = [line for line in walk if "pipelined" not in line and "/d/f" in line]
    assert len(walk) >= 200  # every name was validated again
    assert len(one_by_one) <= 10, one_by_one  # a round trip per 64 names, not per name
