"""The file-system layer without FUSE: FileSystem driven directly over an in-memory store."""

import errno
import os
import stat

import pytest
import trio

from s3fs_stream.config import FsConfig
from s3fs_stream.errors import FsError
from s3fs_stream.filesystem import FileSystem
from s3fs_stream.inode_table import ROOT_INODE
from s3fs_stream.memory_budget import MemoryBudget
from s3fs_stream.object_meta import SetAttr
from s3fs_stream.upload_pool import UploadPool
from tests.memory_store import MemoryStore

MiB = 1024 * 1024


@pytest.fixture
async def fs(nursery):
    store = MemoryStore()
    config = FsConfig(uid=1000, gid=1000, part_size=5 * MiB, max_memory=64 * MiB)
    budget = MemoryBudget(config.max_memory)
    nursery.start_soon(budget.reclaim_forever)
    return Fs(FileSystem(store, "pre/", config, nursery, UploadPool(nursery, 2), budget))


class Fs:
    """The namespace's and the open files' calls under one name, as the adapter makes them."""

    def __init__(self, fs: FileSystem):
        self.inner = fs
        self.store, self.budget = fs.store, fs.budget

    def __getattr__(self, name):
        for layer in (self.inner.namespace, self.inner.files):
            if hasattr(layer, name):
                return getattr(layer, name)
        raise AttributeError(name)


async def names(fs, inode=ROOT_INODE):
    fh = await fs.opendir(inode)
    try:
        return [name for name, _, _ in await fs.readdir(fh, 0)]
    finally:
        fs.releasedir(fh)


async def test_create_write_flush_and_read_back(fs):
    fh, node = await fs.create(ROOT_INODE, "song.wav", 0o640, os.O_WRONLY | os.O_CREAT, 7, 8)
    assert "song.wav" in await names(fs)  # listed while still being written
    await fs.write(fh, 0, b"RIFF" + bytes(100))
    await fs.flush(fh)
    await fs.release(fh)
    data, meta, _ = fs.store.objects["pre/song.wav"]
    assert data == b"RIFF" + bytes(100)
    assert meta["uid"] == "7" and stat.S_IMODE(int(meta["mode"])) == 0o640
    found = await fs.lookup(ROOT_INODE, "song.wav")
    assert found.size == 104
    rh = await fs.open(found.inode, os.O_RDONLY)
    assert bytes(await fs.read(rh, 0, 4)) == b"RIFF"
    await fs.release(rh)


async def test_directories_and_invalid_names(fs):
    fs.store._store("pre/d/x", b"1", {})
    fs.store._store("pre/d", b"hidden by the directory", {})
    fs.store._store("pre/" + "n" * 300, b"too long", {})
    assert await names(fs) == ["d"]
    d = await fs.lookup(ROOT_INODE, "d")
    assert d.is_dir
    sub = await fs.mkdir(ROOT_INODE, "e", 0o755, 0, 0)
    assert "pre/e/" in fs.store.objects and sub.is_dir
    with pytest.raises(FsError) as info:
        await fs.rmdir(ROOT_INODE, "d")
    assert info.value.errno == errno.ENOTEMPTY
    await fs.rmdir(ROOT_INODE, "e")
    with pytest.raises(FsError) as info:
        await fs.lookup(ROOT_INODE, "n" * 300)
    assert info.value.errno == errno.ENAMETOOLONG


async def test_existing_object_opened_for_writing(fs):
    fs.store._store("pre/a", b"data", {})
    node = await fs.lookup(ROOT_INODE, "a")
    fh = await fs.open(node.inode, os.O_WRONLY)  # no O_TRUNC: changes it in place
    await fs.write(fh, 2, b"TA+")
    await fs.flush(fh)
    await fs.release(fh)
    assert fs.store.objects["pre/a"][0] == b"daTA+"
    fh = await fs.open(node.inode, os.O_WRONLY | os.O_TRUNC)
    await fs.write(fh, 0, b"new")
    await fs.flush(fh)
    await fs.release(fh)
    assert fs.store.objects["pre/a"][0] == b"new"


async def test_unlink_while_writing_stores_nothing(fs):
    fh, node = await fs.create(ROOT_INODE, "tmp", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, bytes(6 * MiB))
    await fs.unlink(ROOT_INODE, "tmp")
    await fs.write(fh, 6 * MiB, b"more")
    await fs.flush(fh)
    await fs.release(fh)
    assert "pre/tmp" not in fs.store.objects and not fs.store.uploads
    assert fs.budget.used == 0


async def test_setattr_on_stored_object_rewrites_metadata(fs):
    fs.store._store("pre/f", b"x", {"mode": "33188", "uid": "0", "gid": "0", "mtime": "1"})
    node = await fs.lookup(ROOT_INODE, "f")
    await fs.setattr(node.inode, SetAttr(mode=0o600, mtime_ns=5_000_000_000))
    meta = fs.store.objects["pre/f"][1]
    assert meta["mode"] == str(stat.S_IFREG | 0o600) and meta["mtime"] == "5"
    await fs.setattr(node.inode, SetAttr(size=10))  # truncate(2) of a closed file
    assert fs.store.objects["pre/f"][0] == b"x" + bytes(9)


async def test_attributes_set_after_the_last_flush_reach_s3(fs):
    fh, node = await fs.create(ROOT_INODE, "cp-p", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"payload")
    await fs.flush(fh)  # close() completes the object ...
    await fs.setattr(node.inode, SetAttr(mode=0o600, mtime_ns=1_000_000_000))  # ... then utimes
    await fs.release(fh)
    data, meta, _ = fs.store.objects["pre/cp-p"]
    assert data == b"payload"
    assert meta["mtime"] == "1" and meta["mode"] == str(stat.S_IFREG | 0o600)


async def test_open_during_release_gets_a_fresh_writer(fs):
    fh, node = await fs.create(ROOT_INODE, "f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"one")
    await fs.flush(fh)
    fs.store.delay = 0.01  # release awaits the store; an open arrives meanwhile
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.release, fh)
        await trio.sleep(0)
        fh2 = await fs.open(node.inode, os.O_WRONLY | os.O_TRUNC)
    await fs.write(fh2, 0, b"two")
    await fs.flush(fh2)
    await fs.release(fh2)
    assert fs.store.objects["pre/f"][0] == b"two"
    assert fs.budget.used == 0
