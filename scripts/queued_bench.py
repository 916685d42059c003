"""cp -r of many small files into a mount, with `-o queued_uploads` and without, optionally
through a loopback delay proxy (issue 20). Until `scripts/bench --rtt` measures it:

    python scripts/queued_bench.py [--files 1000] [--rtt-ms 20] [--delay-proxy PATH]

Starts SeaweedFS, a delay proxy (PATH: a delay_proxy.py printing `port=N`, see
scripts/bench --rtt) when --rtt-ms > 0, then for each mode mounts a fresh bucket, times
`cp -r` of the files and then `sync DIR` (which waits for every queued upload), and prints
files/s for both and the daemon's CPU seconds."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from s3fs_stream.local_server import start_local_server  # noqa: E402

BIN = os.path.dirname(sys.executable)


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(files: int, rtt_ms: float, delay_proxy: str | None, modes: list[str],
        extra: list[str], log_dir: str | None) -> None:
    import botocore.session

    with tempfile.TemporaryDirectory(prefix="qbench-") as work:
        src = os.path.join(work, "src")
        os.makedirs(src)
        for i in range(files):
            with open(os.path.join(src, f"f{i:04d}"), "wb") as f:
                f.write(os.urandom(4096))
        server = start_local_server(os.path.join(work, "weed"))
        proxy = None
        endpoint = server.endpoint_url
        try:
            if rtt_ms:
                proxy = subprocess.Popen(
                    [sys.executable, delay_proxy, "--upstream",
                     endpoint.removeprefix("http://"), "--rtt-ms", str(rtt_ms)],
                    stdout=subprocess.PIPE, text=True)
                port = proxy.stdout.readline().strip().removeprefix("port=")
                if not port.isdigit():
                    raise SystemExit(f"the delay proxy {delay_proxy} did not start")
                endpoint = f"http://127.0.0.1:{port}"
            env = {**os.environ, **server.env()}
            s3 = botocore.session.get_session().create_client(
                "s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key)
            for mode in modes:
                bucket = f"qbench-{mode}-{int(time.time())}"
                s3.create_bucket(Bucket=bucket)
                mnt = os.path.join(work, f"mnt-{mode}")
                os.makedirs(mnt)
                options = [f"endpoint_url={endpoint}", "force_path_style",
                           f"log_file={log_dir or work}/{mode}.log", *extra]
                if mode == "queued":
                    options.append("queued_uploads")
                daemon = subprocess.Popen([os.path.join(BIN, "mount.s3stream"), bucket, mnt,
                                           "--foreground", "-o", ",".join(options)], env=env)
                while not os.path.ismount(mnt):
                    time.sleep(0.05)
                time.sleep(0.5)
                before = cpu(daemon.pid)
                start = time.monotonic()
                subprocess.run(["cp", "-r", src, os.path.join(mnt, "small")], check=True)
                copied = time.monotonic() - start
                subprocess.run(["sync", os.path.join(mnt, "small")], check=True)
                synced = time.monotonic() - start
                used = cpu(daemon.pid) - before
                keys = s3.list_objects_v2(Bucket=bucket, Prefix="small/")["KeyCount"]
                subprocess.run(["fusermount3", "-u", mnt], check=True)
                daemon.wait(120)
                print(f"{mode:8s} rtt {rtt_ms:g} ms: cp -r {files / copied:7.1f} files/s "
                      f"({copied:.2f} s), cp -r + sync DIR {files / synced:7.1f} files/s "
                      f"({synced:.2f} s), daemon CPU {used:.2f} s, objects listed {keys}",
                      flush=True)
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(10)
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--delay-proxy", default=os.path.join(ROOT, "tests",
                                                              "delay_proxy.py"))
    parser.add_argument("--modes", default="default,queued")
    parser.add_argument("-o", dest="options", default="", help="more mount options")
    parser.add_argument("--log-dir", help="keep the mounts' logs here")
    args = parser.parse_args()
    run(args.files, args.rtt_ms, args.delay_proxy, args.modes.split(","),
        [o for o in args.options.split(",") if o], args.log_dir)


if __name__ == "__main__":
    main()
