"""The mount.s3stream command as users and mount(8) run it: exit codes, messages, processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
from conftest import VENV_BIN, bucket_with, fuse_available, new_bucket, require, wait_until

from s3fs_stream.local_server import free_port

MOUNT = str(VENV_BIN / "mount.s3stream")


@pytest.fixture
def mountpoint(tmp_path):
    require(fuse_available(), "/dev/fuse and fusermount3")
    path = tmp_path / f"mnt-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def opts(server, *extra: str) -> str:
    return ",".join([f"endpoint_url={server.endpoint_url}", "force_path_style", *extra])


def run_cli(args: list[str], env: dict, mountpoint=None, timeout: float = 90):
    result = subprocess.run([MOUNT, *args], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    if mountpoint is not None and os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    return result


def daemon_pids(mountpoint) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(mountpoint)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


def assert_one_line_failure(result, *words: str) -> None:
    assert result.returncode != 0, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    text = lines[0].lower()
    assert any(w in text for w in words), f"{words} not in {lines[0]!r}"


def test_no_such_bucket(seaweed, mountpoint):
    bucket = f"missing-{uuid.uuid4().hex[:10]}"
    result = run_cli([bucket, str(mountpoint), "-o", opts(seaweed)], seaweed.env(), mountpoint)
    assert_one_line_failure(result, "no such bucket")
    assert not os.path.ismount(mountpoint)


def test_bad_credentials(seaweed, mountpoint):
    bucket = new_bucket(seaweed)
    env = seaweed.env()
    env["AWS_SECRET_ACCESS_KEY"] = "definitely-wrong-secret"
    result = run_cli([bucket, str(mountpoint), "-o", opts(seaweed)], env, mountpoint)
    assert_one_line_failure(result, "access denied")
    assert not os.path.ismount(mountpoint)


def test_unreachable_endpoint(seaweed, mountpoint):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli(["bucket", str(mountpoint), "-o",
                      f"endpoint_url={url},force_path_style,retries=1"], seaweed.env(),
                     mountpoint, timeout=60)
    assert_one_line_failure(result, "unreachable")
    assert time.monotonic() - started < 45
    assert not os.path.ismount(mountpoint)


def test_missing_mountpoint(seaweed, tmp_path):
    bucket = new_bucket(seaweed)
    missing = tmp_path / "does-not-exist"
    result = run_cli([bucket, str(missing), "-o", opts(seaweed)], seaweed.env())
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not missing.exists() or not os.path.ismount(missing)


@pytest.mark.timeout(60)
def test_failed_fuse_mount_is_one_line_exit_32(seaweed, mountpoint):
    """pyfuse3.init fails (here: /dev/fuse is /dev/null, in a mount namespace of the test's
    own): mount(8)'s exit code 32 and one line, in both modes, not an exception group."""
    require(shutil.which("unshare") is not None and os.geteuid() == 0,
            "unshare(1) and root for a private mount namespace")
    bucket = new_bucket(seaweed)
    log_file = mountpoint.parent / "init-failure.log"
    for mode in ([], ["--foreground"]):
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount --bind /dev/null /dev/fuse && exec "$@"', "sh",
             MOUNT, bucket, str(mountpoint), *mode, "-o", opts(seaweed, f"log_file={log_file}")],
            env=seaweed.env(), capture_output=True, text=True, timeout=50)
        assert result.returncode == 32, (mode, result.stderr)
        ours = [line for line in result.stderr.splitlines() if not line.startswith("fuse: ")]
        assert len(ours) == 1 and "cannot mount on" in ours[0], (mode, result.stderr)
    assert "Traceback" not in log_file.read_text()


def test_unknown_option_is_usage_error(seaweed, mountpoint):
    bucket = new_bucket(seaweed)
    result = run_cli([bucket, str(mountpoint), "-o", opts(seaweed, "bogus_option=1")],
                     seaweed.env(), mountpoint)
    assert result.returncode == 2, result
    assert "bogus_option" in result.stderr
    for valid in ("endpoint_url", "region", "log_file", "uid"):
        assert valid in result.stderr, result.stderr
    assert not os.path.ismount(mountpoint)


