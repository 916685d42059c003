"""S3 requests sent straight over trio streams: HEAD, small PUT, DELETE, LIST and, over plain
http, a multipart upload's create, parts and completion (botocore_store.py `_direct_parts`).

botocore spends about 1.6 ms of CPU on every call (parameter validation, event hooks,
endpoint rules, a worker thread) however small the request. For `ls -l` of a directory
(one HEAD per entry for x-amz-meta-*) and for small files (one PUT each) that cost is the
whole cost: on a two-core box botocore reaches ~550 HEAD/s, these requests ~6,000 HEAD/s at
~70 us of CPU each. The caller takes the plain outcomes (2xx, 404 for HEAD, a final 4xx
with S3's XML error); a broken connection, a timeout, an answer not framed plainly
(`Unanswered`) or any other answer is sent again through botocore, which knows every error,
redirect and retry rule.

Framing: a HEAD's answer (no body; one per entry in `ls -l`) is read by our own few lines
(~4 us; h11 ~45 us); every answer with a body by h11 (python-hyper's sans-I/O HTTP/1.1:
chunked, 1xx, conflicting lengths, header limits). Pipelining is ours (HEAD only).

The endpoint (scheme, host, path-style or virtual-hosted) is taken from a URL botocore
built, so addressing follows the client's own rules; requests are signed with SigV4 here
(header auth, the signing key derived once a day). Nothing here logs a header.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import select
import ssl
import time
import urllib.parse
from dataclasses import dataclass

import h11
import trio

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
MAX_HEADER_BYTES = 64 * 1024
SEND_SLICE = 1024 * 1024  # a large body is sent in slices of this, each within read_timeout
MAX_BODY = 64 * 1024 * 1024  # a larger Content-Length is not ours to read (LIST pages: ~1 MiB)
IDLE_MAX = 64  # kept-alive connections
# seconds a kept-alive connection is reused for: servers close idle ones (S3 after a few
# seconds, load balancers at their own timeouts), and a request on a connection the server
# closed meanwhile is lost (EOF, or a reset) however it is written
IDLE_EXPIRY = 4.0


class Unanswered(Exception):
    """No plain answer (broken connection, timeout, unexpected framing): ask botocore."""


# what an exchange may raise instead of an answer (EOFError: closed by the server)
CONNECTION_ERRORS = (EOFError, OSError, trio.BrokenResourceError, ssl.SSLError, ValueError,
                     Unanswered)


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower case; a repeated header keeps its last value
    body: bytes


def quote_key(key: str) -> str:
    """A key as S3 wants it in the path and in the canonical request (never re-encoded)."""
    return urllib.parse.quote(key, safe="/~")


def canonical_query(params: dict[str, str]) -> str:
    """A query string as SigV4 signs it (and as it is sent): sorted, every byte but the
    unreserved ones percent-encoded."""
    return "&".join(f"{urllib.parse.quote(name, safe='-_.~')}="
                    f"{urllib.parse.quote(value, safe='-_.~')}"
                    for name, value in sorted(params.items()))


class Signer:
    """AWS Signature Version 4 for S3 with the Authorization header."""

    def __init__(self, region: str):
        self.region = region
        self._keys: dict[tuple[str, str], bytes] = {}  # (secret, date) -> signing key

    def _signing_key(self, secret: str, date: str) -> bytes:
        key = self._keys.get((secret, date))
        if key is None:
            key = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
            for part in (self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            if len(self._keys) > 4:
                self._keys.clear()
            self._keys[(secret, date)] = key
        return key

    def sign(self, method: str, host: str, path: str, headers: dict[str, str],
             payload_hash: str, credentials: Credentials, now: float | None = None,
             query: str = "") -> None:
        """Add x-amz-date, x-amz-content-sha256, the token and Authorization to `headers`
        (names lower case); every header given is signed. `query` is canonical already
        (`canonical_query`)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        headers["host"] = host
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = payload_hash
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
        names = sorted(headers)
        canonical_headers = "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names)
        signed = ";".join(names)
        request = f"{method}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{payload_hash}"
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        digest = hashlib.sha256(request.encode()).hexdigest()
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}"
        signature = hmac.new(self._signing_key(credentials.secret_key, stamp[:8]),
                             to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}")


