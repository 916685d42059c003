"""POSIX behaviour programs rely on (issue 19): a file removed while open for reading keeps
its content until its last close; a directory's mode, owner and times hold (after the
attribute timeout and a remount) on every server, and the kernel enforces them."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import time

import pytest
from conftest import MiB, bucket_with, wait_until
from fault_proxy import FaultProxy, refuse_method
from memory_store import MemoryStore

from s3fs_stream.object_store import PutOptions
from s3fs_stream.spill_area import SpillArea

UNLINKED = ".s3stream/unlinked/"


def _names(keys: list[str]) -> list[str]:
    """The keys but the mount's own (its lease, kept while it has objects set aside)."""
    return sorted(k for k in keys if not k.startswith(".s3stream/"))


@pytest.fixture(params=["seaweedfs", "moto", "seaweedfs-multipart", "moto-multipart"])
def server_and_size(request):
    """Each server, with the size of file to read (3 MiB on SeaweedFS, smaller on moto) and
    whether it is stored in parts (a copy of it gets another ETag)."""
    multipart = request.param.endswith("-multipart")
    if request.param.startswith("seaweedfs"):
        return request.getfixturevalue("seaweed"), 3 * MiB, multipart
    return request.getfixturevalue("moto_server"), 1 * MiB, multipart


def _put_in_parts(client, bucket: str, key: str, data: bytes) -> None:
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    step = 5 * MiB
    parts = [{"PartNumber": n + 1, "ETag": client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload, PartNumber=n + 1,
        Body=data[start:start + step])["ETag"]}
        for n, start in enumerate(range(0, len(data), step))]
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": parts})


def test_a_file_removed_while_open_for_reading_keeps_its_content(server_and_size,
                                                                  mount_factory):
    server, size, multipart = server_and_size
    data = os.urandom(size + 5 * MiB if multipart else size)
    # stored by another client: nothing of it is in the kernel's page cache
    bucket = bucket_with(server, {"other": b"x"})
    if multipart:
        _put_in_parts(server.client(), bucket, "f.bin", data)
        assert "-" in server.client().head_object(Bucket=bucket, Key="f.bin")["ETag"]
    else:
        server.client().put_object(Bucket=bucket, Key="f.bin", Body=data)
    m = mount_factory(server, bucket=bucket)
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


def _copies(method: str, target: str, headers: dict[str, str]) -> bool:
    return method == "PUT" and "x-amz-copy-source" in headers


@pytest.mark.parametrize("refused", ["copy", "delete"])
def test_a_refused_rm_of_a_file_open_for_reading_changes_nothing(seaweed, mount_factory,
                                                                  refused):
    """S3 first: if keeping the bytes (the copy) or deleting the name is refused, rm fails
    with EACCES, the name and its object stay, the reader reads on, no copy is left."""
    data = os.urandom(2 * MiB)
    bucket = bucket_with(seaweed, {"f": data})
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0) as proxy:
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                          bucket=bucket)
        fd = os.open(m.path / "f", os.O_RDONLY)
        try:
            first = os.read(fd, 16 * 1024)
            proxy.refuse(_copies if refused == "copy" else
                         refuse_method("DELETE", f"/{bucket}/f"))
            with pytest.raises(OSError) as info:
                os.unlink(m.path / "f")
            assert info.value.errno in (errno.EACCES, errno.EPERM), info.value
            assert proxy.refused
            proxy.refuse(None)
            assert os.listdir(m.path) == ["f"]
            assert _names(m.keys()) == ["f"]
            assert not [k for k in m.keys() if k.startswith(UNLINKED)]
            rest = bytearray()
            while chunk := os.read(fd, 1 * MiB):
                rest += chunk
            assert first + rest == data
            assert os.fstat(fd).st_nlink == 1
        finally:
            os.close(fd)
        assert (m.path / "f").read_bytes() == data
        m.unmount()


def test_a_file_open_for_writing_that_is_removed_is_dropped(seaweed, mount_factory):
    """Unchanged: the upload of a file removed while being written is aborted."""
    m = mount_factory(seaweed)
    with open(m.path / "w", "wb") as f:
        f.write(b"x" * 100)
        os.unlink(m.path / "w")
    assert m.keys() == []


# -- a directory's attributes -----------------------------------------------------------------

Y2001 = 978307200  # 2001-01-01 00:00:00 UTC


