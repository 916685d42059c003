"""Recording software writing into the mount: byte-identical to the same command on local disk."""

from __future__ import annotations

import math
import shutil
import subprocess
import wave
from pathlib import Path

import pytest
from conftest import sha

BITEXACT = ["-fflags", "+bitexact", "-flags", "+bitexact"]
SECONDS = 4


def ffmpeg_encoders() -> str:
    return subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True,
                          text=True).stdout


def video_codec() -> list[str]:
    return ["-c:v", "mpeg4", "-q:v", "2"]


def sources(video: bool, size: str = "320x240") -> list[str]:
    args = []
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc=duration={SECONDS}:size={size}:rate=25"]
    args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}:sample_rate=44100"]
    return args


# name -> (ffmpeg args without output, output file name)
FFMPEG_CASES = {
    "mp4": (sources(True) + video_codec() + ["-c:a", "aac"], "out.mp4"),
    # rawvideo makes the file larger than one 8 MiB part, so patches cross part boundaries
    "mkv": (sources(True) + ["-c:v", "rawvideo", "-pix_fmt", "yuv420p", "-c:a", "pcm_s16le"],
            "out.mkv"),
    "wav": (sources(False) + ["-c:a", "pcm_s16le"], "out.wav"),
    "flac": (sources(False) + ["-c:a", "flac"], "out.flac"),
}


def duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


def check(mount, local: Path, name: str, expected_seconds: float):
    expected = local.read_bytes()
    got = mount.get(name)
    assert len(got) == len(expected), f"{name}: {len(got)} bytes in S3, {len(expected)} local"
    assert sha(got) == sha(expected), f"{name}: differs from the local-disk file"
    assert mount.uploads() == []
    assert abs(duration(mount.path / name) - expected_seconds) < 0.1


@pytest.mark.parametrize("case", list(FFMPEG_CASES))
def test_ffmpeg(mount, tmp_path, case):
    assert shutil.which("ffmpeg") and shutil.which("ffprobe")
    assert "mpeg4" in ffmpeg_encoders()
    args, name = FFMPEG_CASES[case]
    local = tmp_path / "local" / name
    local.parent.mkdir()
    for target in (local, mount.path / name):
        result = subprocess.run(["ffmpeg", "-v", "error", "-y", *args, *BITEXACT, str(target)],
                                capture_output=True, timeout=120)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
    check(mount, local, name, SECONDS)


def test_sox_wav(mount, tmp_path):
    assert shutil.which("sox")
    local = tmp_path / "sox.wav"
    for target in (local, mount.path / "sox.wav"):
        result = subprocess.run(["sox", "-n", str(target), "synth", "3", "sine", "440"],
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
    check(mount, local, "sox.wav", 3)


def write_wave(path: Path, seconds: int = 3, rate: int = 44100):
    frames = bytearray()
    for i in range(seconds * rate):
        value = int(12000 * math.sin(2 * math.pi * 440 * i / rate))
        frames += value.to_bytes(2, "little", signed=True) * 2
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        # small chunks, like a recorder; header sizes are patched at close
        for i in range(0, len(frames), 4096):
            w.writeframes(frames[i:i + 4096])


def test_python_wave(mount, tmp_path):
    local = tmp_path / "py.wav"
    write_wave(local)
    write_wave(mount.path / "py.wav")
    check(mount, local, "py.wav", 3)
