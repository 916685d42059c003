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
from s3fs_stream.object_store import PutOptions
from s3fs_stream.upload_pool import UploadPool
from tests.memory_store import MemoryStore

MiB = 1024 * 1024


def unit_filesystem(nursery, **options) -> FileSystem:
    """A FileSystem over a MemoryStore under prefix "pre/", its tasks in `nursery`."""
    config = FsConfig(uid=1000, gid=1000, part_size=5 * MiB, max_memory=64 * MiB, **options)
    budget = MemoryBudget(config.max_memory)
    nursery.start_soon(budget.reclaim_forever)
    return FileSystem(MemoryStore(), "pre/", config, nursery, UploadPool(nursery, 2), budget)


@pytest.fixture
async def fs(nursery):
    return Fs(unit_filesystem(nursery))


class Fs:
    """The namespace's, its deferred metadata's and the open files' calls under one name, as
    the adapter makes them."""

    def __init__(self, fs: FileSystem):
        self.inner = fs
        self.store, self.budget = fs.store, fs.budget

    def __getattr__(self, name):
        for layer in (self.inner.namespace, self.inner.deferred, self.inner.files):
            if hasattr(layer, name):
                return getattr(layer, name)
        raise AttributeError(name)


async def listing(fs, inode=ROOT_INODE, limit=None):
    """(name, node, next offset) of every entry, as the kernel takes them (at most `limit`
    per readdir call, each call from where the last one stopped)."""
    fh = await fs.opendir(inode)
    entries = []
    try:
        while True:
            got = []

            def reply(name, node, next_offset, got=got):
                if limit is not None and len(got) >= limit:
                    return False
                got.append((name, node, next_offset))
                return True

            await fs.readdir(fh, entries[-1][2] if entries else 0, reply)
            if not got:
                return entries
            entries += got
    finally:
        fs.releasedir(fh)


async def names(fs, inode=ROOT_INODE):
    return [name for name, _, _ in await listing(fs, inode)]


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



async def test_fchmod_of_a_file_removed_while_open_changes_only_its_node(fs):
    fs.store._store("pre/f", b"x", {"mode": "33188", "uid": "0", "gid": "0", "mtime": "1"})
    node = await fs.lookup(ROOT_INODE, "f")
    rh = await fs.open(node.inode, os.O_RDONLY)
    await fs.unlink(ROOT_INODE, "f")
    copies = [call for call in fs.store.calls if call[0] == "copy"]
    changed = await fs.setattr(node.inode, SetAttr(mode=0o600))  # fchmod: nothing to store on
    assert stat.S_IMODE(changed.mode) == 0o600
    assert [call for call in fs.store.calls if call[0] == "copy"] == copies
    await fs.release(rh)

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


async def test_listing_streams_pages_with_stable_offsets_and_hides_objects(fs, caplog):
    fs.store.page_size = 7
    for i in range(100):
        fs.store._store(f"pre/d/f{i:03d}", b"x" * 5000, {})
    fs.store._store("pre/d/f050/inner", b"1", {})  # the directory f050 hides the object
    fs.store._store("pre/d/f050.txt", b"y" * 5000, {})  # sorts between "f050" and "f050/"
    fs.store._store("pre/d/../b", b"bad", {})  # no file name: logged once per mount
    d = await fs.lookup(ROOT_INODE, "d")
    fs.store.calls.clear()
    entries = await listing(fs, d.inode, limit=9)
    got = [name for name, _, _ in entries]
    assert sorted(got) == sorted([f"f{i:03d}" for i in range(100)] + ["f050.txt"])
    assert len(got) == len(set(got))
    assert [n for n, node, _ in entries if node.is_dir] == ["f050"]
    assert [off for _, _, off in entries] == list(range(1, len(entries) + 1))
    # one LIST per page, one HEAD per file (its x-amz-meta-* before the kernel gets it),
    # the directory's marker (and, where markers keep no metadata, its attributes object)
    lists = [c for c in fs.store.calls if c[0] == "list_page"]
    heads = [c[1] for c in fs.store.calls if c[0] == "head"]
    assert len(lists) + len(heads) == len(fs.store.calls)
    assert len(lists) <= 102 // 7 + 3
    files = [h for h in heads if h not in ("pre/d/f050/", "pre/.s3stream/dirs/d/f050")]
    assert sorted(files) == sorted(f"pre/d/{name}" for name in got if name != "f050")
    assert "pre/d/f050/" in heads and len(heads) <= len(files) + 2
    # only what the kernel accepted stays in the table
    assert len(fs.inner.table) <= len(entries) + 3
    await listing(fs, d.inode)
    assert caplog.text.count("skipping key") == 1
    assert caplog.text.count("hidden by the directory") == 1


