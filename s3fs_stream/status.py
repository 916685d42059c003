"""`s3stream status`: what a running mount is doing, from the daemon itself.

The daemon serves one JSON document per connection on a Unix socket it owns (mode 0600 in a
directory of mode 0700, and the peer's uid checked with SO_PEERCRED: only its own user and
root get an answer). The socket's name is derived from the mount point, so the client finds
it from the mount point alone:

    $XDG_RUNTIME_DIR/s3stream/   when the daemon has XDG_RUNTIME_DIR (a desktop session)
    /run/s3stream/               root without it (fstab, systemd)
    /tmp/s3stream-UID/           anyone else

    mount-<first 16 hex digits of sha256(real path of the mount point)>.sock

The client asks every one of these directories. Nothing here imports pyfuse3: the server
reads the open-file table, the budget and the store's request counters duck-typed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import sys
import time

import trio

log = logging.getLogger(__name__)

NOT_RUNNING = 1  # no mount answered
SOCKET_TIMEOUT = 5.0


def socket_dirs(uid: int | None = None) -> list[str]:
    """Where sockets live, in the order the daemon picks (the first usable one)."""
    uid = os.getuid() if uid is None else uid
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        dirs.append(os.path.join(runtime, "s3stream"))
    if uid == 0:
        dirs.append("/run/s3stream")
    dirs.append(f"/tmp/s3stream-{uid}")
    return dirs


def socket_name(mountpoint: str, resolve: bool = False) -> str:
    """The daemon resolves the whole path before mounting (`resolve`); the client resolves
    only the parent directory, never touching the mount point itself: a stat of a mount
    whose daemon is stuck would hang the very command meant to diagnose it."""
    path = os.path.abspath(mountpoint)
    if resolve:
        path = os.path.realpath(path)
    else:
        parent, name = os.path.split(path)
        path = os.path.join(os.path.realpath(parent), name) if name else path
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()
    return f"mount-{digest[:16]}.sock"


def _is_s3stream_mount(mountpoint: str) -> bool:
    """From /proc/self/mountinfo: no stat of a mount that may not answer."""
    parent, name = os.path.split(os.path.abspath(mountpoint))
    path = os.path.join(os.path.realpath(parent), name) if name else "/"
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                if fields[4] == path and                         fields[fields.index("-") + 1] == "fuse.s3stream":
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def _own_dir(path: str) -> bool:
    """Create `path` (mode 0700) or accept it if it is ours, a real directory and private."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    if info.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError:
            return False
    return True


class StatusServer:
    """The daemon's side: bound in `open`, served by `serve` (a task of the mount's nursery),
    removed by `close`."""

    def __init__(self, mountpoint: str, snapshot):
        self.mountpoint = mountpoint
        self._snapshot = snapshot  # () -> dict
        self.path: str | None = None
        self._sock: trio.socket.SocketType | None = None

    def open(self) -> None:
        """Bind the socket; before mounting, since its name resolves the mount point (a stat
        of our own mount from the event loop would wait for ourselves)."""
        name = socket_name(self.mountpoint, resolve=True)
        for directory in socket_dirs():
            if not _own_dir(directory):
                continue
            path = os.path.join(directory, name)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                try:  # a socket left by a mount of this mount point that died
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                old_umask = os.umask(0o177)  # born 0600: no moment where others may connect
                try:
                    sock.bind(path)
                finally:
                    os.umask(old_umask)
                os.chmod(path, 0o600)
                sock.listen(8)
            except OSError as exc:
                sock.close()
                log.debug("status socket not possible in %s: %s", directory, exc)
                continue
            self.path, self._sock = path, trio.socket.from_stdlib_socket(sock)
            log.debug("status socket: %s", path)
            return
        log.warning("no directory for the status socket (tried %s): `s3stream status` will "
                    "not see this mount", ", ".join(socket_dirs()))

    async def serve(self) -> None:
        if self._sock is None:
            return
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    connection, _ = await self._sock.accept()
                except (trio.ClosedResourceError, OSError):
                    return  # closed: the mount is ending
                nursery.start_soon(self._answer, connection)

    async def _answer(self, connection) -> None:
        with connection:
            try:
                uid = _peer_uid(connection)
                if uid not in (os.getuid(), 0):
                    log.debug("status: refused a connection from uid %s", uid)
                    return
                data = (json.dumps(self._snapshot()) + "\n").encode()
                with trio.move_on_after(SOCKET_TIMEOUT):
                    while data:
                        sent = await connection.send(data)
                        data = data[sent:]
            except OSError as exc:
                log.debug("status: connection ended: %s", exc)
            except Exception:
                log.exception("status: could not answer")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _peer_uid(connection) -> int:
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                  struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# -- what the daemon reports ------------------------------------------------------------------


