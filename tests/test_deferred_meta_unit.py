"""Deferred metadata of closed files (deferred_meta.META_DELAY), over the in-memory store with
the mount's background task running."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from s3fs_stream import deferred_meta
from s3fs_stream.errors import AccessDenied, FsError
from s3fs_stream.inode_table import ROOT_INODE
from s3fs_stream.object_meta import SetAttr
from tests.test_filesystem_unit import Fs, listing, unit_filesystem

OLD = 1_600_000_000 * 10**9


@pytest.fixture
async def fs(nursery):
    inner = unit_filesystem(nursery)
    nursery.start_soon(inner.deferred.store_meta_forever)
    await trio.sleep(0)  # the task runs: setattr defers
    return Fs(inner)


async def written(fs, name: str, data: bytes = b"x" * 4096, mode: int = 0o600):
    fh, node = await fs.create(ROOT_INODE, name, mode, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o700), fh)  # rsync's fchmod
    await fs.write(fh, 0, data)
    await fs.flush(fh)
    await fs.release(fh)
    return node


def copies(fs) -> list[tuple]:
    return [call for call in fs.store.calls if call[0] == "copy"]


def stored_meta(fs, key: str) -> dict:
    return fs.store.objects[key][1]


async def test_rsync_sequence_costs_one_copy(fs):
    node = await written(fs, ".f.abc123")
    await fs.setattr(node.inode, SetAttr(mtime_ns=OLD, atime_ns=OLD))
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o755))
    assert stat.S_IMODE((await fs.getattr(node.inode)).mode) == 0o755  # shown at once
    assert node.mtime_ns == OLD
    assert copies(fs) == []
    await fs.rename(ROOT_INODE, ".f.abc123", ROOT_INODE, "f", 0)
    assert copies(fs) == [("copy", "pre/.f.abc123", "pre/f")]
    meta = stored_meta(fs, "pre/f")
    assert meta["mode"] == str(stat.S_IFREG | 0o755) and meta["mtime"] == "1600000000"
    heads = len([c for c in fs.store.calls if c[0] == "head"])
    await fs.getattr(node.inode)  # the rename's copy is known: no HEAD
    assert len([c for c in fs.store.calls if c[0] == "head"]) == heads
    await trio.sleep(deferred_meta.META_DELAY + 0.5)
    assert len(copies(fs)) == 1  # nothing left to store


async def test_stored_after_the_delay(fs):
    node = await written(fs, "g")
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    assert stored_meta(fs, "pre/g")["mode"] == str(stat.S_IFREG | 0o700)
    with trio.fail_after(deferred_meta.META_DELAY + 1):
        while stored_meta(fs, "pre/g")["mode"] != str(stat.S_IFREG | 0o640):
            await trio.sleep(0.05)
    assert copies(fs) == [("copy", "pre/g", "pre/g")]
    assert not node.meta_pending


async def test_unlink_drops_it(fs):
    node = await written(fs, "h")
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    await fs.unlink(ROOT_INODE, "h")
    await trio.sleep(deferred_meta.META_DELAY + 0.5)
    assert copies(fs) == [] and "pre/h" not in fs.store.objects


async def test_open_for_writing_stores_it_first(fs):
    node = await written(fs, "i")
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    fh = await fs.open(node.inode, os.O_WRONLY)
    assert copies(fs) == [("copy", "pre/i", "pre/i")]
    await fs.release(fh)


async def test_a_reader_stores_it_before_its_first_read(fs):
    """rsync opens a file read-only to fchmod it: that open stores nothing; a read does."""
    node = await written(fs, "i2")
    fh = await fs.open(node.inode, os.O_RDONLY)
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o755), fh)  # fchmod
    assert copies(fs) == []
    assert await fs.read(fh, 0, 4) == b"xxxx"
    assert copies(fs) == [("copy", "pre/i2", "pre/i2")]
    assert stored_meta(fs, "pre/i2")["mode"] == str(stat.S_IFREG | 0o755)
    await fs.release(fh)


async def test_rsync_fchmod_through_a_read_only_open_then_rename(fs):
    node = await written(fs, ".n.XyZ123")
    await fs.setattr(node.inode, SetAttr(mtime_ns=OLD, atime_ns=OLD))
    fh = await fs.open(node.inode, os.O_RDONLY)
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o755), fh)
    await fs.release(fh)
    await fs.rename(ROOT_INODE, ".n.XyZ123", ROOT_INODE, "n", 0)
    assert copies(fs) == [("copy", "pre/.n.XyZ123", "pre/n")]
    assert stored_meta(fs, "pre/n")["mode"] == str(stat.S_IFREG | 0o755)


async def test_store_all_at_shutdown(fs):
    node = await written(fs, "j")
    await fs.setattr(node.inode, SetAttr(uid=7))
    await fs.store_all_meta()
    assert stored_meta(fs, "pre/j")["uid"] == "7"


async def test_a_replaced_object_is_not_overwritten(fs):
    """Another client's object at the key (a new ETag seen by a HEAD) wins: the change made
    here is dropped, never copied onto it."""
    node = await written(fs, "k")
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    fs.store._store("pre/k", b"y" * 4096, {"mode": str(stat.S_IFREG | 0o604)})
    node.expires = 0.0
    await fs.getattr(node.inode)
    assert stat.S_IMODE(node.mode) == 0o604
    await trio.sleep(deferred_meta.META_DELAY + 0.5)
    assert copies(fs) == []
    assert stored_meta(fs, "pre/k")["mode"] == str(stat.S_IFREG | 0o604)


async def test_listing_keeps_the_change(fs):
    node = await written(fs, "l")
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    node.expires = 0.0
    [(name, listed, _)] = await listing(fs)
    assert name == "l" and stat.S_IMODE(listed.mode) == 0o640
    await fs.lookup(ROOT_INODE, "l")
    assert stat.S_IMODE(node.mode) == 0o640


async def test_forgotten_node_keeps_its_change(fs):
    node = await written(fs, "m")
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    fs.inner.forget(node.inode, node.lookups)
    again = await fs.lookup(ROOT_INODE, "m")
    assert again is node and stat.S_IMODE(again.mode) == 0o640
    await trio.sleep(deferred_meta.META_DELAY + 0.5)
    assert stored_meta(fs, "pre/m")["mode"] == str(stat.S_IFREG | 0o640)


async def test_rename_of_the_parent_directory_stores_it(fs):
    d = await fs.mkdir(ROOT_INODE, "d", 0o755, 0, 0)
    fh, node = await fs.create(d.inode, "f", 0o600, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"z")
    await fs.flush(fh)
    await fs.release(fh)
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    await fs.rename(ROOT_INODE, "d", ROOT_INODE, "e", 0)
    assert stored_meta(fs, "pre/e/f")["mode"] == str(stat.S_IFREG | 0o640)


def refuse_copies(fs) -> list[str]:
    """Every CopyObject answers AccessDenied (a policy, Object Lock); returns the refused
    keys. `del fs.store.copy` lets them through again."""
    refused = []

    async def copy(source, dest, *args, **kwargs):
        refused.append(dest)
        raise AccessDenied(f"CopyObject {dest}: AccessDenied")

    fs.store.copy = copy
    return refused


async def test_another_tools_object_is_changed_at_once(fs):
    """Not stored by this mount: no deferral, a refusal is chmod's errno, nothing shown."""
    fs.store._store("pre/theirs", b"x", {"mode": str(stat.S_IFREG | 0o644)})
    node = await fs.lookup(ROOT_INODE, "theirs")
    refused = refuse_copies(fs)
    with pytest.raises(FsError) as info:
        await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o600))
    assert info.value.errno == errno.EACCES and refused == ["pre/theirs"]
    assert stat.S_IMODE(node.mode) == 0o644 and not node.meta_pending
    del fs.store.copy
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o600))
    assert stored_meta(fs, "pre/theirs")["mode"] == str(stat.S_IFREG | 0o600)


