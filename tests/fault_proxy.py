"""A fault-injecting HTTP/1.1 reverse proxy on loopback, for tests (pure Python, threads).

The client (a mount, botocore) talks to the proxy as if it were the S3 endpoint; the proxy
forwards each request byte for byte to the real server, Host header included: SigV4 signs
the Host the client sent (the proxy's address), and the server checks the signature against
the Host it receives, so nothing is rewritten. Bodies are streamed through in chunks, never
gathered; Range, ETag, If-Match and every other header pass untouched.

A fraction (`rate`) of requests, chosen by a seeded random generator (the same sequence of
requests gets the same faults), get one of the faults in `modes`:

  "500"        InternalError XML, the request is not forwarded
  "503"        SlowDown XML, the request is not forwarded
  "reset"      the request is forwarded (the server acts on it), the connection is reset
               before any byte of the response
  "reset_body" the response's status line and headers are relayed, then the connection is
               reset before its body (a response without a body is relayed whole)
  "truncate"   headers and half of the body, then a reset (a response without a body is
               relayed whole)

Refusals: `proxy.refuse(rule)` makes every request for which `rule(method, target, headers)`
is true get 403 AccessDenied without reaching the server (a bucket policy, Object Lock or
read-only credentials, as the mount meets them); `proxy.refuse(None)` stops refusing. Rules
can change while a mount runs (the mount's own checks at start-up pass first); each refused
request is counted in `refused`.

Holds: `proxy.hold(rule)` makes every request the rule picks wait (before it is forwarded)
until `proxy.let_go()`; each held request is counted in `held`. A slow or distant S3 for as
long as a test needs to look at what the mount does meanwhile.

A bucket "in another region": with `region="eu-central-1"`, a request whose SigV4 credential
scope names another region gets what S3 answers a request signed for the wrong region,
without reaching the server: `region_answer="301"` (the default) PermanentRedirect, or
`"400"` AuthorizationHeaderMalformed, both with `x-amz-bucket-region: REGION` (a HEAD's
answer has no body, as S3's) on a connection kept alive. Each is counted in `misdirected`
(method, target, the region signed for). `record_headers=True` keeps every request's
(method, target, headers) in `seen`.

Chunked answers: `proxy.chunk_answers(rule)` re-encodes the answer to every request the rule
picks (same signature) with `Transfer-Encoding: chunked` instead of its Content-Length, in
chunks of varied sizes (the server's bytes, reframed), as S3 and proxies in front of it may
answer a LIST; `proxy.chunk_answers(None)` stops. Each reframed answer is counted in
`chunked`. `lists(method, target, headers)` picks ListObjectsV2.

`idle_close=SECONDS` closes a client connection that waits that long for its next request,
as S3 and load balancers close idle kept-alive connections.

Faults happen at HTTP-message boundaries of a connection; everything else is a byte pump.
`Expect: 100-continue` is relayed: the server's interim answer goes back to the client before
the body is sent on (an injected 500/503 answers at once; the client then sends no body).
"""

from __future__ import annotations

import collections
import random
import socket
import ssl
import struct
import threading
from collections.abc import Callable

ALL_MODES = ("500", "503", "reset", "reset_body", "truncate")
CHUNK = 256 * 1024

_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}

RefuseRule = Callable[[str, str, dict[str, str]], bool]


def refuse_method(method: str, key_part: str = "") -> RefuseRule:
    """A rule refusing `method` requests whose target (path and query) contains `key_part`."""
    return lambda m, target, headers: m == method and key_part in target


def lists(method: str, target: str, headers: dict[str, str]) -> bool:
    """A rule picking ListObjectsV2 requests."""
    return method == "GET" and "list-type=2" in target


class _Closed(Exception):
    """A peer closed its connection."""


