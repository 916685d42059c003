"""Many files written at once through a real mount: every writer lands byte-identical, none
fails for memory, and the daemon's memory stays within its budget plus a fixed overhead."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    OVERHEAD,
    assert_same,
    budget_of,
    peak_rss,
    run_with_timeout,
    sha,
    status_document,
    wait_until,
)

MiB = 1024 * 1024
CHUNK = 64 * 1024


class Contents:
    """File k's bytes: 64 KiB chunks, each tagged with (k, chunk number) over a random block,
    so a chunk in the wrong file or place is caught, without 640 MiB of random data."""

    def __init__(self, size: int):
        self.size = size
        self.block = os.urandom(CHUNK)

    def chunk(self, k: int, i: int) -> bytes:
        return struct.pack("<QQ", k, i) + self.block[16:]

    def whole(self, k: int) -> bytes:
        return b"".join(self.chunk(k, i) for i in range(self.size // CHUNK))


def write_file(path, contents: Contents, k: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(contents.size // CHUNK):
            os.write(fd, contents.chunk(k, i))
    finally:
        os.close(fd)


def check_all(mount, contents: Contents, count: int, prefix: str = "s") -> None:
    for k in range(count):
        got = mount.get(f"{prefix}{k}")
        assert len(got) == contents.size, f"{prefix}{k}: {len(got)} bytes"
        assert sha(got) == sha(contents.whole(k)), f"{prefix}{k}: content differs"
    assert mount.uploads() == []
    # the mount's lease (spill_area.py) stays while it runs
    left = [k for k in mount.keys(".s3stream/") if not k.endswith("/alive")]
    assert not left, "temporary spill objects left behind"


def concurrent_writers(mount, count: int, size: int, timeout: float) -> Contents:
    contents = Contents(size)
    errors: dict[int, OSError] = {}

    def one(k: int) -> None:
        try:
            write_file(mount.path / f"s{k}", contents, k)
        except OSError as exc:
            errors[k] = exc

    def run() -> None:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(one, range(count)))

    run_with_timeout(run, timeout, mount.log)
    assert not errors, {k: os.strerror(e.errno) for k, e in errors.items()}
    return contents


@pytest.mark.parametrize("options", [(), ("max_memory=64M",)], ids=["default", "64M"])
def test_32_writers_of_20mib_in_64k_writes(seaweed, mount_factory, options):
    m = mount_factory(seaweed, *options)
    contents = concurrent_writers(m, 32, 20 * MiB, 300)
    check_all(m, contents, 32)
    assert peak_rss(m) < budget_of(m) + OVERHEAD


def test_100_writers_of_8mib(seaweed, mount_factory):
    m = mount_factory(seaweed)
    contents = concurrent_writers(m, 100, 8 * MiB, 300)
    check_all(m, contents, 100)
    assert peak_rss(m) < budget_of(m) + OVERHEAD


def test_one_thread_writes_32_open_files_in_turn(seaweed, mount_factory):
    """A single-threaded program that opens 32 files, then writes 64 KiB to each in turn:
    with room for 8 parts, partly filled parts are spilled to the bucket, never deadlock."""
    m = mount_factory(seaweed, "max_memory=64M")
    contents = Contents(20 * MiB)

    def run() -> None:
        fds = [os.open(m.path / f"r{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
               for k in range(32)]
        try:
            for i in range(contents.size // CHUNK):
                for k, fd in enumerate(fds):
                    os.write(fd, contents.chunk(k, i))
        finally:
            for fd in fds:
                os.close(fd)

    run_with_timeout(run, 400, m.log)
    check_all(m, contents, 32, prefix="r")
    assert peak_rss(m) < 64 * MiB + OVERHEAD
    # 32 parts of 8 MiB fill together: whatever the kernel keeps dirty (16 MiB, or 1 % of
    # its dirty limit), far more than 64 MiB of partly filled parts reach the daemon first
    assert status_document(m.path)["memory"]["spills"] > 0


def test_recorders_among_31_other_writers(seaweed, mount_factory, tmp_path):
    """sox's WAV and ffmpeg's MP4 patch their headers at the end; with 31 other files
    filling a 64 MiB budget their part 1 cannot be held, and composition still lands them
    byte-identical to local disk."""
    assert shutil.which("sox") and shutil.which("ffmpeg")
    m = mount_factory(seaweed, "max_memory=64M")
    contents = Contents(20 * MiB)
    recorders = {
        # -R -D: no random dither, so two runs give the same bytes
        "rec.wav": ["sox", "-R", "-D", "-n", "-b", "16", "-r", "48000", "-c", "2", "{}",
                    "synth", "90", "sine", "440"],
        # noise keeps the video from compressing: ~20 MiB, the mdat size patched at the end
        "rec.mp4": ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=duration=3:size=640x480:rate=25", "-vf", "noise=alls=60:allf=t+u",
                    "-c:v", "mpeg4", "-q:v", "1", "-fflags", "+bitexact", "-flags", "+bitexact",
                    "{}"],
    }
    for name, command in recorders.items():
        local = tmp_path / name
        done = subprocess.run([a.replace("{}", str(local)) for a in command],
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert local.stat().st_size > 16 * MiB, f"{name} too small to span parts"
    failures: list[str] = []

    def record(name: str) -> None:
        command = [a.replace("{}", str(m.path / name)) for a in recorders[name]]
        done = subprocess.run(command, capture_output=True, timeout=300)
        if done.returncode:
            failures.append(f"{name}: {done.stderr.decode(errors='replace')}")

    def run() -> None:
        with ThreadPoolExecutor(33) as pool:
            jobs = [pool.submit(record, name) for name in recorders]
            jobs += [pool.submit(write_file, m.path / f"s{k}", contents, k) for k in range(31)]
            for job in jobs:
                job.result()

    run_with_timeout(run, 400, m.log)
    assert not failures, failures
    for name in recorders:
        assert_same(m.get(name), (tmp_path / name).read_bytes(), name)
    check_all(m, contents, 31)


def test_patch_into_part_3_after_parts_1_to_5_were_freed(seaweed, mount_factory):
    m = mount_factory(seaweed, "max_memory=16M")  # part 1 cannot stay: only 2 parts fit
    data = bytearray(os.urandom(100 * MiB))
    fd = os.open(m.path / "big", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), MiB):
            os.write(fd, data[start:start + MiB])
        for offset, patch in ((2 * 8 * MiB + 12345, b"PATCHED!"), (4, b"HEAD")):
            assert os.pwrite(fd, patch, offset) == len(patch)
            data[offset:offset + len(patch)] = patch
    finally:
        os.close(fd)
    got = m.get("big")
    assert len(got) == len(data) and sha(got) == sha(bytes(data))
    assert m.uploads() == []
    assert peak_rss(m) < 16 * MiB + OVERHEAD


def test_probing_a_recording_never_completes_it(seaweed, mount_factory):
    """A player or ffprobe opening the file read-only every half second while it is being
    written: the object appears once, at the writer's close, never continued or copied."""
    m = mount_factory(seaweed)
    data = os.urandom(24 * MiB)
    stop = threading.Event()
    seen: list[bytes] = []
    problems: list[str] = []

    def probe() -> None:
        while not stop.is_set():
            try:
                with open(m.path / "rec.bin", "rb") as f:
                    seen.append(f.read(16))
            except OSError as exc:
                problems.append(f"probe: {exc}")
            try:
                m.head("rec.bin")
                problems.append("the object exists before the recorder closed it")
            except Exception:
                pass
            time.sleep(0.5)

    def record() -> None:
        with open(m.path / "rec.bin", "wb", buffering=0) as f:
            f.write(data[:MiB])
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            for start in range(MiB, len(data), MiB):
                time.sleep(0.2)
                f.write(data[start:start + MiB])
            stop.set()
            prober.join()

    run_with_timeout(record, 120, m.log)
    assert not problems, problems
    assert len(seen) >= 5 and all(s == data[:16] for s in seen)
    assert sha(m.get("rec.bin")) == sha(data)
    assert wait_until(lambda: m.uploads() == [], 5)
    log = m.log()
    assert "changing bytes already uploaded" not in log
    assert "UploadPartCopy" not in log
    assert log.count("CompleteMultipartUpload") == 1
