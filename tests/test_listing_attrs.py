"""What a fresh mount's listing shows: the stored mode, owner and mtime of every file, never
the listing's defaults (readdirplus makes each entry an inode with the attributes handed
over, and with the writeback cache the kernel keeps the mtime it was first given); `.` and
`..`; a no-op nightly `rsync -a` after a remount that sends nothing."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

from tests.conftest import bucket_with, require, status_document, wait_until
from tests.fault_proxy import FaultProxy

KiB, MiB = 1024, 1024 * 1024
ATTR_TIMEOUT = 1.0  # the mount's default

# name -> (size, mode, uid, gid, mtime): one below the old 4,095-byte HEAD limit, the rest
# above it, and an empty one
FILES = {
    "empty": (0, 0o640, 1001, 1002, 1_262_304_000),
    "small": (100, 0o600, 1234, 2345, 1_577_836_800),
    "five": (5 * KiB, 0o600, 1234, 2345, 1_577_836_801),
    "mib": (MiB, 0o751, 0, 2345, 1_600_000_000),
    "nine": (9 * MiB, 0o444, 4321, 0, 1_000_000_000),
}


def run(cmd, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{cmd}: {result.returncode}\n{result.stderr[-2000:]}"
    return result


def ls_l(directory: Path) -> dict[str, tuple[str, int, int, int, int]]:
    """name -> (mode string, uid, gid, size, mtime in s) as `ls -ln` shows them."""
    out = run(["ls", "-ln", "--time-style=+%s", str(directory)]).stdout
    shown = {}
    for line in out.splitlines()[1:]:  # "total N" first
        mode, _, uid, gid, size, mtime, name = line.split(None, 6)
        shown[name] = (mode, int(uid), int(gid), int(size), int(mtime))
    return shown


def stat_of(path: Path) -> tuple[str, int, int, int, int]:
    st = os.lstat(path)
    return stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, int(st.st_mtime)


def make_files(directory: Path) -> None:
    directory.mkdir()
    for name, (size, mode, uid, gid, mtime) in FILES.items():
        path = directory / name
        path.write_bytes(random.Random(name).randbytes(size))
        os.chown(path, uid, gid)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))


def expected(name: str) -> tuple[str, int, int, int, int]:
    size, mode, uid, gid, mtime = FILES[name]
    return stat.filemode(stat.S_IFREG | mode), uid, gid, size, mtime


def test_a_fresh_mount_lists_what_stat_shows(any_server, mount_factory):
    """chmod/chown/touch -d files, remount: `ls -l` shows at once what `stat` shows after
    the attribute timeout, and both are what was set (not the upload time, not 0644)."""
    m = mount_factory(any_server)
    make_files(m.path / "d")
    assert m.unmount() == 0
    fresh = mount_factory(any_server, bucket=m.bucket)
    shown = ls_l(fresh.path / "d")
    time.sleep(ATTR_TIMEOUT + 0.5)
    later = {name: stat_of(fresh.path / "d" / name) for name in FILES}
    assert shown == later
    assert shown == {name: expected(name) for name in FILES}


def test_metadata_after_a_failed_head_replaces_the_kernels_inode(seaweed, mount_factory):
    """A listing whose HEADs are refused hands the kernel the listing's attributes; once a
    HEAD gets through, the kernel is made to drop its inode (it keeps a regular file's first
    mtime whatever a getattr answers), and stat shows the stored mtime."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0) as proxy:
        m = mount_factory(seaweed)
        make_files(m.path / "d")
        assert m.unmount() == 0
        through = dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url)
        fresh = mount_factory(through, bucket=m.bucket)
        os.stat(fresh.path / "d")
        # HEADs of the files in d (not of d's marker) are refused
        proxy.refuse(lambda method, target, headers: method == "HEAD" and
                     "/d/" in target and not target.split("?")[0].endswith("/d/"))
        # readdirplus: the kernel gets inodes with the listing's attributes (a getattr now
        # would HEAD again, and fail)
        assert sorted(os.listdir(fresh.path / "d")) == sorted(FILES)
        assert proxy.refused
        proxy.refuse(None)
        # each inode is dropped once its HEAD is in (the kernel is told from another thread)
        stored = {name: expected(name) for name in FILES}
        assert wait_until(lambda: {name: stat_of(fresh.path / "d" / name)
                                   for name in FILES} == stored, timeout=15), \
            {name: stat_of(fresh.path / "d" / name) for name in FILES}
        assert ls_l(fresh.path / "d") == stored