async def test_rejected_entries_are_not_kept(fs):
    for i in range(50):
        fs.store._store(f"pre/f{i:02d}", b"x" * 5000, {})
    fh = await fs.opendir(ROOT_INODE)
    taken = []
    await fs.readdir(fh, 0, lambda name, node, off: len(taken) < 3 and not taken.append(name))
    fs.releasedir(fh)
    assert taken == ["f00", "f01", "f02"]
    assert len(fs.inner.table) == 4  # the root and the three the kernel took


async def test_small_listed_objects_are_headed_in_parallel_and_symlinks_read(fs):
    for i in range(40):
        fs.store._store(f"pre/s{i:02d}", b"tiny", {"mode": str(stat.S_IFREG | 0o600),
                                                  "mtime": "1000"})
    fs.store._store("pre/link", b"s00", {"mode": str(stat.S_IFLNK | 0o777)})
    fs.store.delay = 0.01
    fs.store.most_in_flight = 0
    entries = await listing(fs)
    # 41 HEADs of 10 ms each, not one by one (counted, not timed: a loaded box is slow)
    assert fs.store.most_in_flight >= 3  # batches at once (each a pipeline on S3)
    nodes = {name: node for name, node, _ in entries}
    assert stat.S_ISLNK(nodes["link"].mode)
    assert nodes["s01"].mode == stat.S_IFREG | 0o600 and nodes["s01"].mtime_ns == 10**12
    assert await fs.readlink(nodes["link"].inode) == b"s00"


