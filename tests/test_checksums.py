"""The CRC32 every uploaded body carries: the accelerated one (isal) and its zlib fallback give
the same values, UploadPart sends the CRC32 of exactly the bytes it sends, and a server
(SeaweedFS, as S3 does; moto stores it unchecked) refuses a part whose header does not match its bytes."""

from __future__ import annotations

import base64
import importlib
import os
import sys
import zlib

import botocore.exceptions
import pytest
import trio
from conftest import new_bucket

from s3fs_stream import botocore_store, checksums
from s3fs_stream.botocore_store import BotocoreStore
from s3fs_stream.config import StoreConfig
from s3fs_stream.errors import IntegrityError
from s3fs_stream.object_store import PutOptions

MiB = 1024 * 1024
SIZES = [0, 1, 5 * 1024 + 1, MiB + 3, 8 * MiB]


def zlib_base64(data) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_the_accelerated_crc32_is_used_and_equals_zlibs():
    # the test extras install isal: the tests run the path the users of `[fast]` run
    assert checksums.CRC32_IMPL == "isal"
    for size in SIZES:
        data = os.urandom(size)
        for kind in (bytes, bytearray, memoryview):
            assert checksums.crc32_base64(kind(data)) == zlib_base64(data), (size, kind)
    # a view into a larger buffer: only its own bytes count
    buffer = bytearray(os.urandom(3 * MiB))
    assert checksums.crc32_base64(memoryview(buffer)[5:MiB + 5]) == \
        zlib_base64(buffer[5:MiB + 5])


def test_without_isal_zlibs_crc32_gives_the_same_values(monkeypatch):
    try:
        monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)  # import raises ImportError
        fallback = importlib.reload(checksums)
        assert fallback.CRC32_IMPL == "zlib" and fallback.crc32 is zlib.crc32
        for size in SIZES:
            data = os.urandom(size)
            assert fallback.crc32_base64(bytearray(data)) == zlib_base64(data)
    finally:
        monkeypatch.undo()
        importlib.reload(checksums)
    assert checksums.CRC32_IMPL == "isal"


class VerifyingClient:
    """upload_part as S3 takes it: refused (BadDigest) when x-amz-checksum-crc32 is not the
    CRC32 of the body received. Keeps what it stored."""

    def __init__(self):
        self.parts: dict[int, bytes] = {}

    def upload_part(self, *, Body, ChecksumCRC32, PartNumber, **_):
        body = bytes(Body)
        if ChecksumCRC32 != zlib_base64(body):
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "BadDigest", "Message": "checksum mismatch"},
                 "ResponseMetadata": {"HTTPStatusCode": 400}}, "UploadPart")
        self.parts[PartNumber] = body
        return {"ETag": f'"{PartNumber}"', "ChecksumCRC32": ChecksumCRC32}


def stand_in_store(client) -> BotocoreStore:
    store = BotocoreStore.__new__(BotocoreStore)
    store.config = StoreConfig(bucket="b")
    store.bucket = "b"
    store._client = client
    store._direct = None
    store.limiter = trio.CapacityLimiter(4)
    return store


async def test_each_part_carries_the_crc32_of_exactly_its_bytes():
    client = VerifyingClient()
    store = stand_in_store(client)
    # a full part, a view of one, and a part cut short in its full-size buffer
    # (Part.payload), all sent at once from worker threads
    full = bytearray(os.urandom(8 * MiB))
    cut = bytearray(os.urandom(8 * MiB))
    del cut[3 * MiB + 7:]
    bodies = {1: full, 2: memoryview(full)[MiB:2 * MiB], 3: cut}
    async with trio.open_nursery() as nursery:
        for number, body in bodies.items():
            nursery.start_soon(store.upload_part, "k", "u", number, body)
    assert client.parts == {number: bytes(body) for number, body in bodies.items()}


async def test_the_server_refuses_a_part_whose_crc32_does_not_match(seaweed, monkeypatch):
    """The header is what protects the bytes: the server checks it (a wrong one is an
    error, never a stored part)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    store = BotocoreStore(StoreConfig(bucket=new_bucket(seaweed), region="us-east-1",
                                      endpoint_url=seaweed.endpoint_url,
                                      force_path_style=True, retry_time=0))
    upload = await store.create_upload("k", PutOptions())
    data = bytearray(os.urandom(5 * MiB))
    part = await store.upload_part("k", upload, 1, data)  # the right CRC32 is accepted
    assert part.size == len(data)
    monkeypatch.setattr(botocore_store, "crc32_base64", lambda body: zlib_base64(b"other"))
    with pytest.raises(IntegrityError):
        await store.upload_part("k", upload, 2, data)
    await store.abort("k", upload)
    await store.aclose()


@pytest.mark.parametrize("sign_payload", ["auto", "on"])
async def test_a_multipart_upload_over_plain_http_goes_direct(any_server, monkeypatch,
                                                              sign_payload):
    """Create, parts and completion over the mount's own connections (no botocore call,
    none sent again through it), and the object is exactly the parts in order; with the
    parts' SHA-256 signed too (`sign_payload=on`)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", any_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", any_server.secret_key)
    bucket = new_bucket(any_server)
    store = BotocoreStore(StoreConfig(bucket=bucket, region="us-east-1",
                                      endpoint_url=any_server.endpoint_url,
                                      force_path_style=True, sign_payload=sign_payload))
    botocore_calls = []
    monkeypatch.setattr(store, "_call", lambda what, fn, **kw: botocore_calls.append(what))
    first, last = bytearray(os.urandom(5 * MiB)), bytearray(os.urandom(MiB + 3))
    options = PutOptions(metadata={"mtime": "1700000000.5"}, content_type="video/mp4")
    upload = await store.create_upload("dir/a b+c", options)
    parts = [await store.upload_part("dir/a b+c", upload, 1, first),
             await store.upload_part("dir/a b+c", upload, 2, last)]
    etag = await store.complete("dir/a b+c", upload, parts)
    await store.aclose()
    assert botocore_calls == [] and not store.stats.fallbacks
    got = any_server.client().get_object(Bucket=bucket, Key="dir/a b+c")
    assert got["Body"].read() == first + last
    assert got["ETag"] == etag and etag.endswith('-2"')
    assert got["Metadata"] == {"mtime": "1700000000.5"}
    assert got["ContentType"] == "video/mp4"


async def test_an_error_in_a_200_completion_goes_again_through_botocore():
    class Response:
        status, headers = 200, {}
        body = (b'<?xml version="1.0"?><Error><Code>InternalError</Code>'
                b"<Message>try again</Message></Error>")

    assert botocore_store._xml_field(Response, "CompleteMultipartUploadResult", "ETag") is None
    Response.body = (b'<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/'
                     b'2006-03-01/"><ETag>&quot;abc-2&quot;</ETag>'
                     b"</CompleteMultipartUploadResult>")
    assert botocore_store._xml_field(Response, "CompleteMultipartUploadResult", "ETag") == \
        '"abc-2"'
    Response.body = b"<CompleteMultipartUploadResult"  # cut short
    assert botocore_store._xml_field(Response, "CompleteMultipartUploadResult", "ETag") is None