def test_ls_a_shows_dot_and_dot_dot(any_server, mount_factory):
    m = mount_factory(any_server)
    directory = m.path / "d"
    directory.mkdir()
    for i in range(600):  # more than one readdir call's worth
        (directory / f"f{i:04d}").write_bytes(b"x" * (i % 7) * 1000)
    for _ in range(2):
        names = run(["ls", "-a", str(directory)]).stdout.split()
        assert names[:2] == [".", ".."] and len(names) == 602
        assert names[2:] == [f"f{i:04d}" for i in range(600)]
        lines = run(["ls", "-lai", str(directory)]).stdout.splitlines()
        dot, dotdot = lines[1].split(), lines[2].split()
        assert dot[-1] == "." and int(dot[0]) == os.stat(directory).st_ino
        assert dotdot[-1] == ".." and int(dotdot[0]) == os.stat(m.path).st_ino
        root = run(["ls", "-a", str(m.path)]).stdout.split()
        assert root == [".", "..", "d"]
    assert sorted(os.listdir(directory)) == names[2:]  # readdir(3) users see no change
    # the kernel counted no lookup for "." and "..": the directories stay usable
    assert os.stat(directory / "f0001").st_size == 1000
    assert "is not known" not in m.log()


def make_backup_tree(root: Path) -> int:
    """A few hundred files of mixed sizes, most over 4 KiB, with their own modes and times
    (what a nightly backup copies); returns how many files."""
    rng = random.Random(17)
    count = 0
    for d in range(6):
        directory = root / f"dir{d}" / "sub"
        directory.mkdir(parents=True)
        for i in range(50):
            size = rng.choice([0, 100, 3000, 5000, 20_000, 70_000, 200_000, 1_100_000])
            if i % 5:
                size = max(size, 4097 + i)
            path = directory / f"file{i:03d}.dat"
            path.write_bytes(rng.randbytes(size))
            path.chmod(rng.choice([0o600, 0o640, 0o644, 0o755, 0o400]))
            when = 1_400_000_000 + rng.randrange(10**8)
            os.utime(path, (when, when))
            count += 1
    return count


def test_no_op_backup_after_a_remount_sends_nothing(any_server, mount_factory, tmp_path):
    """rsync -a a tree in, unmount, mount, `ls -lR`, rsync -a again: no file is sent (the
    listing gave the kernel each file's stored mtime, not the upload time)."""
    require(shutil.which("rsync") is not None, "rsync")
    source = tmp_path / "src"
    files = make_backup_tree(source)
    m = mount_factory(any_server)
    run(["rsync", "-a", f"{source}/", f"{m.path}/backup/"], timeout=300)
    assert m.unmount() == 0
    fresh = mount_factory(any_server, bucket=m.bucket)
    listed = run(["ls", "-lR", str(fresh.path / "backup")]).stdout
    assert sum(line.startswith("-") for line in listed.splitlines()) == files
    again = run(["rsync", "-a", "--itemize-changes", "--stats", f"{source}/",
                 f"{fresh.path}/backup/"], timeout=300).stdout
    sent = [line for line in again.splitlines() if line.startswith((">f", "cf", ".f"))]
    assert sent == [], f"{len(sent)} of {files} files sent again: {sent[:5]}"
    assert "Number of regular files transferred: 0" in again
    run(["diff", "-r", str(source), str(fresh.path / "backup")], timeout=120)


def file_heads(mount, directory: str) -> int:
    """HEADs of objects in `directory` the mount has sent so far (its debug log)."""
    keys = re.findall(rf"S3 HeadObject s3://{mount.bucket}/(\S+) ->", mount.log())
    return sum(key.startswith(f"{directory}/") and key != f"{directory}/" for key in keys)


def make_listed_dir(m, count: int = 40) -> Path:
    """A directory of `count` files with their own modes, written and then left alone for
    over a second (a HEAD in the object's own LastModified second proves nothing)."""
    directory = m.path / "d"
    directory.mkdir()
    for i in range(count):
        path = directory / f"f{i:03d}"
        path.write_bytes(b"x" * i)
        path.chmod(0o600 + i % 8)
    time.sleep(2.1)
    return directory


def test_a_second_listing_of_an_unchanged_directory_sends_no_heads(any_server,
                                                                   mount_factory):
    """The first `ls -l` of a fresh mount HEADs each file; once the attributes expired, the
    next `ls -l` and `find` find the same ETag, size and LastModified in the listing and
    send no HEAD (only LIST requests) -- and still show the stored modes."""
    m = mount_factory(any_server)
    make_listed_dir(m)
    assert m.unmount() == 0
    fresh = mount_factory(any_server, bucket=m.bucket)
    first = ls_l(fresh.path / "d")
    assert file_heads(fresh, "d") >= 40
    assert first["f005"][0] == "-rw----r-x"
    for _ in range(2):
        before = file_heads(fresh, "d")
        time.sleep(ATTR_TIMEOUT + 0.5)  # the attributes are stale: the old code HEADs again
        assert ls_l(fresh.path / "d") == first
        run(["find", str(fresh.path / "d"), "-type", "f"])
        assert file_heads(fresh, "d") == before