def snapshot(mountpoint: str, source: str, files, budget, stats,
             kernel_requests: dict[str, int] | None = None) -> dict:
    """The document `s3stream status` shows: open writers, memory, the kernel's requests
    and the requests sent to S3."""
    now = time.time_ns()
    entries = []
    # a file closed while its completion runs (copying a sparse file's zeros) is shown too
    for writer in [writer for _, writer in files.writers()] + files.releasing():
        seconds = max((now - writer.started_ns) / 1e9, 1e-3)
        retries = stats.retries_by_key.get(writer.key, 0) if stats is not None else 0
        entries.append({
            "name": writer.name, "state": _state(writer), "size": writer.size,
            "bytes_written": writer.bytes_written, "bytes_uploaded": writer.bytes_uploaded,
            "parts_uploaded": writer.parts_uploaded, "parts_in_flight": writer.parts_in_flight,
            "parts_copied": writer.parts_copied,
            "bytes_per_s": round(writer.bytes_written / seconds), "retries": retries,
            "memory": writer.holds, "seconds_open": round(seconds, 1)})
    requests = stats.snapshot() if stats is not None else \
        {"requests": {}, "errors": {}, "retries": 0}
    return {
        "mountpoint": mountpoint, "source": source, "pid": os.getpid(), "time": now / 1e9,
        "files": entries,
        "memory": {"used": budget.used, "limit": budget.limit, "peak": budget.peak,
                   "spills": budget.spills},
        "uploads_in_flight": sum(entry["parts_in_flight"] for entry in entries),
        **({"queued_uploads": files.queue.snapshot()}
           if getattr(files, "queue", None) is not None else {}),
        "kernel_requests": dict(kernel_requests or {}),
        **requests}


def _copied(entry: dict) -> str:
    """Parts copied server-side (a base, a sparse file's zeros), when there are any."""
    copied = entry.get("parts_copied", 0)
    return f"{copied} copied server-side, " if copied else ""


def _state(writer) -> str:
    state = writer.state.value
    if state == "failed":
        return "failed"
    if getattr(writer, "queued", False):
        return "queued"  # closed, its PutObject queued (queued_uploads)
    if writer.completing:
        return "completing"
    return {"complete": "complete", "detached": "deleted"}.get(state, "writing")


# -- the client ------------------------------------------------------------------------------


class StatusError(Exception):
    def __init__(self, message: str, exitcode: int = NOT_RUNNING):
        super().__init__(message)
        self.exitcode = exitcode


def query(path: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    if not chunks:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "no answer (another user's mount?)")
    return json.loads(b"".join(chunks))


def find_sockets(mountpoint: str | None) -> list[str]:
    """The sockets to ask: the one of `mountpoint`, or every one this user can see."""
    found = []
    for directory in dict.fromkeys(socket_dirs()):
        if mountpoint is not None:
            path = os.path.join(directory, socket_name(mountpoint))
            if os.path.exists(path) or _exists_denied(path):
                found.append(path)
            continue
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        found += [os.path.join(directory, n) for n in names if n.startswith("mount-")]
    return found


