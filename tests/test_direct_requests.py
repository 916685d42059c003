"""HEAD, small PUT and DELETE sent over our own connections (direct_requests.py): signed as
botocore signs, understood by both servers, and sent again through botocore whenever they
get no plain answer."""

from __future__ import annotations

import datetime
import functools
import logging
import os

import botocore.auth
import botocore.config
import pytest
import trio
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotocoreCredentials
from conftest import new_bucket

from s3fs_stream import botocore_store
from s3fs_stream.botocore_store import BotocoreStore
from s3fs_stream.config import StoreConfig
from s3fs_stream.direct_requests import (
    EMPTY_SHA256,
    UNSIGNED,
    Credentials,
    DirectClient,
    Signer,
    quote_key,
)
from s3fs_stream.errors import NotFound, PreconditionFailed
from s3fs_stream.local_server import free_port
from s3fs_stream.object_store import PutOptions

ODD_KEYS = ["plain", "with space+plus%percent?q#h", "ünïcödé/ключ", "dir/sub/k~!*'()$&=;,@",
            "long/" + "x" * 250 + "/" + "y" * 250]


@pytest.mark.parametrize("token", [None, "session-token/+="])
@pytest.mark.parametrize("payload", [EMPTY_SHA256, UNSIGNED])
def test_signature_is_botocores(token, payload, monkeypatch):
    """Same request, same second: the same Authorization as botocore's S3 signer."""
    now = 1_795_660_000.0
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda: datetime.datetime.fromtimestamp(now, datetime.UTC)
                        .replace(tzinfo=None))
    host, path = "127.0.0.1:9000", "/bucket/" + quote_key("ünï code/a+b")
    mine = {"x-amz-meta-mode": "33188", "content-type": "text/plain"}
    Signer("eu-west-1").sign("PUT", host, path, mine, payload,
                             Credentials("AKID", "secret", token), now)
    request = AWSRequest("PUT", f"https://{host}{path}",
                         headers={"X-Amz-Meta-Mode": "33188", "Content-Type": "text/plain",
                                  "X-Amz-Content-SHA256": payload})
    request.context["client_config"] = botocore.config.Config(
        s3={"payload_signing_enabled": payload != UNSIGNED})
    signer = S3SigV4Auth(BotocoreCredentials("AKID", "secret", token), "s3", "eu-west-1")
    signer.add_auth(request)
    assert mine["authorization"] == request.headers["Authorization"]
    assert mine["x-amz-date"] == request.headers["X-Amz-Date"]


@pytest.fixture
def direct_store(request, monkeypatch):
    """A store for a bucket of the test's server (`any_server` or `seaweed`)."""
    server = request.getfixturevalue(
        "any_server" if "any_server" in request.fixturenames else "seaweed")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)

    def make(bucket: str, **options) -> BotocoreStore:
        return BotocoreStore(StoreConfig(bucket=bucket, endpoint_url=server.endpoint_url,
                                         region="us-east-1", force_path_style=True, **options))
    return make


async def test_put_head_delete_of_odd_keys_land_as_botocore_sees_them(any_server,
                                                                      direct_store, caplog):
    caplog.set_level(logging.DEBUG, logger="s3fs_stream.botocore_store")
    bucket = new_bucket(any_server)
    store = direct_store(bucket)
    assert store._direct is not None
    client = any_server.client()
    for key in ODD_KEYS:
        body = os.urandom(3000)
        etag = await store.put(key, body, PutOptions({"mode": "33188", "mtime": "12.5"},
                                                     "text/plain"))
        got = client.get_object(Bucket=bucket, Key=key)
        assert got["Body"].read() == body
        assert got["ETag"] == etag and got["Metadata"] == {"mode": "33188", "mtime": "12.5"}
        assert got["ContentType"] == "text/plain"
        info = await store.head(key)
        assert (info.size, info.etag, info.content_type) == (3000, etag, "text/plain")
        assert info.metadata == {"mode": "33188", "mtime": "12.5"}
        assert abs(info.last_modified - got["LastModified"].timestamp()) < 1
        await store.delete(key)
        with pytest.raises(NotFound):
            await store.head(key)
        assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=key)
    # every request went the direct way: none was sent again through botocore
    assert "through botocore" not in caplog.text
    assert store.stats.requests["HeadObject"] == 2 * len(ODD_KEYS)
    await store.aclose()


async def test_without_an_answer_botocore_sends_it_and_a_pause_follows(any_server,
                                                                       direct_store, caplog):
    caplog.set_level(logging.DEBUG, logger="s3fs_stream.botocore_store")
    bucket = new_bucket(any_server)
    store = direct_store(bucket)
    # direct requests to a port nobody listens on; botocore still reaches the server
    store._direct = DirectClient(f"http://127.0.0.1:{free_port()}/{bucket}/p", "p",
                                 "us-east-1", connect_timeout=5, read_timeout=5)
    for i in range(botocore_store.DIRECT_MISSES):
        await store.put(f"k{i}", b"data", PutOptions())
        assert (await store.head(f"k{i}")).size == 4
    # misses are counted per kind of request: PUTs and HEADs each reached the limit
    assert caplog.text.count("no answer") == 2 * botocore_store.DIRECT_MISSES
    assert caplog.text.count("botocore sends them for the next") == 2
    assert store.stats.fallbacks == {"PutObject": 5, "HeadObject": 5}
    caplog.clear()
    assert (await store.head("k0")).size == 4  # paused: straight to botocore
    assert "no answer" not in caplog.text
    await store.delete("k0")  # DELETEs are not paused: tried directly first
    assert caplog.text.count("no answer") == 1
    with pytest.raises(NotFound):
        await store.head("k0")


