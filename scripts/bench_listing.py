"""`ls` / `ls -l` / `find` of 10,000 objects, a first and a second listing (1.5 s later),
for two checkouts of s3stream on one SeaweedFS in one sitting; requests counted from the
mounts' debug logs, the daemon's CPU from /proc. Run from a checkout:

    S3STREAM_CODES=main=/work/main,this=$PWD .venv/bin/python -m pytest -q -s \
        -p tests.conftest scripts/bench_listing.py
"""
import os
import re
import subprocess
import time
from pathlib import Path

from tests.bulk_put import put_many
from tests.conftest import new_bucket, start_mount

N = int(os.environ.get("S3STREAM_OBJECTS", "10000"))
CODES = dict(pair.split("=", 1) for pair in
             os.environ.get("S3STREAM_CODES", f"this={os.getcwd()}").split(","))


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def counts(text):
    c = {}
    for op in re.findall(r"S3 (\w+) s3://", text):
        c[op] = c.get(op, 0) + 1
    return c


def test_bench(seaweed, tmp_path):
    bucket = new_bucket(seaweed)
    put_many(seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key, bucket,
             [f"d/o{i:05d}" for i in range(N)],
             each=lambda k: (b"x" * (100 + int(k[3:]) % 9000),
                             {"mode": str(0o100600 + int(k[3:]) % 8), "uid": "1000",
                              "gid": "1000", "mtime": str(1_500_000_000 + int(k[3:]))}))
    time.sleep(2)
    rows = []
    for rnd in range(2):
        for code, root in CODES.items():
            os.environ["PYTHONPATH"] = root
            for name, cmd in [("ls", "ls {d} > /dev/null"), ("ls -l", "ls -ln {d} > /dev/null"),
                              ("find", "find {d} > /dev/null")]:
                tag = f"{code}-{name.replace(' ', '')}-{rnd}"
                m = start_mount(seaweed, bucket, tmp_path / f"mnt-{tag}", tmp_path / f"{tag}.log")
                try:
                    for which in ("first", "second"):
                        if which == "second":
                            time.sleep(1.5)  # attr_timeout (1 s) has passed
                        before_log, before_cpu = counts(m.log()), cpu(m.process.pid)
                        t = time.monotonic()
                        subprocess.run(["sh", "-c", cmd.format(d=m.path / "d")], check=True,
                                       timeout=600)
                        took = time.monotonic() - t
                        after = counts(m.log())
                        req = {k: after.get(k, 0) - before_log.get(k, 0) for k in after}
                        req = {k: v for k, v in req.items() if v}
                        rows.append(f"{rnd} {code:8} {name:6} {which:6} {took:6.2f} s  "
                                    f"cpu {cpu(m.process.pid) - before_cpu:5.2f} s  {req}")
                        print(rows[-1], flush=True)
                finally:
                    m.unmount()
    Path(tmp_path / "result.txt").write_text("\n".join(rows) + "\n")
