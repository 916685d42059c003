"""Command line: `mount.s3stream` (a mount(8) helper) and `s3stream` with subcommands.

    mount.s3stream BUCKET[:PREFIX] MOUNTPOINT [-sfnv] [-o OPT[,OPT...]] [--OPT VALUE] [--foreground]
    s3stream mount ...          the same
    s3stream local-server --dir DIR [--port N]
    s3stream recover BUCKET[:PREFIX] [--complete | --abort] [--endpoint-url URL ...]

Every option works as `-o name=value` (fstab, mount -t s3stream) and as `--name value`.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, replace

import trio

from .config import FsConfig, MiB, MountConfig, StoreConfig
from .errors import QuietError

log = logging.getLogger("s3fs_stream")

USAGE_ERROR = 2


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 8M, 64MiB, 1G or bytes)")
    return int(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on", ""):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_mode(text: str) -> int:
    return int(text, 8)


@dataclass(frozen=True)
class Option:
    section: str  # "store", "fs" or "mount": which config dataclass holds it
    field: str
    parse: object = str
    flag: bool = False  # valid without a value
    help: str = ""


OPTIONS: dict[str, Option] = {
    "endpoint_url": Option("store", "endpoint_url", help="S3 endpoint URL (non-AWS servers)"),
    "region": Option("store", "region"),
    "profile": Option("store", "profile", help="profile from ~/.aws/config"),
    "force_path_style": Option("store", "force_path_style", parse_bool, True),
    "max_connections": Option("store", "max_connections", int),
    "retries": Option("store", "max_attempts", int, help="attempts per request (default 5)"),
    "checksum": Option("store", "checksum", help="crc32 (default), md5 or off"),
    "sign_payload": Option("store", "sign_payload",
                           help="SigV4 SHA-256 of each body: auto (only without a checksum), "
                                "on or off"),
    "storage_class": Option("store", "storage_class"),
    "sse": Option("store", "sse", help="AES256 or aws:kms"),
    "sse_kms_key_id": Option("store", "sse_kms_key_id"),
    "acl": Option("store", "acl", help="canned ACL, e.g. public-read"),
    "ro": Option("fs", "read_only", parse_bool, True),
    "read_only": Option("fs", "read_only", parse_bool, True),
    "uid": Option("fs", "uid", int),
    "gid": Option("fs", "gid", int),
    "file_mode": Option("fs", "file_mode", parse_mode),
    "dir_mode": Option("fs", "dir_mode", parse_mode),
    "part_size": Option("fs", "part_size", parse_size, help="first part size (default 8M)"),
    "max_memory": Option("fs", "max_memory", parse_size, help="memory budget (default: an eighth of RAM, 256M to 4G)"),
    "upload_concurrency": Option("fs", "upload_concurrency", int),
    "read_ahead_max": Option("fs", "read_ahead_max", parse_size),
    "read_concurrency": Option("fs", "read_concurrency", int),
    "attr_timeout": Option("fs", "attr_timeout", float),
    "entry_timeout": Option("fs", "entry_timeout", float),
    "content_type": Option("fs", "content_type", help="auto (default), none, or a MIME type"),
    "writeback_cache": Option("fs", "writeback_cache", parse_bool, True),
    "allow_other": Option("mount", "allow_other", parse_bool, True),
    "foreground": Option("mount", "foreground", parse_bool, True),
    "log_level": Option("mount", "log_level"),
    "log_file": Option("mount", "log_file"),
}

# what mount(8) and fstab pass along that means nothing to us
GENERIC_OPTIONS = {"rw", "defaults", "_netdev", "nofail", "noauto", "auto", "user", "users",
                   "nouser", "owner", "group", "exec", "noexec", "suid", "nosuid", "dev",
                   "nodev", "async", "sync", "atime", "noatime", "relatime", "nodiratime"}


def _split_options(values: list[str]) -> list[tuple[str, str | None]]:
    pairs = []
    for value in values:
        for item in value.split(","):
            if item:
                name, sep, arg = item.partition("=")
                name = name.strip()
                if not name.startswith(("x-", "_")):
                    name = name.replace("-", "_")
                pairs.append((name, arg if sep else None))
    return pairs


def build_config(argv: list[str]) -> MountConfig:
    parser = argparse.ArgumentParser(
        prog="mount.s3stream", description="Mount an S3 bucket; writes stream into multipart "
        "uploads.", epilog="Options: " + ", ".join(sorted(OPTIONS)))
    parser.add_argument("source", help="BUCKET or BUCKET:PREFIX")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        metavar="OPT[,OPT...]")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    parser.add_argument("-f", dest="fake", action="store_true",
                        help="fake: check everything, mount nothing")
    parser.add_argument("-n", dest="no_mtab", action="store_true", help="ignored")
    parser.add_argument("-v", dest="verbose", action="store_true")
    for name, option in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if option.flag:
            parser.add_argument(flag, dest="long_" + name, nargs="?", const="true",
                                help=option.help)
        else:
            parser.add_argument(flag, dest="long_" + name, help=option.help)
    args = parser.parse_args(argv)

    pairs = _split_options(args.options)
    pairs += [(name, value) for name in OPTIONS
              if (value := getattr(args, "long_" + name)) is not None]
    sections: dict[str, dict] = {"store": {}, "fs": {}, "mount": {}}
    unknown = []
    for name, value in pairs:
        option = OPTIONS.get(name)
        if option is None:
            if name in GENERIC_OPTIONS or name.startswith(("x-systemd.", "x-", "comment")):
                continue
            unknown.append(name)
            continue
        if value is None and not option.flag:
            raise QuietError(f"option {name} needs a value ({name}=...)", USAGE_ERROR)
        try:
            parsed = option.parse(value if value is not None else "true")
        except ValueError as exc:
            raise QuietError(f"option {name}: {exc}", USAGE_ERROR) from None
        sections[option.section][option.field] = parsed
    if unknown and not args.sloppy:
        raise QuietError(f"unknown option(s): {', '.join(unknown)}; valid options: "
                         f"{', '.join(sorted(OPTIONS))}", USAGE_ERROR)

    bucket, _, prefix = args.source.partition(":")
    if not bucket:
        raise QuietError("no bucket given (BUCKET or BUCKET:PREFIX)", USAGE_ERROR)
    prefix = prefix.strip("/")
    store = StoreConfig(bucket=bucket, prefix=prefix + "/" if prefix else "",
                        **sections["store"])
    if store.checksum not in ("crc32", "md5", "off"):
        raise QuietError("option checksum: use crc32, md5 or off", USAGE_ERROR)
    if store.sign_payload not in ("auto", "on", "off"):
        raise QuietError("option sign_payload: use auto, on or off", USAGE_ERROR)
    fs_defaults = FsConfig(uid=os.getuid(), gid=os.getgid())
    fs = replace(fs_defaults, **sections["fs"])
    if fs.part_size < 5 * MiB:
        raise QuietError("option part_size: S3 needs parts of at least 5 MiB", USAGE_ERROR)
    if fs.max_memory < 2 * fs.part_size:
        raise QuietError(f"option max_memory: needs at least twice part_size "
                         f"({2 * fs.part_size >> 20} MiB)", USAGE_ERROR)
    mount = sections["mount"]
    return MountConfig(store=store, fs=fs, mountpoint=os.path.abspath(args.mountpoint),
                       fake=args.fake, verbose=args.verbose, **mount)


def setup_logging(config: MountConfig, to_stderr: bool) -> None:
    level = getattr(logging, config.log_level.upper(), logging.INFO)
    if config.verbose:
        level = min(level, logging.INFO)
    root = logging.getLogger()
    root.handlers.clear()
    if config.log_file:
        handler: logging.Handler = logging.FileHandler(config.log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("s3stream[%(process)d]: %(levelname)s "
                                               "%(message)s"))
    else:  # no syslog (containers): a file the user can find, never silence
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        os.makedirs(os.path.join(state, "s3stream"), exist_ok=True)
        handler = logging.FileHandler(os.path.join(state, "s3stream", "mount.log"))
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("botocore").setLevel(max(level, logging.WARNING))
    logging.getLogger("urllib3").setLevel(max(level, logging.WARNING))
    logging.getLogger("pyfuse3").setLevel(max(level, logging.INFO))


def mount_main(argv: list[str] | None = None) -> int:
    """Entry point of mount.s3stream."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = build_config(argv)
        if config.foreground or config.fake:
            setup_logging(config, to_stderr=True)
            trio.run(_run, config)
            return 0
        return _daemonize(config)
    except QuietError as exc:
        print(f"mount.s3stream: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 130


async def _run(config: MountConfig, ready=lambda: None) -> None:
    from .mount import run_mount  # imports pyfuse3: keep `s3stream --help` light

    await run_mount(config, ready)


def _daemonize(config: MountConfig) -> int:
    """Fork; the child mounts and tells the parent through a pipe when it is ready."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ok":
            return 0
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 1
        print(f"mount.s3stream: {message or 'the mount process died before it was ready'}",
              file=sys.stderr)
        return code or 1
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    setup_logging(config, to_stderr=False)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(write_fd, b"ok")
        os.close(write_fd)
        reported = True

    code = 0
    try:
        trio.run(_run, config, ready)
    except QuietError as exc:
        log.error("%s", exc)
        code = exc.exitcode
        if not reported:
            os.write(write_fd, str(exc).encode())
    except BaseException as exc:
        log.exception("mount failed")
        code = 1
        if not reported:
            os.write(write_fd, f"mount failed: {exc!r}".encode())
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `s3stream`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else USAGE_ERROR
    command, rest = argv[0], argv[1:]
    if command == "mount":
        return mount_main(rest)
    if command == "local-server":
        return _local_server(rest)
    if command == "recover":
        from .recover import recover_main

        return recover_main(rest)
    print(f"s3stream: unknown command {command!r}; use mount, local-server or recover",
          file=sys.stderr)
    return USAGE_ERROR


def _local_server(argv: list[str]) -> int:
    from .local_server import start_local_server

    parser = argparse.ArgumentParser(prog="s3stream local-server",
                                     description="Run an embedded SeaweedFS S3 server on "
                                     "127.0.0.1 (data kept in --dir).")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        server = start_local_server(args.dir, args.port)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"s3stream local-server: {exc}", file=sys.stderr)
        return 1
    print(f"endpoint_url=http://127.0.0.1:{server.endpoint_url.rsplit(':', 1)[1]}\n"
          f"AWS_ACCESS_KEY_ID={server.access_key}\nAWS_SECRET_ACCESS_KEY={server.secret_key}\n"
          f"data: {server.data_dir}   (Ctrl-C stops it)", flush=True)
    try:
        while not stop and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0

