"""The direct client's connection pool against a stand-in endpoint that behaves like the ones
users meet (issue 18): it closes connections idle for a moment (S3, load balancers), closes
after every N-th request (nginx's keepalive_requests), closes a kept-alive connection just as
a request arrives, stalls, or sends lengths no one should allocate. Every HEAD gets its
answer without a fallback to botocore, and none of these is counted as the endpoint failing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import time
from dataclasses import dataclass, field

import pytest
import trio
from conftest import new_bucket, status_document
from fault_proxy import FaultProxy

from s3fs_stream import direct_requests
from s3fs_stream.botocore_store import BotocoreStore
from s3fs_stream.config import StoreConfig
from s3fs_stream.direct_requests import Credentials, DirectClient, Unanswered

CREDENTIALS = Credentials("AKID", "secret")
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nETag: \"e\"\r\n"
          b"Last-Modified: Thu, 26 Nov 2026 03:28:12 GMT\r\n")


@dataclass
class Endpoint:
    """A loopback stand-in for S3 that answers every HEAD 200."""
    idle_close: float = 60.0  # close a connection idle this long
    close_every: int = 0  # answer every N-th request of a connection with Connection: close
    drop_request: int = 0  # close without an answer when a connection's N-th request comes
    stall: bool = False  # never answer
    answer: bytes = ANSWER
    body: bytes = b""  # sent after the answer's headers
    connections: int = 0
    requests: int = 0
    port: int = 0
    nursery: trio.Nursery | None = field(default=None, repr=False)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        served = 0
        try:
            while True:
                with trio.move_on_after(self.idle_close) as idle:
                    while b"\r\n\r\n" not in buffer:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buffer += data
                if idle.cancelled_caught:
                    return  # closed for idleness, as S3 does
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                served += 1
                self.requests += 1
                if self.drop_request and served == self.drop_request:
                    return
                if self.stall:
                    await trio.sleep_forever()
                close = self.close_every and served % self.close_every == 0
                await stream.send_all(self.answer + (b"Connection: close\r\n" if close else b"")
                                      + b"\r\n" + self.body)
                if close:
                    return
        except trio.BrokenResourceError:
            return
        finally:
            await stream.aclose()

    def client(self, read_timeout: float = 5.0) -> DirectClient:
        return DirectClient(f"http://127.0.0.1:{self.port}/bucket/p", "p", "us-east-1",
                            connect_timeout=2, read_timeout=read_timeout)


@pytest.fixture
async def endpoint(nursery):
    made = Endpoint()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, made.serve, 0,
                                                      host="127.0.0.1"))
    made.port = listeners[0].socket.getsockname()[1]
    return made


async def heads(client: DirectClient, count: int) -> list:
    return [await client.request("HEAD", f"k{i}", CREDENTIALS) for i in range(count)]


@pytest.mark.timeout(30)
async def test_connections_closed_while_idle_are_not_reused(endpoint):
    """Bursts of parallel HEADs with pauses longer than the endpoint's idle timeout: every
    HEAD answered, and no request is lost on a connection the server closed."""
    endpoint.idle_close = 0.2
    client = endpoint.client()
    for _ in range(3):
        results = []

        async def burst(results=results):
            results.extend(await heads(client, 4))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(burst)
        assert [r.status for r in results] == [200] * 32
        await trio.sleep(0.5)  # every kept connection is closed by now
    assert client.stale_replaced == 0  # each closed one was seen before use
    await client.aclose()


@pytest.mark.timeout(30)
async def test_old_idle_connections_expire(endpoint, monkeypatch):
    """An idle connection older than IDLE_EXPIRY is not used (the server may be closing it
    at that very moment), even if it still looks open."""
    monkeypatch.setattr(direct_requests, "IDLE_EXPIRY", 0.1)
    client = endpoint.client()
    await heads(client, 2)
    assert endpoint.connections == 1
    await trio.sleep(0.2)
    await heads(client, 1)
    assert endpoint.connections == 2
    await client.aclose()


@pytest.mark.timeout(30)
async def test_a_connection_closed_as_the_request_arrives_is_replaced(endpoint):
    """The race no check can see: the server closes a kept-alive connection as the request
    reaches it. The request goes again on a new connection, and counts as no failure."""
    endpoint.drop_request = 2
    client = endpoint.client()
    assert len(await heads(client, 6)) == 6
    assert client.stale_replaced >= 2
    await client.aclose()


@pytest.mark.timeout(30)
async def test_a_request_cap_per_connection_keeps_pipelining(endpoint):
    """Connection: close after every 3rd request (nginx's keepalive_requests): a pipeline
    is cut short, its answers stand, and pipelining stays on for the next directory."""
    endpoint.close_every = 3
    client = endpoint.client()
    await heads(client, 1)  # a kept-alive connection, used once
    found = await client.head_many([f"k{i}" for i in range(10)], CREDENTIALS)
    assert [r.status for r in found[:2]] == [200, 200]
    assert client.pipelining
    await client.aclose()


@pytest.mark.timeout(30)
async def test_a_server_of_one_request_per_connection_ends_pipelining(endpoint):
    endpoint.close_every = 1
    client = endpoint.client()
    found = await client.head_many([f"k{i}" for i in range(5)], CREDENTIALS)
    assert found[0].status == 200 and found[1] is None
    assert not client.pipelining
    await client.aclose()


@pytest.mark.timeout(30)
async def test_a_region_followed_keeps_the_counts_and_what_was_learned(endpoint, monkeypatch):
    """The bucket's region followed (a new direct client, signed for it): "stale connections
    replaced" in `s3stream status` keeps the count of the client before and goes on
    counting, and what the mount learned of the same server (one request per connection:
    no pipelining) still holds."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = BotocoreStore(StoreConfig(bucket="bucket", force_path_style=True,
                                      endpoint_url=f"http://127.0.0.1:{endpoint.port}"))

    def replaced() -> int:
        return store.stats.snapshot()["stale_connections_replaced"]

    endpoint.close_every = 1
    await store._direct.head_many([f"k{i}" for i in range(5)], CREDENTIALS)
    assert not store._direct.pipelining
    endpoint.close_every, endpoint.drop_request = 0, 2
    await heads(store._direct, 4)
    before = replaced()
    assert before >= 1
    old = store._direct
    await store._follow_region("eu-central-1")
    assert store._direct is not old and store._direct.signer.region == "eu-central-1"
    assert replaced() == before
    assert not store._direct.pipelining
    await heads(store._direct, 4)
    assert replaced() > before
    await store.aclose()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("length", [b"100000000000", b"+5", b"1_000", b"-1", b"\xd9\xa5"])
