"""What common programs cost in requests: the kernel's (`kernel_requests`) and S3's
(`requests`) from `s3stream status --json`, before and after one operation. Each test pins
one request the mount used to send without need."""

from __future__ import annotations

import os
import subprocess
import time

from tests.conftest import bucket_with, new_bucket, status_document


def counts(m) -> tuple[dict[str, int], dict[str, int]]:
    document = status_document(m.path)
    return dict(document["kernel_requests"]), dict(document["requests"])


def grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {kind: after[kind] - before.get(kind, 0) for kind in after
            if after[kind] != before.get(kind, 0)}


def run(*cmd: str, cwd=None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, f"{cmd}: {result.stderr[-2000:]}"


def test_an_open_asks_for_its_file_by_a_head_not_a_list_page(seaweed, mount_factory):
    """Every open for reading asks S3 for its object (close-to-open consistency). It used to
    ask with the LIST page that revalidates a stale listing (up to 1,000 keys from the
    file's name on) whenever a HEAD of this mount had seen the object: `cat` of each file of
    a directory of 10,000 listed a thousand keys per file. Each open asks again anyway, so
    the neighbours the page confirms are no use to it: a HEAD."""
    names = [f"f{i:03d}" for i in range(60)]
    bucket = bucket_with(seaweed, {f"d/{name}": name.encode() for name in names})
    time.sleep(1.1)  # HEADs answered in a later second than LastModified: revalidatable
    m = mount_factory(seaweed, "attr_timeout=60", "entry_timeout=60", bucket=bucket)
    run("ls", "-l", str(m.path / "d"))  # readdirplus: every file HEADed, dentries cached
    kernel0, s3_0 = counts(m)
    for name in names:
        assert (m.path / "d" / name).read_bytes() == name.encode()
    kernel1, s3_1 = counts(m)
    s3, kernel = grown(s3_0, s3_1), grown(kernel0, kernel1)
    assert kernel.get("open") == len(names) and kernel.get("lookup", 0) == 0, kernel
    assert s3.get("HeadObject") == len(names), s3
    assert s3.get("ListObjectsV2", 0) == 0, s3  # without the fix: one page per open
    assert s3.get("GetObject") == len(names), s3


def test_a_renamed_file_keeps_its_attributes_no_head_after_mv(seaweed, mount_factory):
    """`mv a b`: the kernel LOOKUPs b (a HEAD and a one-key LIST ask S3 whether it exists),
    RENAMEs (a CopyObject and a DeleteObject), then sends a SETATTR of its own times
    (writeback cache). The copy has the source's ETag: the attributes the mount just saw
    are those of the object under the new name, and that SETATTR needs no HEAD (it sent
    one per renamed file). (An object without x-amz-meta-mtime shows its LastModified,
    which the copy changes: that one is asked again.)"""
    bucket = new_bucket(seaweed)
    seaweed.client().put_object(Bucket=bucket, Key="d/a", Body=b"x" * 1000,
                                Metadata={"mtime": "1600000000", "mode": "33188"})
    m = mount_factory(seaweed, "attr_timeout=10", bucket=bucket)
    assert os.stat(m.path / "d" / "a").st_mtime == 1_600_000_000
    kernel0, s3_0 = counts(m)
    run("mv", str(m.path / "d" / "a"), str(m.path / "d" / "b"))
    assert os.stat(m.path / "d" / "b").st_mtime == 1_600_000_000
    kernel1, s3_1 = counts(m)
    s3, kernel = grown(s3_0, s3_1), grown(kernel0, kernel1)
    assert kernel.get("rename") == 1, kernel
    assert s3 == {"HeadObject": 1, "ListObjectsV2": 1, "CopyObject": 1,
                  "DeleteObject": 1}, s3
    assert m.get("d/b") == b"x" * 1000 and m.keys("d/") == ["d/b"]


def test_chown_and_chmod_of_a_directory_to_what_it_has_store_nothing(any_server,
                                                                     mount_factory):
    """tar, `cp -a` and rsync run as root set each directory's owner, mode and times once
    it is filled; the owner is the one mkdir gave it. A change that changes nothing is not
    stored (as for files): before, each cost a PUT of the marker, two on SeaweedFS (and
    the attributes object)."""
    m = mount_factory(any_server)
    (m.path / "a" / "b" / "c").mkdir(parents=True, mode=0o755)
    for path in (m.path / "a", m.path / "a" / "b", m.path / "a" / "b" / "c"):
        os.chmod(path, 0o755)  # (mkdir's mode passed through the umask)
    uid, gid = os.getuid(), os.getgid()
    _, s3_0 = counts(m)
    run("chown", "-R", f"{uid}:{gid}", str(m.path / "a"))
    run("chmod", "-R", "755", str(m.path / "a"))
    _, s3_1 = counts(m)
    assert grown(s3_0, s3_1).get("PutObject", 0) == 0, grown(s3_0, s3_1)
    # a real change is stored as before
    os.chmod(m.path / "a" / "b", 0o700)
    _, s3_2 = counts(m)
    assert 1 <= grown(s3_1, s3_2).get("PutObject", 0) <= 2, grown(s3_1, s3_2)
    time.sleep(1.1)
    assert (os.stat(m.path / "a" / "b").st_mode & 0o777) == 0o700
    assert (os.stat(m.path / "a").st_mode & 0o777) == 0o755
