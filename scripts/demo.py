"""The demo: local SeaweedFS + bucket "demo" + a foreground mount at ./mnt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import botocore.config
import botocore.session

from s3fs_stream.local_server import start_local_server

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".s3stream-local"
MOUNTPOINT = ROOT / "mnt"
BUCKET = "demo"


def main() -> int:
    MOUNTPOINT.mkdir(exist_ok=True)
    if os.path.ismount(MOUNTPOINT):
        print(f"{MOUNTPOINT} is already mounted; unmount it first (fusermount3 -u mnt)")
        return 1
    server = start_local_server(DATA)
    try:
        env = dict(os.environ, **server.env())
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
            aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"}))
        buckets = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        if BUCKET not in buckets:
            client.create_bucket(Bucket=BUCKET)
        mount = subprocess.Popen(
            [str(Path(sys.executable).parent / "mount.s3stream"), BUCKET, str(MOUNTPOINT),
             "--foreground", "-o", f"endpoint_url={server.endpoint_url},force_path_style"],
            env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(MOUNTPOINT):
            if mount.poll() is not None or time.monotonic() > deadline:
                print("the mount did not start; see the messages above")
                return 1
            time.sleep(0.1)
        print(f"""
s3stream demo: bucket '{BUCKET}' on a local SeaweedFS ({server.endpoint_url}) is mounted at
  {MOUNTPOINT}   (data kept in {DATA})

Try, in another terminal:
  cp /etc/services mnt/ && ls -l mnt/ && cat mnt/services | head
  dd if=/dev/urandom of=mnt/big.bin bs=1M count=100      # streamed as 8 MiB parts while dd runs
  ffmpeg -f lavfi -i sine=d=10 mnt/tone.wav               # a recorder patching its header
  ffprobe mnt/tone.wav

See what reached S3 (the same bucket, through the S3 API):
  AWS_ACCESS_KEY_ID={server.access_key} AWS_SECRET_ACCESS_KEY={server.secret_key} \\
    .venv/bin/python -c "import botocore.session as s; c=s.get_session().create_client('s3', \\
    endpoint_url='{server.endpoint_url}', region_name='us-east-1'); \\
    [print(o['Key'], o['Size']) for o in c.list_objects_v2(Bucket='{BUCKET}').get('Contents', [])]"

Ctrl-C unmounts and stops the server.""", flush=True)
        try:
            mount.wait()
        except KeyboardInterrupt:
            mount.send_signal(signal.SIGINT)
            mount.wait(60)
        return 0
    finally:
        if os.path.ismount(MOUNTPOINT):
            subprocess.run(["fusermount3", "-u", str(MOUNTPOINT)], check=False)
        server.stop()
        print("demo stopped")


if __name__ == "__main__":
    sys.exit(main())