def test_generic_mount8_options_with_fake(seaweed, mountpoint):
    bucket = new_bucket(seaweed)
    result = run_cli([bucket, str(mountpoint), "-f", "-o",
                      opts(seaweed, "rw", "_netdev", "nofail", "defaults",
                           "x-systemd.automount")], seaweed.env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    assert daemon_pids(mountpoint) == []


def test_daemon_mode_ready_then_unmount_leaves_no_process(seaweed, mountpoint, tmp_path):
    bucket = new_bucket(seaweed)
    seaweed.client().put_object(Bucket=bucket, Key="hello", Body=b"hi")
    log_file = tmp_path / "daemon.log"
    result = subprocess.run([MOUNT, bucket, str(mountpoint), "-o",
                             opts(seaweed, f"log_file={log_file}")], env=seaweed.env(),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=60)
    pids = daemon_pids(mountpoint)
    try:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        # ready at once, no polling
        assert os.path.ismount(mountpoint)
        assert os.listdir(mountpoint) == ["hello"]
        assert (mountpoint / "hello").read_bytes() == b"hi"
        assert len(pids) == 1, pids
        unmount = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                                 text=True)
        assert unmount.returncode == 0, unmount.stderr
        deadline = time.monotonic() + 15
        while daemon_pids(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon_pids(mountpoint) == [], "daemon still running after unmount"
        assert not os.path.ismount(mountpoint)
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        assert "Traceback" not in text, text[-3000:]
    finally:
        for pid in daemon_pids(mountpoint):
            if pid in pids:  # only the daemon this test started
                os.kill(pid, signal.SIGKILL)


def test_foreground_sigterm_exits_zero_and_unmounts(seaweed, mountpoint):
    bucket = new_bucket(seaweed)
    process = subprocess.Popen([MOUNT, bucket, str(mountpoint), "--foreground", "-o",
                                opts(seaweed)], env=seaweed.env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "not mounted within 30 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert "Traceback" not in err and "Traceback" not in out, err
        assert not os.path.ismount(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bucket_prefix_mounts_only_the_prefix(seaweed, mount_factory):
    bucket = new_bucket(seaweed)
    client = seaweed.client()
    for key in ("pre/a", "pre/sub/b", "other/c", "top", "prefix-lookalike/d"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    m = mount_factory(seaweed, bucket=bucket, source=f"{bucket}:pre")
    assert sorted(os.listdir(m.path)) == ["a", "sub"]
    assert (m.path / "a").read_bytes() == b"pre/a"
    assert os.listdir(m.path / "sub") == ["b"]
    assert (m.path / "sub/b").read_bytes() == b"pre/sub/b"
    assert not (m.path / "other").exists()


def kill_own(pids: list[int], mountpoint) -> None:
    """SIGKILL what is left of the daemons this test started (their PIDs, taken earlier)."""
    for pid in daemon_pids(mountpoint):
        if pid in pids:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("abstract", [False, True])
def test_systemd_notify_ready_once_mounted(seaweed, mountpoint, tmp_path, abstract):
    """Type=notify: READY=1 arrives on $NOTIFY_SOCKET only when the mount is usable."""
    bucket = bucket_with(seaweed, {"hello": b"hi"})
    name = f"@s3stream-notify-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(30)
        env = dict(seaweed.env(), NOTIFY_SOCKET=name)
        process = subprocess.Popen([MOUNT, bucket, str(mountpoint), "--foreground", "-o",
                                    opts(seaweed)], env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            message = sock.recv(200)
            assert message == b"READY=1"
            assert os.path.ismount(mountpoint)
            assert os.listdir(mountpoint) == ["hello"]
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
            assert process.returncode == 0, err
            assert "Traceback" not in err and " WARNING " not in err, err
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def sbin_helper():
    """/sbin/mount.s3stream, where mount(8) looks for the helper, installed by
    `s3stream install-helper` for this test and removed afterwards (a symlink that was
    there before is put back)."""
    require(os.geteuid() == 0, "root: the test installs /sbin/mount.s3stream and runs mount(8)")
    require(shutil.which("mount") is not None and shutil.which("umount") is not None,
            "mount(8) and umount(8) from util-linux")
    link = "/sbin/mount.s3stream"
    previous = os.readlink(link) if os.path.islink(link) else None
    if os.path.lexists(link) and previous is None:
        pytest.fail(f"{link} is a file, not a symlink: not replacing it")
    result = subprocess.run([str(VENV_BIN / "s3stream"), "install-helper", "--force"],
                            capture_output=True, text=True, timeout=30)
    try:
        assert result.returncode == 0, result.stderr
        assert os.path.realpath(link) == os.path.realpath(MOUNT)
        yield link
    finally:
        if os.path.lexists(link):
            os.unlink(link)
        if previous is not None:
            os.symlink(previous, link)


def object_reader(server, bucket: str, prefix: str = ""):
    client = server.client()
    return lambda name: client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()


def check_mount8_result(result, mountpoint, stored, log_file) -> None:
    """mount(8) returned once the daemonized helper was ready: usable at once; umount(8)
    ends the daemon; the log is clean. `stored(name)`: the object behind a file name."""
    pids = daemon_pids(mountpoint)
    try:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert os.path.ismount(mountpoint)
        assert len(pids) == 1, pids
        assert sorted(os.listdir(mountpoint)) == ["hello"]
        (mountpoint / "new.txt").write_bytes(b"written through mount(8)")
        assert stored("new.txt") == b"written through mount(8)"
        unmount = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True,
                                 timeout=30)
        assert unmount.returncode == 0, unmount.stderr
        assert wait_until(lambda: not daemon_pids(mountpoint), 15), "daemon still running"
        assert not os.path.ismount(mountpoint)
        text = log_file.read_text(errors="replace")
        assert "mounted s3://" in text and "unmounted" in text, text
        assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    finally:
        kill_own(pids, mountpoint)


def test_mount_t_s3stream_through_mount8(seaweed, mountpoint, sbin_helper, tmp_path):
    """mount -t s3stream BUCKET DIR -o ...: mount(8) runs /sbin/mount.s3stream with the
    options it keeps (adding rw,noexec,nosuid,nodev for `user`) and our environment."""
    bucket = bucket_with(seaweed, {"hello": b"hi"})
    log_file = tmp_path / "mount8.log"
    options = opts(seaweed, f"log_file={log_file}", "_netdev", "nofail", "x-systemd.automount",
                   "user")
    result = subprocess.run(["mount", "-t", "s3stream", bucket, str(mountpoint), "-o", options],
                            env=seaweed.env(), capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    check_mount8_result(result, mountpoint, object_reader(seaweed, bucket), log_file)


def test_fstab_line_through_mount8(seaweed, mountpoint, sbin_helper, tmp_path):
    """An /etc/fstab line, from a temporary fstab (mount -T) so the real one is untouched."""
    bucket = bucket_with(seaweed, {"pre/hello": b"hi", "outside": b"no"})
    log_file = tmp_path / "fstab.log"
    fstab = tmp_path / "fstab"
    options = opts(seaweed, f"log_file={log_file}", "_netdev", "nofail", "noauto", "user",
                   "x-systemd.automount", "x-systemd.mount-timeout=30")
    fstab.write_text(f"# s3stream test\n{bucket}:pre  {mountpoint}  s3stream  {options}  0  0\n")
    result = subprocess.run(["mount", "-T", str(fstab), str(mountpoint)], env=seaweed.env(),
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    check_mount8_result(result, mountpoint, object_reader(seaweed, bucket, "pre/"), log_file)


def test_bad_option_through_mount8_is_one_line(mountpoint, sbin_helper):
    result = subprocess.run(["mount", "-t", "s3stream", "bucket", str(mountpoint), "-o",
                             "uid=no-such-user-here"], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "mount.s3stream: option uid: no user named 'no-such-user-here' (give a user name or a "
        "numeric id)"], result.stderr
    assert not os.path.ismount(mountpoint)
