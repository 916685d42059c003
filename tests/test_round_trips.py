"""Round trips to S3 per operation, counted on a real mount behind a delay proxy.

When S3 is far away, time goes by round trips, not requests: `cp -r` of small files pays
every sequential request of every file. The mount (log_level=debug) logs each request with
its end time and duration; with a 300 ms round trip added on loopback, requests that went
one after the other cannot overlap, and requests sent together always do, so the rounds an
operation took are the groups of overlapping requests.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import time

import pytest
from conftest import new_bucket, run_with_timeout
from delay_proxy import spawn

RTT_MS = 300
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG \S+ S3 (\w+) s3://[^/]+/(\S*) "
                  r"-> \S+ in ([\d.]+) ms")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def far_seaweed(seaweed):
    """The session's SeaweedFS as seen through a delay proxy: +RTT_MS per round trip."""
    proc, url = spawn(seaweed.endpoint_url, RTT_MS)
    try:
        yield dataclasses.replace(seaweed, endpoint_url=url)
    finally:
        proc.terminate()
        proc.wait(10)


def requests(log: str) -> list[tuple[float, float, str, str]]:
    """(start, end, operation, key) of each S3 request the log shows, seconds."""
    out = []
    for line in log.splitlines():
        m = LINE.match(line)
        if m:
            end = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((end - float(m[4]) / 1000, end, m[2], m[3]))
    return out


def rounds(reqs: list[tuple[float, float, str, str]]) -> list[list[str]]:
    """The requests in groups that overlapped in time (one round trip each), in order."""
    groups: list[list[str]] = []
    group_end = None
    for start, end, op, key in sorted(reqs):
        if group_end is None or start >= group_end - 0.002:  # the log's ms rounding
            groups.append([])
            group_end = end
        groups[-1].append(f"{op} {key}")
        group_end = max(group_end, end)
    return groups


def test_small_file_and_directory_revalidation_round_trips(far_seaweed, mount_factory):
    """A new small file costs two rounds (the kernel's LOOKUP of the new name: HEAD and
    LIST at once, since a name must not be answered missing without asking S3; then the
    PutObject close() waits for), and nothing else. A directory whose entry expired, as the
    kernel asks every entry timeout while `cp -r` walks into it, costs one round: its
    marker's attributes (on SeaweedFS, which drops a marker's metadata, also the mount's own
    copy of them) are asked for together with the listing that proves it still exists,
    not after it (three rounds before)."""
    m = mount_factory(far_seaweed, "attr_timeout=0.5", "entry_timeout=0.5",
                      bucket=new_bucket(far_seaweed))
    d = m.path / "d"

    def make_dir_and_file() -> None:
        d.mkdir()
        with open(d / "f0", "wb") as f:  # the first marker tells whether the server keeps
            f.write(b"x" * 4096)         # its metadata: the revalidation below knows

    run_with_timeout(make_dir_and_file, 60, m.log)

    before = len(m.log())
    run_with_timeout(lambda: (d / "f1").write_bytes(os.urandom(4096)), 60, m.log)
    made = [r for r in requests(m.log()[before:]) if r[3].startswith("d/f1")]
    assert sorted(op for _, _, op, _ in made) == ["HeadObject", "ListObjectsV2",
                                                  "PutObject"], made
    assert len(rounds(made)) == 2, rounds(made)

    time.sleep(1.0)  # the entry and attributes of d expired
    before = len(m.log())
    run_with_timeout(lambda: os.stat(d), 60, m.log)
    asked = requests(m.log()[before:])
    keys = sorted(key for _, _, _, key in asked)
    assert keys == [".s3stream/dirs/d", "d", "d/", "d/"], asked  # HEADs of d, d/, the
    assert len(rounds(asked)) == 1, rounds(asked)                 # copy; LIST of d/
    assert m.client.head_object(Bucket=m.bucket, Key="d/f1")["ContentLength"] == 4096
