"""Reading a file while it is being written, through a second descriptor: bytes the writer
already uploaded and freed come back (the upload is completed as it stands and they are read
from that object), never EBUSY. ffmpeg's `-movflags +faststart` does exactly this: it opens
its output again read-only to move the moov atom to the front."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same, run_with_timeout, sha, wait_until

MiB = 1024 * 1024
REBASE = "a reader needs bytes already uploaded"


def parts_uploaded(mount, key: str) -> int:
    uploads = [u for u in mount.uploads() if u["Key"] == key]
    if not uploads:
        return 0
    return len(mount.client.list_parts(Bucket=mount.bucket, Key=key,
                                       UploadId=uploads[0]["UploadId"]).get("Parts", []))


@pytest.mark.timeout(60)
def test_second_descriptor_reads_uploaded_and_freed_bytes(mount):
    """60 MiB written through one descriptor still open; a read-only descriptor reads from
    8 MiB on (parts uploaded and freed) and gets the bytes; the writer goes on and the object
    at its close is every byte."""
    data = random.Random(1).randbytes(60 * MiB)
    path = mount.path / "live.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), MiB):
            os.write(fd, data[start:start + MiB])
        # no fsync, as ffmpeg: the kernel writes back all but its dirty limit (16 MiB), so
        # parts 2-4 at least are in the open upload, and freed
        assert wait_until(lambda: parts_uploaded(mount, "live.bin") >= 4, 30)
        reader = os.open(path, os.O_RDONLY)
        try:
            os.lseek(reader, 8 * MiB, os.SEEK_SET)
            assert_same(os.read(reader, MiB), data[8 * MiB:9 * MiB], "read at 8 MiB")
            assert_same(os.pread(reader, len(data), 0), data, "the whole file")
            os.write(fd, b"tail")  # writing goes on after the reader forced a completion
            assert os.pread(reader, 8, len(data) - 4) == data[-4:] + b"tail"
        finally:
            os.close(reader)
    finally:
        os.close(fd)
    assert REBASE in mount.log()
    assert_same(mount.get("live.bin"), data + b"tail", "live.bin")
    assert mount.uploads() == []


@pytest.fixture(scope="module")
def mp4_source(tmp_path_factory) -> Path:
    """~200 MB of MJPEG video in Matroska, made in about a second: 4 s encoded once, then
    looped by copying packets."""
    assert shutil.which("ffmpeg"), "ffmpeg (scripts/setup installs it)"
    directory = tmp_path_factory.mktemp("mp4src")
    small, source = directory / "small.mkv", directory / "src.mkv"
    for args in (["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25:duration=4",
                  "-c:v", "mjpeg", "-q:v", "1", str(small)],
                 ["-stream_loop", "27", "-i", str(small), "-c", "copy", str(source)]):
        result = subprocess.run(["ffmpeg", "-v", "error", "-y", *args[:-1], "-fflags",
                                 "+bitexact", args[-1]], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert source.stat().st_size > 190 * 1000 * 1000
    return source


def faststart(source: Path, target: Path) -> None:
    result = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-c", "copy",
                             "-movflags", "+faststart", "-fflags", "+bitexact",
                             "-map_metadata", "-1", str(target)], capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


@pytest.mark.timeout(150)  # 40-60 s on a loaded 2-core machine (the rewrite is most of it)
@pytest.mark.parametrize("options", [(), ("max_memory=16M",)], ids=["default", "16M"])
def test_ffmpeg_faststart(seaweed, mount_factory, mp4_source, tmp_path, options):
    """ffmpeg re-opens its output read-only to move the moov atom to the front, reading
    bytes it wrote long ago, then writes them back shifted: byte-identical to local disk."""
    mount = mount_factory(seaweed, *options)
    local = tmp_path / "local.mp4"
    faststart(mp4_source, local)
    started = time.monotonic()
    faststart(mp4_source, mount.path / "out.mp4")
    print(f"faststart of {local.stat().st_size} bytes into the mount {options}: "
          f"{time.monotonic() - started:.1f} s")
    expected = local.read_bytes()
    assert expected[32:36] == b"moov"  # the moov atom moved to the front
    got = mount.get("out.mp4")
    assert len(got) == len(expected)
    assert sha(got) == sha(expected), "out.mp4 differs from the local-disk file"
    assert mount.uploads() == []
    # ffmpeg read bytes uploaded and freed: the upload was completed early for that, or at
    # 16M maybe before, when memory pressure had taken part 1 and ffmpeg patched its header
    assert (REBASE if not options else "completing the upload at") in mount.log()


WRITER = """
import os, random, sys, time
path, total, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(3).randbytes(total)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for start in range(0, total, chunk):
    os.write(fd, data[start:start + chunk])
    time.sleep(0.01)
sys.stdin.read()  # recording until told to stop: the player reads while the file is open
os.close(fd)
"""


@pytest.mark.timeout(90)
def test_player_follows_a_recording(seaweed, mount_factory):
    """A recorder appends in chunks (another process); a player opens the file read-only
    while it grows and reads behind it, at first far behind (parts uploaded and freed, at a
    budget of two parts), then catching up to the end; it reads every byte written."""
    mount = mount_factory(seaweed, "max_memory=16M")
    total, chunk = 96 * MiB, 256 * 1024
    expected = random.Random(3).randbytes(total)
    path = mount.path / "rec.bin"
    recorder = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(total),
                                 str(chunk)], stdin=subprocess.PIPE)
    try:
        assert wait_until(lambda: path.exists() and path.stat().st_size >= 40 * MiB, 40)

        def follow() -> bytes:
            got = bytearray()
            fd = os.open(path, os.O_RDONLY)
            try:
                while len(got) < total:
                    piece = os.read(fd, 128 * 1024)
                    if not piece:  # at the end of what is written so far, as `tail -f`
                        assert recorder.poll() is None
                        time.sleep(0.02)
                        continue
                    got += piece
                    if len(got) < 32 * MiB:
                        time.sleep(0.005)  # a player's pace at first: the recorder runs ahead
            finally:
                os.close(fd)
            return bytes(got)

        got = run_with_timeout(follow, 70, mount.log)
        recorder.stdin.close()
        assert recorder.wait(30) == 0
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    assert_same(got, expected, "what the player read")
    assert REBASE in mount.log()
    assert_same(mount.get("rec.bin"), expected, "rec.bin")
    assert mount.uploads() == []
