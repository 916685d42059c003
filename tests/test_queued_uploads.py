"""`-o queued_uploads` (issue 20): close() of a file of one part returns once its bytes are
held in memory and its PutObject runs in the background. Real mounts on SeaweedFS through
tests/fault_proxy.py, whose `hold` keeps the PUTs waiting while the test looks at the file:
close returns, the name behaves (stat, ls, read, append, rename, unlink), fsync, `sync DIR`
and unmount (fusermount, SIGTERM) wait for the upload, a failed upload is logged, shown by
`s3stream status` and reported by the next fsync or close, memory stays in the budget."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import threading
import time

import pytest
from botocore.exceptions import ClientError
from conftest import run_with_timeout, status_document, wait_until
from fault_proxy import FaultProxy, refuse_method

KiB, MiB = 1024, 1024 * 1024


def puts_of(key_part: str):
    """A proxy rule: PutObject requests of keys containing `key_part` (not the mount's probe
    or its spill area)."""
    return lambda method, target, headers: method == "PUT" and key_part in target \
        and "x-amz-copy-source" not in headers and ".s3stream" not in target


@pytest.fixture
def proxy(seaweed):
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0) as proxy:
        yield proxy
        proxy.let_go()


@pytest.fixture
def queued(seaweed, proxy, mount_factory):
    """A mount with queued uploads, through the proxy."""
    return mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                         "queued_uploads")


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def stored(m, key: str) -> bytes | None:
    try:
        return m.get(key)
    except ClientError:
        return None


def in_thread(fn) -> tuple[threading.Thread, list]:
    """Run `fn` in a thread; the list gets its result or its exception."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_close_returns_before_the_upload_and_the_name_behaves(queued, proxy):
    m = queued
    data = os.urandom(4 * KiB + 5)
    proxy.hold(puts_of("held.bin"))
    run_with_timeout(lambda: write_file(m.path / "held.bin", data), 10, m.log)
    assert wait_until(lambda: proxy.held, 5), "the PUT never reached the proxy"
    assert stored(m, "held.bin") is None  # close returned, the PUT is still held
    # stat, ls, read meanwhile: from memory
    assert os.stat(m.path / "held.bin").st_size == len(data)
    assert "held.bin" in os.listdir(m.path)
    assert run_with_timeout(lambda: (m.path / "held.bin").read_bytes(), 10, m.log) == data
    assert [e["state"] for e in status_document(m.path)["files"]] == ["queued"]
    # fsync waits for the upload
    fd = os.open(m.path / "held.bin", os.O_RDONLY)
    try:
        thread, outcome = in_thread(lambda: os.fsync(fd))
        time.sleep(1.0)
        assert not outcome, "fsync returned before the upload was done"
        proxy.let_go()
        thread.join(10)
        assert outcome == [None]
    finally:
        os.close(fd)
    assert stored(m, "held.bin") == data


def test_append_rename_unlink_of_queued_files_wait_for_their_upload(queued, proxy):
    m = queued
    # page-aligned: the kernel appends without reading the last page first (a read that
    # would wait for the upload on its own)
    first, more = os.urandom(4 * KiB), os.urandom(2000)
    proxy.hold(puts_of("q-"))
    for name in ("q-append", "q-rename", "q-unlink"):
        run_with_timeout(lambda name=name: write_file(m.path / name, first), 10, m.log)

    def append() -> None:
        with open(m.path / "q-append", "ab") as f:
            f.write(more)
    jobs = [in_thread(append), in_thread(lambda: os.rename(m.path / "q-rename",
                                                           m.path / "q-renamed")),
            in_thread(lambda: os.unlink(m.path / "q-unlink"))]
    time.sleep(1.0)
    assert stored(m, "q-append") is None and stored(m, "q-renamed") is None
    proxy.let_go()
    for thread, outcome in jobs:
        thread.join(20)
        assert outcome == [None], outcome
    assert wait_until(lambda: stored(m, "q-append") == first + more, 10)
    assert (m.path / "q-append").read_bytes() == first + more
    assert stored(m, "q-renamed") == first and stored(m, "q-rename") is None
    assert stored(m, "q-unlink") is None
    assert sorted(os.listdir(m.path)) == ["q-append", "q-renamed"]


