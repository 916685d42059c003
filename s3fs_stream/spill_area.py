"""Temporary objects that hold partly filled parts while memory is short.

When every byte of the budget sits in parts that are waiting for more data, and the kernel
has parked that data behind a request that needs memory, only storing a part elsewhere lets
anyone move. The bucket is that elsewhere: a spilled part's bytes go to
`PREFIX.s3stream/spill/MOUNT-ID/N` and come back (ranged GET) when the part is uploaded or
changed, after which the temporary object is deleted. The namespace hides `.s3stream` at
the mount's root. Spills are STANDARD objects whatever the mount's storage class
(`PutOptions.temporary`).

Whether spilling works is checked once the mount runs (`maintain`: a PUT and a DELETE of a
probe object); if not, spilling is off for the mount's life, said in one log line. A spill
refused later pauses spilling (1 s, doubling up to a minute, at most one WARNING a minute):
meanwhile the reclaimer uploads what it can, and a writer nobody can make room for fails
with ENOSPC (memory_budget.py).

Files removed while open for reading (`unlink`) keep their bytes in the same way, under
`PREFIX.s3stream/unlinked/MOUNT-ID/INODE` until their last close (`aside_key`).

Liveness: once a mount has spilled or set a file aside, it keeps a lease object
`spill/MOUNT-ID/alive`, written again every hour and deleted at unmount. A mount deletes
the spill and unlinked areas of other mounts of its prefix whose newest object (lease,
spill or file set aside) is a day old: a crashed mount's. A live mount's objects, however
old, are never deleted by another mount.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import time
import uuid

import trio

from .errors import FsError
from .object_store import ObjectStore, PutOptions, read_into
from .part_buffer import Segment
from .zero_objects import ZeroObjects

log = logging.getLogger(__name__)

RESERVED_NAME = ".s3stream"  # hidden at the mount's root
STALE_AFTER = 24 * 3600  # an area whose newest object is this old belongs to a dead mount
LEASE_NAME = "alive"
PAUSE_FIRST = 1.0  # seconds without spills after a refused one, doubling ...
PAUSE_MAX = 60.0  # ... up to this
WARN_EVERY = 60.0  # at most one WARNING about refused spills per this many seconds
# the unmount's tidying of emptied folders (`folders_left`) is a courtesy: it gives up after
# this long rather than hold the unmount for the store's retries when S3 is unreachable
FOLDERS_CLEANUP_TIME = 5.0
TEMPORARY = PutOptions(temporary=True)


def new_mount_id() -> str:
    return f"{uuid.uuid4().hex[:12]}-{os.getpid()}"


def probe_key(prefix: str, mount_id: str) -> str:
    """The object whose PUT and DELETE tell at start-up whether the mount may write, and
    spill. Not in the mount's own area `spill/MOUNT-ID/`: where the server keeps folders
    (SeaweedFS), that would stay behind as an empty folder per mount. Left behind (a
    refused DELETE), it is deleted with the areas of dead mounts (`delete_stale`)."""
    return f"{prefix}{RESERVED_NAME}/spill/probe-{mount_id}"


class SpillArea:
    def __init__(self, store: ObjectStore, prefix: str, stale_after: float = STALE_AFTER,
                 mount_id: str | None = None):
        self._store = store
        self.root = f"{prefix}{RESERVED_NAME}/spill/"
        self.unlinked_root = f"{prefix}{RESERVED_NAME}/unlinked/"
        self.zeros = ZeroObjects(store, f"{prefix}{RESERVED_NAME}/zeros/")
        self.mount_id = mount_id or new_mount_id()
        self._prefix = f"{self.root}{self.mount_id}/"
        self._numbers = itertools.count(1)
        self.stale_after = stale_after
        self.enabled = True  # False: the start-up check failed, no spills for the mount's life
        self.refused = 0  # spills refused so far (status, tests)
        self._error = ""  # why spilling is off or paused, for the writer's error line
        self._pause = 0.0
        self._retry_at = -math.inf  # trio time before which no spill is tried
        self._next_warning = -math.inf
        self._unwarned = 0  # refusals since the last WARNING
        self._spilled = trio.Event()  # set by the first spill: the lease is needed from then
        self._lease = False  # the lease object exists
        # the mount's start-up write probe was `probe_key(prefix, mount_id)` (mount.py):
        # True: put and deleted, an FsError: refused, None: not known (`check` probes)
        self.probed: bool | FsError | None = None

    @property
    def where(self) -> str:
        return f"s3://{self._store.bucket}/{self.root}"

    def aside_key(self, inode: int) -> str:
        """Where the object of an open file removed by this mount is kept until its last
        close (`Namespace.unlink`). The lease keeps it from other mounts from now on."""
        self._spilled.set()
        return f"{self.unlinked_root}{self.mount_id}/{inode}"

    def ready(self) -> bool:
        """A spill may be tried now: spilling is on and not paused after a refusal."""
        return self.enabled and trio.current_time() >= self._retry_at

    def why_not(self) -> str:
        """For a writer's error line: why nothing could be spilled, and what to do."""
        return (f"spilling to {self.where} is not possible ({self._error}); raise max_memory, "
                "or allow PutObject and DeleteObject on that prefix")

    async def put(self, data: bytes | bytearray | memoryview, start: int) -> Segment:
        if not self.ready():
            raise FsError(f"spilling is paused: {self._error}", errno.ENOSPC)
        key = f"{self._prefix}{next(self._numbers)}"
        try:
            etag = await self._store.put(key, data, TEMPORARY)
        except FsError as exc:
            self._refused_now(exc, len(data))
            raise
        self._pause = 0.0
        self._spilled.set()
        return Segment(key, etag, start, start + len(data))

    def _refused_now(self, exc: FsError, size: int) -> None:
        """No spill for a while; one WARNING a minute at most (with the count meanwhile)."""
        now = trio.current_time()
        self.refused += 1
        self._unwarned += 1
        self._pause = min(PAUSE_MAX, max(PAUSE_FIRST, 2 * self._pause))
        self._retry_at = now + self._pause
        self._error = f"the last spill was refused: {exc}"
        if now < self._next_warning:
            return
        log.warning("could not spill %d bytes to %s to free memory (%d spill(s) refused since "
                    "the last such warning): %s; no spills for %.0f s (at most a minute, then "
                    "tried again): a writer nothing else can make room for fails with ENOSPC "
                    "meanwhile", size, self.where, self._unwarned, exc, self._pause)
        self._unwarned = 0
        self._next_warning = now + WARN_EVERY

    async def read_into(self, segment: Segment, into: memoryview) -> None:
        await read_into(self._store, segment.key, 0, segment.end - segment.start, segment.etag,
                        into)

    async def read(self, segment: Segment, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) of the part, all within the segment."""
        return await self._store.get_range(segment.key, start - segment.start,
                                           end - segment.start, segment.etag)

    async def delete(self, segments: list[Segment]) -> None:
        for segment in segments:
            try:
                await self._store.delete(segment.key)
            except FsError as exc:
                log.warning("could not delete temporary object %s: %s", segment.key, exc)

    # -- the mount's lifetime --------------------------------------------------------------

    async def maintain(self) -> None:
        """For as long as the mount runs: check that spills can be stored (else spilling is
        off), delete dead mounts' spill areas, keep this mount's lease once it has spilled."""
        await self.check()
        if not self.enabled:
            return
        try:
            await self.delete_stale()
        except FsError as exc:
            log.warning("could not look for temporary objects of crashed mounts: %s", exc)
        await self._spilled.wait()
        while True:
            try:
                await self._store.put(f"{self._prefix}{LEASE_NAME}", b"", TEMPORARY)
                self._lease = True
            except FsError as exc:  # its spills are young meanwhile; one line an interval
                log.warning("could not refresh this mount's lease on its temporary objects "
                            "in %s: %s", self.where, exc)
            await trio.sleep(self.stale_after / 24)

    async def check(self) -> None:
        """Whether spills can be stored: what the mount's write probe found (`probed`, the
        same storage options and prefix), else a PUT and a DELETE of a probe object of its
        own. If refused, spilling is off for the mount's life (one line)."""
        if self.probed is None:
            probe = f"{self._prefix}probe"
            try:
                await self._store.put(probe, b"", TEMPORARY)
                await self._store.delete(probe)
            except FsError as exc:
                self.probed = exc
            else:
                self.probed = True
        if isinstance(self.probed, FsError):
            self.enabled = False
            self._error = f"the start-up check was refused: {self.probed}"
            log.warning("spilling is off: temporary objects cannot be stored in %s (%s). When "
                        "max_memory is all held by partly filled parts, a writer waits for a "
                        "few seconds, then fails with ENOSPC; allow PutObject and DeleteObject "
                        "on that prefix, or raise max_memory", self.where, self.probed)

    async def close(self) -> None:
        """At unmount, once every spill is deleted: the lease goes too, then the folders
        (`folders_left`)."""
        if self._lease:
            try:
                await self._store.delete(f"{self._prefix}{LEASE_NAME}")
            except FsError as exc:
                log.warning("could not delete this mount's lease %s%s: %s", self._prefix,
                            LEASE_NAME, exc)
        # another mount of the prefix may spill into these meanwhile: a folder marker's
        # DELETE removes the folder only while it is empty
        with trio.move_on_after(FOLDERS_CLEANUP_TIME) as cleanup:
            for folder in self.folders_left():
                try:
                    await self._store.delete(folder)
                except FsError as exc:  # a policy allowing only the spill prefix: harmless
                    log.debug("could not delete the folder %s: %s", folder, exc)
        if cleanup.cancelled_caught:
            log.debug("left the emptied folders under %s: S3 did not answer within %.0f s",
                      self.root, FOLDERS_CLEANUP_TIME)

    def folders_left(self) -> list[str]:
        """The folder markers this mount's objects may have left, deepest first. A server
        that keeps folders (SeaweedFS) keeps an emptied one, shown to other clients (the
        mount hides `.s3stream`): the start-up probe left `spill/` and `.s3stream/`, spills
        and files set aside their mount's folders. Deleting a folder marker removes it only
        when empty (SeaweedFS keeps a non-empty one and what is in it, other mounts' spills
        and directory attributes); elsewhere it is a DELETE of a key that does not exist.
        None for a mount that wrote nothing there (read-only, or refused)."""
        if not self._spilled.is_set():
            return [self.root, self.root[:-len("spill/")]] if self.probed is True else []
        return [self._prefix, f"{self.unlinked_root}{self.mount_id}/", self.unlinked_root,
                self.root, self.root[:-len("spill/")]]

    async def delete_stale(self) -> None:
        """Delete the spill areas of dead mounts of this prefix: those whose newest object
        (the lease, refreshed hourly by a live mount, a spill or a file set aside) is
        `stale_after` old, spills and files set aside alike. Stops at the first refused
        DELETE (one line)."""
        areas: dict[str, list] = {}  # mount id -> its objects in both areas
        for root in (self.root, self.unlinked_root):
            token = None
            while True:
                page = await self._store.list_page(root, None, token)
                for info in page.objects:
                    area = info.key[len(root):].split("/", 1)[0]
                    areas.setdefault(area, []).append(info)
                token = page.next_token
                if token is None:
                    break
        cutoff = time.time() - self.stale_after
        for area, objects in areas.items():
            if area == self.mount_id or max(o.last_modified for o in objects) >= cutoff:
                continue  # this mount's, or a mount that showed life within the period
            for info in objects:
                try:
                    await self._store.delete(info.key)
                except FsError as exc:
                    log.warning("could not delete temporary objects of a crashed mount in "
                                "%s: %s", self.where, exc)
                    return