async def test_odd_lengths_are_no_answer(endpoint, length):
    endpoint.answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n"
    client = endpoint.client()
    with pytest.raises(Unanswered):
        await client.request("GET", "k", CREDENTIALS)
    await client.aclose()


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"


@pytest.mark.timeout(30)
async def test_chunked_answers_after_an_interim_one_are_read_whole(endpoint):
    """An answer with a body (here a GET) is framed by h11: a 100 Continue before it is
    skipped, chunks (with an extension, and trailers) are joined, and the connection is
    kept for the next request."""
    endpoint.answer = b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED
    endpoint.body = b"5;ext=1\r\n<List\r\n1\r\n>\r\n0\r\nx-trailer: t\r\n\r\n"
    client = endpoint.client()
    for _ in range(2):
        response = await client.request("GET", "", CREDENTIALS, query={"list-type": "2"})
        assert (response.status, response.body) == (200, b"<List>")
    assert endpoint.connections == 1
    await client.aclose()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("answer, body", [
    (CHUNKED, b"10\r\n" + b"x" * 16 + b"\r\n" + b"10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"),
    (CHUNKED + b"Content-Length: 5\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * 70000 + b"\r\n", b""),
    (b"HTTP/1.1 200 OK\r\n", b"until the end"),
], ids=["chunks-over-the-cap", "chunked-and-length", "two-lengths", "long-header",
        "no-length"])
async def test_answers_h11_or_the_cap_refuse_are_no_answer(endpoint, monkeypatch, answer,
                                                           body):
    """A chunked body past MAX_BODY, a body framed two ways, headers past the limit, or a
    body that ends only when the server closes: no answer (botocore is asked)."""
    monkeypatch.setattr(direct_requests, "MAX_BODY", 20)
    endpoint.answer, endpoint.body = answer, body
    client = endpoint.client()
    with pytest.raises(Unanswered):
        await client.request("DELETE", "k", CREDENTIALS)
    await client.aclose()


@pytest.mark.timeout(30)
async def test_a_stalled_answer_ends_after_the_read_timeout(endpoint):
    endpoint.stall = True
    client = endpoint.client(read_timeout=0.3)
    started = trio.current_time()
    with pytest.raises(Unanswered):
        await client.request("HEAD", "k", CREDENTIALS)
    assert trio.current_time() - started < 2
    await client.aclose()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_mount_through_an_endpoint_that_closes_idle_connections(seaweed, mount_factory):
    """Through a real mount, an endpoint that closes connections idle for 2 s (as S3 does
    after a few seconds): bursts of `ls -l` and small-file copies, quiet periods longer than
    that between them. Every result right; the status socket counts no request sent again
    through botocore, and no 60 s pause follows."""
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0, idle_close=2.0) as proxy:
        bucket = new_bucket(seaweed)
        client = seaweed.client()
        for i in range(40):
            client.put_object(Bucket=bucket, Key=f"listed/f{i}", Body=b"x" * (5000 + i))
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                          bucket=bucket)
        source = m.path.parent / "src"
        source.mkdir()
        for i in range(20):
            (source / f"s{i}").write_bytes(os.urandom(100 + i))
        for burst in range(3):
            listing = subprocess.run(["ls", "-l", m.path / "listed"], capture_output=True,
                                     text=True, timeout=60, check=True).stdout
            sizes = sorted(int(line.split()[4]) for line in listing.splitlines()[1:])
            assert sizes == [5000 + i for i in range(40)]
            subprocess.run(["cp", "-r", source, m.path / f"copy{burst}"], check=True,
                           timeout=60)
            for i in range(20):
                assert m.get(f"copy{burst}/s{i}") == (source / f"s{i}").read_bytes()
            time.sleep(3)  # every kept connection is closed by the endpoint meanwhile
        assert proxy.idle_closed > 0  # the endpoint did close idle connections
        document = status_document(m.path)
        assert document.get("direct_fallbacks") == {}, document
        log = m.log()
        assert "again through botocore" not in log and "botocore sends them" not in log


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_ls_of_a_large_directory_listed_chunked_needs_no_botocore(seaweed, mount_factory):
    """An endpoint that answers every LIST chunked (as S3 and proxies in front of it may):
    `ls -l` of a directory of 1,100 objects (two LIST pages) through a real mount shows
    every entry with its size, and no request was sent again through botocore."""
    from bulk_put import put_many
    from fault_proxy import lists

    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    bucket = new_bucket(seaweed)
    count = 1100
    put_many(seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key, bucket,
             [f"big/o{i:04d}" for i in range(count)], each=lambda key: (
                 b"x" * (int(key[5:]) % 97), {}))
    with FaultProxy(port, rate=0.0) as proxy:
        proxy.chunk_answers(lists)
        m = mount_factory(dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url),
                          bucket=bucket)
        listing = subprocess.run(["ls", "-l", m.path / "big"], capture_output=True,
                                 text=True, timeout=120, check=True).stdout
        sizes = {line.split()[8]: int(line.split()[4]) for line in listing.splitlines()[1:]}
        assert sizes == {f"o{i:04d}": i % 97 for i in range(count)}
        assert len(proxy.chunked) >= 2  # both pages of the directory came chunked
        document = status_document(m.path)
        assert document.get("direct_fallbacks") == {}, document
        assert document["requests"]["ListObjectsV2"] >= 2, document
        assert "again through botocore" not in m.log()
