"""A bucket in another region, S3 Express directory buckets, requester-pays buckets (issue 18).

The fault proxy plays a bucket "in another region": a request signed for any other region
gets S3's 301 PermanentRedirect or 400 AuthorizationHeaderMalformed with
`x-amz-bucket-region`. The mount must find the region once and sign every later request,
direct and botocore alike, for it: no request of its own sent again through botocore.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest
import trio
from conftest import VENV_BIN, bucket_with, status_document
from fault_proxy import FaultProxy

from s3fs_stream.botocore_store import BotocoreStore, moved_to
from s3fs_stream.config import StoreConfig
from s3fs_stream.direct_requests import Response

BUCKET_REGION = "eu-central-1"


def use_the_mount(m) -> None:
    """`ls -l`, a small file (direct PUT) and a 3 MiB one (botocore PutObject) written,
    read back and removed; every result checked."""
    listing = subprocess.run(["ls", "-l", m.path / "listed"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    sizes = sorted(int(line.split()[4]) for line in listing.splitlines()[1:])
    assert sizes == [100 + i for i in range(20)]
    small, large = os.urandom(5000), os.urandom(3 * 1024 * 1024 + 7)
    (m.path / "small").write_bytes(small)
    (m.path / "large").write_bytes(large)
    assert (m.path / "small").read_bytes() == small and m.get("small") == small
    assert (m.path / "large").read_bytes() == large and m.get("large") == large
    os.remove(m.path / "small")
    os.remove(m.path / "large")
    assert "small" not in m.keys() and "large" not in m.keys()


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("answer,given_region", [("301", None), ("400", None),
                                                 ("301", "us-west-2")])
def test_a_bucket_in_another_region_is_found_once(seaweed, mount_factory, answer,
                                                  given_region):
    """Mounted with the wrong region (the profile's us-east-1, or `-o region=` given): the
    mount's first request finds the bucket's region and every later one is signed for it.
    At most a couple of requests reach the endpoint signed for the wrong region, none is
    sent again through botocore, and the log says so in one line (a WARNING when the
    region was given)."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    bucket = bucket_with(seaweed, {f"listed/f{i}": b"x" * (100 + i) for i in range(20)})
    with FaultProxy(port, rate=0.0, region=BUCKET_REGION, region_answer=answer) as proxy:
        options = [f"region={given_region}"] if given_region else []
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                          *options, bucket=bucket)
        use_the_mount(m)
        assert 1 <= len(proxy.misdirected) <= 2, proxy.misdirected
        document = status_document(m.path)
        assert document.get("direct_fallbacks") == {}, document
        log = m.log()
        lines = [line for line in log.splitlines() if f"is in region {BUCKET_REGION}" in line]
        assert len(lines) == 1, lines
        assert (" WARNING " in lines[0]) == bool(given_region), lines[0]
        assert "again through botocore" not in log


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_region_named_after_the_mount_started_is_followed(seaweed, mount_factory):
    """A wrong-region answer that comes later (not at mount) is followed as well: the
    direct requests that meet it are sent again, directly, in the bucket's region."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    bucket = bucket_with(seaweed, {f"listed/f{i}": b"x" * (100 + i) for i in range(20)})
    with FaultProxy(port, rate=0.0) as proxy:
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                          bucket=bucket)
        proxy.region = BUCKET_REGION
        use_the_mount(m)
        assert 1 <= len(proxy.misdirected) <= 4, proxy.misdirected
        assert status_document(m.path).get("direct_fallbacks") == {}
        log = m.log()
        assert log.count(f"is in region {BUCKET_REGION}") == 1
        assert "again through botocore" not in log


def test_the_regional_host_is_used_on_aws_and_a_custom_endpoint_is_kept(monkeypatch):
    """On AWS's endpoint the direct requests move to the region's host; with a custom
    endpoint only the signing region changes."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for config, before, after in (
            (StoreConfig(bucket="my-bucket"), "my-bucket.s3.amazonaws.com",
             "my-bucket.s3.eu-central-1.amazonaws.com"),
            (StoreConfig(bucket="my-bucket", endpoint_url="http://127.0.0.1:9",
                         force_path_style=True), "127.0.0.1", "127.0.0.1")):
        store = BotocoreStore(config)
        assert (store._direct.host, store._direct.signer.region) == (before, "us-east-1")
        trio.run(store._follow_region, BUCKET_REGION)
        assert (store._direct.host, store._direct.signer.region) == (after, BUCKET_REGION)
        assert store._client.meta.region_name == BUCKET_REGION
        if config.endpoint_url:
            assert store._client.meta.endpoint_url == config.endpoint_url
            assert store._direct.base_path == "/my-bucket/"