def test_sync_of_the_directory_waits_for_every_queued_upload(queued, proxy):
    m = queued
    (m.path / "d").mkdir()
    files = {f"d/f{i}": os.urandom(100 + i) for i in range(20)}
    proxy.hold(puts_of("/d/f"))
    for name, data in files.items():
        run_with_timeout(lambda name=name, data=data: write_file(m.path / name, data), 10,
                         m.log)
    thread, outcome = in_thread(lambda: subprocess.run(["sync", str(m.path / "d")],
                                                       check=True, timeout=60))
    time.sleep(1.0)
    assert not outcome, "sync DIR returned before the uploads were done"
    assert all(stored(m, name) is None for name in files)
    proxy.let_go()
    thread.join(30)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert {name: stored(m, name) for name in files} == files


@pytest.mark.parametrize("how", ["fusermount", "sigterm"])
def test_unmount_waits_for_every_queued_upload(queued, proxy, how):
    m = queued
    files = {f"u{i}": os.urandom(4 * KiB) for i in range(50)}
    proxy.hold(puts_of("/u"))
    for name, data in files.items():
        run_with_timeout(lambda name=name, data=data: write_file(m.path / name, data), 10,
                         m.log)
    assert stored(m, "u0") is None
    if how == "sigterm":
        m.process.send_signal(signal.SIGTERM)
    else:
        subprocess.run(["fusermount3", "-u", str(m.path)], capture_output=True, check=True)
    time.sleep(1.5)
    assert m.process.poll() is None, "the mount exited with uploads still queued"
    proxy.let_go()
    assert m.process.wait(60) == 0
    assert {name: stored(m, name) for name in files} == files
    assert "waiting for 50 queued upload(s)" in m.log()


@pytest.mark.expect_log_errors("its queued upload failed")
def test_a_failed_upload_is_logged_shown_and_reported(queued, proxy):
    m = queued
    proxy.refuse(refuse_method("PUT", "/fails"))
    # closed for good: the next close of the name reports it
    write_file(m.path / "fails", b"lost")  # close returns: the upload is queued
    assert wait_until(lambda: "its queued upload failed" in m.log(), 20), m.log()[-2000:]
    errors = [line for line in m.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "fails" in errors[0] and "write the file again" in errors[0]
    queue = status_document(m.path)["queued_uploads"]
    assert queue["failed"] == 1 and queue["recent_failures"][0]["name"] == "fails"
    assert wait_until(lambda: status_document(m.path)["queued_uploads"]["unreported"] == ["fails"],
                      10)
    proxy.refuse(None)
    with pytest.raises(OSError) as info:
        write_file(m.path / "fails", b"again")
    assert info.value.errno == errno.EACCES
    # the new bytes are queued and stored all the same; the failure is reported once
    assert wait_until(lambda: stored(m, "fails") == b"again", 10)
    write_file(m.path / "fails", b"third")
    assert wait_until(lambda: stored(m, "fails") == b"third", 10)


@pytest.mark.expect_log_errors("its queued upload failed")
def test_a_failed_upload_of_a_file_still_open_fails_its_fsync(queued, proxy):
    m = queued
    proxy.refuse(refuse_method("PUT", "/open"))
    reader = os.open(m.path / "open", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        write_file(m.path / "open", b"data")  # another descriptor: its close queues
        assert wait_until(lambda: "its queued upload failed" in m.log(), 20)
        with pytest.raises(OSError) as info:
            os.fsync(reader)
        assert info.value.errno == errno.EACCES
    finally:
        try:
            os.close(reader)
        except OSError:
            pass


def test_queued_files_stay_inside_the_memory_budget(seaweed, proxy, mount_factory):
    """Queued files hold their bytes in the budget: with the PUTs held, writers wait for
    room once it is full, and go on as uploads end."""
    m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                      "queued_uploads", "max_memory=10M", "part_size=5M")
    files = {f"m{i}": os.urandom(MiB) for i in range(20)}
    proxy.hold(puts_of("/m"))
    written: list[str] = []

    def write_all() -> None:
        for name, data in files.items():
            write_file(m.path / name, data)
            written.append(name)
    thread, outcome = in_thread(write_all)
    assert wait_until(lambda: len(proxy.held) >= 5, 20)
    time.sleep(1.0)
    assert len(written) < len(files), "every file was queued: memory beyond the budget"
    memory = status_document(m.path)["memory"]
    assert memory["used"] <= memory["limit"] and memory["peak"] <= memory["limit"]
    proxy.let_go()
    thread.join(60)
    assert outcome == [None], outcome
    assert wait_until(lambda: all(stored(m, n) == d for n, d in files.items()), 30)
    assert status_document(m.path)["memory"]["peak"] <= 10 * MiB
