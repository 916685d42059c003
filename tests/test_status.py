"""`s3stream status`: the daemon's own account of the files being written, over a Unix
socket only its user can use."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time

from conftest import VENV_BIN, run_with_timeout, wait_until

from s3fs_stream.status import find_sockets, render, socket_name

MiB = 1024 * 1024
NOBODY = 65534


def status(mnt, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "s3stream"), "status", str(mnt), *args],
                          capture_output=True, text=True, timeout=30)


def documents(mnt) -> list[dict]:
    result = status(mnt, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_follows_a_200_mib_write_and_forgets_the_file_after_close(mount):
    block = os.urandom(MiB)
    progress = threading.Event()  # set: keep writing
    progress.set()
    written = []

    def write() -> None:
        with open(mount.path / "big", "wb") as f:
            for i in range(200):
                f.write(block)
                written.append(i)
                if i % 20 == 19:
                    time.sleep(0.15)  # room for the polls below, whatever the speed

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    try:
        while writer.is_alive():
            [document] = documents(mount.path)
            files = [f for f in document["files"] if f["name"] == "big"]
            if files:
                seen.append(files[0])
            time.sleep(0.1)
    finally:
        run_with_timeout(writer.join, 120, mount.log)
    assert len(written) == 200
    writing = [f for f in seen if f["state"] == "writing"]
    assert len(writing) >= 2, seen
    assert writing[-1]["bytes_written"] > writing[0]["bytes_written"]
    assert max(f["parts_uploaded"] for f in seen) > min(f["parts_uploaded"] for f in seen)
    assert all(f["bytes_written"] <= 200 * MiB for f in seen)
    [document] = documents(mount.path)
    assert [f["name"] for f in document["files"]] == []  # closed: gone
    assert document["requests"]["UploadPart"] >= 25
    assert document["memory"]["limit"] > 0 and document["uploads_in_flight"] == 0
    assert len(mount.get("big")) == 200 * MiB
    text = status(mount.path)  # the terminal page renders too
    assert text.returncode == 0 and "no file open for writing" in text.stdout


def test_status_socket_is_for_the_mount_user_only(mount, tmp_path):
    [path] = find_sockets(str(mount.path))
    assert os.path.basename(path) == socket_name(str(mount.path))
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    if os.geteuid() != 0:
        return  # only root can become another user; the modes above are what protect it
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\n"
             "except PermissionError:\n    sys.exit(13)\n"
             "print(s.recv(100))\n")
    other = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    result = subprocess.run([*other, "/usr/bin/python3", "-c", probe, path],
                            capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 13, (result.stdout, result.stderr)
    # and the client as that user says so in one line, with a non-zero exit
    result = subprocess.run([*other, str(VENV_BIN / "s3stream"), "status", str(mount.path),
                             "--json"], capture_output=True,
                            text=True, timeout=30, cwd="/",
                            env={"PATH": os.environ["PATH"], "HOME": "/"})
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_status_without_a_mount_is_one_line(tmp_path):
    result = status(tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"s3stream status: {tmp_path} is not an s3stream mount"
    result = status(tmp_path / "missing")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def test_render_shows_files_and_totals():
    document = {"mountpoint": "/m", "source": "s3://b/", "pid": 1, "time": 0.0,
                "files": [{"name": "a.wav", "state": "writing", "size": 3 * MiB,
                           "bytes_written": 3 * MiB, "bytes_uploaded": MiB,
                           "parts_uploaded": 1, "parts_in_flight": 2, "bytes_per_s": MiB,
                           "retries": 1, "memory": 0, "seconds_open": 3.0}],
                "memory": {"used": MiB, "limit": 4 * MiB, "peak": 2 * MiB, "spills": 0},
                "uploads_in_flight": 2, "requests": {"UploadPart": 1},
                "errors": {"UploadPart 500": 1}, "retries": 1}
    page = render(document)
    assert "a.wav  writing  [######--------------] 3.0 MiB written" in page
    assert "1 parts uploaded, 2 in flight, 1.0 MiB/s, 1 retries" in page
    assert "errors: UploadPart 500 1" in page
    assert wait_until(lambda: True, 0)
