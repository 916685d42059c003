"""The mount options: one table of names, help, metavars and value parsers (pure, no I/O).

Every parser raises ValueError with one line saying what the option accepts, so a bad value
is refused before anything is mounted (`cli.build_config` adds the option's name).
"""

from __future__ import annotations

import grp
import math
import pwd
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

KiB, MiB, GiB = 1024, 1024**2, 1024**3

LOG_LEVELS = ("debug", "info", "warning", "error")
CANNED_ACLS = ("private", "public-read", "public-read-write", "authenticated-read",
               "aws-exec-read", "bucket-owner-read", "bucket-owner-full-control")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 8M, 64MiB, 1G or bytes)")
    return int(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")


def show_size(n: int) -> str:
    for unit, scale in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def size_between(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        size = parse_size(text)
        if size < low or (high is not None and size > high):
            limit = f"between {show_size(low)} and {show_size(high)}" if high else \
                f"at least {show_size(low)}"
            raise ValueError(f"must be {limit}, not {text}")
        return size
    return parse


AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """A duration such as 90s, 30m, 2h, 1d or 0 (plain numbers are seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not an age: {text!r} (use e.g. 30m, 2h, 1d or 0)")
    return float(match.group(1)) * AGE_UNITS[match.group(2).lower()]


def show_age(seconds: float) -> str:
    """1d2h, 2h5m, 3m10s, 42s: the two largest units."""
    seconds = max(0, int(seconds))
    parts = []
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= scale or (unit == "s" and not parts):
            parts.append(f"{seconds // scale}{unit}")
            seconds %= scale
    return "".join(parts[:2])


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on", ""):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be yes/no, true/false, on/off or 1/0, not {text!r}")


def parse_mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{1,4}", text):
        raise ValueError(f"must be an octal mode such as 644 or 0755, not {text!r}")
    return int(text, 8)


def integer(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < low:
            raise ValueError(f"must be a whole number of at least {low}, not {text!r}")
        return int(text)
    return parse


def seconds(low: float, *, above: bool = False) -> Callable[[str], float]:
    """`above`: the value must be strictly greater than `low` (a wait of 0 s makes no sense)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (above and value == low):
            bound = f"more than {low:g}" if above else f"at least {low:g}"
            raise ValueError(f"must be a number of seconds, {bound} (e.g. 1 or 0.5), "
                             f"not {text!r}")
        return value
    return parse


def user_id(text: str) -> int:
    """A numeric uid or a user name, as chown accepts."""
    return _id(text, "user", lambda name: pwd.getpwnam(name).pw_uid)


def group_id(text: str) -> int:
    return _id(text, "group", lambda name: grp.getgrnam(name).gr_gid)


def _id(text: str, kind: str, lookup: Callable[[str], int]) -> int:
    if text.isdigit():
        if int(text) >= 2**32 - 1:
            raise ValueError(f"{text} is not a valid {kind} id (0 to {2**32 - 2})")
        return int(text)
    try:
        return lookup(text)
    except KeyError:
        raise ValueError(f"no {kind} named {text!r} (give a {kind} name or a numeric id)") \
            from None


def choice(*values: str) -> Callable[[str], str]:
    """One of `values`, matched without regard to case, returned as spelled in `values`."""
    def parse(text: str) -> str:
        for value in values:
            if text.lower() == value.lower():
                return value
        raise ValueError(f"must be one of {', '.join(values)}, not {text!r}")
    return parse


def url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL such as "
                         f"https://s3.example.com, not {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"has a bad port: {text!r}") from None
    return text


def matching(pattern: str, accepts: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise ValueError(f"must be {accepts}, not {text!r}")
        return text
    return parse


def content_type(text: str) -> str:
    if text.lower() in ("auto", "none"):
        return text.lower()
    if not re.fullmatch(r"[\w.+-]+/[\w.+-]+(\s*;.*)?", text):
        raise ValueError(f"must be auto, none or a MIME type such as video/mp4, not {text!r}")
    return text


def path(text: str) -> str:
    if not text:
        raise ValueError("must be a file path, not empty")
    return text


@dataclass(frozen=True)
class Option:
    section: str  # "store", "fs" or "mount": which config dataclass holds it
    field: str
    parse: Callable[[str], object]
    metavar: str
    help: str
    flag: bool = False  # valid without a value: `-o ro` means `-o ro=yes`


def _flag(section: str, field: str, help: str) -> Option:
    return Option(section, field, parse_bool, "yes|no", help, flag=True)


REGION = matching(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?",
                  "a region name such as eu-west-1")
NAME = matching(r"[^\s,]+", "a name without spaces or commas")

OPTIONS: dict[str, Option] = {
    # S3
    "endpoint_url": Option("store", "endpoint_url", url, "URL",
                           "S3 endpoint of a non-AWS server, e.g. http://127.0.0.1:8333"),
    "force_path_style": _flag("store", "force_path_style",
                              "address buckets as URL/BUCKET (most non-AWS servers need it)"),
    "region": Option("store", "region", REGION, "REGION",
                     "AWS region (default: from the profile, else us-east-1)"),
    "profile": Option("store", "profile", NAME, "NAME",
                      "credentials profile from ~/.aws/credentials or ~/.aws/config"),
    "max_connections": Option("store", "max_connections", integer(1), "N",
                              "HTTP connections to S3 (default 16)"),
    "retries": Option("store", "max_attempts", integer(1), "N",
                      "botocore's attempts per request, backoff up to 0.75 s (or 15 s "
                      "for SlowDown) (default 5)"),
    "retry_time": Option("store", "retry_time", seconds(0), "SECONDS",
                         "while the endpoint is unreachable or answers 5xx, a request is "
                         "retried this long before it fails with EIO (default 60)"),
    "connect_timeout": Option("store", "connect_timeout", seconds(0, above=True), "SECONDS",
                              "wait for a TCP connection to the endpoint (default 5)"),
    "read_timeout": Option("store", "read_timeout", seconds(0, above=True), "SECONDS",
                           "wait for each read from the socket (default 30)"),
    "checksum": Option("store", "checksum", choice("crc32", "md5", "off"), "crc32|md5|off",
                       "checksum sent with every body and verified by the server "
                       "(default crc32)"),
    "sign_payload": Option("store", "sign_payload", choice("auto", "on", "off"), "auto|on|off",
                           "SigV4 SHA-256 of each body: auto signs only with checksum=off"),
    "storage_class": Option("store", "storage_class",
                            matching(r"[A-Za-z0-9_-]+", "a storage class such as STANDARD_IA"),
                            "CLASS", "storage class of new objects, e.g. STANDARD_IA"),
    "sse": Option("store", "sse", choice("AES256", "aws:kms", "aws:kms:dsse"), "AES256|aws:kms",
                  "server-side encryption of new objects"),
    "sse_kms_key_id": Option("store", "sse_kms_key_id", NAME, "KEY_ID",
                             "KMS key for sse=aws:kms (default: the account's S3 key)"),
    "direct_requests": _flag("store", "direct_requests",
                             "send HEAD, small PUT and DELETE over the mount's own "
                             "connections, ~20x less CPU than botocore (default yes)"),
    "requester_pays": _flag("store", "requester_pays",
                            "send x-amz-request-payer: requester with every request: the "
                            "mount's account pays for a requester-pays bucket"),
    "acl": Option("store", "acl", choice(*CANNED_ACLS), "ACL",
                  "canned ACL of new objects, e.g. public-read or bucket-owner-full-control"),
    "client_cert": Option("store", "client_cert", path, "PATH",
                          "PEM file with the TLS client certificate an endpoint asks for "
                          "(and its key, unless client_key is given)"),
    "client_key": Option("store", "client_key", path, "PATH",
                         "PEM file with the key of client_cert"),
    # file system
    "ro": _flag("fs", "read_only", "mount read-only"),
    "read_only": _flag("fs", "read_only", "the same as ro"),
    "on_read_only": Option("mount", "on_read_only", choice("mount", "refuse"), "mount|refuse",
                           "when the credentials or bucket policy refuse writes (checked "
                           "at mount): mount read-only with one WARNING (default), or refuse "
                           "to mount"),
    "uid": Option("fs", "uid", user_id, "USER",
                  "owner of files without stored metadata (name or id; default: you)"),
    "gid": Option("fs", "gid", group_id, "GROUP",
                  "group of files without stored metadata (name or id; default: yours)"),
    "file_mode": Option("fs", "file_mode", parse_mode, "MODE",
                        "octal mode of files without stored metadata (default 644)"),
    "dir_mode": Option("fs", "dir_mode", parse_mode, "MODE",
                       "octal mode of directories (default 755)"),
    "content_type": Option("fs", "content_type", content_type, "TYPE",
                           "Content-Type of new objects: auto (from the extension, default), "
                           "none, or a MIME type"),
    "part_size": Option("fs", "part_size", size_between(5 * MiB, 5 * GiB), "SIZE",
                        "first multipart part size, 5M to 5G (default 8M)"),
    "max_memory": Option("fs", "max_memory", size_between(10 * MiB), "SIZE",
                         "memory for all part buffers and read-ahead, at least twice "
                         "part_size (default: an eighth of RAM, 256M to 4G)"),
    "max_unsynced": Option("fs", "max_unsynced", seconds(0), "SECONDS",
                           "upload what a file holds in memory once its oldest unstored "
                           "write is this old, fsync or not: the most a crash loses "
                           "(default 30; 0: only at fsync and close)"),
    "fsync_interval": Option("fs", "fsync_interval", seconds(0), "SECONDS",
                             "an fsync sooner than this after the last one waits for it: "
                             "at most one tail upload per interval (default 1; 0: none)"),
    "upload_concurrency": Option("fs", "upload_concurrency", integer(1), "N",
                                 "parts uploaded at once (default 4)"),
    "read_ahead_max": Option("fs", "read_ahead_max", size_between(MiB), "SIZE",
                             "largest read-ahead window per file, at least 1M (default 32M)"),
    "read_concurrency": Option("fs", "read_concurrency", integer(1), "N",
                               "ranged GETs in flight per read stream (default 4)"),
    "attr_timeout": Option("fs", "attr_timeout", seconds(0), "SECONDS",
                           "how long the kernel caches attributes (default 1)"),
    "entry_timeout": Option("fs", "entry_timeout", seconds(0), "SECONDS",
                            "how long the kernel caches names (default 1)"),
    "negative_timeout": Option("fs", "negative_timeout", seconds(0), "SECONDS",
                               "how long a name found missing stays missing without asking "
                               "S3; another client's new object under it is not seen "
                               "meanwhile (default 0: never; 1 or more speeds up copies of "
                               "many small files when S3 is far away)"),
    "writeback_cache": _flag("fs", "writeback_cache",
                             "let the kernel coalesce small writes (default yes)"),
    "queued_uploads": _flag("fs", "queued_uploads",
                            "close() of a file of one part returns once its bytes are in "
                            "memory; its upload runs in the background, 32 at once (fsync, "
                            "sync DIR and unmount wait for them; a crash loses those not "
                            "yet stored; default no)"),
    # mount
    "allow_other": _flag("mount", "allow_other",
                         "let other users use the mount (needs user_allow_other in "
                         "/etc/fuse.conf unless root)"),
    "foreground": _flag("mount", "foreground",
                        "stay in the foreground and log to stderr (debugging, systemd)"),
    "log_level": Option("mount", "log_level", choice(*LOG_LEVELS), "LEVEL",
                        "debug, info (default), warning or error; debug logs every S3 "
                        "request"),
    "log_file": Option("mount", "log_file", path, "PATH",
                       "append the log here (default: stderr in the foreground, else "
                       "syslog)"),
}

# what mount(8) and fstab pass along that means nothing to us
GENERIC_OPTIONS = {"rw", "defaults", "_netdev", "nofail", "noauto", "auto", "user", "users",
                   "nouser", "owner", "group", "exec", "noexec", "suid", "nosuid", "dev",
                   "nodev", "async", "sync", "dirsync", "atime", "noatime", "relatime",
                   "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
                   "diratime", "nodiratime", "silent", "loud", "nosymfollow"}


def is_generic(name: str) -> bool:
    return name in GENERIC_OPTIONS or name.startswith(("x-", "comment"))
