"""Races between requests that interleave at an await (issue 12), each driven directly over
the in-memory store with one call made slow so the other lands inside it."""

from __future__ import annotations

import os
import subprocess

import trio

from s3fs_stream.inode_table import ROOT_INODE
from s3fs_stream.object_meta import SetAttr
from tests.test_filesystem_unit import Fs, MiB, fs, unit_filesystem  # noqa: F401  (the fixture)

PART = 5 * MiB  # the fixture's part size


def slow(store, name: str, seconds: float, answer_late: bool = False):
    """Make `store.name` wait `seconds` before it acts, or (`answer_late`) act at once and
    answer `seconds` later."""
    original = getattr(store, name)

    async def wrapper(*args, **kwargs):
        if not answer_late:
            await trio.sleep(seconds)
        result = await original(*args, **kwargs)
        if answer_late:
            await trio.sleep(seconds)
        return result

    setattr(store, name, wrapper)


async def test_open_during_the_last_release_starts_from_what_it_stores(fs):  # noqa: F811
    """`for …; do cmd >> f; done`: an OPEN that arrives while the previous close's RELEASE
    still completes (writes came after its flush) continues the object the release stores,
    not the one before it."""
    fh, node = await fs.create(ROOT_INODE, "log", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"one\n")
    await fs.flush(fh)
    await fs.write(fh, 4, b"two\n")  # after the flush: the release completes it
    slow(fs.store, "put", 0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.release, fh)
        await trio.sleep(0.1)  # the release is storing "one\ntwo\n"
        again = await fs.open(node.inode, os.O_WRONLY)
        size = (await fs.getattr(node.inode)).size
        await fs.write(again, size, b"three\n")
        await fs.flush(again)
        await fs.release(again)
    assert fs.store.objects["pre/log"][0] == b"one\ntwo\nthree\n"


async def test_concurrent_opens_of_an_empty_object_share_one_writer(fs):  # noqa: F811
    """Opening a 0-byte object for writing without O_TRUNC, twice at once: the check for a
    writer and the insert of a new one have no await between them."""
    fs.store._store("pre/empty", b"", {})
    node = await fs.lookup(ROOT_INODE, "empty")
    fs.store.delay = 0.05  # every HEAD of the opens' close-to-open refresh waits
    handles = []

    async def open_one():
        handles.append(await fs.open(node.inode, os.O_WRONLY))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(open_one)
    fs.store.delay = 0.0
    writers = {id(fs.inner.files._handles[fh].writer) for fh in handles}
    assert len(writers) == 1 and fs.files.writer(node.inode).handles == 4
    for n, fh in enumerate(handles):
        await fs.write(fh, n, b"abcd"[n:n + 1])
    for fh in handles:
        await fs.flush(fh)
        await fs.release(fh)
    assert fs.store.objects["pre/empty"][0] == b"abcd"


async def test_rename_while_writing_continues_at_the_new_key(fs):  # noqa: F811
    """Renaming a file open for writing: the continuation pins the new key's ETag (no 412
    at the next UploadPartCopy), and a write during the copy lands on the new key."""
    fh, node = await fs.create(ROOT_INODE, "rec", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    first = os.urandom(2 * PART + 100)
    await fs.write(fh, 0, first)
    slow(fs.store, "copy", 0.3)
    second = os.urandom(PART)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.rename, ROOT_INODE, "rec", ROOT_INODE, "moved", 0)
        await trio.sleep(0.05)  # the rename is completing or copying
        await fs.write(fh, len(first), second)
    await fs.write(fh, 0, b"HEAD")  # a header patch: part 1 is copied or loaded from the base
    await fs.flush(fh)
    await fs.release(fh)
    assert "pre/rec" not in fs.store.objects and not fs.store.uploads
    assert fs.store.objects["pre/moved"][0] == b"HEAD" + first[4:] + second
    started = [call[1] for call in fs.store.calls if call[0] in ("create_upload", "put")]
    assert started.count("pre/rec") == 1, started  # nothing started on the old key after


