"""Object metadata ↔ file attributes, in s3fs-fuse's headers and formats (pure functions).

mode, uid, gid, mtime, atime and ctime travel as `x-amz-meta-mode`, `-uid`, `-gid`,
`-mtime`, `-atime` and `-ctime` (times in seconds, optionally with a fraction), so buckets
written by s3fs-fuse look right here and the other way round. Objects without them get the
mount's defaults and their LastModified. The mode carries the file type as s3fs-fuse writes
it: a symbolic link is an object whose body is the target and whose mode has S_IFLNK; a
directory marker `dir/` may carry S_IFDIR and the directory's attributes (servers that keep
no metadata on markers, SeaweedFS, give directories the mount's defaults).
"""

from __future__ import annotations

import mimetypes
import stat
import time
from dataclasses import dataclass, replace

from .config import FsConfig
from .object_store import ObjectInfo


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
    """x-amz-meta-mtime as s3fs-fuse writes it ("1700000000" or "1700000000.123456789")."""
    try:
        seconds, _, fraction = text.strip().partition(".")
        nanos = int((fraction + "000000000")[:9]) if fraction else 0
        return int(seconds) * 1_000_000_000 + nanos
    except ValueError:
        return None


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


def _time(meta: dict[str, str], name: str) -> int | None:
    return parse_mtime(meta[name]) if name in meta else None


def file_attrs(info: ObjectInfo, config: FsConfig) -> dict:
    """Node attributes of an object, from its metadata where it has some. A listing's entry
    (no metadata) gets the mount's defaults and LastModified until a HEAD tells more."""
    meta = info.metadata
    mode = to_int(meta.get("mode"), config.file_mode)
    kind = stat.S_IFLNK if stat.S_ISLNK(mode) else stat.S_IFREG
    mtime_ns = _time(meta, "mtime")
    if mtime_ns is None:
        mtime_ns = int(info.last_modified * 1e9)
    return dict(mode=kind | stat.S_IMODE(mode),
                uid=to_int(meta.get("uid"), config.uid),
                gid=to_int(meta.get("gid"), config.gid),
                mtime_ns=mtime_ns, atime_ns=_time(meta, "atime") or mtime_ns,
                ctime_ns=_time(meta, "ctime") or mtime_ns,
                size=info.size, etag=info.etag, has_metadata=info.has_metadata,
                expires=time.monotonic() + config.attr_timeout)


def dir_attrs(config: FsConfig, marker: ObjectInfo | None = None) -> dict:
    """A directory's attributes: from its marker's metadata where the server kept some,
    else the mount's defaults (and the marker's LastModified, or the mount's start)."""
    meta = marker.metadata if marker is not None else {}
    mode = to_int(meta.get("mode"), config.dir_mode)
    mtime_ns = _time(meta, "mtime")
    if mtime_ns is None:
        mtime_ns = int(marker.last_modified * 1e9) if marker is not None else MOUNT_TIME_NS
    return dict(mode=stat.S_IFDIR | stat.S_IMODE(mode),
                uid=to_int(meta.get("uid"), config.uid),
                gid=to_int(meta.get("gid"), config.gid),
                mtime_ns=mtime_ns, atime_ns=_time(meta, "atime") or mtime_ns,
                ctime_ns=_time(meta, "ctime") or mtime_ns,
                expires=time.monotonic() + config.attr_timeout, has_metadata=True)


MOUNT_TIME_NS = time.time_ns()  # directories without a time of their own


def content_type(path: str, choice: str) -> str | None:
    """`content_type` option: "auto" guesses from the extension, "none" sends nothing."""
    if choice == "none":
        return None
    if choice == "auto":
        return mimetypes.guess_type(path)[0] or "application/octet-stream"
    return choice


def to_int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
