"""Spilling partly filled parts to the bucket when memory is short (docs/SEMANTICS.md,
"Memory decides speed"): a refused spill never hangs the mount, spills are STANDARD objects
whatever the mount's storage class, and one mount's cleanup never deletes a live mount's
spills. Real mounts on SeaweedFS through tests/fault_proxy.py (no random faults)."""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time

import pytest
import trio
from conftest import new_bucket, run_with_timeout, sha, wait_until
from fault_proxy import FaultProxy, refuse_method

from s3fs_stream.botocore_store import BotocoreStore
from s3fs_stream.config import StoreConfig
from s3fs_stream.errors import AccessDenied, FsError
from s3fs_stream.memory_budget import MemoryBudget
from s3fs_stream.object_meta import FileMeta
from s3fs_stream.part_schedule import PartSchedule
from s3fs_stream.spill_area import SpillArea
from s3fs_stream.upload_pool import UploadPool
from s3fs_stream.writer import StreamingWriter
from tests.memory_store import MemoryStore

MiB = 1024 * 1024
CHUNK = 64 * 1024
SPILL_ERROR = "raise max_memory, or allow PutObject and DeleteObject"


@pytest.fixture
def proxy(seaweed):
    port = int(seaweed.endpoint_url.rsplit(":", 1)[1])
    with FaultProxy(port, rate=0.0) as proxy:
        yield proxy


def through(seaweed, proxy):
    return dataclasses.replace(seaweed, endpoint_url=proxy.endpoint_url)