def _exists_denied(path: str) -> bool:
    try:
        os.stat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def collect(mountpoint: str | None) -> list[dict]:
    """Every answering mount's document; one-line errors when there is none."""
    documents, denied = [], []
    for path in find_sockets(mountpoint):
        try:
            documents.append(query(path))
        except PermissionError:
            denied.append(path)
        except (OSError, ValueError):
            continue  # a socket left by a mount that died
    if documents:
        return documents
    if denied:
        raise StatusError(f"permission denied on {denied[0]}: the mount belongs to another "
                          "user (run status as that user)", 13)
    if mountpoint is not None:
        if _is_s3stream_mount(mountpoint):
            raise StatusError(f"{mountpoint}: its daemon does not answer (stuck, another "
                              "user's mount, or a version without status)")
        if not os.path.isdir(mountpoint):
            raise StatusError(f"{mountpoint}: no such directory", 2)
        raise StatusError(f"{mountpoint} is not an s3stream mount")
    raise StatusError("no s3stream mount of this user is running")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = width if total <= 0 else min(width, done * width // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def render(document: dict, rates: dict[str, float] | None = None) -> str:
    """A terminal page for one mount; `rates` (name -> bytes/s between two redraws) replaces
    the average since open when given."""
    memory = document["memory"]
    lines = [f"{document['source']} on {document['mountpoint']} (pid {document['pid']})",
             f"memory {_bar(memory['used'], memory['limit'])} {_size(memory['used'])} of "
             f"{_size(memory['limit'])} (peak {_size(memory['peak'])}, {memory['spills']} "
             f"parts spilled)   uploads in flight: {document['uploads_in_flight']}"]
    files = document["files"]
    if not files:
        lines.append("no file open for writing")
    for entry in files:
        rate = (rates or {}).get(entry["name"], entry["bytes_per_s"])
        lines.append(
            f"  {entry['name']}  {entry['state']}  "
            f"{_bar(entry['bytes_uploaded'], entry['bytes_written'])} "
            f"{_size(entry['bytes_written'])} written, {entry['parts_uploaded']} parts "
            f"uploaded, {entry['parts_in_flight']} in flight, {_copied(entry)}"
            f"{_size(rate)}/s, "
            f"{entry['retries']} retries")
    queue = document.get("queued_uploads")
    if queue is not None:
        lines.append(f"queued uploads: {queue['queued']} queued, {queue['stored']} stored, "
                     f"{queue['failed']} failed")
        lines += [f"  FAILED {failure['name']}: {failure['reason']}"
                  for failure in queue["recent_failures"]]
    kernel = ", ".join(f"{k} {v}" for k, v in sorted(document.get("kernel_requests",
                                                                 {}).items()))
    lines.append(f"kernel requests: {kernel or 'none'}")
    requests = ", ".join(f"{k} {v}" for k, v in sorted(document["requests"].items()))
    lines.append(f"requests: {requests or 'none'}; retries {document['retries']}")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(document["errors"].items()))
    lines.append(f"errors: {errors or 'none'}")
    fallbacks = ", ".join(f"{k} {v}" for k, v in
                          sorted(document.get("direct_fallbacks", {}).items()))
    lines.append(f"sent again through botocore: {fallbacks or 'none'}; stale connections "
                 f"replaced {document.get('stale_connections_replaced', 0)}")
    return "\n".join(lines)


def status_main(argv: list[str]) -> int:
    from .arguments import Parser

    parser = Parser("s3stream status", "Show what running mounts are doing: each file being "
                    "written (bytes, parts uploaded\nand in flight, speed, retries, state) and "
                    "totals (memory, uploads, requests, errors).")
    parser.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                        help="the mount to ask (default: every mount of this user)")
    parser.add_argument("--watch", action="store_true",
                        help="redraw every --interval seconds until Ctrl-C")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between redraws with --watch (default 1)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (a list, one entry per mount)")
    args = parser.parse_args(argv)
    try:
        if not args.watch:
            documents = collect(args.mountpoint)
            if args.json:
                print(json.dumps(documents, indent=1))
            else:
                print("\n\n".join(render(d) for d in documents))
            return 0
        return _watch(args.mountpoint, args.interval, args.json)
    except StatusError as exc:
        print(f"s3stream status: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 0


def _watch(mountpoint: str | None, interval: float, as_json: bool) -> int:
    previous: dict[tuple[int, str], tuple[float, int]] = {}
    while True:
        documents = collect(mountpoint)
        if as_json:
            print(json.dumps(documents), flush=True)
        else:
            pages = []
            for document in documents:
                rates = {}
                for entry in document["files"]:
                    key = (document["pid"], entry["name"])
                    now, written = document["time"], entry["bytes_written"]
                    if key in previous and now > previous[key][0]:
                        rates[entry["name"]] = max(0.0, (written - previous[key][1]) /
                                                   (now - previous[key][0]))
                    previous[key] = (now, written)
                pages.append(render(document, rates))
            sys.stdout.write("\x1b[H\x1b[J" + "\n\n".join(pages) + "\n")
            sys.stdout.flush()
        time.sleep(interval)