async def test_missing_names_cost_no_request_once_known_with_negative_timeout(nursery):
    """`negative_timeout`: the trade a user may choose (copies of many small files when S3
    is far away): a name known missing answers ENOENT without a request."""
    fs = Fs(unit_filesystem(nursery, negative_timeout=5.0))
    d = await fs.mkdir(ROOT_INODE, "new", 0o755, 0, 0)
    fs.store.calls.clear()
    for i in range(20):
        with pytest.raises(FsError) as info:
            await fs.lookup(d.inode, f"f{i}")
        assert info.value.errno == errno.ENOENT
        fh, _ = await fs.create(d.inode, f"f{i}", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        await fs.write(fh, 0, b"small")
        await fs.flush(fh)
        await fs.release(fh)
    assert [c[0] for c in fs.store.calls] == ["put"] * 20  # one PutObject per file
    assert fs.store.objects["pre/new/f3"][1]["mtime"]
    with pytest.raises(FsError):  # a missing name is remembered
        await fs.lookup(ROOT_INODE, "nothing")
    fs.store.calls.clear()
    with pytest.raises(FsError):
        await fs.lookup(ROOT_INODE, "nothing")
    assert fs.store.calls == []
    await fs.mkdir(ROOT_INODE, "nothing", 0o755, 0, 0)  # ... until made here
    assert (await fs.lookup(ROOT_INODE, "nothing")).is_dir


async def test_another_clients_new_object_is_found_at_once(fs):
    """By default a lookup never answers ENOENT from memory for a name that exists in the
    bucket: S3 is strongly consistent, and a consumer told "x is there" must find it."""
    d = await fs.mkdir(ROOT_INODE, "new", 0o755, 0, 0)  # made here: known empty
    with pytest.raises(FsError):
        await fs.lookup(d.inode, "x")
    with pytest.raises(FsError):
        await fs.lookup(ROOT_INODE, "y")
    await fs.store.put("pre/new/x", b"theirs", PutOptions())
    await fs.store.put("pre/y", b"theirs too", PutOptions())
    assert (await fs.lookup(d.inode, "x")).size == 6
    assert (await fs.lookup(ROOT_INODE, "y")).size == 10


async def test_symlinks_links_devices_and_long_names(fs):
    node = await fs.symlink(ROOT_INODE, "l", b"../target dir/f", 5, 6)
    data, meta, _ = fs.store.objects["pre/l"]
    assert data == b"../target dir/f" and stat.S_ISLNK(int(meta["mode"]))
    assert await fs.readlink(node.inode) == b"../target dir/f"
    for call in (fs.link(node.inode, ROOT_INODE, "hard"),
                 fs.mknod(ROOT_INODE, "fifo", stat.S_IFIFO | 0o644, 0, 0)):
        with pytest.raises(FsError) as info:
            await call
        assert info.value.errno == errno.EOPNOTSUPP
    deep = ROOT_INODE
    for i in range(4):
        deep = (await fs.mkdir(deep, "d" * 250 + str(i), 0o755, 0, 0)).inode
    for call in (fs.create(deep, "f" * 60, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0),
                 fs.mkdir(deep, "e" * 60, 0o755, 0, 0),
                 fs.rename(ROOT_INODE, "l", deep, "g" * 60, 0)):
        with pytest.raises(FsError) as info:
            await call
        assert info.value.errno == errno.ENAMETOOLONG


async def test_times_and_root(fs):
    fs.store._store("pre/f", b"x", {"mode": "33188", "mtime": "5"})
    node = await fs.lookup(ROOT_INODE, "f")
    await fs.setattr(node.inode, SetAttr(atime_ns=7_000_000_000))
    meta = fs.store.objects["pre/f"][1]
    assert meta["atime"] == "7" and meta["mtime"] == "5" and float(meta["ctime"]) > 7
    root = await fs.setattr(ROOT_INODE, SetAttr(mtime_ns=9_000_000_000))
    assert (await fs.getattr(ROOT_INODE)).mtime_ns == 9_000_000_000 == root.mtime_ns


async def test_replaced_object_gets_a_new_inode(fs):
    fs.store._store("pre/f", b"old", {})
    node = await fs.lookup(ROOT_INODE, "f")
    fh = await fs.open(node.inode, os.O_RDONLY)
    await fs.release(fh)
    fs.store._store("pre/f", b"new and longer", {})
    node.expires = 0.0
    with pytest.raises(FsError) as info:
        await fs.open(node.inode, os.O_RDONLY)  # the kernel looks the name up again
    assert info.value.errno == errno.ESTALE
    again = await fs.lookup(ROOT_INODE, "f")
    assert again.inode != node.inode and again.size == 14


async def test_metadata_of_listed_entries_is_fetched_once_per_node(fs):
    """A node listed twice in what needs a HEAD (a backlog may hold it twice) is HEADed
    once, and nothing is left claimed (a crash of the mount before)."""
    for i in range(40):
        await fs.store.put(f"pre/big{i:02d}", b"x" * 5000, PutOptions({"mode": "33152"}))
    names = [name for name, _, _ in await listing(fs)]
    assert len(names) == 40
    nodes = [fs.inner.table.by_path(name) for name in names]
    for node in nodes:  # the listing HEADed them: stale now
        node.expires = 0.0
    fs.store.calls.clear()
    await fs.inner.namespace.fetcher.head_nodes(nodes + nodes[:10])
    assert len([c for c in fs.store.calls if c[0] == "head"]) == 40
    assert all(n.fetching is None and n.has_metadata and n.mode == 0o100600 for n in nodes)


STORED = {"mode": str(stat.S_IFREG | 0o600), "uid": "7", "gid": "8", "mtime": "1577836800"}


@pytest.mark.parametrize("size", [0, 100, 5 * 1024, MiB])
async def test_listed_entries_carry_their_stored_attributes(fs, size):
    """readdirplus makes each entry an inode with the attributes handed over, and the
    kernel keeps a regular file's mtime from then on: a listing's (LastModified, the
    mount's mode and owner) must never be what it gets for an object with x-amz-meta-*."""
    fs.store._store("pre/f", b"x" * size, STORED)
    fs.store._store("pre/d/inner", b"", {})
    [(name, node, _), (_, d, _)] = sorted(await listing(fs), key=lambda e: e[1].is_dir)
    assert (name, node.mode, node.uid, node.gid, node.mtime_ns, node.size) == \
        ("f", stat.S_IFREG | 0o600, 7, 8, 1577836800 * 10**9, size)
    # a listed directory (no marker here) is what getattr says; a listed file's metadata is
    # known: getattr within the attribute timeout needs no request
    fs.store.calls.clear()
    assert (await fs.getattr(node.inode)).mtime_ns == 1577836800 * 10**9
    assert fs.store.calls == []
    assert d.is_dir and (await fs.getattr(d.inode)).has_metadata


async def test_metadata_after_a_listing_makes_the_kernel_drop_the_inode(nursery):
    """A HEAD that fails during readdir leaves an entry with the listing's attributes;
    getattr HEADs it (fresh or not), and the kernel is told to drop the inode, which it
    would otherwise keep with the listing's mtime."""
    notes = []
    inner = unit_filesystem(nursery)
    inner.namespace._notify = lambda *args: notes.append(args)
    fs = Fs(inner)
    fs.store._store("pre/f", b"x" * 5000, STORED)
    head_many = fs.store.head_many

    async def refused(keys):
        return [FsError("refused", errno.EACCES) for _ in keys]

    fs.store.head_many = refused
    [(_, node, _)] = await listing(fs)
    assert not node.has_metadata and node.lookups == 1
    fs.store.head_many = head_many
    assert (await fs.getattr(node.inode)).mtime_ns == 1577836800 * 10**9
    assert node.mode == stat.S_IFREG | 0o600 and node.uid == 7
    assert notes == [("entry", ROOT_INODE, "f", 0)]
    notes.clear()
    await listing(fs)  # the same attributes again: nothing to drop
    assert notes == []


async def test_readdir_hands_out_no_node_that_a_forget_dropped_meanwhile(fs):
    """The kernel forgets an entry while a readdir that lists it again waits for HEADs:
    the entry it gets must be one the table knows (else a later stat of it fails with
    "inode N is not known")."""
    fs.store._store("pre/a", b"x" * 100, STORED)
    fs.store._store("pre/f", b"x" * 100, STORED)
    [(_, fresh, _), (_, node, _)] = await listing(fs)
    node.expires = 0.0  # stale: the next listing HEADs it (and `fresh` waits for that)
    fs.store.delay = 0.05
    got = []

    async def list_again():
        got.extend(await listing(fs))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(list_again)
        await trio.sleep(0.075)  # the LIST took 0.05 s; the HEAD is out
        assert node.fetching is not None
        for forgotten in (fresh, node):
            fs.inner.forget(forgotten.inode, forgotten.lookups)
            assert fs.inner.table.get(forgotten.inode) is None
    fs.store.delay = 0.0
    assert [name for name, _, _ in got] == ["a", "f"]
    for _, handed, _ in got:
        assert fs.inner.table.get(handed.inode) is handed and handed.lookups == 1
        assert (await fs.getattr(handed.inode)).mtime_ns == 1577836800 * 10**9


async def test_entries_removed_meanwhile_are_not_listed(fs):
    fs.store._store("pre/a", b"x" * 5000, STORED)
    fs.store._store("pre/b", b"x" * 5000, STORED)
    fh = await fs.opendir(ROOT_INODE)
    taken = []
    fs.store.delay = 0.02

    async def unlink_b_while_heads_are_out():
        await trio.sleep(0.01)
        del fs.store.objects["pre/b"]  # another client deletes it after the listing

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unlink_b_while_heads_are_out)
        await fs.readdir(fh, 0, lambda name, node, off: not taken.append(name))
    fs.releasedir(fh)
    assert taken == ["a"]