class _Connection:
    def __init__(self, stream: trio.abc.Stream, read_timeout: float):
        self.stream = stream
        self.read_timeout = read_timeout
        self.buffer = bytearray()
        self.used = False  # has answered a request before (may have been closed since)
        self.idle_since = 0.0  # trio time it went back to the idle list

    def closed_while_idle(self) -> bool:
        """Anything readable on an idle connection (the server's FIN, a reset, a TLS
        close_notify, stray bytes) means it cannot carry another request. A look at the
        socket, no read: the check urllib3 and httpcore make before reusing a connection."""
        if self.buffer:
            return True
        stream = getattr(self.stream, "transport_stream", self.stream)  # under TLS
        sock = getattr(stream, "socket", None)
        if sock is None:
            return False
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    async def receive(self) -> bytes:
        with trio.fail_after(self.read_timeout):
            return await self.stream.receive_some(65536)

    async def send(self, data: bytes) -> None:
        with trio.fail_after(self.read_timeout):
            await self.stream.send_all(data)

    async def read_head(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                return head
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise Unanswered("response headers too long")
            data = await self.receive()
            if not data:
                raise EOFError
            self.buffer += data


class DirectClient:
    """Kept-alive HTTP/1.1 connections to one S3 endpoint, one request on each at a time.

    `base_url` is any URL of an object in the bucket as botocore would address it, with the
    key `probe_key`; everything before the key is the bucket's base.

    The pool: an idle connection is reused only within IDLE_EXPIRY seconds and only if
    nothing arrived on it while idle; one that still turns out closed (EOF before any
    answer: the server closed it as the request left) is replaced by a new connection, once.
    Such a replacement is no failure of the endpoint: `stale_replaced` counts them, in
    `counters`, which a store passes to the client of each region it follows in turn (the
    count of the mount, not of one client)."""

    def __init__(self, base_url: str, probe_key: str, region: str,
                 connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 64,
                 headers: dict[str, str] | None = None,
                 counters: collections.Counter[str] | None = None):
        url = urllib.parse.urlsplit(base_url)
        quoted = quote_key(probe_key)
        if url.scheme not in ("http", "https") or not url.path.endswith(quoted):
            raise ValueError("no usable bucket URL")
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.netloc = url.netloc.rpartition("@")[2]
        self.base_path = url.path[:len(url.path) - len(quoted)]
        self.signer = Signer(region)
        self.headers = dict(headers or {})  # sent (and signed) with every request
        self.connect_timeout = connect_timeout  # TCP connect and TLS handshake
        self.read_timeout = read_timeout  # each send and each read of the socket
        # "stale_replaced": kept-alive connections found closed and replaced
        self.counters: collections.Counter[str] = \
            collections.Counter() if counters is None else counters
        self._ssl = ssl_context if self.https else None
        if self.https and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self._idle: list[_Connection] = []
        self._idle_run: object = None  # the trio run the idle connections belong to
        self.pipelining = True  # until a new connection is closed after one answer
        self._limit = trio.CapacityLimiter(max_connections)

    @property
    def stale_replaced(self) -> int:
        return self.counters["stale_replaced"]

    async def _connect(self) -> _Connection:
        with trio.fail_after(self.connect_timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_hostname=self.host,
                                        https_compatible=True)
                await stream.do_handshake()
        return _Connection(stream, self.read_timeout)

    async def request(self, method: str, key: str, credentials: Credentials,
                      headers: dict[str, str] | None = None, body: bytes = b"",
                      payload_hash: str = EMPTY_SHA256,
                      query: dict[str, str] | None = None) -> Response:
        """Send one request; raises Unanswered when there is no complete HTTP answer."""
        request = self._build(method, key, credentials, headers, body, payload_hash, query)

        async def exchange(connection: _Connection) -> tuple[Response, bool]:
            await self._send(connection, request, body)
            return await self._read_response(connection, method)

        return await self._on_a_connection(exchange)

    async def head_many(self, keys: list[str], credentials: Credentials
                        ) -> list[Response | None]:
        """HEADs of `keys` pipelined on one connection: every request written at once, the
        answers read in order (HTTP/1.1 keeps them in order). None for each key left
        without an answer (the connection broke or was closed part way): the caller asks
        for those one by one. Saves a round trip and two wake-ups per HEAD.

        A server that answers only the first of a pipeline and closes (some test servers)
        gets no more pipelines from this client: one request at a time, as `request`."""
        results: list[Response | None] = [None] * len(keys)
        if not self.pipelining or len(keys) == 1:
            for index, key in enumerate(keys):
                try:
                    results[index] = await self.request("HEAD", key, credentials)
                except Unanswered:
                    pass
            return results
        requests = b"".join(self._build("HEAD", key, credentials) for key in keys)

        async def pipeline(connection: _Connection) -> tuple[list[Response | None], bool]:
            # a new connection closed after its first answer (a server that takes one
            # request per connection) ends pipelining for good; a kept-alive one closed part
            # way (a server's cap of requests per connection) ends only this pipeline
            fresh = not connection.used
            await self._send(connection, requests, b"")
            for index in range(len(keys)):
                try:
                    results[index], keep = await self._read_response(connection, "HEAD")
                except CONNECTION_ERRORS:
                    if index == 0:
                        raise  # no answer at all: as for a single request
                    if fresh and index == 1:
                        self.pipelining = False
                    return results, False  # the answers so far stand
                if not keep:
                    if fresh and index == 0 and len(keys) > 1:
                        self.pipelining = False
                    return results, False
            return results, True

        try:
            return await self._on_a_connection(pipeline)
        except Unanswered:
            return results

    async def _on_a_connection(self, exchange):
        """`exchange(connection)` -> (result, keep) on a kept-alive connection that is still
        good, or a new one; once more on a *new* one when a kept-alive connection turns out
        to be closed before any answer. Raises Unanswered for anything but an answer."""
        self._check_run()
        async with self._limit:
            connection = await self._take_idle()
            for attempt in range(2):
                try:
                    if connection is None:
                        connection = await self._connect()
                    result, keep = await exchange(connection)
                except EOFError:
                    await self._discard(connection)
                    if attempt == 0 and connection is not None and connection.used:
                        self.counters["stale_replaced"] += 1
                        connection = None  # a new one: the others may be as stale
                        continue
                    raise Unanswered("connection closed before the answer") from None
                except (*CONNECTION_ERRORS, trio.TooSlowError) as exc:
                    await self._discard(connection)
                    raise Unanswered(type(exc).__name__) from None
                except BaseException:
                    await self._discard(connection)  # cancelled mid-request
                    raise
                await self._keep_or_close(connection, keep)
                return result
        raise AssertionError("unreachable")

    async def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection that is young and still open, if any;
        older or closed ones are dropped on the way."""
        now = trio.current_time()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < IDLE_EXPIRY and \
                    not connection.closed_while_idle():
                return connection
            await self._discard(connection)
        return None

    def _check_run(self) -> None:
        run = trio.lowlevel.current_root_task()
        if run is not self._idle_run:
            self._idle, self._idle_run = [], run  # another trio.run's: closed when collected

    def _build(self, method: str, key: str, credentials: Credentials,
               headers: dict[str, str] | None = None, body: bytes = b"",
               payload_hash: str = EMPTY_SHA256,
               query: dict[str, str] | None = None) -> bytes:
        """The request line and signed headers, ready to send."""
        headers = self.headers | (headers or {})
        # an object's path, or the bucket's own (no slash after a path-style bucket)
        path = self.base_path + quote_key(key) if key else self.base_path.rstrip("/") or "/"
        query_string = canonical_query(query) if query else ""
        self.signer.sign(method, self.netloc, path, headers, payload_hash, credentials,
                         query=query_string)
        if body or method in ("PUT", "POST"):
            headers["content-length"] = str(len(body))
        target = f"{path}?{query_string}" if query_string else path
        lines = [f"{method} {target} HTTP/1.1"] + [f"{n}: {v}" for n, v in headers.items()]
        try:
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise Unanswered("a header is not latin-1") from None

    async def _send(self, connection: _Connection, request: bytes, body: bytes) -> None:
        try:
            await connection.send(request + body if len(body) < 65536 else request)
            if len(body) >= 65536:  # a part: each slice within read_timeout, as botocore's
                view = memoryview(body)  # socket timeouts, not the whole part at once
                for start in range(0, len(view), SEND_SLICE):
                    await connection.send(view[start:start + SEND_SLICE])
        except trio.BrokenResourceError:
            raise EOFError from None  # closed by the server while idle: no answer to wait for

    async def _read_response(self, connection: _Connection, method: str
                             ) -> tuple[Response, bool]:
        """The next answer on the connection, and whether the connection can be used again.
        A HEAD's answer has no body: our own parser (~4 us per answer, h11 ~45 us, and a
        directory's `ls -l` is one HEAD per entry). Any other answer goes through h11."""
        if method != "HEAD":
            return await _read_with_h11(connection, method)
        while True:
            head = await connection.read_head()
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or \
                    not (parts[1].isascii() and parts[1].isdigit() and len(parts[1]) == 3):
                raise Unanswered("not an HTTP/1 answer")
            status = int(parts[1])
            if status >= 200:
                break  # an interim 1xx answer has no body: the real one follows
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        # no body, whatever Content-Length or Transfer-Encoding say (RFC 9110 9.3.2)
        response = Response(status, headers, b"")
        connection.used = True
        if parts[0] == "HTTP/1.0":  # kept alive only when it says so
            return response, headers.get("connection", "").lower() == "keep-alive"
        return response, headers.get("connection", "").lower() != "close"

    async def _keep_or_close(self, connection: _Connection, keep: bool) -> None:
        if keep and len(self._idle) < IDLE_MAX:
            connection.idle_since = trio.current_time()
            self._idle.append(connection)
        else:
            await self._discard(connection)

    async def _discard(self, connection: _Connection | None) -> None:
        if connection is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(connection.stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._discard(connection)


def _content_length(value: str | None) -> int:
    """A Content-Length as RFC 9110 writes it (digits only: not `+5`, `1_000` or `٥`), and
    small enough to read into memory; anything else is no plain answer."""
    if value is None:
        raise Unanswered("answer without a length")
    if not (value.isascii() and value.isdigit()) or len(value) > 15:
        raise Unanswered("answer with a malformed Content-Length")
    length = int(value)
    if length > MAX_BODY:
        raise Unanswered(f"answer of {length} bytes: more than a direct request reads")
    return length


async def _read_with_h11(connection: _Connection, method: str) -> tuple[Response, bool]:
    """An answer with a body (LIST, PUT, DELETE, an error's XML), framed by h11: Content-Length
    or chunked, interim 1xx answers skipped, conflicting lengths and over-long headers
    refused. A body is read only up to MAX_BODY, however it is framed. h11 needs to have
    "sent" the request to know what answer to expect: it is told of one, the bytes we sent
    ourselves. EOFError when the server closed before any byte of the answer (a stale
    kept-alive connection: the caller tries a new one)."""
    parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    parser.send(h11.Request(method=method, target="/", headers=[("host", "s3"),
                                                                ("content-length", "0")]))
    parser.send(h11.EndOfMessage())
    received = bool(connection.buffer)
    if received:
        parser.receive_data(bytes(connection.buffer))
        connection.buffer.clear()
    response: h11.Response | None = None
    body = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise Unanswered(f"malformed answer: {exc}") from None
        if event is h11.NEED_DATA:
            data = await connection.receive()
            if not data and not received:
                raise EOFError
            received = True
            parser.receive_data(data)  # b"": the server closed
        elif isinstance(event, h11.InformationalResponse):
            continue  # 100 Continue and the like: the real answer follows
        elif isinstance(event, h11.Response):
            response = event
            _check_framing(event)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise Unanswered(f"answer of more than {MAX_BODY} bytes: more than a direct "
                                 "request reads")
        elif isinstance(event, h11.EndOfMessage):
            break
        else:  # ConnectionClosed before the end of the answer
            raise Unanswered("connection closed mid-answer")
    assert response is not None
    connection.used = True
    leftover, closed = parser.trailing_data
    connection.buffer += leftover  # unasked-for bytes: the connection is not reused
    headers = {name.decode("latin-1"): value.decode("latin-1")
               for name, value in response.headers}
    keep = parser.their_state is h11.DONE and not closed and not leftover
    return Response(response.status_code, headers, bytes(body)), keep


def _check_framing(response: h11.Response) -> None:
    """A body whose end the answer does not mark (read until the server closes) is not
    taken: a cut-off body would look whole; nor one framed two ways (Content-Length and
    chunked: request smuggling's shape). A Content-Length must be plain digits and within
    MAX_BODY (h11 frames the body by it; this checks it before any byte is read)."""
    if response.status_code in (204, 304):
        return
    lengths = [value for name, value in response.headers if name == b"content-length"]
    chunked = any(name == b"transfer-encoding" for name, _ in response.headers)
    if lengths and chunked:
        raise Unanswered("answer with both Content-Length and Transfer-Encoding")
    if chunked:
        return
    if len(lengths) != 1:
        raise Unanswered("answer without a length" if not lengths else
                         "answer with several Content-Lengths")
    _content_length(lengths[0].decode("latin-1"))