def block(k: int, i: int) -> bytes:
    return bytes([k, i % 251]) * (CHUNK // 2)


def whole(k: int, size: int) -> bytes:
    return b"".join(block(k, i) for i in range(size // CHUNK))


def write_in_turn(m, count: int, size: int) -> dict[int, OSError | None]:
    """One thread writes 64 KiB to each of `count` open files in turn (a mixer, a recorder of
    several channels): with little memory every part is partly filled, only a spill frees
    one. A file whose write fails gets no more writes, the others go on; each one's error or
    None. Through a mount without the writeback cache (WRITE_THROUGH) each write reaches the
    daemon before it returns: `count` x `size` beyond max_memory puts every byte in the
    budget's way, where the kernel's dirty pages could otherwise hold what the daemon lacks
    until close() (then no spill was needed: a run that spilled nothing). Parts are
    partly filled as long as `size` is below part_size (8 MiB)."""
    fds = {k: os.open(m.path / f"w{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
           for k in range(count)}
    outcome: dict[int, OSError | None] = dict.fromkeys(fds)
    try:
        for i in range(size // CHUNK):
            for k, fd in fds.items():
                if outcome[k] is None:
                    try:
                        os.write(fd, block(k, i))
                    except OSError as exc:
                        outcome[k] = exc
    finally:
        for k, fd in fds.items():
            try:
                os.close(fd)
            except OSError as exc:
                outcome[k] = outcome[k] or exc
    return outcome


WRITE_THROUGH = "writeback_cache=off"


class Prober:
    """Lookups of other names while the writers run: the mount must keep answering."""

    def __init__(self, m):
        self.m = m
        self.slowest = 0.0
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            assert os.stat(self.m.path / "other.txt").st_size == 5
            assert not os.path.exists(self.m.path / f"absent-{self.count}")  # a fresh lookup
            os.listdir(self.m.path)
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.count += 1
            time.sleep(0.1)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        if self.thread.is_alive():
            self.slowest = float("inf")  # a lookup still waits for an answer


def check_outcomes(m, outcome: dict[int, OSError | None], size: int) -> int:
    """Every writer either landed byte-identical or failed with ENOSPC (and stored nothing).
    Returns how many failed."""
    failed = 0
    for k, error in outcome.items():
        if error is None:
            assert sha(m.get(f"w{k}")) == sha(whole(k, size)), f"w{k}: content differs"
        else:
            assert error.errno == errno.ENOSPC, f"w{k}: {error}"
            failed += 1
            with pytest.raises(m.client.exceptions.ClientError):
                m.head(f"w{k}")  # never a truncated object
    return failed


def spill_lines(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "spill" in line and (" WARNING " in line or " ERROR " in line)]


@pytest.mark.expect_log_errors(SPILL_ERROR)
def test_a_spill_area_refused_from_the_start_turns_spilling_off(seaweed, proxy, mount_factory):
    """A policy denies the spill prefix: the start-up check finds out (one line), no spill
    is tried, writers nothing can make room for fail with ENOSPC after a short wait (one
    ERROR line each), the others land, and the mount answers lookups all along."""
    bucket = new_bucket(seaweed)
    seaweed.client().put_object(Bucket=bucket, Key="other.txt", Body=b"hello")
    proxy.refuse(refuse_method("PUT", ".s3stream/spill/"))  # the rest may be written
    m = mount_factory(through(seaweed, proxy), "max_memory=16M", WRITE_THROUGH, bucket=bucket)
    assert wait_until(lambda: "spilling is off" in m.log(), 10), m.log()[-2000:]
    size = 7 * MiB // 2
    with Prober(m) as prober:
        outcome = run_with_timeout(lambda: write_in_turn(m, 5, size), 120, m.log)
    failed = check_outcomes(m, outcome, size)
    # five partly filled parts fill the budget: nothing can make room but a failed file's
    # memory. Parts grow in 1 MiB steps (writer.GRAIN), so five files of 3.5 MiB need more
    # than 16 MiB and four fit: one fails (two, were the steps coarser), the others land
    assert 1 <= failed <= 2, outcome
    # the start-up probe only (sent directly, then again through botocore)
    assert len(proxy.refused) <= 2, proxy.refused[:5]
    log = m.log()
    assert log.count("spilling is off") == 1
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == failed
    assert all(SPILL_ERROR in e and "max_memory (16 MiB)" in e for e in errors), errors
    assert len(spill_lines(log)) == failed + 1
    assert prober.count >= 3 and prober.slowest < 3.0, (prober.count, prober.slowest)
    # still a working mount: a small file lands
    (m.path / "after.txt").write_bytes(b"after")
    assert m.get("after.txt") == b"after"


@pytest.mark.expect_log_errors(SPILL_ERROR)
def test_spills_refused_while_mounted_back_off(seaweed, proxy, mount_factory):
    """The spill prefix becomes read-only while the mount runs: refused spills pause
    spilling (a bounded number of PUTs and of WARNING lines), writers finish or fail with
    ENOSPC, never hang, and the mount keeps answering."""
    bucket = new_bucket(seaweed)
    seaweed.client().put_object(Bucket=bucket, Key="other.txt", Body=b"hello")
    seen: list[tuple[str, str]] = []
    proxy.refuse(lambda method, target, headers: seen.append((method, target)) and False)
    m = mount_factory(through(seaweed, proxy), "max_memory=16M", WRITE_THROUGH, bucket=bucket)
    # the start-up check passed: its probe (the write probe, where spills go) was deleted
    assert wait_until(lambda: any(method == "DELETE" and "/.s3stream/spill/probe-" in target
                                  for method, target in seen), 10), seen
    proxy.refuse(refuse_method("PUT", ".s3stream/"))
    size = 7 * MiB // 2  # as above: the budget fills, only a spill could make room
    started = time.monotonic()
    with Prober(m) as prober:
        outcome = run_with_timeout(lambda: write_in_turn(m, 5, size), 120, m.log)
    took = time.monotonic() - started
    failed = check_outcomes(m, outcome, size)
    assert 1 <= failed <= 2, outcome  # every spill refused: as with spilling off
    # pauses of 1, 2, 4 ... s: a handful of attempts however long the writers took (each
    # spill is its own key; a PUT refused over the mount's own connection is sent once more
    # through botocore, so count spills, not requests)
    attempts = {target for _, target in proxy.refused}
    assert 1 <= len(attempts) <= 3 + took / 4, (len(attempts), took)
    assert all("/.s3stream/spill/" in target for target in attempts), attempts
    assert len(proxy.refused) <= 2 * len(attempts)
    log = m.log()
    refusals = [line for line in log.splitlines()
                if "could not spill" in line and " WARNING " in line]
    assert 1 <= len(refusals) <= 1 + took / 60, refusals
    assert "spilling is off" not in log
    assert len(spill_lines(log)) == failed + len(refusals)
    assert prober.count >= 3 and prober.slowest < 3.0, (prober.count, prober.slowest)
    proxy.refuse(None)  # allowed again: after the pause, spilling works
    (m.path / "after.txt").write_bytes(b"after")
    assert m.get("after.txt") == b"after"


def test_spills_are_standard_whatever_the_storage_class(seaweed, proxy, mount_factory):
    """-o storage_class=STANDARD_IA,acl=public-read: the files carry both, spills neither
    (seen on the requests themselves, through the proxy). Six files written in turn, 24 MiB
    at max_memory=16M, each write reaching the daemon at once: some part must spill."""
    puts: list[tuple[str, dict[str, str]]] = []

    def record(method, target, headers):
        if method in ("PUT", "POST"):
            puts.append((target, dict(headers)))
        return False

    proxy.refuse(record)
    m = mount_factory(through(seaweed, proxy), "max_memory=16M", WRITE_THROUGH,
                      "storage_class=STANDARD_IA", "acl=public-read")
    names = [f"w{k}" for k in range(6)]
    size = 4 * MiB
    outcome = run_with_timeout(lambda: write_in_turn(m, 6, size), 120, m.log)
    assert not any(outcome.values()), outcome
    for k, name in enumerate(names):
        assert m.get(name) == whole(k, size)
    # the spills, and the lease beside them (a temporary object too)
    spills = [headers for target, headers in puts if "/.s3stream/spill/" in target
              and "/probe" not in target and "?" not in target]
    spilled = [target for target, _ in puts if "/.s3stream/spill/" in target
               and "/probe" not in target and not target.endswith("/alive")]
    files = [headers for target, headers in puts if target.split("?")[0].rsplit("/", 1)[-1]
             in names and ("uploads" in target or "?" not in target)]
    assert spilled, "no part was spilled: nothing to check"
    assert len(files) == len(names), files  # one PUT each (4 MiB: one part)
    assert all(h.get("x-amz-storage-class") == "STANDARD_IA" for h in files), files
    assert all(h.get("x-amz-acl") == "public-read" for h in files), files
    assert not [h for h in spills if "x-amz-storage-class" in h or "x-amz-acl" in h], spills
    # spills, lease and their folders (SeaweedFS keeps emptied ones) are gone at unmount
    assert m.unmount() == 0
    listing = m.client.list_objects_v2(Bucket=m.bucket, Delimiter="/")
    assert not listing.get("CommonPrefixes"), listing
    assert sorted(o["Key"] for o in listing.get("Contents", [])) == names, listing


async def test_a_live_mounts_old_spills_are_not_deleted_by_another_mount(seaweed,
                                                                         monkeypatch):
    """Two mounts of one prefix: the first keeps a lease beside its spills; the second's
    cleanup deletes a dead mount's spill area once its newest object is `stale_after` old,
    and never the live one's, however old its spills are (here 2.4 s stands for a day)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    bucket = new_bucket(seaweed)
    client = seaweed.client()
    store = BotocoreStore(StoreConfig(bucket=bucket, endpoint_url=seaweed.endpoint_url,
                                      region="us-east-1", force_path_style=True))
    dead = "rec/.s3stream/spill/0123456789ab-1/1"
    client.put_object(Bucket=bucket, Key=dead, Body=b"x" * 100)
    live = SpillArea(store, "rec/", stale_after=2.4)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.maintain)
            segment = await live.put(b"y" * 100, 0)
            await trio.sleep(3)  # the spill and the dead area are "a day" old
            other = SpillArea(store, "rec/", stale_after=2.4)
            await other.delete_stale()
            keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
            assert segment.key in keys, keys  # the live mount's old spill stays ...
            assert dead not in keys, keys  # ... the dead one's goes
            assert any(k.endswith("/alive") for k in keys), keys
            assert await live.read(segment, 0, 100) == b"y" * 100
            await live.delete([segment])
            nursery.cancel_scope.cancel()
        await live.close()
        assert not client.list_objects_v2(Bucket=bucket).get("Contents"), "lease left"
    finally:
        await store.aclose()


class RefusingStore(MemoryStore):
    """A store whose policy denies PUTs under the spill prefix."""

    def __init__(self):
        super().__init__()
        self.refused = 0

    async def put(self, key, data, options):
        if key.startswith(".s3stream/"):
            self.refused += 1
            raise AccessDenied(f"PutObject {key}: AccessDenied")
        return await super().put(key, data, options)


async def test_round_robin_with_refused_spills_fails_some_writers_never_spins(nursery,
                                                                              autojump_clock):
    """Eight files filled in turn by one task with room for three parts, the bucket refusing
    every spill: a few refused PUTs (paused 1, 2, 4 ... s), each stuck write fails with
    ENOSPC after 2 s and frees its file's memory, the rest of the files land whole."""
    store = RefusingStore()
    budget = MemoryBudget(16 * MiB)
    nursery.start_soon(budget.reclaim_forever)
    pool = UploadPool(nursery, 4)
    spill = SpillArea(store, "")
    part = 5 * MiB
    writers = [StreamingWriter(f"f{i}", f"f{i}", store, pool, budget,
                               PartSchedule(part, 10 * MiB), spill,
                               FileMeta(0o100644, 1, 2, 1_700_000_000_000_000_000), None)
               for i in range(8)]
    contents = {w.key: bytearray() for w in writers}
    failed = set()
    started = trio.current_time()
    with trio.fail_after(300):
        for step in range(3 * part // CHUNK):
            for writer in writers:
                if writer.key in failed:
                    continue
                piece = bytes([step % 251, len(failed)]) * (CHUNK // 2)
                try:
                    await writer.write(step * CHUNK, piece)
                except FsError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    failed.add(writer.key)
                    continue
                contents[writer.key] += piece
        for writer in writers:
            try:
                await writer.flush()
            except FsError as exc:
                assert writer.key in failed and exc.errno == errno.ENOSPC, exc
            await writer.release()
    took = trio.current_time() - started
    assert 0 < len(failed) < 8, failed
    for key, data in contents.items():
        if key not in failed:
            assert store.objects[key][0] == data, key
        else:
            assert key not in store.objects
    assert 0 < store.refused <= 3 + took / 4, (store.refused, took)
    assert budget.refusals == len(failed) and budget.used == 0