async def test_lookup_hands_out_no_node_that_a_forget_dropped_meanwhile(fs):
    """A listed directory's lookup HEADs its marker; the kernel forgets the directory while
    that HEAD is out: the inode the lookup answers is one the table knows."""
    fs.store._store("pre/d/inner", b"", {})
    [(_, d, _)] = await listing(fs)
    assert d.is_dir
    d.has_metadata = False  # as when its marker's HEAD failed during the listing
    fs.store.delay = 0.05
    found = []

    async def look_up():
        found.append(await fs.lookup(ROOT_INODE, "d"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look_up)
        await trio.sleep(0.02)  # the marker's HEAD is out
        fs.inner.forget(d.inode, d.lookups)
        assert fs.inner.table.get(d.inode) is None
    fs.store.delay = 0.0
    [node] = found
    assert fs.inner.table.get(node.inode) is node and node.lookups == 1
    assert (await fs.getattr(node.inode)).is_dir


async def test_renamed_directory_keeps_its_attributes(fs):
    """The markers a directory rename writes anew carry the directory's mode, owner and
    times (they were written empty: the directory showed the mount's defaults)."""
    d = await fs.mkdir(ROOT_INODE, "d", 0o700, 7, 8)
    await fs.mkdir(d.inode, "inner", 0o750, 7, 8)
    await fs.rename(ROOT_INODE, "d", ROOT_INODE, "e", 0)
    for key, mode in (("pre/e/", 0o700), ("pre/e/inner/", 0o750)):
        meta = fs.store.objects[key][1]
        assert meta["mode"] == str(stat.S_IFDIR | mode) and meta["uid"] == "7", key
    e = await fs.lookup(ROOT_INODE, "e")
    e.expires = 0.0
    assert stat.S_IMODE((await fs.getattr(e.inode)).mode) == 0o700


async def test_a_lookups_missing_answer_serves_the_mkdir_or_rename_right_after(nursery):
    """The kernel sends MKDIR (or RENAME onto a name) right after its LOOKUP found the name
    missing in S3: that answer, a few ms old, is taken once instead of asking again. A
    second use, one after `entry_timeout`, or one after a lookup that found the name asks
    S3 (and sees another client's object)."""
    fs = Fs(unit_filesystem(nursery, entry_timeout=0.5))

    async def missing(name: str) -> None:
        with pytest.raises(FsError) as info:
            await fs.lookup(ROOT_INODE, name)
        assert info.value.errno == errno.ENOENT

    await missing("d")
    fs.store.calls.clear()
    await fs.mkdir(ROOT_INODE, "d", 0o755, 0, 0)
    # (the first marker's HEAD tells whether the server keeps a marker's metadata)
    assert [c[:2] for c in fs.store.calls if c[0] in ("head", "list")] == [("head", "pre/d/")]

    fh, _ = await fs.create(ROOT_INODE, ".t.XyZ", 0o600, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"new")
    await fs.flush(fh)
    await fs.release(fh)
    await missing("t")
    fs.store.calls.clear()
    await fs.rename(ROOT_INODE, ".t.XyZ", ROOT_INODE, "t", 0)
    assert [c[:2] for c in fs.store.calls if c[0] in ("head", "list")] == []

    # another client's object made after the answer: seen by a mkdir once the answer is
    # older than entry_timeout, or when the answer was used already
    await missing("e")
    await fs.store.put("pre/e", b"theirs", PutOptions())
    await trio.sleep(0.6)
    with pytest.raises(FsError) as info:
        await fs.mkdir(ROOT_INODE, "e", 0o755, 0, 0)
    assert info.value.errno == errno.EEXIST
    await missing("f")
    known = fs.inner.namespace.known
    assert known.take_asked_missing("f") and not known.take_asked_missing("f")
    await missing("g")
    await fs.store.put("pre/g", b"theirs", PutOptions())
    assert (await fs.lookup(ROOT_INODE, "g")).size == 6  # found: the old answer goes
    assert not known.take_asked_missing("g")


@pytest.mark.parametrize("queued", [False, True])
async def test_a_closed_file_keeps_the_attributes_it_was_stored_with(nursery, queued):
    """rsync sets its temporary file's times and mode right after closing it: the object's
    ETag, size and metadata are what this mount just stored, so no HEAD is needed (with
    `queued_uploads`, once the queued PutObject stored it). A failed store leaves the node
    to be asked again."""
    fs = Fs(unit_filesystem(nursery, queued_uploads=queued))
    fh, node = await fs.create(ROOT_INODE, ".f.AbC", 0o600, os.O_WRONLY | os.O_CREAT, 5, 6)
    await fs.write(fh, 0, b"x" * 100)
    await fs.flush(fh)
    await fs.release(fh)
    while fs.writer(node.inode) is not None or fs.closing(node.inode):
        await trio.sleep(0.01)
    fs.store.calls.clear()
    await fs.setattr(node.inode, SetAttr(mtime_ns=10**18, atime_ns=10**18))
    await fs.setattr(node.inode, SetAttr(mode=0o644))
    assert [c for c in fs.store.calls if c[0] == "head"] == []
    assert (node.size, node.uid, node.gid, stat.S_IMODE(node.mode), node.mtime_ns) == \
        (100, 5, 6, 0o644, 10**18)

    fs.store.refuse("put")
    fh, node = await fs.create(ROOT_INODE, "g", 0o600, os.O_WRONLY | os.O_CREAT, 5, 6)
    await fs.write(fh, 0, b"x" * 100)
    try:
        await fs.flush(fh)  # (queued: the failure is reported by a later fsync or close)
    except FsError:
        assert not queued
    await fs.release(fh)
    while fs.writer(node.inode) is not None or fs.closing(node.inode):
        await trio.sleep(0.01)
    assert not node.fresh