def test_an_express_directory_bucket_is_refused(tmp_path):
    """S3 Express One Zone directory buckets (names ending --x-s3): one line, no mount."""
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [str(VENV_BIN / "mount.s3stream"), "data--usw2-az1--x-s3", str(tmp_path / "mnt"),
         "--foreground", "-o", "endpoint_url=http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "S3 Express One Zone directory bucket" in output
    assert "data--usw2-az1--x-s3" in output
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_requester_pays_signs_the_header_on_every_request(seaweed, mount_factory):
    """`-o requester_pays`: x-amz-request-payer: requester, signed, on every request of the
    mount: the direct ones (LIST, HEAD, small PUT, DELETE, on http a multipart upload) and
    botocore's (GETs)."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    bucket = bucket_with(seaweed, {"d/f1": b"one", "d/f2": b"two"})
    with FaultProxy(port, rate=0.0, record_headers=True) as proxy:
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                          "requester_pays", bucket=bucket)
        listing = subprocess.run(["ls", "-l", m.path / "d"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        assert len(listing.splitlines()) == 3
        small, large = os.urandom(1000), os.urandom(10 * 1024 * 1024)  # large: multipart
        (m.path / "small").write_bytes(small)
        (m.path / "large").write_bytes(large)
        assert (m.path / "large").read_bytes() == large
        os.remove(m.path / "small")
        seen = list(proxy.seen)  # the mount's requests alone (the test's own come next)
        assert m.get("large") == large and "small" not in m.keys()
    assert seen
    for method, target, headers in seen:
        assert headers.get("x-amz-request-payer") == "requester", (method, target)
        signed = headers["authorization"].partition("SignedHeaders=")[2].split(",")[0]
        assert "x-amz-request-payer" in signed.split(";"), (method, target)

    def botocore(headers):
        return "botocore" in headers.get("user-agent", "").lower()

    assert any(m == "HEAD" and "/d/f" in t and not botocore(h) for m, t, h in seen)
    assert any(m == "PUT" and "small" in t and not botocore(h) for m, t, h in seen)
    assert any(m == "POST" and "uploads" in t for m, t, h in seen)
    assert any(m == "PUT" and "partNumber" in t for m, t, h in seen)
    assert any(m == "GET" and "large" in t and botocore(h) for m, t, h in seen)


def test_a_direct_answer_names_the_region_in_its_header_or_its_body():
    """301/400 with x-amz-bucket-region, or AuthorizationHeaderMalformed's <Region>."""
    malformed = (b"<Error><Code>AuthorizationHeaderMalformed</Code>"
                 b"<Region>eu-west-1</Region></Error>")
    assert moved_to("us-east-1", Response(400, {}, malformed)) == "eu-west-1"
    assert moved_to("us-east-1", Response(301, {"x-amz-bucket-region": "eu-west-1"}, b"")) \
        == "eu-west-1"
    assert moved_to("eu-west-1", Response(301, {"x-amz-bucket-region": "eu-west-1"}, b"")) \
        is None
    assert moved_to("us-east-1", Response(400, {}, b"<Error><Code>InvalidArgument</Code>"
                                                   b"</Error>")) is None
    assert moved_to("us-east-1", Response(403, {"x-amz-bucket-region": "eu-west-1"}, b"")) \
        is None


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("answer", ["301", "400"])
def test_the_region_redirect_at_mount_is_no_retry(seaweed, mount_factory, answer):
    """The redirected HeadBucket at mount (the answer that names the bucket's region) is no
    failure sent again: `s3stream status` counts no retry and the log has no retry line,
    only the one line about the region."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    bucket = bucket_with(seaweed, {"f": b"one"})
    with FaultProxy(port, rate=0.0, region=BUCKET_REGION, region_answer=answer) as proxy:
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                          bucket=bucket)
        assert (m.path / "f").read_bytes() == b"one"
        assert proxy.misdirected, "the mount's HeadBucket was not redirected"
        document = status_document(m.path)
        log = m.log()
        assert document["retries"] == 0, document
        assert "retr" not in log.lower(), [line for line in log.splitlines()
                                           if "retr" in line.lower()]
        assert log.count(f"is in region {BUCKET_REGION}") == 1
