"""BotocoreStore's ranged reads: straight into a recycled buffer against a real server, and
the failure paths that a real server will not produce on demand (a stand-in client)."""

from __future__ import annotations

import io
import os

import pytest
import trio
from conftest import bucket_with

from s3fs_stream.botocore_store import BotocoreStore, _read_body_into
from s3fs_stream.config import StoreConfig
from s3fs_stream.errors import IntegrityError

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

    store = BotocoreStore.__new__(BotocoreStore)
    store.bucket = "b"
    store._client = Client()
    store.limiter = trio.CapacityLimiter(1)  # only what get_range uses
    with pytest.raises(IntegrityError, match="does not honour Range"):
        await store.get_range("k", 0, 10, None)
    assert body.read_calls == 0
