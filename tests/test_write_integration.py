"""Writes through a real mount (SeaweedFS): every object is checked byte-for-byte with botocore."""

from __future__ import annotations

import concurrent.futures
import ctypes
import mmap
import os
import stat
import subprocess
import time

import pytest
from conftest import run_with_timeout, sha, wait_until

MiB = 1024 * 1024
SIZES = [0, 1, 8 * MiB - 1, 8 * MiB, 8 * MiB + 1]
BIG = 200 * MiB


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Random source files on local disk: {size: (path, bytes)}."""
    directory = tmp_path_factory.mktemp("sources")
    files = {}
    for size in SIZES + [BIG]:
        data = os.urandom(size)
        path = directory / f"src-{size}"
        path.write_bytes(data)
        files[size] = (path, data)
    return files


def copy_command(tool: str, src, dst) -> list[str]:
    if tool == "cp":
        return ["cp", str(src), str(dst)]
    bs = {"dd4k": "4k", "dd1M": "1M"}[tool]
    return ["dd", f"if={src}", f"of={dst}", f"bs={bs}", "status=none"]


def assert_object(m, key: str, data: bytes):
    got = m.get(key)
    assert len(got) == len(data), f"{key}: {len(got)} bytes in S3, expected {len(data)}"
    assert sha(got) == sha(data), f"{key}: content differs"


# ---------------------------------------------------------------- copy tools


def copy_and_check(mount, tool, src, data, key, timeout):
    """Copy `src` into the mount as `key` with `tool`; the object must equal `data`."""
    result = subprocess.run(copy_command(tool, src, mount.path / key), capture_output=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert_object(mount, key, data)


@pytest.mark.parametrize("tool", ["cp", "dd4k", "dd1M"])
def test_copy_tools_small_and_boundary_sizes(mount, sources, tool):
    for size in SIZES:
        copy_and_check(mount, tool, *sources[size], f"{tool}-{size}", timeout=120)
    assert mount.uploads() == []


@pytest.mark.parametrize("tool", ["cp", "dd1M"])
def test_copy_tools_200mib(mount, sources, tool):
    copy_and_check(mount, tool, *sources[BIG], f"{tool}-big", timeout=180)
    assert mount.uploads() == []


def test_shell_redirection(mount):
    subprocess.run(["bash", "-c", f"echo hi > {mount.path}/x"], check=True, timeout=30)
    assert mount.get("x") == b"hi\n"


def test_touch_creates_empty_object(mount):
    subprocess.run(["touch", str(mount.path / "empty")], check=True, timeout=30)
    assert mount.get("empty") == b""
    assert mount.head("empty")["ContentLength"] == 0


def test_python_4k_writes(mount):
    data = os.urandom(8 * MiB + 12345)
    with open(mount.path / "py4k", "wb", buffering=0) as f:
        for i in range(0, len(data), 4096):
            assert f.write(data[i:i + 4096]) == len(data[i:i + 4096])
    assert_object(mount, "py4k", data)


def test_object_metadata(mount):
    before = time.time()
    path = mount.path / "meta"
    path.write_bytes(b"metadata")
    head = mount.head("meta")
    meta = head["Metadata"]
    for name in ("mtime", "mode", "uid", "gid"):
        assert name in meta, f"x-amz-meta-{name} missing: {meta}"
    mode = int(meta["mode"])
    assert stat.S_ISREG(mode), f"mode {meta['mode']} is not a regular file (s3fs-fuse format)"
    assert int(meta["uid"]) == os.getuid()
    assert int(meta["gid"]) == os.getgid()
    mtime = float(meta["mtime"])
    assert before - 5 <= mtime <= time.time() + 5, meta["mtime"]
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(mode)


def test_close_makes_object_visible_immediately(mount):
    data = os.urandom(9 * MiB)
    fd = os.open(mount.path / "vis", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
    # no sleep: visible right after close() returns
    assert_object(mount, "vis", data)
    assert mount.uploads() == []


def test_loop_redirect_one_flush_per_child(mount):
    subprocess.run(["bash", "-c",
                    f"for i in $(seq 100); do /bin/echo $i; done > {mount.path}/f"],
                   check=True, timeout=120)
    expected = "".join(f"{i}\n" for i in range(1, 101)).encode()
    got = mount.get("f")
    assert got.count(b"\n") == 100
    assert got == expected


def test_write_fsync_write_close(mount):
    a, b = os.urandom(3 * MiB + 7), os.urandom(6 * MiB + 3)
    fd = os.open(mount.path / "fs", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, a)
    os.fsync(fd)
    os.write(fd, b)
    os.close(fd)
    assert_object(mount, "fs", a + b)


def test_fsync_leaves_open_upload_until_close(mount):
    data = os.urandom(8 * MiB + 100)
    fd = os.open(mount.path / "fsbig", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        uploads = mount.uploads()
        assert [u["Key"] for u in uploads] == ["fsbig"], uploads
        # every byte written so far is stored as parts of that upload
        parts = mount.client.list_parts(Bucket=mount.bucket, Key="fsbig",
                                        UploadId=uploads[0]["UploadId"]).get("Parts", [])
        # SeaweedFS lists every upload of a re-uploaded part number; the last one counts
        sizes = {p["PartNumber"]: p["Size"] for p in parts}
        assert sorted(sizes) == list(range(1, len(sizes) + 1)), parts
        assert sum(sizes.values()) == len(data), parts
    finally:
        os.close(fd)
    assert mount.uploads() == []
    assert_object(mount, "fsbig", data)


def test_concurrent_writers(mount):
    datas = {f"c{i}": os.urandom(12 * MiB + i * 1000) for i in range(4)}

    def write(key):
        with open(mount.path / key, "wb") as f:
            data = datas[key]
            for i in range(0, len(data), 64 * 1024):
                f.write(data[i:i + 64 * 1024])

    def all_writers():
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(write, datas))

    run_with_timeout(all_writers, 120)
    for key, data in datas.items():
        assert_object(mount, key, data)
    assert mount.uploads() == []


def test_seek_back_patch_in_part_one(mount):
    data = bytearray(os.urandom(20 * MiB))
    fd = os.open(mount.path / "patch", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, bytes(data))
    assert os.pwrite(fd, b"RIFF", 4) == 4
    assert os.pwrite(fd, b"data", 40) == 4
    os.close(fd)
    data[4:8] = b"RIFF"
    data[40:44] = b"data"
    assert_object(mount, "patch", bytes(data))


def test_write_into_uploaded_middle_part_lands(mount):
    """A part uploaded and freed can still be changed: the upload is completed early, the
    part read back and patched, the rest composed server-side at close."""
    data = bytearray(os.urandom(40 * MiB))
    fd = os.open(mount.path / "middle", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        assert os.pwrite(fd, b"XXXX", 12 * MiB) == 4
        os.fsync(fd)
    finally:
        os.close(fd)
    data[12 * MiB:12 * MiB + 4] = b"XXXX"
    assert_object(mount, "middle", bytes(data))
    assert mount.uploads() == []
    assert "middle: changing bytes already uploaded" in mount.log()


def resident_bytes(fd: int, size: int) -> int:
    """Bytes of the open file held in the kernel's page cache (mincore on a mapping, which
    does not fault anything in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = ctypes.create_string_buffer(pages)
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector.raw) * mmap.PAGESIZE
    finally:
        libc.munmap(address, size)


