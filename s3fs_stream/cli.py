"""Command line: `mount.s3stream` (a mount(8) helper) and `s3stream` with subcommands.

    mount.s3stream BUCKET[:PREFIX] MOUNTPOINT [-sfnv] [-o OPT[,OPT...]] [--OPT VALUE] [--foreground]
    s3stream mount ...          the same
    s3stream local-server --dir DIR [--port N]
    s3stream recover BUCKET[:PREFIX] [-o OPT[,OPT...]] [--list | --complete | --abort]
                     [--older-than AGE] [--key KEY]
    s3stream install-helper [--dir /sbin]

Every option works as `-o name=value` (fstab, mount -t s3stream) and as `--name value`, for
the mount and for recover (its S3 options); the table of options and their value checks is
in options.py. Every command has --version, and a bad value is one line naming the option,
exit code 2.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import signal
import socket
import sys
import time
from dataclasses import replace

import trio

from .arguments import (
    SECTION_TITLES,
    USAGE_ERROR,
    Parser,
    add_options,
    parse_options,
    parse_source,
)
from .config import FsConfig, MountConfig, StoreConfig
from .errors import QuietError
from .options import show_size

log = logging.getLogger("s3fs_stream")

MOUNT_EPILOG = """\
Every --NAME VALUE option also works as -o NAME=VALUE (comma-separated; a yes|no option
given as -o NAME means yes), which is the form mount(8) and /etc/fstab use. Sizes take
K, M, G suffixes (powers of 1024). Credentials and region come from botocore's usual
chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile in ~/.aws, instance metadata.

