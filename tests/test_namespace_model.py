"""Reference-model test of the namespace: random sequences of namespace operations against a
model of what every path must show, through the file-system layer (Namespace, OpenFiles and
the FUSE adapter's attributes and readdir, no mount) over the in-memory store that enforces
S3's rules.

The operations: create+write+close, files held open for writing, chmod, chown, utimes,
rename of files and directories, unlink, mkdir, rmdir, a second client replacing or deleting
objects in the bucket, S3 refusing requests (403 AccessDenied), deferred attributes coming
due, the kernel forgetting inodes, and a remount (a new FileSystem over the same bucket,
after the shutdown's `store_all_meta`). After every step each path's existence, kind, size,
content, mode, uid, gid and mtime, as lookup, getattr and readdir show them, must match the
model; after a remount, what was stored must show. An operation S3 refused must fail and
leave the bucket and what the mount shows as they were (DESIGN "Failure order").

The state machine plays the kernel too: it looks paths up component by component, counts
the lookups it holds (`held`) and forgets them, also while a request waits for S3; an inode
it holds must stay known to the file system. Content is read (which stores deferred
attributes) where no attributes are pending, and by the rule `read_file`.
Time: the attribute and entry timeouts (1 s) pass by moving the clock the namespace reads
(`Clock`); META_DELAY is made an hour, and the rule `meta_due` makes deferred changes due.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from s3fs_stream import (
    attribute_fetcher,
    deferred_meta,
    inode_table,
    known_names,
    namespace,
    object_meta,
    open_files,
)
from s3fs_stream.config import FsConfig
from s3fs_stream.errors import FsError
from s3fs_stream.filesystem import FileSystem
from s3fs_stream.fuse_adapter import FuseOperations
from s3fs_stream.inode_table import ROOT_INODE
from s3fs_stream.memory_budget import MemoryBudget
from s3fs_stream.object_meta import SetAttr, format_mtime
from s3fs_stream.upload_pool import UploadPool
from tests.memory_store import MemoryStore

MiB = 1024 * 1024
PREFIX = "pre/"
UID = GID = 1000
CONFIG = FsConfig(uid=UID, gid=GID, part_size=5 * MiB, max_memory=64 * MiB)
TOPS = ["a", "b", "c.txt", "d"]
CHILDREN = ["x", "y.bin"]
PATHS = TOPS + [f"{t}/{c}" for t in TOPS for c in CHILDREN]
PERMS = [0o600, 0o640, 0o700, 0o755, 0o444]
OWNERS = [0, 7, 1000]
OLD_TIMES = [1_600_000_000_000_000_000, 1_500_000_000_123_456_789, 1_700_000_000_500_000_000]
SIZES = [0, 3, 100, 5000]  # 5000: past SYMLINK_MAX, a listing does not HEAD it
MUTATIONS = ("put", "copy", "delete", "create_upload", "upload_part", "upload_part_copy",
             "complete")
REFUSALS = [("delete",), ("copy",), ("put",), MUTATIONS]
STEP_TIMEOUT = 10.0
MAX_EXAMPLES = 200  # about 15 s once it passes (25 steps each)


class Clock:
    """`time` for the namespace's modules, with a monotonic clock the test moves forward
    (the attribute and entry timeouts pass without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __getattr__(self, name):
        return getattr(time, name)

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


CLOCK = Clock()


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> str:
    return path.rpartition("/")[2]


@dataclass
class File:
    data: bytes
    perm: int
    uid: int
    gid: int
    mtime: int | None  # None: the mount's own "now", learned when first seen
    extra: dict[str, str] | None = None  # another tool's x-amz-meta-* that must survive
    fh: int | None = None  # held open for writing (its data not stored yet)
    # no x-amz-meta-mtime: its mtime is LastModified, which a rename's copy makes "now"
    lastmod: bool = False


@dataclass
class Dir:
    perm: int
    uid: int
    gid: int
    mtime: int | None


@dataclass
class Writer:
    """A handle the test holds open for writing; `path` None once the file was unlinked
    (or renamed over): its close stores nothing."""

    path: str | None
    data: bytes
    base: File | None = field(default=None, repr=False)


class TrioThread:
    """A trio loop in a thread of its own: the state machine's rules are synchronous, the
    file system's tasks live across them."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("trio thread did not start")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by close()
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    def run(self, fn, *args):
        async def bounded():
            with trio.fail_after(STEP_TIMEOUT):
                return await fn(*args)

        return trio.from_thread.run(bounded, trio_token=self.token)

    def close(self) -> None:
        if self._failure is None:
            trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self.token)
        self._thread.join(10)
        if self._failure is not None:
            raise self._failure


class Mount:
    """One FileSystem over the store, its tasks (the budget, the deferred attributes) in a
    nursery of its own, and the adapter for what the kernel gets."""

    def __init__(self, fs: FileSystem, scope: trio.CancelScope):
        self.fs = fs
        self.ns = fs.namespace
        self.files = fs.files
        self.ops = FuseOperations(fs)
        self.scope = scope


async def serve(store: MemoryStore, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        budget = MemoryBudget(CONFIG.max_memory)
        nursery.start_soon(budget.reclaim_forever)
        fs = FileSystem(store, PREFIX, CONFIG, nursery, UploadPool(nursery, 2), budget)
        nursery.start_soon(fs.deferred.store_meta_forever)
        await trio.sleep(0)  # it runs: setattr defers
        task_status.started(Mount(fs, nursery.cancel_scope))
        await trio.sleep_forever()


def attrs_tuple(attrs: pyfuse3.EntryAttributes) -> tuple:
    return (stat.S_IFMT(attrs.st_mode), stat.S_IMODE(attrs.st_mode), attrs.st_uid,
            attrs.st_gid, attrs.st_mtime_ns)


class NamespaceModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self.loop = TrioThread()
        self.mount = self.loop.run(self.loop.nursery.start, serve, self.store)
        self.files: dict[str, File] = {}
        self.dirs: dict[str, Dir] = {}
        self.writers: dict[int, Writer] = {}
        self.held: Counter[int] = Counter()  # the kernel's lookups
        self.serial = 0  # makes every content unique: another client's object differs
        self._pending_write = b""  # what s3_refuses's write wrote, for `_apply`
        self._pending_close = 0  # the handle s3_refuses's close closed, for `_apply`

    def teardown(self) -> None:
        try:
            for fh in list(self.writers):
                self.loop.run(self.mount.files.release, fh)
        finally:
            self.loop.close()

    # -- the kernel's side ---------------------------------------------------------------

    def run(self, fn, *args):
        return self.loop.run(fn, *args)

    async def _lookup(self, path: str):
        node = None
        parent = ROOT_INODE
        for name in path.split("/"):
            node = await self.mount.ns.lookup(parent, name)
            self.held[node.inode] += 1
            parent = node.inode
        return node

    def lookup(self, path: str):
        return self.run(self._lookup, path) if path else self.mount.fs.table[ROOT_INODE]

    def content(self, index: int, size: int) -> bytes:
        self.serial += 1
        stamp = f"<{self.serial}:{index}>".encode()
        return (stamp * (size // len(stamp) + 1))[:size] if size >= len(stamp) else \
            stamp[:size]

    def errno_of(self, fn, *args) -> int | None:
        try:
            self.run(fn, *args)
        except FsError as exc:
            return exc.errno
        return None

    def advance(self, seconds: float = 1.5) -> None:
        """The attribute and entry timeouts pass."""
        CLOCK.offset += seconds

    # -- what the model says ---------------------------------------------------------------

    def is_dir(self, path: str) -> bool:
        return path == "" or path in self.dirs

    def children(self, path: str) -> list[str]:
        return sorted(p for p in [*self.files, *self.dirs] if parent_of(p) == path)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs

    def can_hold(self, path: str) -> bool:
        """Its parent directory exists: a name can be made there."""
        return self.is_dir(parent_of(path)) and "/" not in parent_of(path)

    def subtree(self, path: str) -> list[str]:
        return [p for p in [*self.files, *self.dirs] if p == path or p.startswith(path + "/")]

    def pick(self, data, candidates) -> str | None:
        candidates = sorted(candidates)
        return data.draw(st.sampled_from(candidates)) if candidates else None

    def writable(self) -> list[str]:
        """Paths a file can be written at (not a directory, not open for writing here)."""
        return [p for p in PATHS if self.can_hold(p) and p not in self.dirs
                and self.writer_of(p) is None]

    def existing(self) -> list[str]:
        return [*self.files, *self.dirs]

    def writer_of(self, path: str) -> int | None:
        f = self.files.get(path)
        return f.fh if f is not None else None

    # -- rules -------------------------------------------------------------------------------

    @rule(data=st.data(), size=st.sampled_from(SIZES), perm=st.sampled_from(PERMS),
          hold=st.booleans())
    def write_file(self, data, size, perm, hold):
        """open(O_CREAT|O_TRUNC), write, close (or keep it open for writing)."""
        path = self.pick(data, self.writable())
        if path is None:
            return
        content = self.content(0, size)
        old = self.files.get(path)
        fh = self._write(path, content, perm)
        if fh is None:
            return
        if hold:
            f = File(content, old.perm if old else perm, old.uid if old else UID,
                     old.gid if old else GID, None, None, fh)
            self.writers[fh] = Writer(path, content, old)
            self.files[path] = f
            return
        self.run(self.mount.files.flush, fh)
        self.run(self.mount.files.release, fh)
        self.files[path] = File(content, old.perm if old else perm, old.uid if old else UID,
                                old.gid if old else GID, None)

    def _write(self, path: str, data: bytes, perm: int) -> int | None:
        if path in self.files:
            node = self.lookup(path)
            fh = self.run(self.mount.ns.open, node.inode, os.O_WRONLY | os.O_TRUNC)
        else:
            parent = self.lookup(parent_of(path))
            fh, node = self.run(self.mount.ns.create, parent.inode, name_of(path),
                                stat.S_IFREG | perm, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                UID, GID)
            self.held[node.inode] += 1
        if data:
            self.run(self.mount.files.write, fh, 0, data)
        return fh

    @precondition(lambda self: self.writers)
    @rule(data=st.data(), size=st.sampled_from([1, 50, 5000]))
    def append_to_open_file(self, data, size):
        fh = data.draw(st.sampled_from(sorted(self.writers)))
        writer = self.writers[fh]
        more = self.content(1, size)
        self.run(self.mount.files.write, fh, len(writer.data), more)
        writer.data += more
        if writer.path is not None:
            f = self.files[writer.path]
            f.data, f.mtime = writer.data, None  # a write makes the mtime "now"

    @precondition(lambda self: self.writers)
    @rule(data=st.data())
    def close_open_file(self, data):
        fh = data.draw(st.sampled_from(sorted(self.writers)))
        self._close(fh)

    def _close(self, fh: int) -> None:
        writer = self.writers.pop(fh)
        try:
            self.run(self.mount.files.flush, fh)
        finally:
            self.run(self.mount.files.release, fh)
        if writer.path is not None:
            self.files[writer.path].fh = None

    @precondition(lambda self: self.files or self.dirs)
    @rule(data=st.data(), perm=st.sampled_from(PERMS))
    def chmod(self, data, perm):
        path = self.pick(data, self.existing())
        if path is None:
            return
        node = self.lookup(path)
        kind = stat.S_IFDIR if path in self.dirs else stat.S_IFREG
        self.run(self.mount.ns.setattr, node.inode, SetAttr(mode=kind | perm))
        self.changed(path, perm=perm)

    def changed(self, path: str, **attrs) -> None:
        """A setattr's change; an object that changes gets its x-amz-meta-mtime stored."""
        entry = self.dirs.get(path) or self.files[path]
        if any(getattr(entry, name) != value for name, value in attrs.items()) and \
                isinstance(entry, File):
            entry.lastmod = False
        for name, value in attrs.items():
            setattr(entry, name, value)

    @precondition(lambda self: self.files or self.dirs)
    @rule(data=st.data(), uid=st.sampled_from(OWNERS), gid=st.sampled_from(OWNERS))
    def chown(self, data, uid, gid):
        path = self.pick(data, self.existing())
        if path is None:
            return
        node = self.lookup(path)
        self.run(self.mount.ns.setattr, node.inode, SetAttr(uid=uid, gid=gid))
        self.changed(path, uid=uid, gid=gid)

    @precondition(lambda self: self.files or self.dirs)
    @rule(data=st.data(), when=st.sampled_from(OLD_TIMES))
    def utimes(self, data, when):
        path = self.pick(data, self.existing())
        if path is None:
            return
        node = self.lookup(path)
        self.run(self.mount.ns.setattr, node.inode, SetAttr(mtime_ns=when, atime_ns=when))
        self.changed(path, mtime=when, lastmod=False)  # atime changes

    @rule(data=st.data(), perm=st.sampled_from(PERMS))
    def mkdir(self, data, perm):
        # where a name exists the kernel answers EEXIST itself
        path = self.pick(data, [p for p in PATHS if self.can_hold(p) and not self.exists(p)])
        if path is None:
            return
        parent = self.lookup(parent_of(path))
        node = self.run(self.mount.ns.mkdir, parent.inode, name_of(path),
                        stat.S_IFDIR | perm, UID, GID)
        self.held[node.inode] += 1
        self.dirs[path] = Dir(perm, UID, GID, None)

    @precondition(lambda self: self.files or self.dirs)
    @rule(data=st.data(), of_file=st.booleans())
    def rmdir(self, data, of_file):
        path = self.pick(data, self.files if of_file else self.dirs)
        if path is None:
            return
        expected = errno.ENOTDIR if path in self.files else \
            errno.ENOTEMPTY if self.children(path) else None
        self._expect(expected, self.mount.ns.rmdir, path)
        if expected is None:
            del self.dirs[path]

    @precondition(lambda self: self.files or self.dirs)
    @rule(data=st.data())
    def unlink(self, data):
        path = self.pick(data, self.existing())
        if path is None:
            return
        expected = errno.EISDIR if path in self.dirs else None
        self._expect(expected, self.mount.ns.unlink, path)
        if expected is None:
            self._drop_file(path)

    def _drop_file(self, path: str) -> None:
        f = self.files.pop(path)
        if f.fh is not None:
            self.writers[f.fh].path = None  # detached: its close stores nothing

    def _expect(self, expected: int | None, fn, path: str, *more) -> None:
        parent = self.lookup(parent_of(path))
        got = self.errno_of(fn, parent.inode, name_of(path), *more)
        assert got == expected, f"{fn.__name__} {path}: errno {got}, expected {expected}"

    def rename_outcome(self, old: str, new: str) -> int | None | bool:
        """The errno a rename must fail with, None when it must succeed, False when the
        kernel would not send it."""
        if not self.exists(old) or not self.can_hold(new) or old == new or \
                new.startswith(old + "/") or old.startswith(new + "/"):
            return False
        if new in self.files and old in self.dirs:
            return errno.ENOTDIR
        if new in self.dirs and old in self.files:
            return errno.EISDIR
        if new in self.dirs and self.children(new):
            return errno.ENOTEMPTY
        if old in self.dirs and any(self.files[p].fh is not None for p in self.subtree(old)
                                    if p in self.files):
            return errno.EBUSY  # documented: close the files inside first
        if old in self.files and "/" in new and new.count("/") > 1:
            return False
        if old in self.dirs and any(p.count("/") > 1 for p in
                                    (new + q[len(old):] for q in self.subtree(old))):
            return False  # deeper than the paths the model looks at
        return None

    @precondition(lambda self: self.files or self.dirs)
    @rule(data=st.data())
    def rename(self, data):
        old = self.pick(data, self.existing())
        new = old and self.pick(data, [p for p in PATHS
                                       if self.rename_outcome(old, p) is not False])
        if new is None:
            return
        expected = self.rename_outcome(old, new)
        parent = self.lookup(parent_of(new))
        self._expect(expected, self.mount.ns.rename, old, parent.inode, name_of(new), 0)
        if expected is None:
            self._move(old, new)

    def _move(self, old: str, new: str) -> None:
        if new in self.files:
            self._drop_file(new)
        self.dirs.pop(new, None)
        for path in sorted(self.subtree(old)):
            moved = new + path[len(old):]
            if path in self.dirs:
                self.dirs[moved] = self.dirs.pop(path)
            else:
                f = self.files[moved] = self.files.pop(path)
                if f.lastmod:
                    f.mtime = None
                if f.fh is not None:
                    # a rename completes what the open file holds, then moves the object:
                    # a close that fails later leaves that
                    self.writers[f.fh].path = moved
                    self.writers[f.fh].base = replace(f, fh=None)

    # -- another client, S3's refusals, time ------------------------------------------------

    @rule(data=st.data(), size=st.sampled_from([20, 100, 5000]),
          meta=st.sampled_from(["s3fs", "s3fs+other", "none"]),
          perm=st.sampled_from(PERMS), owner=st.sampled_from(OWNERS),
          when=st.sampled_from(OLD_TIMES))
    def another_client_puts(self, data, size, meta, perm, owner, when):
        """Another client replaces (or creates) the object; it shows once the attribute and
        entry timeouts passed."""
        path = self.pick(data, self.writable())
        if path is None:
            return
        content = self.content(2, size)
        headers = {}
        if meta != "none":
            headers = {"mode": str(stat.S_IFREG | perm), "uid": str(owner),
                       "gid": str(owner), "mtime": format_mtime(when)}
        extra = {"origin": "another-tool"} if meta == "s3fs+other" else None
        self.store._store(PREFIX + path, content, headers | (extra or {}))
        if headers:
            self.files[path] = File(content, perm, owner, owner, when, extra)
        else:
            modified = int(self.store.modified[PREFIX + path] * 1e9)
            self.files[path] = File(content, CONFIG.file_mode, UID, GID, modified,
                                    lastmod=True)
        self.advance()

    @precondition(lambda self: any(f.fh is None for f in self.files.values()))
    @rule(data=st.data())
    def another_client_deletes(self, data):
        path = self.pick(data, [p for p in self.files if self.writer_of(p) is None])
        if path is None:
            return
        del self.store.objects[PREFIX + path]
        del self.files[path]
        self.advance()

    @rule(methods=st.sampled_from(REFUSALS),
          op=st.sampled_from(["write", "chmod_dir", "unlink", "rename", "mkdir", "rmdir",
                              "close", "utimes"]),
          data=st.data(), perm=st.sampled_from(PERMS))
    def s3_refuses(self, methods, op, data, perm):
        """S3 answers AccessDenied to some requests during one operation: it fails with an
        error, and the bucket and what the mount shows stay as they were (DESIGN "Failure
        order") -- but for a rename whose copy was made and whose delete was refused, which
        leaves both names whole (rename is a copy and a delete), and attributes reported done
        earlier that an open or a rename stored first."""
        if op in ("write",):
            path, other = self.pick(data, self.writable()), None
        elif op == "mkdir":
            path, other = self.pick(data, [p for p in PATHS if self.can_hold(p)
                                           and not self.exists(p)]), None
        elif op == "rename":
            path = self.pick(data, self.existing())
            other = path and self.pick(data, [p for p in PATHS
                                              if self.rename_outcome(path, p) is None])
        else:
            path, other = self.pick(data, self.existing()), None
        if (path is None or (op == "rename" and other is None)) and op != "close":
            return
        before = {k: (d, dict(m)) for k, (d, m, _) in self.store.objects.items()}
        self.store.refused.clear()
        self.store.refuse(*methods)
        try:
            got = self._refused_op(op, path, other, perm)
        finally:
            self.store.allow()
        if got is False:
            return
        if self.store.refused:
            assert got is not None, (f"{op} {path} {other}: S3 refused "
                                     f"{self.store.refused[0]} but it reported success")
            after = {k: (d, dict(m)) for k, (d, m, _) in self.store.objects.items()}
            source = self.files.get(path)
            if op == "rename" and source is not None and source.fh is not None and \
                    PREFIX + path in after:
                # a rename completes what an open file holds before it copies the object
                before[PREFIX + path] = (source.data, after[PREFIX + path][1])
            if op == "rename" and after != before and self._copied_whole(path, other,
                                                                         before, after):
                # copied, then the delete refused: rename is a copy and a delete, not
                # atomic (docs/SEMANTICS.md); both names stay, and the mount shows both
                self._copy_subtree(path, other)
                return
            self.settle_deferred(before, after)
            assert after == before, f"{op} {path} {other}: refused, yet the bucket changed"
        else:
            assert got is None, f"{op} {path}: errno {got} with nothing refused"
            self._apply(op, path, other, perm)

    def settle_deferred(self, before: dict, after: dict) -> None:
        """Attributes reported done earlier and stored meanwhile (an open for writing or
        a rename stores them first) are no change of the bucket: take them into `before`."""
        for key, (data, meta) in after.items():
            path = key[len(PREFIX):]
            f = self.files.get(path)
            if f is None or key not in before or before[key] == (data, meta):
                continue
            if before[key][0] == data and meta.get("mode") == str(stat.S_IFREG | f.perm) \
                    and meta.get("uid") == str(f.uid) and meta.get("gid") == str(f.gid) and \
                    (f.mtime is None or meta.get("mtime") == format_mtime(f.mtime)):
                before[key] = (data, meta)

    @staticmethod
    def _copied_whole(old: str, new: str, before: dict, after: dict) -> bool:
        """The bucket is as before but for a complete copy of `old` (a key or a directory)
        at `new`, from which nothing was deleted."""
        def under(key: str, path: str) -> bool:
            return key == PREFIX + path or key.startswith(PREFIX + path + "/")

        if {k: v for k, v in after.items() if not under(k, new)} != \
                {k: v for k, v in before.items() if not under(k, new)}:
            return False
        sources = {k: v for k, v in before.items() if under(k, old)}
        copies = {k: v for k, v in after.items() if under(k, new)}
        moved = {PREFIX + new + k[len(PREFIX + old):]: v[0] for k, v in sources.items()}
        assert {k: v[0] for k, v in copies.items()} == moved, \
            f"rename {old} {new}: refused, and a partial copy is left: {sorted(copies)}"
        return True

    def _copy_subtree(self, old: str, new: str) -> None:
        if new in self.files:
            self._drop_file(new)
        self.dirs.pop(new, None)
        for path in sorted(self.subtree(old)):
            copied = new + path[len(old):]
            if path in self.dirs:
                self.dirs[copied] = replace(self.dirs[path])
            else:
                f = self.files[copied] = replace(self.files[path], fh=None)
                if f.lastmod:
                    f.mtime = None

    def _refused_op(self, op, path, other, perm) -> int | None | bool:
        """Run `op` (False: it does not apply to the model's state). Its errno or None."""
        if op == "write":
            if not self.can_hold(path) or path in self.dirs or \
                    self.writer_of(path) is not None:
                return False
            data = self.content(3, 100)
            self._pending_write = data
            try:
                fh = self._write(path, data, perm)
            except FsError as exc:
                return exc.errno
            try:
                self.run(self.mount.files.flush, fh)
            except FsError as exc:
                return exc.errno
            finally:
                self.run(self.mount.files.release, fh)
            return None
        if op == "close":
            if not self.writers:
                return False
            fh = sorted(self.writers)[0]
            self._pending_close = fh
            writer = self.writers.pop(fh)
            failed = None
            try:
                self.run(self.mount.files.flush, fh)
            except FsError as exc:
                failed = exc.errno
            finally:
                self.run(self.mount.files.release, fh)
            if failed is not None:
                # the program got the error at close: what it wrote is not stored
                if writer.path is not None:
                    if writer.base is not None:
                        self.files[writer.path] = replace(writer.base, fh=None)
                    else:
                        del self.files[writer.path]
                return failed
            self.writers[fh] = writer  # `_apply` closes it in the model
            return None
        if op == "mkdir":
            parent = self.lookup(parent_of(path))
            return self.errno_of(self.mount.ns.mkdir, parent.inode, name_of(path),
                                 stat.S_IFDIR | perm, UID, GID)
        if not self.exists(path):
            return False
        node = self.lookup(path)
        if op == "chmod_dir":
            if path not in self.dirs:
                return False
            return self.errno_of(self.mount.ns.setattr, node.inode,
                                 SetAttr(mode=stat.S_IFDIR | perm))
        if op == "utimes":
            return self.errno_of(self.mount.ns.setattr, node.inode,
                                 SetAttr(mtime_ns=OLD_TIMES[0] + perm, atime_ns=OLD_TIMES[0]))
        if op in ("unlink", "rmdir"):
            if (op == "unlink") != (path in self.files) or \
                    (op == "rmdir" and self.children(path)):
                return False
            parent = self.lookup(parent_of(path))
            fn = self.mount.ns.unlink if op == "unlink" else self.mount.ns.rmdir
            return self.errno_of(fn, parent.inode, name_of(path))
        if op == "rename":
            if self.rename_outcome(path, other) is not None:
                return False
            old_parent, new_parent = self.lookup(parent_of(path)), self.lookup(parent_of(other))
            return self.errno_of(self.mount.ns.rename, old_parent.inode, name_of(path),
                                 new_parent.inode, name_of(other), 0)
        raise AssertionError(op)

    def _apply(self, op, path, other, perm) -> None:
        """The model's change for an operation that succeeded."""
        if op == "write":
            old = self.files.get(path)
            self.files[path] = File(self._pending_write, old.perm if old else perm,
                                    old.uid if old else UID, old.gid if old else GID, None)
        elif op == "close":
            writer = self.writers.pop(self._pending_close)
            if writer.path is not None:
                self.files[writer.path].fh = None
        elif op == "chmod_dir":
            self.changed(path, perm=perm)
        elif op == "utimes":
            self.changed(path, mtime=OLD_TIMES[0] + perm, lastmod=False)
        elif op == "unlink":
            self._drop_file(path)
        elif op == "rmdir":
            del self.dirs[path]
        elif op == "mkdir":
            self.dirs[path] = Dir(perm, UID, GID, None)
        elif op == "rename":
            self._move(path, other)

    @rule(refused=st.booleans())
    def meta_due(self, refused):
        """The deferred attributes' time comes (META_DELAY); S3 may refuse to store them.
        Either way what chmod/chown/utimes reported done stays shown, after the attribute
        timeout too."""
        if refused:
            self.store.refuse("copy")
        try:
            self.run(self._make_due)
        finally:
            self.store.allow()
        self.advance()

    async def _make_due(self) -> None:
        deferred = self.mount.ns.deferred
        now = trio.current_time()
        for pending in deferred._pending.values():
            pending.due = now
        deferred._wakeup.set()
        while any(p.due <= now for p in deferred._pending.values()) or deferred._storing:
            await trio.sleep(0.001)
            if all(p.due > now for p in deferred._pending.values()) and not deferred._storing:
                break

    @rule()
    def time_passes(self):
        self.advance()

    @rule()
    def kernel_forgets(self):
        for inode, count in self.held.items():
            self.mount.fs.forget(inode, count)
        self.held.clear()

    @precondition(lambda self: self.files or self.dirs)
    @rule(data=st.data(), listing=st.booleans(), at=st.integers(0, 3))
    def kernel_forgets_meanwhile(self, data, listing, at):
        """FORGETs come while a lookup or a readdir waits for S3 (the kernel sends them
        whenever it likes; here as the `at`-th request arrives): what the file system hands
        out afterwards must still be known to it."""
        path = self.pick(data, self.existing())
        self.advance()  # stale: the lookup asks S3
        requests = []

        def forget_now(call) -> None:
            requests.append(call)
            if len(requests) == at + 1:
                for inode, count in list(self.held.items()):
                    self.mount.fs.forget(inode, count)
                    self.held[inode] -= count

        directory = self.lookup(parent_of(path)).inode
        self.store.on_call = forget_now
        try:
            if listing:
                self.run(self._readdir, directory)
            else:
                self.run(self._lookup, path)
        finally:
            self.store.on_call = None

    @rule()
    def remount(self):
        """Files open are closed, the deferred attributes stored as at unmount; a new file
        system over the same bucket shows exactly what was stored."""
        for fh in sorted(self.writers):
            self._close(fh)
        self.run(self.mount.ns.deferred.store_all_meta)
        trio.from_thread.run_sync(self.mount.scope.cancel, trio_token=self.loop.token)
        self.mount = self.run(self.loop.nursery.start, serve, self.store)
        self.held.clear()
        for path, f in self.files.items():
            if f.extra:
                stored = self.store.objects[PREFIX + path][1]
                assert f.extra.items() <= stored.items(), \
                    f"{path}: another tool's metadata {f.extra} lost: {stored}"

    # -- the checks ------------------------------------------------------------------------

    def expect(self, path: str, where: str, attrs: pyfuse3.EntryAttributes) -> None:
        entry = self.dirs.get(path) or self.files[path]
        kind = stat.S_IFDIR if path in self.dirs else stat.S_IFREG
        mtime = entry.mtime
        if mtime is None and (path in self.dirs or entry.fh is None):
            mtime = entry.mtime = attrs.st_mtime_ns  # the mount's "now": pinned from here
        want = (kind, entry.perm, entry.uid, entry.gid, mtime)
        got = attrs_tuple(attrs)
        if entry is not None and isinstance(entry, File) and entry.fh is not None:
            got, want = got[:4], want[:4]  # the mtime of a file open for writing moves
        assert got == want, f"{path} ({where}): {show(got)}, expected {show(want)}"
        if path in self.files:
            assert attrs.st_size == len(entry.data), \
                f"{path} ({where}): size {attrs.st_size}, expected {len(entry.data)}"

    @invariant()
    def paths_match_the_model(self):
        for path in PATHS:
            try:
                node = self.lookup(path)
            except FsError as exc:
                assert not self.exists(path), f"{path}: lookup failed ({exc!r}), expected it"
                assert exc.errno == errno.ENOENT, f"{path}: {exc!r}"
                continue
            assert self.exists(path), f"{path}: shown, expected missing"
            self.expect(path, "lookup", self.mount.ops._attributes(node))
            node = self.run(self.mount.ns.getattr, node.inode)
            self.expect(path, "getattr", self.mount.ops._attributes(node))
            # a read stores attributes set and not stored yet (the rule `read_file` does):
            # read here only what a read leaves as it is
            if path in self.files and not node.meta_pending:
                self.check_content(path, node)

    def check_content(self, path, node) -> None:
        f = self.files[path]
        if f.fh is None:
            got = self.run(self._read_all, node.inode, len(f.data))
            assert got == f.data, f"{path}: content {got[:40]!r}, expected {f.data[:40]!r}"

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def read_file(self, data):
        path = self.pick(data, self.files)
        self.check_content(path, self.lookup(path))

    async def _read_all(self, inode: int, size: int) -> bytes:
        fh = await self.mount.ns.open(inode, os.O_RDONLY)
        try:
            return bytes(await self.mount.files.read(fh, 0, size + 10))
        finally:
            await self.mount.files.release(fh)

    @invariant()
    def listings_match_the_model(self):
        for directory in ["", *sorted(d for d in self.dirs if "/" not in d)]:
            node = self.lookup(directory)
            entries = self.run(self._readdir, node.inode)
            names = [name for name, _ in entries]
            listed = [n for n in names if n not in (".", "..")]
            want = [name_of(p) for p in self.children(directory)]
            assert sorted(listed) == want, f"readdir {directory!r}: {names}, expected {want}"
            assert len(listed) == len(set(listed)), f"readdir {directory!r}: {names}"
            assert names.count(".") == 1 and names.count("..") == 1, \
                f"readdir {directory!r}: {names}: '.' and '..' must be listed once each"
            for name, attrs in entries:
                if name in (".", ".."):
                    continue
                self.expect(f"{directory}/{name}" if directory else name, "readdir", attrs)

    async def _readdir(self, inode: int) -> list[tuple[str, pyfuse3.EntryAttributes]]:
        """As the kernel reads a directory: buffers of at most 2 entries, each call from
        the offset where the last stopped; readdirplus counts a lookup per entry taken
        (not for '.' and '..')."""
        fh = await self.mount.ops.opendir(inode, None)
        taken: list[tuple[str, pyfuse3.EntryAttributes, int]] = []
        try:
            while True:
                token: list = []
                await self.mount.ops.readdir(fh, taken[-1][2] if taken else 0, token)
                if not token:
                    break
                taken += token
        finally:
            await self.mount.ops.releasedir(fh)
        for name, attrs, _ in taken:
            if name not in (".", ".."):
                self.held[attrs.st_ino] += 1
        return [(name, attrs) for name, attrs, _ in taken]

    @invariant()
    def inodes_the_kernel_holds_are_known(self):
        for inode, count in self.held.items():
            if count:
                assert self.mount.fs.table.get(inode) is not None, \
                    f"inode {inode}: the kernel holds {count} lookups, the file system " \
                    "forgot it"


def readdir_reply(token: list, name: bytes, attrs, next_id: int) -> bool:
    """pyfuse3.readdir_reply for the test: the kernel's buffer takes two entries."""
    if len(token) >= 2:
        return False
    token.append((os.fsdecode(name), attrs, next_id))
    return True


def show(attrs: tuple) -> str:
    kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file"}.get(attrs[0], oct(attrs[0]))
    text = f"{kind} {attrs[1]:o} uid {attrs[2]} gid {attrs[3]}"
    if len(attrs) > 4:
        text += f" mtime {attrs[4]}"
    return text


@pytest.mark.timeout(600)
def test_namespace_matches_the_model(monkeypatch):
    for module in (namespace, attribute_fetcher, deferred_meta, known_names, inode_table,
                   object_meta, open_files):
        monkeypatch.setattr(module, "time", CLOCK)
    monkeypatch.setattr(deferred_meta, "META_DELAY", 3600.0)
    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)
    run_state_machine_as_test(NamespaceModel, settings=settings(
        max_examples=MAX_EXAMPLES, stateful_step_count=25, deadline=None, derandomize=True,
        database=None, report_multiple_bugs=False, suppress_health_check=list(HealthCheck)))

