"""The in-memory store behaves as SeaweedFS does where the writer could go wrong: every
upload of a part number is kept, listed, and usable by completion."""

from __future__ import annotations

from s3fs_stream.object_store import PutOptions, UploadedPart
from s3fs_stream.recover import last_uploads
from tests.memory_store import MIN_PART, MemoryStore


async def test_superseded_part_uploads_are_kept_listed_and_completable():
    store = MemoryStore()
    upload = await store.create_upload("k", PutOptions({}))
    old = await store.upload_part("k", upload, 1, b"a" * MIN_PART)
    new = await store.upload_part("k", upload, 1, b"b" * MIN_PART)
    tail = await store.upload_part("k", upload, 2, b"tail")
    listed = await store.list_parts("k", upload)
    assert [(p.number, p.etag) for p in listed] == [(1, new.etag), (1, old.etag),
                                                   (2, tail.etag)]
    assert last_uploads(listed)[1].etag == new.etag  # what recover completes with
    # completing with the old ETag gives the old bytes, as SeaweedFS does
    await store.complete("k", upload, [old, tail])
    assert store.objects["k"][0] == b"a" * MIN_PART + b"tail"


async def test_an_unknown_etag_is_refused():
    store = MemoryStore()
    upload = await store.create_upload("k", PutOptions({}))
    await store.upload_part("k", upload, 1, b"x")
    try:
        await store.complete("k", upload, [UploadedPart(1, '"nope"', 1)])
    except Exception as exc:
        assert "InvalidPart" in str(exc)
    else:
        raise AssertionError("completed with an ETag never uploaded")
