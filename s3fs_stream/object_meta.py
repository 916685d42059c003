"""Object metadata ↔ file attributes, in s3fs-fuse's headers and formats (pure functions).

mode, uid, gid, mtime, atime and ctime travel as `x-amz-meta-mode`, `-uid`, `-gid`,
`-mtime`, `-atime` and `-ctime` (times in seconds, optionally with a fraction), so buckets
written by s3fs-fuse look right here and the other way round. Objects without them get the
mount's defaults and their LastModified. The mode carries the file type as s3fs-fuse writes
it: a symbolic link is an object whose body is the target and whose mode has S_IFLNK; a
directory marker `dir/` may carry S_IFDIR and the directory's attributes (servers that keep
no metadata on markers, SeaweedFS, give directories the mount's defaults).

Values other tools wrote that are no valid attribute (`uid: -1`, an owner of 2**32 or more,
"abc", an mtime beyond what a time_t in nanoseconds holds) are not shown: the mount's
default (or LastModified) takes their place, and the first of them is logged once.

Everything else an existing object carries (its content type and other content headers,
other tools' x-amz-meta-*, storage class, encryption, tags) is `Kept` by every rewrite.
"""

from __future__ import annotations

import logging
import mimetypes
import re
import stat
import time
from dataclasses import dataclass, replace

from .config import FsConfig
from .object_store import ObjectInfo, PutOptions

log = logging.getLogger(__name__)

OUR_KEYS = frozenset({"mode", "uid", "gid", "mtime", "atime", "ctime"})
ID_MAX = 2**32 - 2  # uid_t; 2**32 - 1 is (uid_t)-1, "no owner"
NS_MAX = 2**63 - 1  # times travel as signed 64-bit nanoseconds
_SECONDS = re.compile(r"\s*(-?)(\d{1,20})(?:\.(\d*))?\s*")


@dataclass
class FileMeta:
    """What an object the mount writes carries as x-amz-meta-*."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    mtime_explicit: bool = False  # set by utimes to a time other than "now"
    atime_ns: int | None = None  # stored only once set (touch -a, cp -p): else mtime
    ctime_ns: int | None = None  # stored only once attributes changed: else mtime

    def to_headers(self, with_mtime: bool = True) -> dict[str, str]:
        headers = {"mode": str(self.mode), "uid": str(self.uid), "gid": str(self.gid)}
        if with_mtime:
            headers["mtime"] = format_mtime(self.mtime_ns)
        if self.atime_ns is not None:
            headers["atime"] = format_mtime(self.atime_ns)
        if self.ctime_ns is not None:
            headers["ctime"] = format_mtime(self.ctime_ns)
        return headers


@dataclass(frozen=True)
class SetAttr:
    """The attributes a setattr request changes (None: unchanged)."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None

    @property
    def changes_meta(self) -> bool:
        return any(v is not None for v in (self.mode, self.uid, self.gid, self.mtime_ns,
                                           self.atime_ns))

    def kernel_time_only(self, now_ns: int) -> bool:
        """Only a recent mtime: what the kernel's writeback cache sends by itself after
        writes and renames (and `touch -m` with no date, which cannot be told apart)."""
        return (self.mtime_ns is not None and abs(self.mtime_ns - now_ns) <= 2_000_000_000
                and all(v is None for v in (self.size, self.mode, self.uid, self.gid,
                                            self.atime_ns)))


def format_mtime(mtime_ns: int) -> str:
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)
    return f"{seconds}.{nanos:09d}" if nanos else str(seconds)


def parse_mtime(text: str) -> int | None:
    """x-amz-meta-mtime as s3fs-fuse writes it ("1700000000" or "1700000000.123456789");
    None for anything else (NaN, "abc") and for times a signed 64-bit count of nanoseconds
    does not hold (before 1677 or after 2262)."""
    match = _SECONDS.fullmatch(text)
    if match is None:
        return None
    sign, seconds, fraction = match.groups()
    nanos = int(seconds) * 1_000_000_000 + int(((fraction or "") + "000000000")[:9])
    nanos = -nanos if sign else nanos
    return nanos if -NS_MAX <= nanos <= NS_MAX else None


