"""The mount's lifetime: one nursery owns the upload workers, the read-ahead fetches and the
FUSE session; unmount (fusermount3 -u, umount, SIGINT, SIGTERM) lets open files' uploads stay
recoverable and closes the session.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable
from dataclasses import replace

import pyfuse3
import trio

from .botocore_store import BotocoreStore
from .config import MountConfig
from .errors import AccessDenied, NoSuchBucket, NotFound, QuietError, StoreError, Unreachable
from .filesystem import FileSystem
from .fuse_adapter import FuseOperations, KernelNotifier
from .memory_budget import MemoryBudget
from .object_store import PutOptions
from .page_cache import PageCacheDropper, find_fuse_fd
from .recover import warn_of_old_uploads
from .spill_area import RESERVED_NAME, new_mount_id, probe_key
from .status import StatusServer, snapshot
from .upload_pool import UploadPool

log = logging.getLogger(__name__)

MOUNT_FAILURE = 32  # mount(8)'s exit code for "mount failure"
UPLOADS_LEFT = 3  # unmounted with files still open: their uploads wait for `recover`


async def check_access(store: BotocoreStore, prefix: str) -> None:
    """Fail with one line naming the cause if the bucket is not usable."""
    where = f"s3://{store.bucket}/{prefix}"
    try:
        await store.check_bucket()
        await store.list_page(prefix, "/", max_keys=1)
    except (NoSuchBucket, NotFound):
        raise QuietError(f"no such bucket: {store.bucket}", MOUNT_FAILURE) from None
    except AccessDenied as exc:
        hint = "" if store.config.requester_pays else \
            "; a requester-pays bucket needs -o requester_pays"
        raise QuietError(f"access denied to {where}: check the credentials{hint} ({exc})",
                         MOUNT_FAILURE) from None
    except Unreachable as exc:
        endpoint = store.config.endpoint_url or "the AWS S3 endpoint"
        raise QuietError(f"endpoint unreachable: {endpoint} ({exc})", MOUNT_FAILURE) from None
    except StoreError as exc:
        raise QuietError(f"cannot use {where}: {exc}", MOUNT_FAILURE) from None


async def check_writes(store: BotocoreStore, config: MountConfig, mount_id: str
                       ) -> tuple[MountConfig, bool | StoreError | None]:
    """Before the mount answers anything: may it write under its prefix? A PUT and a DELETE
    of one probe object where spills go, `spill_area.probe_key` (hidden, STANDARD, no public
    ACL, as spills are), which answers for spilling too: returned beside the config to mount
    with (True: spills can be stored, the error that refused them, None: not known). Where
    that PUT is refused, a second probe `PREFIX.s3stream/probe/ID` tells whether a policy
    refuses only the spill prefix. A refused PUT mounts read-only (one WARNING) or, with
    on_read_only=refuse, fails the mount. A refused DELETE only warns: writes work, removals
    and renames will answer EACCES."""
    if config.fs.read_only:
        return config, None
    where = f"s3://{store.bucket}/{config.store.prefix}"
    probe = probe_key(config.store.prefix, mount_id)
    spills: bool | StoreError | None = True
    try:
        await store.put(probe, b"", PutOptions(temporary=True))
    except AccessDenied as exc:
        spills = exc
        probe = f"{config.store.prefix}{RESERVED_NAME}/probe/{mount_id}"
        try:
            await store.put(probe, b"", PutOptions(temporary=True))
        except AccessDenied as exc:
            if config.on_read_only == "refuse":
                raise QuietError(f"writes to {where} are refused ({exc}): the credentials or "
                                 "the bucket policy allow no PutObject there; not mounted "
                                 "(on_read_only=refuse)", MOUNT_FAILURE) from None
            log.warning("mounting %s read-only: the credentials or the bucket policy refuse "
                        "writes there (%s); use -o ro to mount read-only without this "
                        "warning, on_read_only=refuse to fail instead, or allow PutObject to "
                        "write", where, exc)
            return replace(config, fs=replace(config.fs, read_only=True)), None
        except StoreError as exc:
            log.warning("could not check whether %s accepts writes (%s); mounted read-write",
                        where, exc)
            return config, spills
    except StoreError as exc:  # not a refusal: writes are tried, and fail on their own
        log.warning("could not check whether %s accepts writes (%s); mounted read-write",
                    where, exc)
        return config, None
    try:
        await store.delete(probe)
    except AccessDenied as exc:
        log.warning("deletes in %s are refused (%s): writing works, but rm, mv and "
                    "overwriting fail with EACCES; the probe object %s is left", where, exc,
                    probe)
        if spills is True:
            spills = exc  # spills could not be deleted either
    except StoreError as exc:
        log.warning("could not delete the probe object s3://%s/%s: %s", store.bucket, probe,
                    exc)
        if spills is True:
            spills = None  # the spill area checks on its own
    return config, spills


def check_mountpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise QuietError(f"mount point {path} does not exist or is not a directory",
                         MOUNT_FAILURE)
    if os.path.ismount(path):
        raise QuietError(f"mount point {path} is already a mount point", MOUNT_FAILURE)


def limit_malloc_caching() -> None:
    """Keep RSS flat without paying a page fault per 4 KiB of every request.

    Part and read-ahead buffers (8 MiB) are recycled through the budget and stay in their own
    mappings (threshold 2 MiB). The 1 MiB request buffers pyfuse3 allocates per WRITE come
    from the heap, which keeps up to 16 MiB free at its top instead of returning it after
    each request: mapping and faulting them in fresh cost half of the daemon's system time.
    glibc would otherwise raise its mmap threshold as large blocks are freed, and freed part
    buffers would linger in the heap. Two arenas are plenty for a few worker threads.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 2 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD
    libc.mallopt(-8, 2)  # M_ARENA_MAX