async def test_create_on_a_name_with_a_live_writer_counts_the_lookup(fs):  # noqa: F811
    fh, node = await fs.create(ROOT_INODE, "f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"x")
    assert node.lookups == 1
    fh2, again = await fs.create(ROOT_INODE, "f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    assert again is node and node.lookups == 2
    for handle in (fh, fh2):
        await fs.flush(handle)
        await fs.release(handle)
    fs.inner.forget(node.inode, 2)
    assert fs.inner.table.get(node.inode) is None


async def test_setattr_racing_unlink_sends_no_placeholder_key(fs):  # noqa: F811
    """`echo b > f; rm f`: the kernel's mtime SETATTR HEADs the object while the unlink
    runs; it must not then copy `\\0unlinked/N` onto itself."""
    fs.store._store("pre/f", b"b\n", {"mode": "33188", "uid": "0", "gid": "0", "mtime": "1"})
    node = await fs.lookup(ROOT_INODE, "f")
    node.has_metadata = False  # listed, not HEADed: the setattr HEADs first
    slow(fs.store, "head", 0.2, answer_late=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.setattr, node.inode, SetAttr(mtime_ns=5_000_000_000))
        await trio.sleep(0.05)
        await fs.unlink(ROOT_INODE, "f")
    keys = [str(arg) for call in fs.store.calls for arg in call[1:3]]
    assert not any("\0" in key or "unlinked" in key for key in keys), fs.store.calls
    assert "pre/f" not in fs.store.objects


def test_echo_then_rm_sends_no_placeholder_key(seaweed, mount_factory):
    """Through a real mount: `echo b > f; rm f` in quick succession (the kernel's SETATTR of
    the times races the unlink) never sends a key holding NUL or the placeholder name; the
    debug log lists every S3 request."""
    m = mount_factory(seaweed, "attr_timeout=0")  # every SETATTR HEADs first: a wider window
    script = ("for i in $(seq 40); do echo b > f; rm f; echo c > g$i; touch g$i & rm g$i; "
              "wait; done")
    result = subprocess.run(["sh", "-c", script], cwd=m.path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    m.unmount()
    requests = [line for line in m.log().splitlines() if " S3 " in line]
    assert len(requests) > 100, len(requests)
    # (the mount's own area for removed files, `.s3stream/unlinked/`, is no placeholder)
    bad = [line for line in requests
           if "\0" in line or "unlinked" in line.replace(".s3stream/unlinked/", "")]
    assert not bad, bad[:5]
    # `touch g & rm g`: when the rm wins, touch creates g anew, as on a local disk
    assert all(key.startswith("g") for key in m.keys()), m.keys()


async def test_a_completion_during_the_unlinks_delete_is_deleted_again(fs):  # noqa: F811
    """The unlink deletes first and detaches the writer after: a close whose completion
    lands after the delete acted (while its answer is on the way) stores the object again;
    the unlink detaches the writer once that completion is done and deletes it again."""
    fh, node = await fs.create(ROOT_INODE, "f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"data")
    slow(fs.store, "delete", 0.3, answer_late=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.unlink, ROOT_INODE, "f")
        await trio.sleep(0.05)  # the delete acted; its answer is 0.25 s away
        await fs.flush(fh)  # stores "pre/f" again
        assert "pre/f" in fs.store.objects
    assert "pre/f" not in fs.store.objects
    await fs.write(fh, 4, b"more")  # detached: dropped
    await fs.flush(fh)
    await fs.release(fh)
    assert "pre/f" not in fs.store.objects and not fs.store.uploads
    assert [call[0] for call in fs.store.calls].count("delete") == 2


async def test_a_completion_during_a_rename_over_the_file_is_replaced_again(fs):  # noqa: F811
    """`mv other f` over a file open for writing: its writer is detached after the copy; a
    completion of it that lands after the copy (while the copy's answer is on the way) is
    copied over again, so f ends with other's bytes."""
    fs.store._store("pre/other", b"other", {})
    fh, node = await fs.create(ROOT_INODE, "f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, b"mine")
    await fs.lookup(ROOT_INODE, "other")
    slow(fs.store, "copy", 0.3, answer_late=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.rename, ROOT_INODE, "other", ROOT_INODE, "f", 0)
        await trio.sleep(0.05)  # the copy acted; its answer is 0.25 s away
        await fs.flush(fh)  # stores "mine" over it
        assert fs.store.objects["pre/f"][0] == b"mine"
    assert fs.store.objects["pre/f"][0] == b"other" and "pre/other" not in fs.store.objects
    await fs.write(fh, 4, b"more")  # detached: dropped
    await fs.flush(fh)
    await fs.release(fh)
    assert fs.store.objects["pre/f"][0] == b"other" and not fs.store.uploads


async def test_data_sent_through_a_flushed_handle_is_completed_by_its_owners_close(fs):  # noqa: F811
    """Writeback cache: the kernel writes every program's dirty pages through one writing
    handle of the file (the one opened last, until its release), also after that handle's
    own close sent FLUSH. Another program's close then writes nothing through its own handle,
    yet its data arrived meanwhile: its flush must complete it (concurrent `dd conv=notrunc`:
    the last close found the object without one program's range)."""
    fs.store._store("pre/dd", bytes(8192), {})
    node = await fs.lookup(ROOT_INODE, "dd")
    mine = await fs.open(node.inode, os.O_WRONLY)
    other = await fs.open(node.inode, os.O_WRONLY)  # opened last: the kernel writes through it
    await fs.write(other, 0, b"other's")
    await fs.flush(other)  # the other program's close
    await fs.write(other, 4096, b"mine")  # my pages, sent before other's RELEASE
    await fs.flush(mine)  # my close: nothing left to send through my own handle
    stored = fs.store.objects["pre/dd"][0]
    assert stored[:7] == b"other's" and stored[4096:4100] == b"mine"
    await fs.release(other)
    await fs.release(mine)


async def test_without_writeback_cache_a_handle_that_wrote_nothing_completes_nothing(
        nursery):
    """Without the writeback cache every write comes through its own handle: the close of
    a writing handle that wrote nothing leaves another program's stream uncompleted."""
    direct = Fs(unit_filesystem(nursery, writeback_cache=False))
    direct.store._store("pre/rec", bytes(8192), {})
    node = await direct.lookup(ROOT_INODE, "rec")
    recorder = await direct.open(node.inode, os.O_WRONLY)
    idle = await direct.open(node.inode, os.O_WRONLY)
    await direct.write(recorder, 0, b"new")
    await direct.flush(idle)
    assert direct.store.objects["pre/rec"][0] == bytes(8192)
    await direct.flush(recorder)
    assert direct.store.objects["pre/rec"][0][:3] == b"new"
    await direct.release(idle)
    await direct.release(recorder)