def test_an_object_changed_by_another_client_shows_its_new_attributes(any_server,
                                                                      mount_factory):
    """Another client copies an object onto itself with a new mode (same body, ETag and
    size, a new LastModified): the next `ls -l` shows the new mode."""
    m = mount_factory(any_server)
    directory = make_listed_dir(m, count=5)
    first = ls_l(directory)
    assert first["f002"][0] == "-rw-----w-"
    time.sleep(ATTR_TIMEOUT + 0.5)
    assert ls_l(directory) == first  # the mount knows it: no HEAD needed
    key = "d/f002"
    old = m.head(key)
    metadata = dict(old["Metadata"], mode=str(stat.S_IFREG | 0o751))
    m.client.copy_object(Bucket=m.bucket, Key=key, CopySource={"Bucket": m.bucket, "Key": key},
                         Metadata=metadata, MetadataDirective="REPLACE")
    new = m.head(key)
    assert new["LastModified"] > old["LastModified"] and new["ContentLength"] == 2
    time.sleep(ATTR_TIMEOUT + 0.5)
    shown = ls_l(directory)
    assert shown["f002"][0] == "-rwxr-x--x", shown["f002"]
    assert {n: v for n, v in shown.items() if n != "f002"} == \
        {n: v for n, v in first.items() if n != "f002"}


def test_directories_of_a_listing_are_headed_pipelined(any_server, mount_factory):
    """A fresh mount's `ls -l` of directories shows each one's stored mode, and their
    markers' HEADs (and on SeaweedFS, which drops a marker's metadata, the HEADs of their
    attributes objects) go pipelined like files', not one request at a time."""
    m = mount_factory(any_server)
    top = m.path / "top"
    top.mkdir()
    modes = {f"s{i:02d}": 0o700 + (i % 8) * 0o10 for i in range(24)}
    for name, mode in modes.items():
        (top / name).mkdir()
        (top / name).chmod(mode)
    assert m.unmount() == 0
    fresh = mount_factory(any_server, bucket=m.bucket)
    shown = ls_l(fresh.path / "top")
    assert {name: value[0] for name, value in shown.items()} == \
        {name: stat.filemode(stat.S_IFDIR | mode) for name, mode in modes.items()}
    heads = [line for line in fresh.log().splitlines()
             if re.search(r"S3 HeadObject s3://\S+/(top/s\d\d/|\.s3stream/dirs/top/s\d\d) ", line)]
    assert len(heads) >= len(modes)
    if any_server.name == "seaweedfs":  # moto answers one request per connection: the
        alone = [line for line in heads if "pipelined" not in line]  # rest go one by one
        assert not alone, alone[:3]


def test_stale_stats_after_a_listing_are_answered_by_a_list_page(any_server, mount_factory):
    """`ls -l` of a large directory stats entries after readdir handed them over, often
    after the attribute timeout: stale files whose metadata the mount HEADed are checked by
    one LIST page from the name on (ETag, size, LastModified), not a HEAD each; one that
    another client rewrote meanwhile is HEADed and shows its new mode."""
    m = mount_factory(any_server)
    directory = make_listed_dir(m)
    first = ls_l(directory)
    heads, lists = file_heads(m, "d"), m.log().count("S3 ListObjectsV2")
    time.sleep(ATTR_TIMEOUT + 0.5)
    key = "d/f031"
    m.client.copy_object(Bucket=m.bucket, Key=key, CopySource={"Bucket": m.bucket, "Key": key},
                         Metadata=dict(m.head(key)["Metadata"],
                                       mode=str(stat.S_IFREG | 0o751)),
                         MetadataDirective="REPLACE")
    stats = {name: stat_of(directory / name) for name in sorted(first)}
    assert stats["f031"][0] == "-rwxr-x--x"
    del stats["f031"], first["f031"]
    assert stats == {name: (mode, uid, gid, size, mtime)
                     for name, (mode, uid, gid, size, mtime) in first.items()}
    assert file_heads(m, "d") - heads == 1  # f031's
    assert 1 <= m.log().count("S3 ListObjectsV2") - lists <= 4


def test_ls_l_sends_the_kernel_no_request_per_entry_besides_the_listing(seaweed,
                                                                        mount_factory):
    """`ls -l` of 300 objects: the kernel asks readdirplus for the names with their
    attributes and answers every statx, getxattr and path walk from them -- no GETATTR per
    entry. The mount point's own attributes used to come with attr_timeout 0, so every path
    walked through it cost a GETATTR of the root: 2 per entry of an `ls -l`, and one for
    every path any program used."""
    bucket = bucket_with(seaweed, {f"d/o{i:03d}": b"x" * i for i in range(300)})
    m = mount_factory(seaweed, "attr_timeout=60", "entry_timeout=60", bucket=bucket)
    assert sorted(ls_l(m.path / "d")) == [f"o{i:03d}" for i in range(300)]
    kernel = status_document(m.path)["kernel_requests"]
    assert kernel.get("getattr", 0) <= 5, kernel  # the root's and d's, once each
    assert kernel.get("lookup", 0) <= 5, kernel
    assert 1 <= kernel["readdir"] <= 10, kernel
