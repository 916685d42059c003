"""What people do to a mounted tree: ls -l and find over huge directories, rsync -a twice,
cp -a and tar round trips, symlinks shared with s3fs-fuse, two mounts of one bucket."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bulk_put import put_many
from tests.conftest import new_bucket, require, wait_until

MiB = 1024 * 1024


def run(cmd, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{cmd}: {result.returncode}\n{result.stderr[-2000:]}"
    return result


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.timeout(600)  # ls and find HEAD each of the 110,000 objects they list
def test_ls_and_find_over_100000_objects(seaweed, mount_factory):
    bucket = new_bucket(seaweed)
    big = [f"big/f{i:06d}" for i in range(100_000)]
    ten = [f"ten/sub{i % 10}/g{i:05d}" for i in range(10_000)]
    put_many(seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key, bucket, big + ten)
    m = mount_factory(seaweed, bucket=bucket)
    before = rss_kib(m.process.pid)
    # the first readdir call answers as soon as its entries are in (ls reads them all first)
    head = run([sys.executable, "-c", "import os, sys, time; started = time.monotonic(); "
                "entries = os.scandir(sys.argv[1]); "
                "print(*[next(entries).name for _ in range(3)], time.monotonic() - started)",
                str(m.path / "big")], timeout=60).stdout.split()
    first = float(head.pop())
    assert len(head) == 3
    assert first < 5, f"the first entries took {first:.1f} s"
    started = time.monotonic()
    names = run(["ls", str(m.path / "big")]).stdout.split()
    # every file is HEADed before the kernel gets it: its stored attributes, never defaults
    print(f"ls of 100,000 objects: {time.monotonic() - started:.1f} s")
    assert len(names) == 100_000 and names[0] == "f000000" and names[-1] == "f099999"
    found = run(["find", str(m.path)]).stdout.splitlines()
    assert len(found) == 1 + 2 + 100_000 + 10 + 10_000  # root, big, ten, the rest
    started = time.monotonic()
    long = run(["ls", "-lR", str(m.path / "ten")]).stdout.splitlines()
    elapsed = time.monotonic() - started
    files = [line for line in long if line.startswith("-")]
    assert len(files) == 10_000 and all(" 0 " in line for line in files)
    print(f"ls -lR of 10,000 objects: {elapsed:.1f} s")
    grown = rss_kib(m.process.pid) - before
    assert grown < 150 * 1024, f"RSS grew by {grown} KiB"
    assert m.log().count("WARNING") == 0


def make_tree(root: Path, small: int = 1000) -> None:
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "many").mkdir()
    for i in range(small):
        (root / "many" / f"f{i:04d}").write_bytes(os.urandom(64) * (i % 64 + 1))
    for i in range(2):
        (root / "nested" / f"big{i}.bin").write_bytes(os.urandom(20 * MiB))
    odd = root / "nested" / "deeper"
    for name in ("with space", "ünïcode ✓", "plus+sign", "per%cent", "what?", "hash#tag",
                 "n" * 255):
        (odd / name).write_bytes(name.encode())
    secret = root / "nested" / "secret"
    secret.write_bytes(b"600")
    secret.chmod(0o600)
    tool = root / "nested" / "tool.sh"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o755)
    os.symlink("../many/f0001", root / "nested" / "link")
    os.symlink("deeper/deepest", root / "nested" / "dirlink")
    os.symlink("/nowhere/at all", root / "dangling")
    for i, path in enumerate(sorted(root.rglob("*"))):
        when = 1_500_000_000 + i * 3600
        os.utime(path, (when, when), follow_symlinks=False)


def listing(root: Path) -> list[str]:
    out = run(["find", ".", "-printf", r"%p %y %m %T@ %s %l\n"], cwd=root).stdout
    # directories: sizes differ by file system
    return sorted(" ".join(f[:4]) if f[1] == "d" else " ".join(f)
                  for f in (line.split(" ") for line in out.splitlines()))


def test_rsync_twice_moves_nothing(seaweed, mount_factory, tmp_path):
    require(shutil.which("rsync") is not None, "rsync")
    source = tmp_path / "src"
    make_tree(source)
    m = mount_factory(seaweed)
    target = m.path / "copy"
    run(["rsync", "-a", f"{source}/", f"{target}/"], timeout=300)
    again = run(["rsync", "-a", "--itemize-changes", f"{source}/", f"{target}/"], timeout=120)
    # SeaweedFS keeps no metadata on directory markers: directory times are checked on moto
    changes = [line for line in again.stdout.splitlines() if not line.startswith(".d..t")]
    assert changes == []
    run(["diff", "-r", "--no-dereference", str(source), str(target)])
    theirs = [line for line in listing(source)]
    ours = [line for line in listing(target)]
    files = [line for line in theirs if line.split(" ")[1] != "d"]
    assert [line for line in ours if line.split(" ")[1] != "d"] == files
    assert os.readlink(target / "nested" / "link") == "../many/f0001"
    assert (target / "nested" / "link").read_bytes() == (source / "many" / "f0001").read_bytes()
    assert m.head("copy/nested/big0.bin")["Metadata"]["mtime"]


def test_cp_a_and_tar_round_trip(any_server, mount_factory, tmp_path):
    source = tmp_path / "src"
    make_tree(source, small=20) if any_server.name == "seaweedfs" else _small_tree(source)
    m = mount_factory(any_server)
    run(["cp", "-a", str(source), str(m.path / "cp")], timeout=300)
    run(["tar", "-C", str(source), "-cf", str(tmp_path / "t.tar"), "."])
    (m.path / "tar").mkdir()
    run(["tar", "-C", str(m.path / "tar"), "-xf", str(tmp_path / "t.tar")], timeout=300)
    out = tmp_path / "out"
    out.mkdir()
    run(f"tar -C {m.path / 'tar'} -cf - . | tar -C {out} -xf -", timeout=300, shell=True)
    full = any_server.name == "moto"  # directory attributes: moto keeps markers' metadata
    for copy in (m.path / "cp", m.path / "tar", out):
        # "." of the tar copy is the directory the test made (its time: not yet compared)
        theirs = [line for line in listing(source) if not line.startswith(". ")]
        ours = [line for line in listing(copy) if not line.startswith(". ")]
        if not full:
            theirs = [line for line in theirs if line.split(" ")[1] != "d"]
            ours = [line for line in ours if line.split(" ")[1] != "d"]
        assert ours == theirs, copy


def _small_tree(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"eff")
    (root / "d" / "e" / "g").write_bytes(b"gee" * 1000)
    (root / "d" / "e" / "g").chmod(0o600)
    (root / "d").chmod(0o700)
    os.symlink("e/g", root / "d" / "l")
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        when = 1_400_000_000 + i * 60
        os.utime(path, (when - 30, when), follow_symlinks=False)


def test_links_devices_names_and_times(any_server, mount_factory):
    m = mount_factory(any_server)
    f = m.path / "f"
    f.write_bytes(b"data")
    with pytest.raises(OSError) as info:
        os.link(f, m.path / "hard")
    assert info.value.errno == errno.EOPNOTSUPP
    result = subprocess.run(["ln", str(f), str(m.path / "hard2")], capture_output=True,
                            text=True)
    assert result.returncode != 0 and "not supported" in result.stderr
    with pytest.raises(OSError) as info:
        os.mkfifo(m.path / "fifo")
    assert info.value.errno == errno.EOPNOTSUPP
    for xattr_call in (lambda: os.setxattr(f, "user.x", b"1"),
                       lambda: os.getxattr(f, "user.x"), lambda: os.listxattr(f),
                       lambda: os.removexattr(f, "user.x")):
        with pytest.raises(OSError) as info:
            xattr_call()
        assert info.value.errno == errno.EOPNOTSUPP  # no extended attributes, and no crash
    assert f.read_bytes() == b"data"
    for name in ("x" * 256,):
        with pytest.raises(OSError) as info:
            (m.path / name).write_bytes(b"x")
        assert info.value.errno == errno.ENAMETOOLONG
    deep = m.path
    for i in range(4):
        deep = deep / (chr(ord("a") + i) * 250)
        deep.mkdir()
    for action in (lambda: (deep / ("f" * 100)).write_bytes(b"x"),
                   lambda: (deep / ("g" * 100)).mkdir(),
                   lambda: os.rename(f, deep / ("h" * 100))):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.ENAMETOOLONG
    assert f.read_bytes() == b"data"
    names = ["with space", "ünïcode ✓", "plus+sign", "per%cent", "what?", "hash#tag",
             "n" * 255]
    for name in names:
        (m.path / name).write_bytes(name.encode())
    assert all((m.path / n).read_bytes() == n.encode() for n in names)
    assert set(names) <= set(os.listdir(m.path))
    # touch -a, touch -m, touch -d, and the mount point itself
    run(["touch", "-a", "-d", "2001-02-03 04:05:06", str(f)])
    run(["touch", "-m", "-d", "2002-02-03 04:05:06", str(f)])
    before = os.stat(f).st_ctime
    os.chmod(f, 0o640)
    time.sleep(1.2)
    st = os.stat(f)
    # GNU touch sets times through a descriptor it opened for writing: they are stored at
    # its close, before the next command (they once raced it and were lost)
    assert time.localtime(st.st_mtime)[0] == 2002 and st.st_mode & 0o777 == 0o640
    assert time.localtime(st.st_atime)[0] == 2001
    assert st.st_ctime >= before
    run(["touch", "-d", "2003-01-01 00:00:00", str(m.path)])
    assert time.localtime(os.stat(m.path).st_mtime)[0] == 2003
    assert m.log().count("Traceback") == 0


def test_two_mounts_see_each_others_changes(seaweed, mount_factory):
    a = mount_factory(seaweed)
    b = mount_factory(seaweed, bucket=a.bucket)
    first = os.urandom(3 * MiB)
    (a.path / "f").write_bytes(first)
    assert wait_until(lambda: (b.path / "f").exists(), 3)
    assert (b.path / "f").read_bytes() == first
    held = open(b.path / "f", "rb")
    for size in (20 * MiB, 5, 5, 3 * MiB):
        data = os.urandom(size)
        (a.path / "f").write_bytes(data)
        assert wait_until(lambda size=size: os.stat(b.path / "f").st_size == size, 3), size
        assert (b.path / "f").read_bytes() == data, size
    with pytest.raises(OSError) as info:
        held.seek(0)
        os.pread(held.fileno(), 4096, 2 * MiB)
    assert info.value.errno == errno.ESTALE
    held.close()
    # close-to-open: a new open right after the change sees the new object
    (b.path / "g").write_bytes(b"one")
    assert (a.path / "g").read_bytes() == b"one" or wait_until(
        lambda: (a.path / "g").read_bytes() == b"one", 3)
    (b.path / "g").write_bytes(b"second, longer")
    assert (a.path / "g").read_bytes() == b"second, longer"


def _s3fs_mount(server, bucket: str, path: Path, tmp_path: Path) -> subprocess.Popen:
    require(shutil.which("s3fs") is not None, "s3fs (apt install s3fs)")
    passwd = tmp_path / "s3fs.passwd"
    passwd.write_text(f"{server.access_key}:{server.secret_key}\n")
    passwd.chmod(0o600)
    path.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["s3fs", bucket, str(path), "-f", "-o",
         f"url={server.endpoint_url},use_path_request_style,passwd_file={passwd},"
         "endpoint=us-east-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL)
    if not wait_until(lambda: os.path.ismount(path), 30):
        process.kill()
        pytest.fail("s3fs did not mount")
    return process


def _s3fs_unmount(process: subprocess.Popen, path: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _write_tree(root: Path) -> None:
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"file")
    (root / "d" / "f").chmod(0o600)
    (root / "d" / "x").write_bytes(b"#!/bin/sh\n")
    (root / "d" / "x").chmod(0o755)
    os.symlink("f", root / "d" / "l")
    for path in (root / "d" / "f", root / "d" / "x", root / "d" / "l"):
        os.utime(path, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000),
                 follow_symlinks=False)


def _tree(root: Path) -> list[tuple]:
    out = []
    for name in ("f", "x", "l"):
        st = os.lstat(root / "d" / name)
        link = os.readlink(root / "d" / name) if name == "l" else None
        out.append((name, oct(st.st_mode), int(st.st_mtime), link))
    return out


def test_trees_shared_with_s3fs(seaweed, mount_factory, tmp_path):
    bucket = new_bucket(seaweed)
    theirs = tmp_path / "s3fs"
    process = _s3fs_mount(seaweed, bucket, theirs, tmp_path)
    try:
        _write_tree(theirs / "by-s3fs")
        expected = _tree(theirs / "by-s3fs")
    finally:
        _s3fs_unmount(process, theirs)
    assert expected[2][3] == "f" and expected[0][1] == oct(0o100600)
    m = mount_factory(seaweed, bucket=bucket)
    assert _tree(m.path / "by-s3fs") == expected
    _write_tree(m.path / "by-s3stream")
    ours = _tree(m.path / "by-s3stream")
    assert ours == expected
    m.unmount()
    process = _s3fs_mount(seaweed, bucket, theirs, tmp_path)
    try:
        assert _tree(theirs / "by-s3stream") == expected
    finally:
        _s3fs_unmount(process, theirs)