def changed_meta(meta: FileMeta, change: SetAttr, started_ns: int) -> FileMeta:
    """`meta` with a setattr applied. A "now" mtime (the kernel's own, or `touch`) from two
    seconds before `started_ns` until now is left to the completion time; any other is kept
    as given."""
    updates: dict = {}
    if change.mode is not None:
        updates["mode"] = stat.S_IFMT(meta.mode) | stat.S_IMODE(change.mode)
    if change.uid is not None:
        updates["uid"] = change.uid
    if change.gid is not None:
        updates["gid"] = change.gid
    if change.mtime_ns is not None and change.mtime_ns != meta.mtime_ns:
        updates["mtime_ns"] = change.mtime_ns
        # a future time (touch -d 2030-01-01) is as explicit as a past one
        updates["mtime_explicit"] = not (started_ns - 2_000_000_000 <= change.mtime_ns
                                         <= time.time_ns() + 2_000_000_000)
    if change.atime_ns is not None:
        updates["atime_ns"] = change.atime_ns
    # a setattr that changes nothing (the kernel's writeback repeating the times it has, as
    # after a rename) stores nothing: no ctime bump, no server-side copy
    updates = {name: value for name, value in updates.items()
               if name == "mtime_explicit" or getattr(meta, name) != value}
    if updates:
        updates["ctime_ns"] = time.time_ns()  # ctime moves on every change of attributes
    return replace(meta, **updates) if updates else meta


def _time(meta: dict[str, str], name: str, key: str) -> int | None:
    if name not in meta:
        return None
    value = parse_mtime(meta[name])
    if value is None:
        _odd(key, name, meta[name], "a time")
    return value


def _id(meta: dict[str, str], name: str, default: int, key: str, limit: int) -> int:
    text = meta.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if 0 <= value <= limit:
        return value
    _odd(key, name, text, f"a number from 0 to {limit}")
    return default


_odd_logged = False


def _odd(key: str, name: str, value: str, wanted: str) -> None:
    """Once per mount: metadata another tool wrote that is no valid attribute."""
    global _odd_logged
    if not _odd_logged:
        _odd_logged = True
        log.warning("%r carries x-amz-meta-%s: %.40r, not %s (written by another tool?): "
                    "shown with the mount's default instead; other such values in this "
                    "bucket are not logged again", key, name, value, wanted)


def file_attrs(info: ObjectInfo, config: FsConfig) -> dict:
    """Node attributes of an object, from its metadata where it has some. A listing's entry
    (no metadata) gets the mount's defaults and LastModified until a HEAD tells more."""
    meta, key = info.metadata, info.key
    mode = _id(meta, "mode", config.file_mode, key, 2**32 - 1)
    kind = stat.S_IFLNK if stat.S_ISLNK(mode) else stat.S_IFREG
    mtime_ns = _time(meta, "mtime", key)
    if mtime_ns is None:
        mtime_ns = int(info.last_modified * 1e9)
    return dict(mode=kind | stat.S_IMODE(mode),
                uid=_id(meta, "uid", config.uid, key, ID_MAX),
                gid=_id(meta, "gid", config.gid, key, ID_MAX),
                mtime_ns=mtime_ns, atime_ns=_time(meta, "atime", key) or mtime_ns,
                ctime_ns=_time(meta, "ctime", key) or mtime_ns,
                size=info.size, etag=info.etag, has_metadata=info.has_metadata,
                kept=Kept.of(info) if info.has_metadata else None,
                head_modified=unchanged_since(info),
                mtime_stored=info.has_metadata and "mtime" in meta,
                expires=time.monotonic() + config.attr_timeout)


