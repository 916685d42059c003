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


def test_rsync_temporary_file_round_trips(far_seaweed, mount_factory):
    """rsync's sequence for a new file: stat of the name (missing), a temporary `.x.XXXX`
    created, written and closed, its times and mode set, then renamed over the name. The
    closed file's attributes are known from this mount's own PutObject (its ETag, its size,
    the metadata sent), so utimes and chmod ask nothing (a HEAD each before); the rename's
    target was just looked up missing by the kernel's LOOKUP, so the rename does not ask
    again (HEAD+LIST before). Six rounds: the stat, the temporary name's LOOKUP, the PUT,
    the target's LOOKUP, the CopyObject (carrying the deferred times and mode), the
    DeleteObject. Timeouts long enough that no entry expires between the steps."""
    m = mount_factory(far_seaweed, "attr_timeout=10", "entry_timeout=10",
                      bucket=new_bucket(far_seaweed))
    target, temporary = m.path / "x", m.path / ".x.AbCdEf"

    def rsync_one() -> None:
        assert not target.exists()  # the generator's check of the name
        with open(temporary, "wb") as f:
            f.write(b"y" * 4096)
        os.utime(temporary, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        os.chmod(temporary, 0o640)
        os.rename(temporary, target)

    run_with_timeout(lambda: (m.path / "warm").write_bytes(b""), 60, m.log)  # startup's
    before = len(m.log())                                                  # listings done
    run_with_timeout(rsync_one, 60, m.log)
    made = [r for r in requests(m.log()[before:]) if r[3].lstrip(".").startswith("x")]
    groups = rounds(made)
    assert [sorted(op.split()[0] for op in g) for g in groups] == [
        ["HeadObject", "ListObjectsV2"],   # stat x: missing
        ["HeadObject", "ListObjectsV2"],   # LOOKUP .x.AbCdEf before CREATE
        ["PutObject"],                     # close()
        ["HeadObject", "ListObjectsV2"],   # the rename's LOOKUP of x
        ["CopyObject"],                    # the rename, with the times and mode
        ["DeleteObject"]], groups
    head = m.client.head_object(Bucket=m.bucket, Key="x")
    assert head["ContentLength"] == 4096
    assert int(head["Metadata"]["mode"]) & 0o7777 == 0o640
    assert head["Metadata"]["mtime"] == "1600000000"
    st = os.stat(target)
    assert (st.st_size, st.st_mode & 0o7777, st.st_mtime_ns) == \
        (4096, 0o640, 1_600_000_000_000_000_000)


def test_mkdir_round_trips(far_seaweed, mount_factory):
    """mkdir of a new name: the kernel's LOOKUP just asked S3 (HEAD and LIST at once) and
    found nothing, so mkdir stores the marker without asking again (one more HEAD+LIST
    round before)."""
    m = mount_factory(far_seaweed, "attr_timeout=10", "entry_timeout=10",
                      bucket=new_bucket(far_seaweed))
    run_with_timeout(lambda: (m.path / "first").mkdir(), 60, m.log)  # how the server keeps
    before = len(m.log())                                             # markers is known
    run_with_timeout(lambda: (m.path / "d").mkdir(), 60, m.log)
    groups = rounds(requests(m.log()[before:]))
    assert len(groups) >= 2 and sorted(op.split()[0] for op in groups[0]) == \
        ["HeadObject", "ListObjectsV2"], groups
    assert all(op.split()[0] == "PutObject" for g in groups[1:] for op in g), groups
    assert m.client.head_object(Bucket=m.bucket, Key="d/")