examples:
  AWS:
    mount.s3stream my-bucket /mnt/s3 -o region=eu-west-1
  an S3-compatible server (MinIO, SeaweedFS, Ceph, Garage, ...), only keys under rec/:
    mount.s3stream my-bucket:rec /mnt/rec -o endpoint_url=http://127.0.0.1:8333,force_path_style
  the same through mount(8), once `s3stream install-helper` has put the helper in /sbin:
    mount -t s3stream my-bucket /mnt/s3 -o region=eu-west-1
  /etc/fstab (root's credentials: /root/.aws or profile=NAME):
    my-bucket  /mnt/s3  s3stream  _netdev,nofail,region=eu-west-1,allow_other  0  0
  debugging (stays in the foreground, logs every S3 request to stderr):
    mount.s3stream my-bucket /mnt/s3 --foreground --log-level debug
  unmount: fusermount3 -u /mnt/s3 (or umount /mnt/s3 as root)
"""


def mount_parser(prog: str) -> Parser:
    parser = Parser(prog, "Mount an S3 bucket as a directory: files written there stream "
                    "into S3\nmultipart uploads while they are being written.",
                    usage="%(prog)s BUCKET[:PREFIX] MOUNTPOINT [-sfnv] [-o OPT[,OPT...]] "
                    "[--OPTION VALUE ...]", epilog=MOUNT_EPILOG)
    parser.add_argument("source", metavar="BUCKET[:PREFIX]",
                        help="the bucket, and optionally the key prefix to mount")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    helper = parser.add_argument_group("mount(8) helper flags")
    helper.add_argument("-o", dest="options", action="append", default=[],
                        metavar="OPT[,OPT...]",
                        help="options as NAME=VALUE or NAME, the same as the --NAME below")
    helper.add_argument("-s", dest="sloppy", action="store_true",
                        help="sloppy: ignore unknown options")
    helper.add_argument("-f", dest="fake", action="store_true",
                        help="fake: check the options, credentials and bucket, mount nothing")
    helper.add_argument("-n", dest="no_mtab", action="store_true",
                        help="no mtab entry (ignored: there is no mtab to write)")
    helper.add_argument("-v", dest="verbose", action="store_true",
                        help="verbose: log at least at info level")
    add_options(parser, SECTION_TITLES)
    return parser


def build_config(argv: list[str], prog: str = "mount.s3stream") -> MountConfig:
    """argv -> MountConfig; every value is checked here (pure: no files, no network)."""
    args = mount_parser(prog).parse_args(argv)
    sections = parse_options(args, set(SECTION_TITLES), args.sloppy)
    bucket, prefix = parse_source(args.source)
    store = StoreConfig(bucket=bucket, prefix=prefix, **sections["store"])
    if store.sse_kms_key_id and not (store.sse or "").startswith("aws:kms"):
        raise QuietError("option sse_kms_key_id: needs sse=aws:kms", USAGE_ERROR)
    fs = replace(FsConfig(uid=os.getuid(), gid=os.getgid()), **sections["fs"])
    if fs.max_memory < 2 * fs.part_size:
        raise QuietError(f"option max_memory: must be at least twice part_size "
                         f"({show_size(2 * fs.part_size)}), not {show_size(fs.max_memory)}",
                         USAGE_ERROR)
    mount = sections["mount"]
    if mount.get("log_file"):
        mount["log_file"] = os.path.abspath(mount["log_file"])
    if store.client_key and not store.client_cert:
        raise QuietError("option client_key: needs client_cert", USAGE_ERROR)
    return MountConfig(store=store, fs=fs, mountpoint=os.path.abspath(args.mountpoint),
                       fake=args.fake, verbose=args.verbose, **mount)


def check_before_mount(config: MountConfig) -> None:
    """The checks that touch the system, done before daemonizing so that a failure is one
    line on the terminal with exit code 2 rather than a dead background process."""
    if config.log_file:
        try:
            with open(config.log_file, "a"):
                pass
        except OSError as exc:
            raise QuietError(f"option log_file: cannot append to {config.log_file} "
                             f"({exc.strerror}); give a writable file", USAGE_ERROR) from None
    for name in ("client_cert", "client_key"):
        value = getattr(config.store, name)
        if value and not os.access(value, os.R_OK):
            raise QuietError(f"option {name}: cannot read {value}; give a readable PEM file",
                             USAGE_ERROR)
    if config.store.profile:
        from .botocore_store import profile_exists

        if not profile_exists(config.store.profile):
            raise QuietError(f"option profile: no profile {config.store.profile!r} in "
                             "~/.aws/config or ~/.aws/credentials", USAGE_ERROR)


class KernelGaveUpFilter(logging.Filter):
    """pyfuse3 logs an ERROR when a reply finds the kernel no longer waiting for it
    (fuse_reply_* fails with ENOENT): the request was interrupted, or dropped because the
    file system is being unmounted, as the RELEASE of a file read just before `umount` is.
    Nothing is lost, so it becomes a debug line."""

    GONE = os.strerror(errno.ENOENT)

    def filter(self, record: logging.LogRecord) -> bool:
        if "fuse_reply_* failed" in str(record.msg) and record.getMessage().endswith(self.GONE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


_CONTROL = {code: f"\\x{code:02x}" for code in [*range(32), 127]}


class OneLineFormatter(logging.Formatter):
    r"""Every log line is one line: control characters in a message (file names may hold
    `\n`, `\r`, escape sequences) are written as `\xNN`, so a name cannot forge or hide a
    line; a traceback after the message is left as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = record.message.translate(_CONTROL)
        return super().formatMessage(record)


def setup_logging(config: MountConfig, to_stderr: bool) -> None:
    level = getattr(logging, config.log_level.upper())
    if config.verbose:
        level = min(level, logging.INFO)
    root = logging.getLogger()
    root.handlers.clear()
    if config.log_file:
        handler: logging.Handler = logging.FileHandler(config.log_file)
        handler.setFormatter(OneLineFormatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(OneLineFormatter("s3stream[%(process)d]: %(levelname)s "
                                               "%(message)s"))
    else:  # no syslog (containers): a file the user can find, never silence
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        os.makedirs(os.path.join(state, "s3stream"), exist_ok=True)
        handler = logging.FileHandler(os.path.join(state, "s3stream", "mount.log"))
        handler.setFormatter(OneLineFormatter(
            "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # botocore's and urllib3's debug lines carry signatures and credentials headers: our own
    # request lines (botocore_store) replace them
    logging.getLogger("botocore").setLevel(max(level, logging.WARNING))
    logging.getLogger("urllib3").setLevel(max(level, logging.WARNING))
    fuse_log = logging.getLogger("pyfuse3")
    fuse_log.setLevel(max(level, logging.INFO))
    fuse_log.addFilter(KernelGaveUpFilter())


def notify_systemd(state: str = "READY=1") -> None:
    """Tell systemd (a Type=notify unit) that the mount is ready, as sd_notify(3) does:
    one datagram to the unix socket in $NOTIFY_SOCKET ('@' starts an abstract name).
    Without the variable there is nobody to tell."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not tell systemd %s at NOTIFY_SOCKET=%s: %s", state, address, exc)


def mount_main(argv: list[str] | None = None, prog: str = "mount.s3stream") -> int:
    """Entry point of mount.s3stream."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = build_config(argv, prog)
        check_before_mount(config)
        if config.foreground or config.fake:
            setup_logging(config, to_stderr=True)
            trio.run(_run, config, (lambda: None) if config.fake else notify_systemd)
            return 0
        return _daemonize(config, prog)
    except QuietError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 130


async def _run(config: MountConfig, ready=lambda: None) -> None:
    from .mount import run_mount  # imports pyfuse3: keep `s3stream --help` light

    await run_mount(config, ready)


def _daemonize(config: MountConfig, prog: str) -> int:
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
        print(f"{prog}: {message or 'the mount process died before it was ready'}",
              file=sys.stderr)
        return code or 1
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(write_fd, b"ok")
        os.close(write_fd)
        reported = True

    code = 0
    try:
        setup_logging(config, to_stderr=False)
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
    """Entry point of `s3stream`: dispatch to a subcommand, each with its own --help."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][1](argv[1:])
    listing = "\n".join(f"  {name:<15} {text}" for name, (text, _) in COMMANDS.items())
    parser = Parser("s3stream", "Stream files into S3 through a FUSE mount.",
                    usage="%(prog)s COMMAND [ARGS...]",
                    epilog=f"commands:\n{listing}\n\n`s3stream COMMAND --help` describes "
                    "each; mount.s3stream is the same as `s3stream mount`.")
    parser.add_argument("command", metavar="COMMAND", choices=list(COMMANDS),
                        help="one of the commands below")
    parser.parse_args(argv[:1])  # --help, --version, or one line naming what is wrong
    return USAGE_ERROR


def _recover(argv: list[str]) -> int:
    from .recover import recover_main

    return recover_main(argv)


def _status(argv: list[str]) -> int:
    from .status import status_main

    return status_main(argv)


def _local_server(argv: list[str]) -> int:
    from .local_server import start_local_server

    parser = Parser("s3stream local-server", "Run an embedded SeaweedFS S3 server on "
                    "127.0.0.1 to try s3stream out (data kept in --dir).")
    parser.add_argument("--dir", required=True, metavar="PATH",
                        help="directory for the server's data (created if missing)")
    parser.add_argument("--port", type=int, metavar="N",
                        help="S3 port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        server = start_local_server(args.dir, args.port)
    except (RuntimeError, OSError) as exc:
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


def _install_helper(argv: list[str]) -> int:
    parser = Parser("s3stream install-helper", "Symlink mount.s3stream into the directory "
                    "where mount(8) looks for helpers,\nso that `mount -t s3stream` and "
                    "/etc/fstab lines of type s3stream work.")
    parser.add_argument("--dir", default="/sbin", metavar="PATH",
                        help="where mount(8) looks for mount.TYPE helpers (default /sbin)")
    parser.add_argument("--force", action="store_true",
                        help="replace a different mount.s3stream already there")
    args = parser.parse_args(argv)
    try:
        link, target, changed = install_helper(args.dir, args.force)
    except QuietError as exc:
        print(f"s3stream install-helper: {exc}", file=sys.stderr)
        return exc.exitcode
    print(f"{link} -> {target}" + ("" if changed else " (already installed)"))
    return 0


def helper_script() -> str:
    """The mount.s3stream script installed beside this `s3stream` (or this interpreter)."""
    for directory in (os.path.dirname(os.path.abspath(sys.argv[0])),
                      os.path.dirname(sys.executable)):
        candidate = os.path.join(directory, "mount.s3stream")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    raise QuietError("no mount.s3stream script next to s3stream or the Python interpreter; "
                     "install the package first (pip install s3fs-stream)")


def install_helper(directory: str, force: bool = False) -> tuple[str, str, bool]:
    """Make DIRECTORY/mount.s3stream a symlink to our helper: (link, target, changed)."""
    target = helper_script()
    link = os.path.join(directory, "mount.s3stream")
    if os.path.lexists(link):
        if os.path.realpath(link) == target:
            return link, target, False
        if not force:
            raise QuietError(f"{link} exists and is not this installation's helper "
                             f"({os.path.realpath(link)}); use --force to replace it")
    try:
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
    except OSError as exc:
        raise QuietError(f"cannot create {link} ({exc.strerror}); run it as root "
                         "(sudo s3stream install-helper) or choose --dir") from None
    return link, target, True


COMMANDS = {
    "mount": ("mount a bucket (the same as mount.s3stream)",
              lambda argv: mount_main(argv, "s3stream mount")),
    "recover": ("list, complete or abort the uploads a dead mount left behind", _recover),
    "status": ("show the files being written, memory, uploads and errors of a mount",
               _status),
    "local-server": ("run an embedded SeaweedFS S3 server to try s3stream out", _local_server),
    "install-helper": ("symlink mount.s3stream into /sbin for mount -t s3stream and fstab",
                       _install_helper),
}
