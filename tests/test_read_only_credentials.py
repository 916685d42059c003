"""Credentials or a bucket policy that allow reading but not writing are found at mount
(a probe PUT and DELETE where spills go, PREFIX.s3stream/spill/probe-ID, and where that is
refused, under PREFIX.s3stream/probe/) before the mount answers anything:
the mount comes up read-only with one WARNING line, writes answer EROFS at open instead of
EIO at close, or with on_read_only=refuse it is not mounted (one line, non-zero exit)."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import time

import pytest
from conftest import VENV_BIN, new_bucket
from fault_proxy import FaultProxy, refuse_method


@pytest.fixture
def read_only_server(seaweed):
    """The server behind a proxy that refuses every PUT, as a read-only policy does."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0) as proxy:
        proxy.refuse(refuse_method("PUT"))  # before the mount starts
        yield dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url), proxy


def test_read_only_credentials_mount_read_only_with_one_warning(seaweed, read_only_server,
                                                                mount_factory, tmp_path):
    server, proxy = read_only_server
    bucket = new_bucket(seaweed)
    seaweed.client().put_object(Bucket=bucket, Key="d/hello.txt", Body=b"hello")
    m = mount_factory(server, bucket=bucket)
    assert (m.path / "d" / "hello.txt").read_bytes() == b"hello"  # reads work
    source = tmp_path / "source.txt"
    source.write_bytes(b"data")
    result = subprocess.run(["cp", str(source), str(m.path / "d" / "new.txt")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr, result.stderr
    with pytest.raises(OSError) as caught:
        os.open(m.path / "other.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    assert caught.value.errno == errno.EROFS
    with pytest.raises(OSError) as caught:
        os.mkdir(m.path / "newdir")
    assert caught.value.errno == errno.EROFS
    log = m.log()
    warnings = [line for line in log.splitlines() if "read-only" in line and " WARNING " in line]
    assert len(warnings) == 1, log[-3000:]
    assert "refuse writes" in warnings[0] and "-o ro" in warnings[0]
    assert "spilling is off" not in log  # a read-only mount spills nothing, says nothing
    # only the probes were refused (the spill area's, then the prefix's): nothing else
    assert {target.split("/.s3stream/")[1].split("/")[0].split("-")[0]
            for _, target in proxy.refused} == {"spill", "probe"}, proxy.refused


def test_writes_ro_given_by_the_user_needs_no_probe(seaweed, read_only_server, mount_factory):
    server, proxy = read_only_server
    m = mount_factory(server, "ro", bucket=new_bucket(seaweed))
    assert os.listdir(m.path) == []
    assert proxy.refused == []
    assert "read-only" not in m.log()


def test_on_read_only_refuse_fails_the_mount_with_one_line(seaweed, read_only_server,
                                                          tmp_path):
    server, _ = read_only_server
    bucket = new_bucket(seaweed)
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [str(VENV_BIN / "mount.s3stream"), bucket, str(tmp_path / "mnt"),
         "-o", f"endpoint_url={server.endpoint_url},force_path_style,on_read_only=refuse"],
        env=server.env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 32, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "writes to" in lines[0] and "refused" in lines[0], lines
    assert "on_read_only=refuse" in lines[0]
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.expect_log_errors("AccessDenied")
def test_a_put_refused_later_answers_eacces_not_eio(seaweed, mount_factory):
    """The policy changes while mounted: a file's PUT is refused at close with EACCES."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0) as proxy:
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url))
        proxy.refuse(refuse_method("PUT"))
        fd = os.open(m.path / "late.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"data")
        with pytest.raises(OSError) as caught:
            os.close(fd)
        assert caught.value.errno == errno.EACCES, caught.value
        proxy.refuse(None)
        m.unmount()


def test_a_mount_sends_one_probe_and_leaves_no_folder_of_its_own(seaweed, mount_factory):
    """The start-up write probe is put where spills go and answers for spilling too: one PUT
    and one DELETE under .s3stream/ (no second probe of the spill area). SeaweedFS keeps the
    emptied folders .s3stream/spill/ and .s3stream/, shown to other clients: the unmount
    deletes them, and the bucket lists nothing."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    seen: list[tuple[str, str]] = []
    with FaultProxy(port, rate=0.0) as proxy:
        proxy.refuse(lambda method, target, headers: seen.append((method, target)) and False)
        through = dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url)
        m = mount_factory(through)
        assert os.listdir(m.path) == []
        time.sleep(1.0)  # the spill area's start-up work is done meanwhile
        ours = [(method, target.split("?")[0]) for method, target in seen
                if "/.s3stream/" in target and method in ("PUT", "DELETE")]
        assert [method for method, _ in ours] == ["PUT", "DELETE"], ours
        assert "spilling is off" not in m.log()
        assert m.unmount() == 0
    listing = seaweed.client().list_objects_v2(Bucket=m.bucket, Delimiter="/")
    assert not listing.get("CommonPrefixes") and not listing.get("Contents"), listing
