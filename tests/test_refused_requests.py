"""S3 refuses a request (a bucket policy, Object Lock, read-only credentials): 403
AccessDenied from tests/fault_proxy.py, switched on once the mount is ready. The mount acts
on S3 first and changes local state after: a refused delete or copy leaves an open file's
writer writing, a refused chmod is an errno, and a deferred chmod whose store is refused is
never shown reverted (issue 17, items 3 and 5). Real mounts on SeaweedFS."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import stat
import time

import pytest
from conftest import assert_same, log_errors, run_with_timeout
from fault_proxy import FaultProxy, refuse_method

from s3fs_stream.deferred_meta import META_DELAY

MiB = 1024 * 1024
REFUSED = (errno.EACCES, errno.EPERM)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def copies(method: str, target: str, headers: dict[str, str]) -> bool:
    """CopyObject and UploadPartCopy: a PUT naming its source in x-amz-copy-source."""
    return method == "PUT" and "x-amz-copy-source" in headers


@pytest.fixture
def proxy(seaweed):
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0) as proxy:
        yield proxy


@pytest.fixture
def mounted(seaweed, proxy, mount_factory):
    """A mount of a fresh bucket on SeaweedFS through the proxy (nothing refused yet)."""
    return mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:MiB]):]


def rename_refused(m, proxy, old: str, new: str) -> None:
    """`mv old new` while S3 refuses copies: it fails with a refusal errno; refusals end."""
    proxy.refuse(copies)
    with pytest.raises(OSError) as info:
        os.rename(m.path / old, m.path / new)
    assert info.value.errno in REFUSED, info.value
    assert proxy.refused
    proxy.refuse(None)


@pytest.mark.timeout(120)
def test_refused_rm_of_a_file_being_written_keeps_its_data(mounted, proxy):
    """rm of a file open for writing whose DeleteObject is refused fails with EACCES, and the
    writer goes on: close returns 0 and the object holds every byte (the upload used to be
    aborted before the delete was asked)."""
    m = mounted
    data = payload(20 * MiB + 12345, 1)
    fd = os.open(m.path / "rec.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data[:20 * MiB])  # more than one part: an upload is open
        proxy.refuse(refuse_method("DELETE", f"/{m.bucket}/rec.bin"))
        with pytest.raises(OSError) as info:
            os.unlink(m.path / "rec.bin")
        assert info.value.errno in REFUSED, info.value
        assert proxy.refused, "the DeleteObject never reached the proxy"
        proxy.refuse(None)
        assert os.path.exists(m.path / "rec.bin")
        write_all(fd, data[20 * MiB:])
    finally:
        run_with_timeout(lambda: os.close(fd), 60, m.log)  # raises if close fails
    assert_same(m.get("rec.bin"), data, "rec.bin")
    assert not m.uploads()


@pytest.mark.timeout(120)
def test_refused_rename_over_a_file_being_written_keeps_its_data(mounted, proxy):
    """`mv other f` over a file open for writing, with the copy refused: the rename fails
    with EACCES, f's writer goes on and its close stores every byte; other is untouched."""
    m = mounted
    m.client.put_object(Bucket=m.bucket, Key="other", Body=b"other bytes\n")
    data = payload(20 * MiB + 777, 2)
    fd = os.open(m.path / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data[:20 * MiB])
        rename_refused(m, proxy, "other", "f")
        write_all(fd, data[20 * MiB:])
    finally:
        run_with_timeout(lambda: os.close(fd), 60, m.log)
    assert_same(m.get("f"), data, "f")
    assert m.get("other") == b"other bytes\n"
    assert (m.path / "other").read_bytes() == b"other bytes\n"
    assert not m.uploads()