def test_uploaded_parts_leave_the_page_cache(mount):
    """Pages of parts already in S3 are dropped from the kernel's cache while the file is
    still being written (page_cache.py); a partial-page write there still lands (the kernel
    reads the page back first, through the writer)."""
    data = os.urandom(96 * MiB)
    fd = os.open(mount.path / "dropped", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), MiB):
            os.write(fd, data[start:start + MiB])
        os.fsync(fd)  # every part uploaded; full ones but part 1 and the last leave memory
        assert wait_until(lambda: resident_bytes(fd, len(data)) <= 24 * MiB, 10, 0.1), \
            f"{resident_bytes(fd, len(data)) >> 20} MiB of 96 still cached"
        os.pwrite(fd, b"RIFF", 4)  # part 1 is still held and cached
        os.pwrite(fd, b"XXXX", 12 * MiB)  # the kernel reads the page back first
    finally:
        os.close(fd)
    expected = bytearray(data)
    expected[4:8] = b"RIFF"
    expected[12 * MiB:12 * MiB + 4] = b"XXXX"
    assert_object(mount, "dropped", bytes(expected))


def test_without_writeback_cache_reads_of_freed_parts(seaweed, mount_factory):
    """With writeback_cache=off the kernel never reads before a write: a read through the
    writing descriptor is a real read (bytes uploaded and freed are read back from the
    upload completed as it stands), and a write into a freed part reaches the file system
    itself and lands."""
    m = mount_factory(seaweed, "writeback_cache=off")
    data = os.urandom(40 * MiB)
    fd = os.open(m.path / "direct", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        assert os.pread(fd, 4096, 12 * MiB) == data[12 * MiB:12 * MiB + 4096]
        assert os.pread(fd, 4, 4) == data[4:8]  # part 1 is still held
        assert os.pwrite(fd, b"XXXX", 12 * MiB) == 4
    finally:
        os.close(fd)
    assert_object(m, "direct", data[:12 * MiB] + b"XXXX" + data[12 * MiB + 4:])


def test_unlink_while_writing(mount):
    fd = os.open(mount.path / "gone", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, os.urandom(10 * MiB))
    os.unlink(mount.path / "gone")
    os.write(fd, os.urandom(10 * MiB))
    os.close(fd)
    assert "gone" not in mount.keys()
    assert mount.uploads() == []


def test_o_trunc_overwrite_replaces_object(mount):
    mount.client.put_object(Bucket=mount.bucket, Key="ow", Body=os.urandom(3 * MiB))
    time.sleep(1.5)  # past the attribute cache TTL
    data = os.urandom(1000)
    with open(mount.path / "ow", "wb") as f:
        f.write(data)
    assert_object(mount, "ow", data)


def test_open_existing_without_trunc_changes_it_in_place(mount):
    mount.client.put_object(Bucket=mount.bucket, Key="exist", Body=b"keep me")
    time.sleep(1.5)
    fd = os.open(mount.path / "exist", os.O_WRONLY)
    try:
        os.pwrite(fd, b"K", 0)
    finally:
        os.close(fd)
    assert mount.get("exist") == b"Keep me"


def test_read_back_through_mount(mount):
    data = os.urandom(8 * MiB + 4321)
    (mount.path / "rb").write_bytes(data)
    got = (mount.path / "rb").read_bytes()
    assert sha(got) == sha(data)
    small = b"small object"
    (mount.path / "rbs").write_bytes(small)
    assert (mount.path / "rbs").read_bytes() == small


def test_rsync_twice_transfers_nothing(mount, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    files = {"a.txt": b"alpha\n", "b.bin": os.urandom(100_000), "sub/c.txt": b"gamma\n",
             "sub/d.bin": os.urandom(9 * MiB)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    os.chmod(src / "a.txt", 0o600)
    os.utime(src / "b.bin", (1_600_000_000, 1_600_000_000))
    dst = f"{mount.path}/dst/"
    first = subprocess.run(["rsync", "-a", f"{src}/", dst], capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr.decode(errors="replace")
    for name, data in files.items():
        assert_object(mount, f"dst/{name}", data)
    time.sleep(1.5)  # past the attribute cache TTL
    second = subprocess.run(["rsync", "-a", "-i", f"{src}/", dst], capture_output=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr.decode(errors="replace")
    itemized = second.stdout.decode(errors="replace").splitlines()
    file_lines = [line for line in itemized if len(line) > 1 and line[1] == "f"]
    assert not file_lines, "second rsync transferred files:\n" + "\n".join(itemized)


def test_a_written_file_and_its_rename_cost_no_extra_copy(mount):
    """With the writeback cache the kernel sends its own times after the last write and after
    a rename; those are kept in memory, not stored by copying the object onto itself."""
    data = os.urandom(20 * MiB)
    with open(mount.path / "big.bin", "wb") as f:
        f.write(data)
    os.rename(mount.path / "big.bin", mount.path / "moved.bin")
    time.sleep(2)  # the kernel's writeback of times comes late
    os.stat(mount.path / "moved.bin")
    copies = [line for line in mount.log().splitlines() if "S3 CopyObject" in line]
    assert len(copies) == 1, copies  # the rename itself
    assert_object(mount, "moved.bin", data)
