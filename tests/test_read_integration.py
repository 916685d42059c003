"""Reads through a real mount: objects put with botocore read back byte-identical."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import bucket_with, new_bucket, require, run_with_timeout, sha, wait_until

MiB = 1024 * 1024
BIG = 64 * MiB


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- both servers


def test_small_objects_list_and_read_back(any_server, mount_factory):
    objects = {"empty": b"", "one": b"\x7f", "five": payload(5 * MiB + 1, 1)}
    m = mount_factory(any_server, bucket=bucket_with(any_server, objects))
    assert sorted(os.listdir(m.path)) == sorted(objects)
    for key, data in objects.items():
        assert os.stat(m.path / key).st_size == len(data)
        got = read_file(m.path / key)
        assert len(got) == len(data) and got == data, key


def test_nested_prefixes_and_dir_marker(any_server, mount_factory):
    bucket = bucket_with(any_server, {"a/b/c/file": b"nested", "dir/": b""})
    m = mount_factory(any_server, bucket=bucket)
    assert sorted(os.listdir(m.path)) == ["a", "dir"]
    for d in ("a", "a/b", "a/b/c", "dir"):
        assert (m.path / d).is_dir(), d
    assert os.listdir(m.path / "a") == ["b"]
    assert os.listdir(m.path / "a/b") == ["c"]
    assert os.listdir(m.path / "a/b/c") == ["file"]
    assert (m.path / "a/b/c/file").is_file()
    assert read_file(m.path / "a/b/c/file") == b"nested"
    assert os.listdir(m.path / "dir") == []


# ---------------------------------------------------------------- SeaweedFS only


@pytest.fixture(scope="module")
def big_bucket(seaweed):
    data = payload(BIG, 64)
    return bucket_with(seaweed, {"big.bin": data}), data


def test_big_sequential_copy(seaweed, mount_factory, big_bucket, tmp_path):
    bucket, data = big_bucket
    m = mount_factory(seaweed, bucket=bucket)
    out = tmp_path / "copy.bin"
    with open(m.path / "big.bin", "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, MiB)
    got = out.read_bytes()
    assert len(got) == BIG
    assert sha(got) == sha(data)


def test_kernel_bdi_tuned_after_init(seaweed, mount_factory, big_bucket):
    """The kernel caps read-ahead at 128 KiB when it processes INIT's reply; the mount raises
    it to 1 MiB afterwards (root only), so sequential reads arrive as 1 MiB requests. It also
    lowers the dirty-page limit, which bounds what close() must write back first."""
    require(os.geteuid() == 0, "setting a bdi's read_ahead_kb needs root")
    bucket, _ = big_bucket
    m = mount_factory(seaweed, bucket=bucket)
    device = os.stat(m.path).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}")

    def setting(name: str) -> int:
        return int((bdi / name).read_text())

    assert wait_until(lambda: setting("read_ahead_kb") == 1024, 5), setting("read_ahead_kb")
    if (bdi / "max_bytes").exists():  # Linux 6.2+; kept as a ratio, so not exact
        assert wait_until(lambda: setting("max_bytes") <= 18 * MiB, 5), setting("max_bytes")


def test_big_reverse_chunks(seaweed, mount_factory, big_bucket):
    bucket, data = big_bucket
    m = mount_factory(seaweed, bucket=bucket)
    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        for offset in range(BIG - MiB, -1, -MiB):
            chunk = os.pread(fd, MiB, offset)
            assert chunk == data[offset:offset + MiB], f"mismatch at offset {offset}"
    finally:
        os.close(fd)


def test_big_random_reads(seaweed, mount_factory, big_bucket):
    bucket, data = big_bucket
    m = mount_factory(seaweed, bucket=bucket)
    rng = random.Random(42)
    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        for _ in range(200):
            offset = rng.randrange(0, BIG)
            length = rng.choice([1, rng.randrange(1, 4096), rng.randrange(1, 300_000),
                                 rng.randrange(1, 3 * MiB)])
            got = os.pread(fd, length, offset)
            assert got == data[offset:offset + length], f"pread({length}, {offset})"
        # reads at and past the end
        assert os.pread(fd, 10, BIG) == b""
        assert os.pread(fd, 100, BIG - 10) == data[-10:]
    finally:
        os.close(fd)


def test_big_two_readers_same_file(seaweed, mount_factory, big_bucket):
    bucket, data = big_bucket
    m = mount_factory(seaweed, bucket=bucket)
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def reader(index: int) -> None:
        try:
            h = hashlib.sha256()
            start.wait()
            with open(m.path / "big.bin", "rb") as f:
                while chunk := f.read(MiB if index == 0 else 256 * 1024):
                    h.update(chunk)
            results[index] = h.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "readers hung"
    assert results == {0: sha(data), 1: sha(data)}


def test_big_tail(seaweed, mount_factory, big_bucket):
    bucket, data = big_bucket
    m = mount_factory(seaweed, bucket=bucket)
    out = subprocess.run(["tail", "-c", "1000", str(m.path / "big.bin")], capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data[-1000:]


def test_directory_of_5000_keys(mount):
    keys = [f"many/k{i:05d}" for i in range(5000)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: mount.client.put_object(Bucket=mount.bucket, Key=k,
                                                         Body=k.encode()), keys))
    names = os.listdir(mount.path / "many")
    assert len(names) == 5000
    assert sorted(names) == sorted(k.split("/")[1] for k in keys)
    assert read_file(mount.path / "many/k04999") == b"many/k04999"


def test_replaced_object_gives_estale(seaweed, mount_factory):
    bucket = new_bucket(seaweed)
    client = seaweed.client()
    old, new = payload(BIG, 1), payload(BIG, 2)
    client.put_object(Bucket=bucket, Key="obj", Body=old)
    m = mount_factory(seaweed, bucket=bucket)
    fd = os.open(m.path / "obj", os.O_RDONLY)
    try:
        assert os.read(fd, MiB) == old[:MiB]
        client.put_object(Bucket=bucket, Key="obj", Body=new)
        offset = 40 * MiB
        with pytest.raises(OSError) as info:
            got = os.pread(fd, MiB, offset)
            # never mixed bytes: if it did return, say which content it was
            which = "old" if got == old[offset:offset + MiB] else \
                "new" if got == new[offset:offset + MiB] else "neither"
            pytest.fail(f"read through the old handle returned data ({which} content)")
        assert info.value.errno == errno.ESTALE, info.value
    finally:
        os.close(fd)


def test_reopen_after_estale_sees_new_content(seaweed, mount_factory):
    """ESTALE's remedy is to open again: the new handle must read the new object even while
    the cached attributes have not yet expired (attr_timeout=10 makes this deterministic)."""
    bucket = new_bucket(seaweed)
    client = seaweed.client()
    old, new = payload(16 * MiB, 3), payload(16 * MiB, 4)
    client.put_object(Bucket=bucket, Key="obj", Body=old)
    m = mount_factory(seaweed, "attr_timeout=10", bucket=bucket)
    offset = 12 * MiB
    with open(m.path / "obj", "rb") as f:
        assert f.read(MiB) == old[:MiB]
        client.put_object(Bucket=bucket, Key="obj", Body=new)
        f.seek(offset)
        with pytest.raises(OSError) as info:
            f.read(MiB)
        assert info.value.errno == errno.ESTALE
    with open(m.path / "obj", "rb") as f:
        f.seek(offset)
        assert f.read(MiB) == new[offset:offset + MiB]


def test_invalid_key_names_are_skipped(any_server, mount_factory):
    # SeaweedFS normalizes "a//b" to "a/b" and refuses the 300-byte segment; moto stores both,
    # so the moto run is the one that exercises the skipping.
    seaweed = any_server
    bucket = new_bucket(seaweed)
    client = seaweed.client()
    client.put_object(Bucket=bucket, Key="good", Body=b"good")
    bad = ["a//b", "long/" + "n" * 300]
    accepted = []
    for key in bad:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"bad")
        except Exception:  # noqa: BLE001 - the server may refuse such keys
            continue
        accepted.append(key)
    m = mount_factory(seaweed, bucket=bucket)
    listed_keys = m.keys()
    names = os.listdir(m.path)
    assert "good" in names
    for top in {k.split("/")[0] for k in listed_keys}:
        if top:
            assert top in names
            # walking every directory works and never shows an invalid name
    for _root, dirs, files in os.walk(m.path):
        for name in dirs + files:
            assert name and len(name.encode()) <= 255, name
    if "long/" + "n" * 300 in listed_keys:
        assert os.listdir(m.path / "long") == []
    for key in listed_keys:
        if "//" in key or any(len(seg.encode()) > 255 for seg in key.split("/")):
            # logged as the key, or as the key prefix that holds the bad segment ('a//')
            shown = key[:key.index("//") + 2] if "//" in key else key[:40]
            assert "skipping key" in m.log() and "'" + shown in m.log(), key
    # the mount keeps working
    assert read_file(m.path / "good") == b"good"
    assert os.stat(m.path / "good").st_size == 4
    print("server accepted:", accepted, "stored keys:", listed_keys)


def test_file_and_directory_same_name(seaweed, mount_factory):
    m = mount_factory(seaweed, bucket=bucket_with(seaweed, {"x": b"file", "x/y": b"inner"}))
    assert os.listdir(m.path) == ["x"]
    assert (m.path / "x").is_dir()
    assert read_file(m.path / "x/y") == b"inner"


def test_server_killed_mid_read_then_restarted(mount_factory, restartable_seaweed):
    server = restartable_seaweed.server
    data = payload(BIG, 7)
    bucket = bucket_with(server, {"big.bin": data, "small": b"small"})
    m = mount_factory(server, "retries=2", bucket=bucket)
    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        assert os.read(fd, MiB) == data[:MiB]
        restartable_seaweed.stop()
        started = time.monotonic()

        def far_read():
            try:
                return os.pread(fd, MiB, 40 * MiB)
            except OSError as exc:
                return exc

        result = run_with_timeout(far_read, 90)
        assert isinstance(result, OSError), \
            f"read with the server down returned {len(result)} bytes"
        assert result.errno == errno.EIO, result
        print(f"EIO after {time.monotonic() - started:.1f} s")
    finally:
        os.close(fd)
    assert m.process.poll() is None, "mount process died"

    restartable_seaweed.restart()
    # the mount is usable again: stat and read work through the same mount
    assert run_with_timeout(lambda: os.stat(m.path / "small").st_size, 60) == 5
    assert run_with_timeout(lambda: read_file(m.path / "small"), 60) == b"small"

    def far_read_again():
        with open(m.path / "big.bin", "rb") as f:
            f.seek(40 * MiB)
            return f.read(MiB)

    assert run_with_timeout(far_read_again, 60) == data[40 * MiB:41 * MiB]
    assert "small" in run_with_timeout(lambda: os.listdir(m.path), 60)
    m.unmount()
