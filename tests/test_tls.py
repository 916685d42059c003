"""https endpoints: a TLS-terminating proxy with a test CA (trustme) in front of SeaweedFS,
trusted through AWS_CA_BUNDLE as users trust a private endpoint. botocore and the mount's
own connections (direct_requests.py) both verify it; nothing falls back."""

from __future__ import annotations

import dataclasses
import os
import ssl
import subprocess

import pytest
import trustme
from conftest import VENV_BIN, new_bucket
from fault_proxy import FaultProxy

MiB = 1024 * 1024


@pytest.fixture
def tls_endpoint(seaweed, tmp_path, monkeypatch):
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))  # for botocore here and the mounts
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0, tls=context) as proxy:
        yield dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url), proxy


def test_a_mount_over_https_uses_its_own_verified_connections(seaweed, tls_endpoint,
                                                              mount_factory):
    server, proxy = tls_endpoint
    assert server.endpoint_url.startswith("https://")
    m = mount_factory(server)
    (m.path / "d").mkdir()
    for i in range(20):
        (m.path / "d" / f"f{i:02d}").write_bytes(f"file {i}".encode())
    big = os.urandom(20 * MiB + 7)
    (m.path / "d" / "big").write_bytes(big)
    os.chmod(m.path / "d" / "f00", 0o600)
    listing = sorted(os.listdir(m.path / "d"))
    assert listing == ["big"] + [f"f{i:02d}" for i in range(20)]
    assert [os.stat(m.path / "d" / name).st_size for name in listing[1:]] == \
        [len(f"file {i}") for i in range(20)]
    assert (m.path / "d" / "big").read_bytes() == big
    assert m.unmount() == 0
    direct = seaweed.client()  # plain http to the server itself
    assert direct.get_object(Bucket=m.bucket, Key="d/big")["Body"].read() == big
    assert direct.head_object(Bucket=m.bucket, Key="d/f00")["Metadata"]["mode"] == \
        str(0o100600)
    log = m.log()
    assert "PutObject" in log and "HeadObject" in log and proxy.requests > 20
    assert "through botocore" not in log and "no answer" not in log


def test_an_untrusted_certificate_is_refused_before_mounting(seaweed, tls_endpoint,
                                                             monkeypatch, tmp_path):
    """Without the CA the endpoint is not trusted: the mount refuses to start, with one line
    that says why, and mounts nothing."""
    server, _ = tls_endpoint
    bucket = new_bucket(server)
    monkeypatch.delenv("AWS_CA_BUNDLE")
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [str(VENV_BIN / "mount.s3stream"), bucket, str(tmp_path / "mnt"),
         "-o", f"endpoint_url={server.endpoint_url},force_path_style"],
        env=server.env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "certificate" in result.stderr.lower() and "AWS_CA_BUNDLE" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")