async def test_a_refused_deferred_store_is_kept_and_retried(fs):
    node = await written(fs, "mine")
    refused = refuse_copies(fs)
    await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o600))  # deferred
    await trio.sleep(deferred_meta.META_DELAY + 2 * deferred_meta.META_DELAY + 0.5)  # 1 s, then +2 s
    assert refused == ["pre/mine", "pre/mine"]  # backed off: not one per loop
    assert stat.S_IMODE(node.mode) == 0o600 and node.meta_pending  # never reverted
    node.expires = 0.0
    assert stat.S_IMODE((await fs.getattr(node.inode)).mode) == 0o600  # a HEAD keeps it
    with pytest.raises(FsError) as info:
        await fs.store_meta(node.inode)  # fsync reports it
    assert info.value.errno == errno.EACCES
    with pytest.raises(FsError) as info:  # the next change is stored at once
        await fs.setattr(node.inode, SetAttr(mode=stat.S_IFREG | 0o640))
    assert info.value.errno == errno.EACCES
    assert stat.S_IMODE(node.mode) == 0o600 and node.meta_pending
    fh = await fs.open(node.inode, os.O_RDONLY)
    assert await fs.read(fh, 0, 4) == b"xxxx"  # a read does not fail for it
    await fs.release(fh)
    del fs.store.copy
    await fs.store_meta(node.inode)
    assert stored_meta(fs, "pre/mine")["mode"] == str(stat.S_IFREG | 0o600)
    assert not node.meta_pending