class _Reader:
    """Buffered reads from a socket: lines, exact lengths, and chunks for pumping."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(CHUNK)
        if not data:
            raise _Closed()
        self.buf += data

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return line
            if len(self.buf) > 65536:
                raise _Closed()
            self._fill()

    def head(self) -> bytes:
        """A start line and headers, up to and including the empty line."""
        lines = [self.line()]
        while lines[-1] not in (b"\r\n", b"\n"):
            lines.append(self.line())
        return b"".join(lines)

    def some(self, limit: int) -> bytes:
        if not self.buf:
            self._fill()
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data


def _headers(head: bytes) -> tuple[bytes, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0].encode("latin-1"), headers


def _pump_length(src: _Reader, dst: socket.socket | None, length: int) -> None:
    while length > 0:
        data = src.some(min(length, CHUNK))
        length -= len(data)
        if dst is not None:
            dst.sendall(data)


def _pump_chunked(src: _Reader, dst: socket.socket | None) -> None:
    while True:
        size_line = src.line()
        if dst is not None:
            dst.sendall(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the empty line
                line = src.line()
                if dst is not None:
                    dst.sendall(line)
                if line in (b"\r\n", b"\n"):
                    return
        _pump_length(src, dst, size + 2)  # the chunk and its CRLF


def _pump_body(src: _Reader, dst: socket.socket | None, headers: dict[str, str]) -> None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        _pump_chunked(src, dst)
    else:
        _pump_length(src, dst, int(headers.get("content-length", "0") or 0))


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, upstream_port: int, rate: float = 0.1, seed: int = 0,
                 modes: tuple[str, ...] = ALL_MODES, upstream_host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None, idle_close: float | None = None,
                 region: str | None = None, region_answer: str = "301",
                 record_headers: bool = False):
        unknown = set(modes) - set(ALL_MODES)
        if unknown:
            raise ValueError(f"unknown fault modes: {sorted(unknown)}")
        self.upstream = (upstream_host, upstream_port)
        self.tls = tls  # clients speak https to the proxy (it speaks http upstream)
        self.rate = rate
        self.idle_close = idle_close
        self.idle_closed = 0  # connections closed for idleness
        self.modes = tuple(modes)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.faulted: list[tuple[str, str, str]] = []  # (mode, method, target)
        self._refuse: RefuseRule | None = None
        self.refused: list[tuple[str, str]] = []  # (method, target) answered 403
        self._hold: tuple[RefuseRule, threading.Event] | None = None
        self.held: list[tuple[str, str]] = []  # (method, target) held by `hold`
        self.region = region  # the bucket's region (None: any region signed for is right)
        self.region_answer = region_answer
        self.misdirected: list[tuple[str, str, str]] = []  # (method, target, region signed)
        self.record_headers = record_headers
        self.seen: list[tuple[str, str, dict[str, str]]] = []  # (method, target, headers)
        self._chunk: RefuseRule | None = None
        self.chunked: list[tuple[str, str]] = []  # (method, target) answered chunked
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.add(client)
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._serve, args=(client,), daemon=True,
                                          name="fault-proxy-conn")
                self._threads.append(thread)
            thread.start()

    def refuse(self, rule: RefuseRule | None) -> None:
        """Answer 403 AccessDenied to every request the rule picks (None: refuse nothing)."""
        with self._lock:
            self._refuse = rule

    def hold(self, rule: RefuseRule) -> None:
        """Hold every request the rule picks until `let_go` (at most 120 s)."""
        with self._lock:
            self._hold = (rule, threading.Event())

    def let_go(self) -> None:
        with self._lock:
            if self._hold is not None:
                self._hold[1].set()
            self._hold = None

    def _held(self, method: str, target: str, headers: dict[str, str]) -> None:
        with self._lock:
            hold = self._hold
            if hold is None or not hold[0](method, target, headers):
                return
            self.held.append((method, target))
        hold[1].wait(120)

    def chunk_answers(self, rule: RefuseRule | None) -> None:
        """Re-encode the answers to the requests the rule picks as chunked (None: none)."""
        with self._lock:
            self._chunk = rule

    def _rechunk(self, method: str, target: str, headers: dict[str, str]) -> bool:
        with self._lock:
            if self._chunk is None or not self._chunk(method, target, headers):
                return False
            self.chunked.append((method, target))
            return True

    def _choose(self, method: str, target: str, headers: dict[str, str]) -> str | None:
        with self._lock:
            self.requests += 1
            if self.record_headers:
                self.seen.append((method, target, headers))
            signed = _signed_region(headers)
            if self.region is not None and signed is not None and signed != self.region:
                self.misdirected.append((method, target, signed))
                return "region"
            if self._refuse is not None and self._refuse(method, target, headers):
                self.refused.append((method, target))
                return "403"
            if self._random.random() >= self.rate:
                return None
            mode = self._random.choice(self.modes)
            self.faults[mode] += 1
            self.faulted.append((mode, method, target))
            return mode

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if self.tls is not None:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (OSError, ssl.SSLError):
                    return  # a client that does not trust us
            reader = _Reader(client)
            up_reader: _Reader | None = None
            while not self._stopped:
                client.settimeout(self.idle_close)  # only while waiting for a request
                try:
                    head = reader.head()
                except _Closed:
                    return
                except TimeoutError:
                    with self._lock:
                        self.idle_closed += 1
                    return
                client.settimeout(None)
                start, headers = _headers(head)
                method, target = start.decode("latin-1").split(" ")[:2]
                self._held(method, target, headers)
                mode = self._choose(method, target, headers)
                expect = headers.get("expect", "").lower() == "100-continue"
                if mode == "region":
                    if expect:  # the client may or may not send the body now: not kept
                        client.sendall(self._region_response(method, target, close=True))
                        return
                    _pump_body(reader, None, headers)  # read and dropped
                    client.sendall(self._region_response(method, target))
                    continue
                if mode in _ERRORS:
                    if not expect:
                        _pump_body(reader, None, headers)  # read and dropped
                    client.sendall(_error_response(mode, target))
                    return  # Connection: close
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=120)
                    with self._lock:
                        self._sockets.add(upstream)
                    up_reader = _Reader(upstream)
                upstream.sendall(head)
                response_head = None
                if expect:
                    response_head = up_reader.head()
                    if _status(response_head) == 100:
                        client.sendall(response_head)
                        response_head = None
                if response_head is None:
                    _pump_body(reader, upstream, headers)
                    response_head = up_reader.head()
                    while _status(response_head) == 100:  # a late interim answer
                        response_head = up_reader.head()
                if mode == "reset":
                    _reset(client)
                    return
                status, response_headers = _headers(response_head)
                code = _status(response_head)
                has_body = method != "HEAD" and code not in (204, 304) and (
                    "chunked" in response_headers.get("transfer-encoding", "").lower()
                    or int(response_headers.get("content-length", "0") or 0) > 0)
                if has_body and mode is None and "content-length" in response_headers \
                        and self._rechunk(method, target, headers):
                    _relay_chunked(up_reader, client, response_head,
                                   int(response_headers["content-length"]))
                    if _closes(headers, response_headers):
                        return
                    continue
                client.sendall(response_head)
                if has_body and mode in ("reset_body", "truncate"):
                    if mode == "truncate":
                        length = int(response_headers.get("content-length", "0") or 0)
                        _pump_length(up_reader, client, length // 2)
                    _reset(client)
                    return
                if has_body:
                    if "content-length" in response_headers or \
                            "chunked" in response_headers.get("transfer-encoding", "").lower():
                        _pump_body(up_reader, client, response_headers)
                    else:  # the body ends when the server closes
                        try:
                            while True:
                                client.sendall(up_reader.some(CHUNK))
                        except _Closed:
                            return
                if _closes(headers, response_headers):
                    return
        except (OSError, _Closed, ValueError):
            return
        finally:
            with self._lock:
                self._sockets.discard(client)
                if upstream is not None:
                    self._sockets.discard(upstream)
            client.close()
            if upstream is not None:
                upstream.close()


    def _region_response(self, method: str, target: str, close: bool = False) -> bytes:
        """S3's answer to a request signed for another region than the bucket's."""
        if self.region_answer == "301":
            code, reason, error = 301, "Moved Permanently", "PermanentRedirect"
            message = "The bucket you are attempting to access must be addressed using " \
                      "the specified endpoint."
            extra = f"<Endpoint>s3.{self.region}.amazonaws.com</Endpoint>"
        else:
            code, reason, error = 400, "Bad Request", "AuthorizationHeaderMalformed"
            message = f"The authorization header is malformed; the region is wrong; " \
                      f"expecting '{self.region}'"
            extra = f"<Region>{self.region}</Region>"
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{error}</Code>'
                f"<Message>{message}</Message>{extra}"
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        head = (f"HTTP/1.1 {code} {reason}\r\nx-amz-bucket-region: {self.region}\r\n"
                f"Content-Type: application/xml\r\n")
        if method == "HEAD":
            head += "Content-Length: 0\r\n"  # no body
            body = b""
        else:
            head += f"Content-Length: {len(body)}\r\n"
        if close:
            head += "Connection: close\r\n"
        return (head + "\r\n").encode() + body


def _signed_region(headers: dict[str, str]) -> str | None:
    """The region of a SigV4 Authorization header's credential scope (or of a presigned
    URL's: not looked at), None when unsigned."""
    authorization = headers.get("authorization", "")
    _, found, rest = authorization.partition("Credential=")
    if not found:
        return None
    scope = rest.split(",", 1)[0].split("/")  # KEY/DATE/REGION/s3/aws4_request
    return scope[2] if len(scope) >= 5 else None


