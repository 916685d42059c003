"""Many small objects fast, for listing tests: a few hundred PUTs in flight over keep-alive
HTTP/1.1 connections (asyncio), each signed with botocore's SigV4 (UNSIGNED-PAYLOAD)."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def put_many(endpoint_url: str, access_key: str, secret_key: str, bucket: str,
             keys: list[str], body: bytes = b"", connections: int = 200,
             each: Callable[[str], tuple[bytes, dict[str, str]]] | None = None) -> None:
    """`each(key)`: that key's body and x-amz-meta-* (names without the prefix), instead of
    `body` and none."""
    asyncio.run(_put_many(endpoint_url, Credentials(access_key, secret_key), bucket, keys,
                          each or (lambda key: (body, {})), connections))


async def _put_many(endpoint_url, credentials, bucket, keys, each, connections):
    url = urllib.parse.urlsplit(endpoint_url)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            while True:
                try:
                    key = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                path = f"/{bucket}/" + urllib.parse.quote(key, safe="/~")
                body, metadata = each(key)
                headers = {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
                headers.update({f"x-amz-meta-{k}": v for k, v in metadata.items()})
                request = AWSRequest("PUT", f"{endpoint_url}{path}", data=body,
                                     headers=headers)
                S3SigV4Auth(credentials, "s3", "us-east-1").add_auth(request)
                head = [f"PUT {path} HTTP/1.1", f"Host: {url.netloc}",
                        f"Content-Length: {len(body)}"]
                head += [f"{k}: {v}" for k, v in request.headers.items()
                         if k.lower() not in ("host", "content-length")]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if b" 200 " not in status:
                    raise RuntimeError(f"PUT {key}: {status!r}")
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(min(connections, len(keys)))))
