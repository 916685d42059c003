"""BotocoreStore's ranged reads: straight into a recycled buffer against a real server, and
the failure paths that a real server will not produce on demand (a stand-in client)."""

from __future__ import annotations

import io
import os

import botocore.exceptions
import pytest
import trio
from conftest import bucket_with

from s3fs_stream.botocore_store import BotocoreStore, _read_body_into
from s3fs_stream.config import StoreConfig
from s3fs_stream.errors import IntegrityError, NotFound, Unreachable

MiB = 1024 * 1024


@pytest.fixture
def store_for(seaweed, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)

    def make(bucket: str) -> BotocoreStore:
        return BotocoreStore(StoreConfig(bucket=bucket, endpoint_url=seaweed.endpoint_url,
                                         region="us-east-1", force_path_style=True))
    return make


async def test_ranges_read_into_a_reused_buffer_are_exact(seaweed, store_for):
    data = os.urandom(20 * MiB + 5)
    store = store_for(bucket_with(seaweed, {"obj": data}))
    etag = (await store.head("obj")).etag
    buffer = bytearray(os.urandom(8 * MiB))  # leftovers that must never show
    for start, end in [(0, 8 * MiB), (8 * MiB, 16 * MiB), (16 * MiB, len(data)), (3, 4)]:
        got = await store.get_range("obj", start, end, etag, into=buffer)
        assert isinstance(got, memoryview) and got.obj is buffer
        assert bytes(got) == data[start:end]
    # every body was read to its end and its connection went back to the pool: one
    # connection served the HEAD and all four GETs, one after another
    pools = store._client._endpoint.http_session._manager.pools
    (pool,) = pools._container.values()
    assert pool.num_connections == 1


class _Body(io.BytesIO):
    read_calls = 0

    def read(self, *args):
        self.read_calls += 1
        return super().read(*args)


def test_body_without_an_http_client_response_is_copied():
    view = memoryview(bytearray(10))
    assert _read_body_into(io.BytesIO(b"0123456789"), view) == 10
    assert bytes(view) == b"0123456789"


async def test_a_server_ignoring_range_fails_fast_without_reading_the_body():
    body = _Body(b"x")

    class Client:
        def get_object(self, **args):
            return {"ContentLength": 100 * MiB, "Body": body}

    store = stand_in_store(Client())
    with pytest.raises(IntegrityError, match="does not honour Range"):
        await store.get_range("k", 0, 10, None)
    assert body.read_calls == 0


def stand_in_store(client, retry_time: float = 60.0) -> BotocoreStore:
    store = BotocoreStore.__new__(BotocoreStore)
    store.config = StoreConfig(bucket="b", retry_time=retry_time)
    store.bucket = "b"
    store._client = client
    store._direct = None  # every request through the stand-in client
    store.limiter = trio.CapacityLimiter(1)
    return store


class FlakyClient:
    """head_object fails with `error` `failures` times, then answers."""

    def __init__(self, failures: int, error: Exception):
        self.failures = failures
        self.error = error
        self.calls: list[float] = []

    def head_object(self, **args):
        self.calls.append(0.0)
        if len(self.calls) <= self.failures:
            raise self.error
        return {"ContentLength": 3, "ETag": '"e"', "LastModified": _Stamp()}


class _Stamp:
    def timestamp(self) -> float:
        return 0.0


UNREACHABLE = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


def server_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")


async def test_an_unreachable_endpoint_is_retried_until_it_answers(autojump_clock):
    client = FlakyClient(6, UNREACHABLE)
    started = trio.current_time()
    info = await stand_in_store(client).head("k")
    assert info.size == 3 and len(client.calls) == 7
    # 0.5 + 1 + 2 + 4 + 5 + 5 s of pauses between the whole-request retries
    assert trio.current_time() - started == pytest.approx(17.5)


@pytest.mark.parametrize("code,status", [("InternalError", 500), ("SlowDown", 503),
                                         ("ServiceUnavailable", 503)])
async def test_server_errors_are_retried(autojump_clock, code, status):
    client = FlakyClient(2, server_error(code, status))
    assert (await stand_in_store(client).head("k")).size == 3
    assert len(client.calls) == 3


async def test_retries_stop_at_retry_time_with_eio(autojump_clock):
    client = FlakyClient(10**6, UNREACHABLE)
    started = trio.current_time()
    with pytest.raises(Unreachable) as info:
        await stand_in_store(client, retry_time=30).head("k")
    assert info.value.errno == 5
    # the last attempt is made at the deadline: 0.5 + 1 + 2 + 4 + 4 x 5 + 2.5
    assert trio.current_time() - started == pytest.approx(30)
    assert len(client.calls) == 10


async def test_other_errors_are_not_retried(autojump_clock):
    client = FlakyClient(1, server_error("NoSuchKey", 404))
    with pytest.raises(NotFound):
        await stand_in_store(client).head("k")
    assert len(client.calls) == 1
