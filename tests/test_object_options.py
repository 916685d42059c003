"""The mount's object options (acl, storage_class, sse, sse_kms_key_id, content_type) on every
object it writes: a small one (PutObject), a multipart one, one changed in place (composed
with UploadPartCopy), one whose attributes changed after close (a copy onto itself), and
renamed ones (CopyObject). Checked on moto, which stores and returns all of them."""

from __future__ import annotations

import os

import pytest

MiB = 1024 * 1024
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"

CASES = {
    # without the writeback cache, a rename is one CopyObject (no ctime SETATTR after it)
    "aes256": (["acl=public-read", "storage_class=STANDARD_IA", "sse=AES256",
                "writeback_cache=no"],
               {"ServerSideEncryption": "AES256", "StorageClass": "STANDARD_IA"}),
    "kms": (["storage_class=REDUCED_REDUNDANCY", "sse=aws:kms", f"sse_kms_key_id={KMS_KEY}",
             "content_type=application/x-recording"],
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": KMS_KEY,
             "StorageClass": "REDUCED_REDUNDANCY"}),
}


def _check(mount, key: str, expected: dict, content_type: str, public: bool) -> None:
    head = mount.head(key)
    got = {name: head.get(name) for name in expected}
    assert got == expected, key
    assert head["ContentType"] == content_type, key
    if not public:
        return  # moto answers GetObjectAcl of a multipart object created without an ACL with 500
    grants = mount.client.get_object_acl(Bucket=mount.bucket, Key=key)["Grants"]
    assert [g for g in grants if g["Grantee"].get("URI") == ALL_USERS], (key, grants)


@pytest.mark.parametrize("case", list(CASES))
def test_object_options_on_every_kind_of_write(moto_server, mount_factory, case):
    options, expected = CASES[case]
    public = "acl=public-read" in options
    fixed = next((o.split("=", 1)[1] for o in options if o.startswith("content_type=")), None)

    def kind(name: str) -> str:
        return fixed or {"wav": "audio/x-wav", "txt": "text/plain"}.get(
            name.rsplit(".", 1)[-1], "application/octet-stream")

    mount = mount_factory(moto_server, *options)
    small, big = os.urandom(4096), os.urandom(10 * MiB)
    (mount.path / "small.txt").write_bytes(small)
    (mount.path / "big.wav").write_bytes(big)
    for name in ("small.txt", "big.wav"):
        _check(mount, name, expected, kind(name), public)
    # in place: the header patched and a tail appended (UploadPartCopy of the rest)
    with open(mount.path / "big.wav", "r+b") as f:
        f.write(b"RIFF")
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    assert mount.get("big.wav") == b"RIFF" + big[4:] + b"tail"
    _check(mount, "big.wav", expected, kind("big.wav"), public)
    os.chmod(mount.path / "small.txt", 0o600)  # a copy onto itself with new metadata
    _check(mount, "small.txt", expected, kind("small.txt"), public)
    # renames: the options stay; an automatic content type follows the new name (rsync
    # writes a temporary name first)
    os.rename(mount.path / "small.txt", mount.path / "renamed.wav")
    os.rename(mount.path / "big.wav", mount.path / "renamed-big.bin")
    assert mount.get("renamed.wav") == small
    _check(mount, "renamed.wav", expected, kind("renamed.wav"), public)
    _check(mount, "renamed-big.bin", expected, kind("renamed-big.bin"), public)
    assert int(mount.head("renamed.wav")["Metadata"]["mode"]) & 0o777 == 0o600


def test_every_copy_sends_the_mount_options(monkeypatch):
    """moto keeps a copied object's storage class and ACL; S3 does not (CopyObject applies
    the bucket's defaults unless told): so the requests themselves are checked."""
    import trio
    from botocore.stub import Stubber

    from s3fs_stream.botocore_store import BotocoreStore
    from s3fs_stream.config import StoreConfig
    from s3fs_stream.object_store import PutOptions

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = BotocoreStore(StoreConfig(
        bucket="b", endpoint_url="http://127.0.0.1:9", storage_class="STANDARD_IA",
        sse="aws:kms", sse_kms_key_id=KMS_KEY, acl="public-read"))
    mount_options = {"StorageClass": "STANDARD_IA", "ServerSideEncryption": "aws:kms",
                     "SSEKMSKeyId": KMS_KEY, "ACL": "public-read"}
    source = {"Bucket": "b", "Key": "old"}
    with Stubber(store._client) as stub:
        stub.add_response("copy_object", {"CopyObjectResult": {"ETag": '"1"'}},
                          {"Bucket": "b", "Key": "new", "CopySource": source,
                           **mount_options})
        stub.add_response("copy_object", {"CopyObjectResult": {"ETag": '"2"'}},
                          {"Bucket": "b", "Key": "new.wav", "CopySource": source,
                           "MetadataDirective": "REPLACE", "Metadata": {"mode": "33188"},
                           "ContentType": "audio/x-wav", **mount_options})
        assert trio.run(store.copy, "old", "new", None, 10) == '"1"'
        assert trio.run(store.copy, "old", "new.wav",
                        PutOptions({"mode": "33188"}, "audio/x-wav"), 10) == '"2"'
        stub.assert_no_pending_responses()