async def test_a_refused_signature_is_sent_again_through_botocore(seaweed, direct_store,
                                                                   caplog):
    """(moto checks no signatures)"""
    any_server = seaweed
    caplog.set_level(logging.DEBUG, logger="s3fs_stream.botocore_store")
    bucket = new_bucket(any_server)
    store = direct_store(bucket)
    store._direct_frozen = (float("inf"), Credentials(any_server.access_key, "wrong"))
    await store.put("k", b"body", PutOptions({"mode": "33188"}))
    assert any_server.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"body"
    assert "-> 403" in caplog.text and "again through botocore" in caplog.text


async def test_idle_connections_closed_by_the_server_are_replaced(seaweed, direct_store):
    """A kept-alive connection the server has closed meanwhile costs no failure."""
    bucket = new_bucket(seaweed)
    store = direct_store(bucket)
    await store.put("k", b"x", PutOptions())
    for connection in store._direct._idle:  # as if the server had closed them meanwhile
        ours, theirs = trio.socket.socketpair()
        theirs.close()
        connection.stream = trio.SocketStream(ours)
    assert (await store.head("k")).size == 1
    assert not any(store._direct_misses.values()) and not store.stats.fallbacks


async def test_bodies_over_the_limit_go_through_botocore(seaweed, direct_store, caplog):
    caplog.set_level(logging.DEBUG, logger="s3fs_stream.botocore_store")
    bucket = new_bucket(seaweed)
    store = direct_store(bucket)
    body = os.urandom(botocore_store.DIRECT_PUT_MAX + 1)
    await store.put("big", body, PutOptions())
    assert seaweed.client().get_object(Bucket=bucket, Key="big")["Body"].read() == body


async def test_direct_requests_off(seaweed, direct_store):
    store = direct_store(new_bucket(seaweed), direct_requests=False)
    assert store._direct is None
    await store.put("k", b"x", PutOptions())
    assert (await store.head("k")).size == 1


async def test_requests_of_an_earlier_trio_run_are_not_reused(seaweed, direct_store):
    store = direct_store(new_bucket(seaweed))

    async def put_and_head():
        await store.put("k", b"x", PutOptions())
        assert (await store.head("k")).size == 1

    await put_and_head()
    assert store._direct._idle
    trio_token = trio.lowlevel.current_root_task()
    store._direct._idle_run = object()  # as if they were another run's
    await put_and_head()
    assert store._direct._idle_run is trio_token


async def test_listings_match_botocores_page_by_page(any_server, direct_store, caplog):
    caplog.set_level(logging.DEBUG, logger="s3fs_stream.botocore_store")
    keys = ["top"] + [f"p/{k}" for k in ODD_KEYS] + ["p/sub/a", "p/sub/b", "p/a b/c",
                                                        "p/+/d", "p/%41/e"]
    bucket = new_bucket(any_server)
    client = any_server.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    store = direct_store(bucket)
    for prefix, delimiter in [("p/", "/"), ("", "/"), ("p/", None), ("", None)]:
        got, token = [], None
        args = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 3}
        if delimiter:
            args["Delimiter"] = delimiter
        while True:
            page = await store.list_page(prefix, delimiter, token, max_keys=3)
            expected = client.list_objects_v2(**args)
            assert [(o.key, o.size, o.etag) for o in page.objects] == \
                [(o["Key"], o["Size"], o["ETag"]) for o in expected.get("Contents", [])]
            assert [o.last_modified for o in page.objects] == \
                [o["LastModified"].timestamp() for o in expected.get("Contents", [])]
            assert page.prefixes == [p["Prefix"] for p in expected.get("CommonPrefixes", [])]
            got += [o.key for o in page.objects] + page.prefixes
            token = page.next_token
            if token is None:
                assert not expected.get("IsTruncated")
                break
            args["ContinuationToken"] = expected["NextContinuationToken"]
        if delimiter is None:
            assert sorted(got) == sorted(k for k in keys if k.startswith(prefix))
    assert "through botocore" not in caplog.text
    assert store.stats.requests["ListObjectsV2"] > 8


async def test_a_copy_pinned_to_an_etag_refuses_a_replaced_source(seaweed, direct_store):
    """Attributes stored by a copy onto itself never land on another client's object."""
    bucket = new_bucket(seaweed)
    store = direct_store(bucket)
    first = await store.put("k", b"ours", PutOptions({"mode": "33188"}))
    seaweed.client().put_object(Bucket=bucket, Key="k", Body=b"theirs")
    with pytest.raises(PreconditionFailed):
        await store.copy("k", "k", PutOptions({"mode": "33152"}), 4, first.strip('"'))
    head = await store.head("k")
    assert head.size == 6 and "mode" not in head.metadata
    etag = await store.copy("k", "k", PutOptions({"mode": "33152"}), 6, head.etag)
    assert (await store.head("k")).metadata == {"mode": "33152"} and etag