KERNEL_READ_AHEAD_KB = 1024
KERNEL_DIRTY_MAX = 16 * 1024 * 1024
# Requests handled at once. Each task keeps libfuse's receive buffer (1 MiB + 4 KiB, resident
# once a 1 MiB WRITE filled it) and a WRITE in progress holds a second copy of its data
# (pyfuse3's bytes), so requests cost at most MAX_TASKS x 2 MiB beside the budget
# (docs/internals.md "Memory outside the budget"). A WRITE waiting for memory holds a task;
# with the writeback cache at most MAX_BACKGROUND of them are in flight, leaving the rest for
# lookups, reads and closes.
MAX_TASKS = 16
DRAIN_PAUSE = 0.5  # after a signal, unmount once no request came for this long ...
DRAIN_LIMIT = 10.0  # ... or after this long (files still written to are left for recover)
# The kernel's writeback WRITEs (and read-ahead READs) in flight at once (FUSE's default is
# 12): each holds up to 2 MiB of this daemon's memory outside the budget while it waits, and
# more in flight made no write faster (one stream: 4 as fast as 32, 16 MiB less RSS).
MAX_BACKGROUND = 4


async def tune_kernel(operations: FuseOperations, mountpoint: str,
                      ready: Callable[[], None]) -> None:
    """Once the kernel's INIT is answered: the kernel settings below, then the mount is
    ready (`ready()`: the helper returns, systemd is told) and opens proceed. A program that
    mounts and reads at once thus gets the same request sizes as one that waits: the kernel
    sizes a file's read-ahead from the device's setting when its open returns."""
    await operations.initialized.wait()
    try:
        await trio.to_thread.run_sync(tune_kernel_bdi, mountpoint)
    finally:
        operations.tuned.set()
    ready()