def _closes(request_headers: dict[str, str], response_headers: dict[str, str]) -> bool:
    return "close" in response_headers.get("connection", "").lower() or \
        "close" in request_headers.get("connection", "").lower()


def _relay_chunked(src: _Reader, dst: socket.socket, head: bytes, length: int) -> None:
    """The answer `head` with a body of `length` bytes from `src`, sent chunked: the
    Content-Length line replaced by Transfer-Encoding, the body in chunks of varied sizes
    (one with a chunk extension), then the last chunk and no trailers."""
    lines = [line for line in head.split(b"\r\n")
             if not line.lower().startswith(b"content-length:")]
    lines.insert(1, b"Transfer-Encoding: chunked")  # the empty line(s) stay at the end
    dst.sendall(b"\r\n".join(lines))
    sizes = (1, 700, 4096, 65536, 13)
    index = 0
    while length > 0:
        data = bytearray()
        want = min(length, sizes[index % len(sizes)])
        while len(data) < want:
            data += src.some(want - len(data))
        length -= len(data)
        extension = b";s3stream=test" if index == 1 else b""
        dst.sendall(b"%x%s\r\n" % (len(data), extension) + bytes(data) + b"\r\n")
        index += 1
    dst.sendall(b"0\r\n\r\n")


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _error_response(mode: str, target: str) -> bytes:
    code, reason, error, message = _ERRORS[mode]
    resource = target.split("?", 1)[0]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{error}</Code>'
            f"<Message>{message}</Message><Resource>{resource}</Resource>"
            f"<RequestId>fault-proxy</RequestId></Error>").encode()
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