async def test_small_copies_go_direct_and_land_as_botocores(any_server, direct_store,
                                                            monkeypatch):
    """A rename's CopyObject (up to DIRECT_COPY_MAX bytes) goes over the mount's own
    connections: keeping the source's metadata and content type, or replacing them, pinned
    to the source's ETag, for odd keys; S3's refusal is final (sent once); a larger copy
    goes through botocore."""
    bucket = new_bucket(any_server)
    store = direct_store(bucket)
    through_botocore = []
    call = store._call

    async def counted(what, fn, /, **kwargs):
        through_botocore.append(what)
        return await call(what, fn, **kwargs)

    monkeypatch.setattr(store, "_call", counted)
    client = any_server.client()
    for key in ODD_KEYS:
        etag = await store.put(key, b"x" * 100, PutOptions({"mode": "33188"}, "text/plain"))
        kept = await store.copy(key, key + ".kept", None, 100, etag.strip('"'))
        got = client.head_object(Bucket=bucket, Key=key + ".kept")
        assert (got["Metadata"], got["ContentType"]) == ({"mode": "33188"}, "text/plain")
        assert got["ETag"].strip('"') == kept.strip('"')
        await store.copy(key, key + ".new", PutOptions({"mode": "33152"}, "video/mp4"), 100,
                         etag)
        got = client.get_object(Bucket=bucket, Key=key + ".new")
        assert (got["Metadata"], got["ContentType"]) == ({"mode": "33152"}, "video/mp4")
        assert got["Body"].read() == b"x" * 100
    assert through_botocore == [] and not store.stats.fallbacks
    assert store.stats.requests["CopyObject"] == 2 * len(ODD_KEYS)
    if any_server.name == "seaweedfs":  # moto ignores x-amz-copy-source-if-match
        old = client.head_object(Bucket=bucket, Key="plain")["ETag"]
        client.put_object(Bucket=bucket, Key="plain", Body=b"theirs")
        with pytest.raises(PreconditionFailed):
            await store.copy("plain", "elsewhere", None, 100, old)
        assert through_botocore == []
    size = botocore_store.DIRECT_COPY_MAX + 1
    client.put_object(Bucket=bucket, Key="big", Body=bytes(size))
    await store.copy("big", "big copy", None, size)
    assert [what.split()[0] for what in through_botocore] == ["CopyObject"]
    assert client.head_object(Bucket=bucket, Key="big copy")["ContentLength"] == size
    await store.aclose()


async def test_pipelined_heads_answer_each_key(any_server, direct_store, caplog):
    caplog.set_level(logging.DEBUG, logger="s3fs_stream.botocore_store")
    bucket = new_bucket(any_server)
    client = any_server.client()
    for key in ODD_KEYS:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode(), Metadata={"mode": "1"})
    store = direct_store(bucket)
    keys = ODD_KEYS + ["missing"] + ODD_KEYS
    found = await store.head_many(keys)
    for key, result in zip(keys, found, strict=True):
        if key == "missing":
            assert isinstance(result, NotFound)
        else:
            assert (result.key, result.size, result.metadata) == (key, len(key.encode()),
                                                                  {"mode": "1"})
    if any_server.name == "moto":  # its server answers the first and closes
        assert not store._direct.pipelining
    else:
        assert caplog.text.count(f"({len(keys)} pipelined)") == len(keys)
    assert "through botocore" not in caplog.text
    # again: on moto now one request at a time, on SeaweedFS pipelined as before
    assert [getattr(f, "size", None) for f in await store.head_many(keys)] == \
        [getattr(f, "size", None) for f in found]


async def test_pipelined_heads_cut_short_are_asked_again_one_by_one(seaweed, direct_store):
    """A server that answers only part of a pipeline and closes: the rest one by one."""
    bucket = new_bucket(seaweed)
    for key in ("a", "b", "c"):
        seaweed.client().put_object(Bucket=bucket, Key=key, Body=b"x")
    store = direct_store(bucket)

    async def one_answer_then_close(stream):
        received = b""
        while received.count(b"\r\n\r\n") < 3:
            received += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nETag: \"e\"\r\n"
                              b"Last-Modified: Thu, 26 Nov 2026 03:28:12 GMT\r\n"
                              b"Connection: close\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, one_answer_then_close, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        store._direct = DirectClient(f"http://127.0.0.1:{port}/{bucket}/p", "p", "us-east-1",
                                     connect_timeout=5, read_timeout=5)
        found = await store.head_many(["a", "b", "c"])
        nursery.cancel_scope.cancel()
    assert found[0].size == 7  # the stand-in's answer
    assert [f.size for f in found[1:]] == [1, 1]  # asked again, through botocore
    assert not store._direct.pipelining
