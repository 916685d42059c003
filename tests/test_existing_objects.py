"""Existing objects are writable through a real mount (issue 10): appends, in-place writes,
truncation to any size, concurrent `dd conv=notrunc`, reads while open, a base replaced by
another client, and a reference-model test against a local file. Every case checks the object
byte-for-byte with botocore, that the daemon wrote nothing to local disk, and that its peak
memory stayed within the budget."""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import time

import pytest
from conftest import (
    assert_no_disk_and_bounded,
    assert_same,
    bucket_with,
    run_with_timeout,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

MiB = 1024 * 1024
PART = 8 * MiB  # the mount's default first part size


@pytest.fixture
def ext(shm_dir, mount_factory):
    """make(server, objects, *options): a mount of a new bucket holding `objects`, its log on
    a tmpfs so that any local disk write of the daemon is the writer's. shm_dir is set up
    before mount_factory, so the log outlives the factory's check of it."""

    def make(server, objects: dict[str, bytes] | None = None, *options: str):
        bucket = bucket_with(server, objects or {})
        return mount_factory(server, *options, bucket=bucket, log_dir=shm_dir)

    return make


def put_multipart(client, bucket: str, key: str, data: bytes, part: int = 5 * MiB) -> None:
    """An object uploaded in parts (another part size than the mount's) by another client."""
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), part), 1):
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                                  Body=data[start:start + part])["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": parts})


def traffic(log: str, key: str) -> dict:
    """What the mount asked S3 for `key`, from its debug log: bytes of ranged GETs, and the
    part numbers uploaded and copied server-side."""
    got = 0
    for first, last in re.findall(rf"S3 GetObject s3://\S+/{re.escape(key)} "
                                  r"Range=bytes=(\d+)-(\d+) -> 2", log):
        got += int(last) - int(first) + 1
    uploaded = re.findall(rf"S3 UploadPart s3://\S+/{re.escape(key)} PartNumber=(\d+) -> 2", log)
    copied = re.findall(rf"S3 UploadPartCopy s3://\S+/{re.escape(key)} [^\n]*?"
                        r"PartNumber=(\d+) -> 2", log)
    return {"get_bytes": got, "uploaded": sorted(map(int, uploaded)),
            "copied": sorted(map(int, copied))}


def check(m, key: str, expected: bytes | bytearray) -> None:
    assert_same(m.get(key), bytes(expected), key)
    assert m.uploads() == []
    assert_no_disk_and_bounded(m)


# ---------------------------------------------------------------- appends


def test_echo_appends(any_server, ext):
    m = ext(any_server)
    f = m.path / "f"
    subprocess.run(["sh", "-c", f"echo one >> {f}; echo two >> {f}; echo three >> {f}"],
                   check=True, timeout=60)
    check(m, "f", b"one\ntwo\nthree\n")
    assert f.read_bytes() == b"one\ntwo\nthree\n"


def test_append_1000_bytes_to_4k_object(any_server, ext):
    base = os.urandom(4096)
    m = ext(any_server, {"small": base})
    tail = os.urandom(1000)
    with open(m.path / "small", "ab") as f:
        f.write(tail)
    check(m, "small", base + tail)
    assert (m.path / "small").stat().st_size == 5096


def test_append_3mib_to_20mib_multipart_object(seaweed, ext):
    m = ext(seaweed)
    base = os.urandom(20 * MiB)
    put_multipart(m.client, m.bucket, "big", base)
    time.sleep(1.2)  # past the attribute TTL of the bucket's (empty) listing
    tail = os.urandom(3 * MiB)
    with open(m.path / "big", "ab") as f:
        f.write(tail)
    check(m, "big", base + tail)
    # only the last part went through the mount; parts 1-2 were copied server-side
    seen = traffic(m.log(), "big")
    assert seen["get_bytes"] <= 4 * MiB, seen
    assert seen["copied"] == [1, 2] and seen["uploaded"] == [3], seen