@pytest.mark.timeout(120)
def test_refused_rename_of_a_file_being_written_keeps_both(mounted, proxy):
    """`mv f g` of a file open for writing onto another file open for writing, with the copy
    refused: the rename fails with EACCES and both writers go on: each close returns 0 and
    each object holds every byte written to it."""
    m = mounted
    data = {name: payload(20 * MiB + 99 * i, 3 + i) for i, name in enumerate(("f", "g"))}
    fds = {name: os.open(m.path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
           for name in data}
    try:
        for name, fd in fds.items():
            write_all(fd, data[name][:20 * MiB])
        rename_refused(m, proxy, "f", "g")
        for name, fd in fds.items():
            write_all(fd, data[name][20 * MiB:])
    finally:
        for fd in fds.values():
            run_with_timeout(lambda fd=fd: os.close(fd), 60, m.log)
    for name, expected in data.items():
        assert_same(m.get(name), expected, name)
    assert not m.uploads()


@pytest.mark.timeout(120)
def test_refused_chmod_of_another_tools_object_fails(seaweed, mounted, proxy, mount_factory):
    """chmod of an object this mount did not write, with CopyObject refused: chmod fails
    with EACCES (it used to return 0 and the mode came back 0644 a second later); stat shows
    the old mode, now and after a remount."""
    m = mounted
    m.client.put_object(Bucket=m.bucket, Key="report.txt", Body=b"secret\n",
                        Metadata={"mode": str(stat.S_IFREG | 0o644)})
    path = m.path / "report.txt"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    proxy.refuse(copies)
    with pytest.raises(OSError) as info:
        os.chmod(path, 0o600)
    assert info.value.errno in REFUSED, info.value
    assert len(proxy.refused) == 1  # one attempt, no retries of a refusal
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    time.sleep(META_DELAY + 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert len(proxy.refused) == 1  # nothing deferred to retry
    proxy.refuse(None)
    assert int(m.head("report.txt")["Metadata"]["mode"]) == stat.S_IFREG | 0o644
    again = mount_factory(seaweed, bucket=m.bucket)
    assert stat.S_IMODE(os.stat(again.path / "report.txt").st_mode) == 0o644
    os.chmod(path, 0o600)  # allowed again: stored at once
    assert int(m.head("report.txt")["Metadata"]["mode"]) == stat.S_IFREG | 0o600


@pytest.mark.timeout(120)
@pytest.mark.expect_log_errors("could not store its new attributes")
def test_refused_deferred_chmod_is_never_shown_reverted(mounted, proxy):
    """chmod of a file this mount just wrote is deferred (rsync's pattern); its store is
    refused: the mode stays 0600 while the mount lives, the store is retried with backoff
    (few refused requests), the log has one ERROR line, fsync and the next chmod report
    EACCES, and once S3 allows it the change is stored."""
    m = mounted
    path = m.path / "f"
    path.write_bytes(b"x" * 4096)
    proxy.refuse(copies)
    os.chmod(path, 0o600)  # deferred: returns at once
    watched = time.monotonic()
    modes = set()
    while time.monotonic() - watched < 8 * META_DELAY:
        modes.add(stat.S_IMODE(os.stat(path).st_mode))
        time.sleep(0.05)
    assert modes == {0o600}, [oct(mode) for mode in modes]
    # stores at 1 s, then retries 2 and 4 s after each refusal: 3 in 8 s (never one per stat)
    assert 2 <= len(proxy.refused) <= 4, proxy.refused
    errors = [line for line in log_errors(m.log()) if "new attributes" in line]
    assert len(errors) == 1 and " f: could not store" in errors[0], errors
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.fsync(fd)  # reported at the file's next fsync
        assert info.value.errno in REFUSED, info.value
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        os.chmod(path, 0o640)  # the next change is stored at once: its errno reaches chmod
    assert info.value.errno in REFUSED, info.value
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert int(m.head("f")["Metadata"]["mode"]) == stat.S_IFREG | 0o644
    refused = len(proxy.refused)
    proxy.refuse(None)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # allowed now: stored
    finally:
        os.close(fd)
    assert int(m.head("f")["Metadata"]["mode"]) == stat.S_IFREG | 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(proxy.refused) == refused
    assert len([line for line in log_errors(m.log()) if "new attributes" in line]) == 1


@pytest.mark.timeout(120)
def test_a_refused_delete_is_sent_once(mounted, proxy):
    """rm of a stored file whose DeleteObject S3 refuses (403 AccessDenied with its XML):
    the mount's own request gets S3's final word and rm gets EACCES, without the same
    DELETE sent again through botocore (it used to go twice)."""
    m = mounted
    m.client.put_object(Bucket=m.bucket, Key="kept.txt", Body=b"kept\n")
    assert (m.path / "kept.txt").read_bytes() == b"kept\n"
    proxy.refuse(refuse_method("DELETE", f"/{m.bucket}/kept.txt"))
    with pytest.raises(OSError) as info:
        os.unlink(m.path / "kept.txt")
    assert info.value.errno == errno.EACCES, info.value
    assert len(proxy.refused) == 1, proxy.refused
    proxy.refuse(None)
    assert (m.path / "kept.txt").read_bytes() == b"kept\n"
    assert m.get("kept.txt") == b"kept\n"
    assert "again through botocore" not in m.log()