def unchanged_since(info: ObjectInfo) -> int:
    """The object's LastModified in whole seconds (S3 lists it so) if the HEAD that told
    `info` answered in a later second than that, else 0. A rewrite after the HEAD gets a
    LastModified of its own time, later than this; one in the same second as the object's
    write could keep the second (and a copy onto itself keeps the ETag and size)."""
    modified = int(info.last_modified)
    return modified if info.has_metadata and int(info.answered) > modified else 0


def dir_attrs(config: FsConfig, marker: ObjectInfo | None = None) -> dict:
    """A directory's attributes: from its marker's metadata where the server kept some,
    else the mount's defaults (and the marker's LastModified, or the mount's start)."""
    meta = marker.metadata if marker is not None else {}
    key = marker.key if marker is not None else ""
    mode = _id(meta, "mode", config.dir_mode, key, 2**32 - 1)
    mtime_ns = _time(meta, "mtime", key)
    if mtime_ns is None:
        mtime_ns = int(marker.last_modified * 1e9) if marker is not None else MOUNT_TIME_NS
    return dict(mode=stat.S_IFDIR | stat.S_IMODE(mode),
                uid=_id(meta, "uid", config.uid, key, ID_MAX),
                gid=_id(meta, "gid", config.gid, key, ID_MAX),
                mtime_ns=mtime_ns, atime_ns=_time(meta, "atime", key) or mtime_ns,
                ctime_ns=_time(meta, "ctime", key) or mtime_ns,
                expires=time.monotonic() + config.attr_timeout, has_metadata=True)


MOUNT_TIME_NS = time.time_ns()  # directories without a time of their own


def content_type(path: str, choice: str) -> str | None:
    """`content_type` option: "auto" guesses from the extension, "none" sends nothing."""
    if choice == "none":
        return None
    if choice == "auto":
        return mimetypes.guess_type(path)[0] or "application/octet-stream"
    return choice


def renamed_type(old: str, new: str, stored: str | None, choice: str) -> str | None:
    """The content type of an object renamed from `old` to `new` that has `stored`. With
    "auto", a type that is the guess for the old name (or a generic octet-stream) was
    guessed and follows the name: rsync and recorders write to a temporary name first. Any
    other was chosen by whoever wrote the object and stays, as with a fixed choice."""
    if choice == "auto" and (stored is None or stored == content_type(old, "auto")
                             or stored in ("binary/octet-stream", "application/octet-stream")):
        return content_type(new, "auto")
    return stored


@dataclass(frozen=True)
class Kept:
    """What an existing object carries besides the mount's own x-amz-meta-* keys, as its
    HEAD showed it: its content type, KEPT_HEADERS (content headers, storage class,
    encryption), other tools' x-amz-meta-* and how many tags. Every rewrite of the object
    (chmod, touch, appends, in-place changes, truncation, rename) sends them again."""

    content_type: str | None
    headers: dict[str, str]
    metadata: dict[str, str]  # other tools' x-amz-meta-*, without OUR_KEYS
    tag_count: int = 0

    @classmethod
    def of(cls, info: ObjectInfo) -> Kept:
        return cls(info.content_type, dict(info.headers),
                   {k: v for k, v in info.metadata.items() if k not in OUR_KEYS},
                   info.tag_count)


def kept_type(kept: Kept | None, guessed: str | None) -> str | None:
    """An object's content type as stored: its own where a HEAD showed one, else what
    this mount gave it (`guessed`)."""
    return kept.content_type if kept is not None and kept.content_type is not None \
        else guessed


def rewrite_options(ours: dict[str, str], kept: Kept | None, content_type: str | None,
                    tags: str | None = None) -> PutOptions:
    """What a rewrite of an object stores: our metadata `ours` over the object's own
    (`kept`: None for an object this mount made, which carries the mount's options)."""
    if kept is None:
        return PutOptions(ours, content_type, tags=tags)
    return PutOptions(kept.metadata | ours, content_type, dict(kept.headers), tags)