def tune_kernel_bdi(mountpoint: str) -> None:
    """Two settings of the mount's backing device (needs root; skipped otherwise):

    - read_ahead_kb 1024: the kernel reads ahead in 1 MiB requests instead of 128 KiB ones,
      eight times fewer round trips through FUSE for sequential reads;
    - max_bytes 16 MiB of dirty pages (the kernel's default for FUSE is 1 % of its dirty
      limit, ~45 MiB here): close() must first write back whatever is dirty, so this is part
      of what it waits for. Our own parts already keep the upload pipeline full; the lower
      limit cut close() from 0.38 to 0.22 s per 1 GiB file with no loss of speed.

    Only after INIT: the kernel caps the read-ahead to what INIT negotiated (128 KiB) when
    it processes the reply, undoing any earlier setting. Runs in a worker thread (it may
    mount fusectl); never stats the mount point, which would wait for ourselves."""
    # from mountinfo, not stat(): a stat of our own mount point would wait for ourselves
    device = None
    # mountinfo shows resolved paths (only the parent is resolved: not a stat of ours) ...
    wanted = os.path.join(os.path.realpath(os.path.dirname(mountpoint)),
                          os.path.basename(mountpoint))
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            if _unescape(fields[4]) == wanted:  # ... with spaces as \040
                device = fields[2]
    if device is None:
        return
    _set_bdi(device, "read_ahead_kb", lambda _: KERNEL_READ_AHEAD_KB)
    # only ever lowered: a small machine's default may be lower still (Linux 6.2+)
    _set_bdi(device, "max_bytes", lambda default: min(KERNEL_DIRTY_MAX, default))
    _set_max_background(device)


def _unescape(field: str) -> str:
    """A path field of /proc/self/mountinfo: space, tab, newline, backslash are octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _set_max_background(device: str) -> None:
    """FUSE lets the kernel keep 12 background requests (writeback WRITEs, read-ahead READs)
    in flight; lower it to MAX_BACKGROUND, each one parked in this daemon costing up to 2 MiB
    outside the budget. The fusectl file system is mounted when it is not (root only;
    otherwise the default stays)."""
    connections = "/sys/fs/fuse/connections"
    minor = device.split(":")[1]
    if not os.path.isdir(f"{connections}/{minor}"):
        try:
            subprocess.run(["mount", "-t", "fusectl", "fusectl", connections],
                           capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:  # no mount(8), or it hung
            log.debug("fusectl not mounted (%s): max_background left at its default", exc)
    for name, value in (("max_background", MAX_BACKGROUND),
                        ("congestion_threshold", MAX_BACKGROUND * 3 // 4)):
        try:
            with open(f"{connections}/{minor}/{name}", "w") as control:
                control.write(str(value))
        except OSError as exc:
            log.debug("kernel %s left at its default (%s)", name, exc)


def _set_bdi(device: str, name: str, value: Callable[[int], int]) -> None:
    """Set /sys/class/bdi/DEVICE/NAME to `value(current)`; a missing file or no permission
    leaves the kernel's default."""
    path = f"/sys/class/bdi/{device}/{name}"
    try:
        with open(path) as bdi:
            current = int(bdi.read())
        with open(path, "w") as bdi:
            bdi.write(str(value(current)))
    except (OSError, ValueError) as exc:
        log.debug("kernel %s left at its default (%s)", name, exc)


def fuse_options(config: MountConfig) -> set[str]:
    options = {f"fsname=s3stream:{config.store.bucket}", "subtype=s3stream",
               "default_permissions", "noatime"}
    if config.allow_other:
        options.add("allow_other")
    if config.fs.read_only:
        options.add("ro")
    return options


