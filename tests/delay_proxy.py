"""A TCP proxy on loopback that delays each direction's bytes by a fixed time (a WAN link).

`scripts/bench --rtt MS` puts one in front of its S3 server, so that every system (s3stream,
raw botocore, s3fs-fuse, rclone) pays the same round trip: each chunk read from one side is
stamped on arrival and written to the other side `delay` seconds later (delay = MS / 2 per
direction, so a request and its answer cost MS). It is a pipe, not a sleep per request: chunks
queue behind each other in order, so pipelined requests, many connections and streaming bodies
behave as they do over a long link with plenty of bandwidth. Bytes pass untouched (SigV4 signs
the Host the client sent, the proxy's address, and the server checks the Host it receives).

Each direction buffers at most `window` bytes (64 MiB) before it stops reading, which bounds
memory and gives the sender TCP backpressure. A half-close (EOF) travels after the last chunk,
delayed like the data; a reset or error on either side closes both.

It runs as a process of its own (`spawn`: the bench and the tests use it so; it then shares no
GIL with a raw client or a test's threads):

    python tests/delay_proxy.py --upstream 127.0.0.1:8333 --rtt-ms 20

prints `port=N` once it listens, and runs until SIGTERM/SIGINT or its parent's exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import time

CHUNK = 256 * 1024
WINDOW = 64 << 20


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], delay: float, window: int = WINDOW):
        self.upstream = upstream
        self.delay = delay  # seconds, each direction
        self.window = window
        self.connections = 0
        self.bytes = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port,
                                                  limit=CHUNK, backlog=256)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter):
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        u_writer = None
        try:
            try:
                u_reader, u_writer = await asyncio.open_connection(*self.upstream, limit=CHUNK)
            except OSError:
                return
            for w in (c_writer, u_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:  # the proxy adds its delay, not Nagle's
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # the answer's direction waits the same delay as the request's
            pipes = [asyncio.ensure_future(self._pipe(c_reader, u_writer)),
                     asyncio.ensure_future(self._pipe(u_reader, c_writer))]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            finally:  # a failed direction ends the other one too
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (c_writer, u_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read chunks as they come, write each `delay` after it arrived; EOF likewise."""
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        queued = 0
        more = asyncio.Event()  # the sender has something to send
        room = asyncio.Event()  # the receiver may read again
        room.set()

        async def receive() -> None:
            nonlocal queued
            while True:
                await room.wait()
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                queue.append((time.monotonic() + self.delay, data))
                queued += len(data)
                if queued >= self.window:
                    room.clear()
                more.set()
                if not data:
                    return

        async def send() -> None:
            nonlocal queued
            while True:
                while not queue:
                    more.clear()
                    await more.wait()
                due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # the EOF, as late as the data before it
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                queued -= len(data)
                self.bytes += len(data)
                if queued < self.window:
                    room.set()

        receiver = asyncio.ensure_future(receive())
        try:
            await send()
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)


def spawn(upstream_url: str, rtt_ms: float) -> tuple[subprocess.Popen, str]:
    """Start a delay proxy process in front of `upstream_url` (http://HOST:PORT): the
    process (the caller stops it) and the endpoint URL clients use instead."""
    upstream = upstream_url.split("//", 1)[1].rstrip("/")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--upstream", upstream,
                             "--rtt-ms", str(rtt_ms)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line.startswith("port="):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the delay proxy did not start (exit {proc.returncode})")
    return proc, f"http://127.0.0.1:{int(line.split('=', 1)[1])}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, metavar="HOST:PORT")
    ap.add_argument("--rtt-ms", type=float, required=True,
                    help="round trip added (half of it each direction)")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: free)")
    a = ap.parse_args(argv)
    host, _, port = a.upstream.rpartition(":")
    parent = os.getppid()  # before `port=` is printed: the parent may exit right after

    async def run() -> None:
        proxy = DelayProxy((host, int(port)), a.rtt_ms / 2000)
        listen = await proxy.start(a.port)
        print(f"port={listen}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)

        async def orphaned() -> None:  # a parent killed with SIGKILL stops no one
            while os.getppid() == parent:
                await asyncio.sleep(1.0)
            stop.set()

        watch = asyncio.ensure_future(orphaned())
        await stop.wait()
        watch.cancel()
        await proxy.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