# ---------------------------------------------------------------- truncate


def test_truncate_20mib_object_to_12mib_plus_3(seaweed, ext):
    base = os.urandom(20 * MiB)
    m = ext(seaweed, {"t": base})
    subprocess.run(["truncate", "-s", str(12 * MiB + 3), m.path / "t"], check=True, timeout=60)
    check(m, "t", base[:12 * MiB + 3])
    assert (m.path / "t").stat().st_size == 12 * MiB + 3
    seen = traffic(m.log(), "t")
    # the cut part is loaded whole before it is cut (at most one part through the mount)
    assert seen["get_bytes"] <= PART and seen["copied"] == [1], seen


def test_truncate_4k_object_to_10mib(any_server, ext):
    base = os.urandom(4096)
    m = ext(any_server, {"t": base})
    subprocess.run(["truncate", "-s", "10M", m.path / "t"], check=True, timeout=60)
    check(m, "t", base + bytes(10 * MiB - 4096))


# ---------------------------------------------------------------- in place


def test_r_plus_seek_write_seek_write(seaweed, ext):
    base = bytearray(os.urandom(20 * MiB))
    m = ext(seaweed, {"rp": bytes(base)})
    patch = os.urandom(100_000)
    with open(m.path / "rp", "r+b") as f:
        f.seek(9 * MiB + 5)
        f.write(patch)
        f.seek(17)
        f.write(b"ABCD")
    base[9 * MiB + 5:9 * MiB + 5 + len(patch)] = patch
    base[17:21] = b"ABCD"
    check(m, "rp", base)
    seen = traffic(m.log(), "rp")
    # parts 1 and 2 each loaded once (the kernel reads pages around partial-page writes)
    assert seen["get_bytes"] == 2 * PART and seen["copied"] == [3], seen


def test_r_plus_small_object(moto_server, ext):
    base = bytearray(os.urandom(5000))
    m = ext(moto_server, {"rp": bytes(base)})
    with open(m.path / "rp", "r+b") as f:
        f.seek(4090)
        f.write(b"0123456789")
        f.seek(17)
        f.write(b"ABCD")
    base[4090:4100] = b"0123456789"
    base[17:21] = b"ABCD"
    check(m, "rp", base)


def dd_notrunc(src, dst, bs: int, seek: int, count: int) -> list[str]:
    return ["dd", f"if={src}", f"of={dst}", f"bs={bs}", f"seek={seek}", f"count={count}",
            "conv=notrunc", "status=none"]