async def run_mount(config: MountConfig, ready: Callable[[], None] = lambda: None) -> None:
    """Check access, mount, serve until unmounted; `ready` is called once the mount works:
    the kernel's INIT is answered and the kernel settings of `tune_kernel` are in force."""
    store = BotocoreStore(config.store)
    await check_access(store, config.store.prefix)
    mount_id = new_mount_id()
    # before anything is answered: ro or rw, and whether spills can be stored
    config, spills = await check_writes(store, config, mount_id)
    await warn_of_old_uploads(store, config.store.prefix)
    check_mountpoint(config.mountpoint)
    if config.fake:
        ready()
        return
    limit_malloc_caching()
    try:
        await _serve(config, store, ready, mount_id, spills)
    except* QuietError as group:  # one line and its exit code, not a group's traceback
        raise _first(group) from None


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _serve(config: MountConfig, store: BotocoreStore, ready: Callable[[], None],
                 mount_id: str, spills: bool | StoreError | None) -> None:
    """One nursery owns every task of the mount and the FUSE session."""
    budget = MemoryBudget(config.fs.max_memory)
    left: list[str] = []
    async with trio.open_nursery() as nursery:
        pool = UploadPool(nursery, config.fs.upload_concurrency)
        pages = PageCacheDropper()
        notifier = KernelNotifier()
        fs = FileSystem(store, config.store.prefix, config.fs, nursery, pool, budget,
                        pages.drop, notifier.notify, mount_id)
        fs.spill.probed = spills  # the write probe was the spill area's
        nursery.start_soon(budget.reclaim_forever)
        if not config.fs.read_only:  # check the spill area, clean up after crashed mounts
            nursery.start_soon(fs.spill.maintain)
        if config.fs.max_unsynced:
            nursery.start_soon(fs.files.sync_forever, config.fs.max_unsynced)
        nursery.start_soon(fs.deferred.store_meta_forever)  # chmod/utimes of closed files
        operations = FuseOperations(fs, config.fs.writeback_cache)
        source = f"s3://{config.store.bucket}/{config.store.prefix}"
        status = StatusServer(config.mountpoint, lambda: snapshot(
            config.mountpoint, source, fs.files, budget, getattr(store, "stats", None),
            operations.kernel_requests))
        status.open()  # before mounting: its path resolves the mount point
        try:
            pyfuse3.init(operations, config.mountpoint, fuse_options(config))
        except RuntimeError as exc:
            status.close()
            raise QuietError(f"cannot mount on {config.mountpoint}: {exc}",
                             MOUNT_FAILURE) from None
        log.info("mounted s3://%s/%s on %s (max object size %d GiB at max_memory=%d MiB)",
                 config.store.bucket, config.store.prefix, config.mountpoint,
                 fs.schedule.max_object_size >> 30, config.fs.max_memory >> 20)
        nursery.start_soon(_terminate_on_signals, operations)
        nursery.start_soon(status.serve)
        nursery.start_soon(tune_kernel, operations, config.mountpoint, ready)
        nursery.start_soon(pages.run, find_fuse_fd())
        nursery.start_soon(notifier.run)
        try:
            await pyfuse3.main(min_tasks=2, max_tasks=MAX_TASKS)
        finally:
            pages.stop()  # nobody answers the kernel any more
            status.close()
            notifier.stop()
            with trio.move_on_after(150, shield=True):
                left = await fs.files.shutdown()
                await fs.spill.close()  # after the writers: their spills are deleted
                await fs.deferred.store_all_meta()  # after the writers: none holds a file
                await pool.close()
                await store.aclose()
            pyfuse3.close(unmount=True)
            log.info("unmounted %s (memory: peak %d of %d MiB, %d parts spilled to the bucket "
                     "while memory was short)", config.mountpoint, budget.peak >> 20,
                     budget.limit >> 20, budget.spills)
            nursery.cancel_scope.cancel()
    if left:
        raise QuietError(f"{len(left)} file(s) were still open at unmount; their uploads are "
                         "left for 's3stream recover'", UPLOADS_LEFT)


async def _terminate_on_signals(operations: FuseOperations) -> None:
    """SIGINT/SIGTERM/SIGHUP unmount, once requests in progress are done (a close() being
    written back completes instead of failing); a second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting once requests in progress are done",
                     signal.Signals(signum).name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_second_signal, signals, nursery.cancel_scope)
                await operations.quiet(DRAIN_PAUSE, DRAIN_LIMIT)
                nursery.cancel_scope.cancel()
            # a close still completing a large sparse file (or copying a large base) would
            # keep pyfuse3.main (it waits for its handlers) and so the unmount waiting
            operations.fs.files.stop_completions()
            pyfuse3.terminate()
            return


async def _second_signal(signals, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return
