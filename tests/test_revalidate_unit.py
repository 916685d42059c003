"""`AttributeFetcher.revalidate`: a LIST page from a stale file's name on makes it and the
names after it fresh when the listing shows the objects a HEAD told (ETag, size,
LastModified); a page that confirms nothing (the directory rewritten) stops further pages
there for a while, so a walk of it HEADs instead of paying a LIST and a HEAD per name."""

from __future__ import annotations

import errno

import pytest

from s3fs_stream.errors import FsError, Unreachable
from s3fs_stream.object_store import PutOptions
from tests.test_filesystem_unit import unit_filesystem

NAMES = ("a1", "b1", "c1")


async def stored_nodes(fs, modified: float) -> list:
    nodes = []
    for name in NAMES:
        key = f"pre/d/{name}"
        etag = await fs.store.put(key, b"x", PutOptions())
        fs.store.modified[key] = modified
        nodes.append(fs.table.upsert(f"d/{name}", False, mode=0o100600, uid=1, gid=2,
                                     mtime_ns=5, size=1, etag=etag, has_metadata=True,
                                     head_modified=int(modified), expires=0.0))
    return nodes


def lists(fs) -> int:
    return sum(call[0] == "list_page" for call in fs.store.calls)


async def test_one_page_revalidates_a_stale_file_and_the_names_after_it(nursery):
    fs = unit_filesystem(nursery)
    a, b, c = await stored_nodes(fs, 1_700_000_000.0)
    await fs.namespace.fetcher.revalidate(b)
    assert lists(fs) == 1
    assert b.fresh and c.fresh and not a.fresh  # the page starts at b
    assert (b.mode, b.uid, b.gid, b.mtime_ns) == (0o100600, 1, 2, 5)


async def test_a_page_that_confirms_nothing_stops_pages_there_for_a_while(nursery):
    fs = unit_filesystem(nursery)
    a, b, c = await stored_nodes(fs, 1_700_000_000.0)
    for name in NAMES:  # another client rewrote every object since the HEADs
        fs.store.modified[f"pre/d/{name}"] = 1_700_000_100.0
    await fs.namespace.fetcher.revalidate(a)
    assert lists(fs) == 1 and not (a.fresh or b.fresh or c.fresh)
    await fs.namespace.fetcher.revalidate(b)
    await fs.namespace.fetcher.revalidate(c)
    assert lists(fs) == 1  # their HEADs answer


async def test_an_unreachable_endpoint_fails_the_stat_once_not_list_then_head(nursery):
    """S3 unreachable for the LIST's whole retry budget: the stat fails with that error; a
    HEAD after it would wait a second budget (a read of an open file during an outage got
    EIO only after 120 s, the kernel's GETATTR before its READ)."""
    fs = unit_filesystem(nursery)
    _, b, _ = await stored_nodes(fs, 1_700_000_000.0)
    fs.store.calls.clear()

    def down(call):
        raise Unreachable(f"{call[0]}: endpoint unreachable after retries (the test)")
    fs.store.on_call = down
    with pytest.raises(FsError) as info:
        await fs.namespace.getattr(b.inode)
    assert info.value.errno == errno.EIO
    assert [call[0] for call in fs.store.calls] == ["list_page"]