def _check_priv(path, name: str) -> None:
    st = os.stat(path)
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, int(st.st_mtime)) == \
        (oct(0o700), 1234, 1234, Y2001), name


def test_a_directory_keeps_its_mode_owner_and_times(any_server, mount_factory):
    m = mount_factory(any_server)
    priv = m.path / "priv"
    result = subprocess.run("mkdir priv && chmod 700 priv && chown 1234:1234 priv && "
                            "TZ=UTC touch -d 2001-01-01 priv", shell=True, cwd=m.path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    _check_priv(priv, "right away")
    time.sleep(2.5)  # past the attribute timeout: from the bucket again
    _check_priv(priv, "after the attribute timeout")
    (priv / "sub").mkdir()
    os.chmod(priv / "sub", 0o1750)  # the sticky bit too
    m.unmount()
    m = mount_factory(any_server, bucket=m.bucket)
    priv = m.path / "priv"
    _check_priv(priv, "after remount")
    assert os.stat(priv / "sub").st_mode & 0o7777 == 0o1750
    # a listing's entry, then a change of one attribute, keeps the others
    assert "priv" in os.listdir(m.path)
    os.chmod(priv, 0o750)
    assert os.stat(priv).st_uid == 1234
    os.chmod(priv, 0o700)
    # renamed: the directory and the one inside keep theirs
    os.rename(priv, m.path / "moved")
    time.sleep(2.5)
    _check_priv(m.path / "moved", "after rename")
    assert os.stat(m.path / "moved" / "sub").st_mode & 0o7777 == 0o1750
    m.unmount()
    m = mount_factory(any_server, bucket=m.bucket)
    _check_priv(m.path / "moved", "after rename and remount")
    assert os.stat(m.path / "moved" / "sub").st_mode & 0o7777 == 0o1750
    assert not os.path.exists(m.path / "priv")
    # rmdir leaves nothing behind
    os.rmdir(m.path / "moved" / "sub")
    os.rmdir(m.path / "moved")
    assert _names(m.keys()) == [] and not [k for k in m.keys() if "/dirs/" in k], m.keys()
    # a new directory of the old name has its own attributes
    os.mkdir(m.path / "moved", 0o755)
    time.sleep(2.5)
    assert os.stat(m.path / "moved").st_mode & 0o7777 == 0o755
    assert os.stat(m.path / "moved").st_uid == 0


def _as_nobody(command: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_a_private_directory_keeps_other_users_out(seaweed, mount_factory):
    m = mount_factory(seaweed, "allow_other")
    (m.path / "open").mkdir()
    (m.path / "priv").mkdir()
    (m.path / "priv" / "secret").write_bytes(b"s")
    os.chmod(m.path / "priv", 0o700)
    allowed = _as_nobody("ls open", m.path)
    assert allowed.returncode == 0, allowed.stderr  # the mount itself lets nobody in
    for when in ("before remount", "after the attribute timeout", "after remount"):
        if when == "after the attribute timeout":
            time.sleep(2.5)
        if when == "after remount":
            m.unmount()
            m = mount_factory(seaweed, "allow_other", bucket=m.bucket)
        denied = _as_nobody("ls priv", m.path)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, \
            (when, denied.stdout, denied.stderr)
        assert os.stat(m.path / "priv").st_mode & 0o777 == 0o700, when
    assert os.listdir(m.path / "priv") == ["secret"]  # root still gets in


async def test_a_crashed_mounts_files_set_aside_are_deleted_after_a_day():
    """Copies of removed files go like spills: a dead mount's (no life for a day) are
    deleted by a later mount, a live mount's (its lease is fresh) stay however old."""
    store = MemoryStore()
    day_ago = time.time() - 25 * 3600
    dead = ".s3stream/unlinked/0123456789ab-1/7"
    live = SpillArea(store, "")
    kept = live.aside_key(5)
    lease = f".s3stream/spill/{live.mount_id}/alive"
    for key in (dead, kept, lease):
        await store.put(key, b"x", PutOptions(temporary=True))
    store.modified[dead] = store.modified[kept] = day_ago
    await SpillArea(store, "").delete_stale()
    assert dead not in store.objects
    assert kept in store.objects and lease in store.objects
    store.modified[lease] = day_ago  # the live mount died too
    await SpillArea(store, "").delete_stale()
    assert kept not in store.objects and lease not in store.objects