def test_dd_conv_notrunc_alone_and_concurrently(seaweed, ext, tmp_path):
    size = 20 * MiB
    base = os.urandom(size)
    m = ext(seaweed, {"dd": base})
    local = tmp_path / "dd"
    local.write_bytes(base)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2 * MiB))

    # alone: 1 MiB over the boundary between parts 1 and 2
    one = dd_notrunc(src, "{}", 4096, (PART - 512 * 1024) // 4096, 256)
    for target in (local, m.path / "dd"):
        subprocess.run([a.replace("{}", str(target)) for a in one], check=True, timeout=60)
    assert_same(m.get("dd"), local.read_bytes(), "dd alone")

    # several processes on the same object at once, disjoint ranges (the order of overlapping
    # ones is up to the scheduler), one across parts 1-2, one not aligned
    # to pages (bs=1000: the kernel reads the pages it completes)
    jobs = [dd_notrunc(src, "{}", 4096, 100, 64), dd_notrunc(src, "{}", 4096, 2000, 300),
            dd_notrunc(src, "{}", 1000, 13_000, 700), dd_notrunc(src, "{}", 65536, 300, 8)]
    for job in jobs:
        subprocess.run([a.replace("{}", str(local)) for a in job], check=True, timeout=60)

    def run() -> None:
        procs = [subprocess.Popen([a.replace("{}", str(m.path / "dd")) for a in job],
                                  stderr=subprocess.PIPE) for job in jobs]
        for proc in procs:
            _, err = proc.communicate(120)
            assert proc.returncode == 0, err.decode(errors="replace")

    run_with_timeout(run, 180, m.log)
    check(m, "dd", local.read_bytes())


def test_close_stores_bytes_the_kernel_sent_through_another_descriptor(seaweed, ext):
    """With the writeback cache the kernel writes a program's dirty pages through the writing
    descriptor of the file opened last: the close of the one that wrote them still finds
    them in the object (the cause of a concurrent `dd conv=notrunc` range found old)."""
    base = os.urandom(2 * PART)
    m = ext(seaweed, {"o": base})
    mine = os.open(m.path / "o", os.O_WRONLY)
    other = os.open(m.path / "o", os.O_WRONLY)  # opened last: the kernel writes through it
    try:
        patch = os.urandom(64 * 1024)
        os.pwrite(mine, patch, PART + 4096)
        os.close(mine)
        mine = None
        expected = base[:PART + 4096] + patch + base[PART + 4096 + len(patch):]
        assert_same(m.get("o"), expected, "at the close of the descriptor that wrote")
    finally:
        if mine is not None:
            os.close(mine)
        os.close(other)
    check(m, "o", expected)


def test_new_file_seek_30mib_write_one_byte(seaweed, ext):
    m = ext(seaweed)
    with open(m.path / "sparse", "wb") as f:
        f.seek(30 * MiB)
        f.write(b"!")
    got = m.get("sparse")
    assert len(got) == 30 * MiB + 1 and got[-1:] == b"!" and got[:-1].count(0) == 30 * MiB
    assert m.uploads() == []
    assert_no_disk_and_bounded(m)


# ---------------------------------------------------------------- reads while open


@pytest.mark.parametrize("options", [(), ("writeback_cache=off",)], ids=["writeback", "direct"])
def test_reads_through_another_descriptor_while_open(seaweed, ext, options):
    base = bytearray(os.urandom(20 * MiB))
    m = ext(seaweed, {"o": bytes(base)}, *options)
    patch = os.urandom(70_000)
    fd = os.open(m.path / "o", os.O_RDWR)
    try:
        os.pwrite(fd, patch, 9 * MiB + 5)
        os.pwrite(fd, b"HEAD", 4)
        base[9 * MiB + 5:9 * MiB + 5 + len(patch)] = patch
        base[4:8] = b"HEAD"
        with open(m.path / "o", "rb") as reader:
            assert_same(reader.read(), bytes(base), "read while open")
            reader.seek(9 * MiB)
            assert reader.read(100) == bytes(base[9 * MiB:9 * MiB + 100])
        assert m.get("o") != bytes(base)  # nothing completed yet: the old object stands
    finally:
        os.close(fd)
    check(m, "o", base)


# ---------------------------------------------------------------- base replaced


@pytest.mark.expect_log_errors("replaced by another client", "the object is not written",
                               "completing at release failed",
                               "closed without a successful completion")
def test_base_replaced_by_another_client_fails_with_eio(seaweed, ext):
    base = os.urandom(20 * MiB)
    m = ext(seaweed, {"r": base})
    theirs = os.urandom(20 * MiB)
    fd = os.open(m.path / "r", os.O_RDWR)
    failed = None
    try:
        os.pwrite(fd, b"mine", 100)  # part 1: loaded into memory now (a partial page)
        m.client.put_object(Bucket=m.bucket, Key="r", Body=theirs)
        os.pwrite(fd, bytes(4096), 12 * MiB)  # part 2, not held: its load must fail
    except OSError as exc:
        failed = exc
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            failed = failed or exc
    assert failed is not None and failed.errno == errno.EIO, failed
    assert_same(m.get("r"), theirs, "the other client's object")
    assert "replaced by another client" in m.log()
    assert_no_disk_and_bounded(m)
    # the upload started for the composition stays for `s3stream recover`; clean it up here
    for upload in m.uploads():
        m.client.abort_multipart_upload(Bucket=m.bucket, Key=upload["Key"],
                                        UploadId=upload["UploadId"])


# ---------------------------------------------------------------- reference model

offsets = st.one_of(st.integers(0, 64 * 1024),
                    st.sampled_from([0, 4, 4095, PART - 3, PART, PART + 4096]),
                    st.integers(0, 2 * PART + MiB))
lengths = st.one_of(st.integers(1, 8192), st.integers(1, 2 * MiB))
operation = st.one_of(
    st.tuples(st.just("pwrite"), offsets, lengths),
    st.tuples(st.just("write"), lengths),  # at the descriptor's position (the end: O_APPEND)
    st.tuples(st.just("seek"), offsets),
    st.tuples(st.just("ftruncate"), st.one_of(st.integers(0, 8192), offsets)),
)
FLAGS = {"r+": os.O_RDWR, "w-only": os.O_WRONLY, "append": os.O_WRONLY | os.O_APPEND,
         "trunc": os.O_RDWR | os.O_TRUNC}
session = st.tuples(st.sampled_from(sorted(FLAGS)), st.lists(operation, max_size=4),
                    st.one_of(st.none(), st.integers(0, 2 * PART)))  # then truncate -s
scenarios = st.tuples(st.sampled_from([0, 5000, PART + 12345]),
                      st.lists(session, min_size=1, max_size=3), st.integers(0, 2**32))

MODEL_DEADLINE = 40.0  # seconds for all examples together; later ones are skipped


@pytest.fixture(scope="module")
def model_state():
    return {"started": None, "examples": 0}


@pytest.fixture
def model_mount(seaweed, ext):
    return ext(seaweed)


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios)
def test_model_open_append_pwrite_truncate_close(model_mount, model_state, tmp_path, scenario):
    """Random sessions of open / write / pwrite / seek / ftruncate / close (then perhaps
    `truncate -s` of the path) applied to a local file and to an object through the mount:
    after every close the object equals the local file."""
    m = model_mount
    model_state["started"] = model_state["started"] or time.monotonic()
    if time.monotonic() - model_state["started"] > MODEL_DEADLINE:
        return  # bounded: the suite stays fast
    model_state["examples"] += 1
    initial_size, sessions, seed = scenario
    rng = random.Random(seed)
    key = f"model-{model_state['examples']}-{seed}"
    initial = rng.randbytes(initial_size)
    m.client.put_object(Bucket=m.bucket, Key=key, Body=initial)
    local = tmp_path / key
    local.write_bytes(initial)
    remote = m.path / key
    for number, (flags, ops, truncate_to) in enumerate(sessions):
        fds = [os.open(local, FLAGS[flags]), os.open(remote, FLAGS[flags])]
        try:
            for op in ops:
                data = rng.randbytes(op[-1]) if op[0] in ("pwrite", "write") else b""
                for fd in fds:
                    if op[0] == "pwrite":
                        os.pwrite(fd, data, op[1])
                    elif op[0] == "write":
                        os.write(fd, data)
                    elif op[0] == "seek":
                        os.lseek(fd, op[1], os.SEEK_SET)
                    else:
                        os.ftruncate(fd, op[1])
        finally:
            for fd in fds:
                os.close(fd)
        assert_same(m.get(key), local.read_bytes(), f"{key} after session {number} {flags} "
                                                    f"{ops}")
        if truncate_to is not None:
            os.truncate(local, truncate_to)
            subprocess.run(["truncate", "-s", str(truncate_to), remote], check=True,
                           timeout=60)
            assert_same(m.get(key), local.read_bytes(), f"{key} after truncate -s "
                                                        f"{truncate_to}")
    assert m.uploads() == []
    assert_no_disk_and_bounded(m)
