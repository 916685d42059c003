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


def _mount_writes_and_reads(m, proxy) -> None:
    """Both ways to the server work over https: nothing falls back to botocore."""
    for i in range(5):
        (m.path / f"f{i}").write_bytes(f"file {i}".encode())
    assert sorted(os.listdir(m.path)) == [f"f{i}" for i in range(5)]
    assert (m.path / "f3").read_bytes() == b"file 3"
    assert m.unmount() == 0
    log = m.log()
    assert "PutObject" in log and "HeadObject" in log and proxy.requests > 5
    assert "through botocore" not in log and "no answer" not in log, log[-3000:]


def test_the_ca_bundle_of_the_config_file_serves_both_ways(seaweed, tls_endpoint,
                                                           mount_factory, monkeypatch,
                                                           tmp_path):
    """`ca_bundle` in the botocore config file (AWS_CONFIG_FILE), not the environment: the
    mount's own connections trust what botocore trusts."""
    server, proxy = tls_endpoint
    bundle = os.environ["AWS_CA_BUNDLE"]
    monkeypatch.delenv("AWS_CA_BUNDLE")
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nca_bundle = {bundle}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    _mount_writes_and_reads(mount_factory(server, bucket=new_bucket(seaweed)), proxy)


def test_a_client_certificate_is_presented_both_ways(seaweed, tmp_path, monkeypatch,
                                                     mount_factory):
    """An endpoint that requires a client certificate (mutual TLS): client_cert is given to
    botocore and to the mount's own connections alike."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # no certificate, no connection
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    client = ca.issue_cert("s3stream-client")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0, tls=context) as proxy:
        server = dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url)
        m = mount_factory(server, f"client_cert={cert}", f"client_key={key}",
                          bucket=new_bucket(seaweed))
        _mount_writes_and_reads(m, proxy)


@pytest.mark.parametrize(("no_proxy", "direct"), [("", False), ("127.0.0.1", True),
                                                   ("example.com,127.0.0.1", True),
                                                   ("example.com", False)])
def test_a_proxy_keeps_the_direct_way_off_unless_no_proxy_excludes_the_endpoint(
        monkeypatch, no_proxy, direct):
    """The proxy is botocore's (HTTP(S)_PROXY with NO_PROXY applied as botocore applies
    it): where botocore goes through the proxy, so does every request."""
    from s3fs_stream.botocore_store import BotocoreStore
    from s3fs_stream.config import StoreConfig

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                 "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    if no_proxy:
        monkeypatch.setenv("NO_PROXY", no_proxy)
    store = BotocoreStore(StoreConfig(bucket="b", endpoint_url="http://127.0.0.1:9",
                                      force_path_style=True, region="us-east-1"))
    assert (store._direct is not None) == direct
