"""Objects written by other tools, through a real mount (issue 17 items 6 and 7).

Rewrites keep what the object carries besides the mount's own x-amz-meta-* keys: an object
put with botocore with content headers, its own content type, another tool's metadata, tags,
a storage class and encryption is chmod'ed, touched, appended to, changed in place, renamed
and truncated through the mount, and after each a HEAD and GetObjectTagging with botocore
show every one of them kept. Only what the server itself stores is asserted (each server's
`stored` below says what a put keeps there): SeaweedFS has no KMS (a put with
x-amz-server-side-encryption: aws:kms fails) and drops x-amz-website-redirect-location;
moto keeps both, and like S3 drops storage class and encryption on every copy and upload
that does not send them.

Metadata no file system value fits (`uid: -1`, 2**32, "abc", an mtime beyond 2262 or not a
number) is shown as the mount's defaults: `ls -l` works, one WARNING line says so.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import subprocess
import time

import pytest
from conftest import bucket_with, new_bucket, wait_until

KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
BODY = bytes(range(256)) * 8  # 2 KiB: small on moto
TAGS = [{"Key": "project", "Value": "alpha"}, {"Key": "team", "Value": "data eng"}]
# on every server: content headers, a type the extension would not give, metadata, tags
COMMON = {
    "ContentType": "application/x-foreign",
    "ContentEncoding": "gzip",
    "CacheControl": "max-age=60",
    "ContentDisposition": 'attachment; filename="report.bin"',
    "ContentLanguage": "de",
}
EXPIRES = "Wed, 21 Oct 2037 07:28:00 GMT"
# what each server keeps beyond COMMON of a PutObject (checked below before any rewrite)
STORED = {
    "seaweedfs": {"StorageClass": "STANDARD_IA", "ServerSideEncryption": "AES256"},
    "moto": {"StorageClass": "STANDARD_IA", "ServerSideEncryption": "aws:kms",
             "SSEKMSKeyId": KMS_KEY, "BucketKeyEnabled": True,
             "WebsiteRedirectLocation": "/elsewhere"},
}


def put_foreign(server, bucket: str, key: str) -> None:
    server.client().put_object(
        Bucket=bucket, Key=key, Body=BODY, Metadata={"foo": "bar", "other-tool": "v2"},
        Expires=EXPIRES, Tagging="project=alpha&team=data%20eng", **COMMON,
        **STORED[server.name])


def kept(m, key: str) -> dict:
    """What the object carries now, in the terms put_foreign set them."""
    head = m.head(key)
    got = {name: head.get(name) for name in [*COMMON, *STORED[m.server.name]]}
    got["Expires"] = head["ResponseMetadata"]["HTTPHeaders"].get("expires")
    got["foreign metadata"] = {k: v for k, v in head["Metadata"].items()
                               if k in ("foo", "other-tool")}
    got["tags"] = sorted(m.client.get_object_tagging(Bucket=m.bucket, Key=key)["TagSet"],
                         key=lambda t: t["Key"])
    return got


def expected(server) -> dict:
    return {**COMMON, **STORED[server.name], "Expires": EXPIRES,
            "foreign metadata": {"foo": "bar", "other-tool": "v2"}, "tags": TAGS}


def requests(m, operation: str) -> int:
    return len(re.findall(rf"S3 {operation} s3://", m.log()))


def _chmod(m, path):
    os.chmod(path, 0o640)
    # a chmod of a closed file is stored within a second (deferred metadata)
    assert wait_until(lambda: m.head("f.txt")["Metadata"].get("mode") == str(
        stat.S_IFREG | 0o640), 5)
    return "f.txt"


def _touch(m, path):
    subprocess.run(["touch", "-d", "2001-02-03 04:05:06 UTC", str(path)], check=True,
                   timeout=30)
    assert m.head("f.txt")["Metadata"]["mtime"] == "981173106"
    return "f.txt"


def _append(m, path):
    with open(path, "ab") as f:
        f.write(b"appended")
    assert m.get("f.txt") == BODY + b"appended"
    return "f.txt"


def _in_place(m, path):
    subprocess.run(["dd", "of=" + str(path), "bs=1", "seek=100", "conv=notrunc",
                    "status=none"], input=b"XYZ", check=True, timeout=30)
    assert m.get("f.txt") == BODY[:100] + b"XYZ" + BODY[103:]
    return "f.txt"


def _rename(m, path):
    # a type that is not the guess for the old name was chosen: it stays on a new extension
    os.rename(path, path.with_name("renamed.wav"))
    assert m.get("renamed.wav") == BODY and "f.txt" not in m.keys()
    return "renamed.wav"


def _truncate(m, path):
    os.truncate(path, 100)
    assert m.get("f.txt") == BODY[:100]
    return "f.txt"


OPERATIONS = {"chmod": _chmod, "touch -d": _touch, "append": _append,
              "dd conv=notrunc": _in_place, "rename": _rename, "truncate": _truncate}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_rewrite_keeps_what_other_tools_stored(any_server, mount_factory, operation):
    bucket = new_bucket(any_server)
    put_foreign(any_server, bucket, "f.txt")
    # the mount's own options are for new objects: an existing one keeps its own
    m = mount_factory(any_server, "storage_class=REDUCED_REDUNDANCY", "sse=AES256",
                      bucket=bucket)
    assert kept(m, "f.txt") == expected(any_server)  # what the server stores of a put
    key = OPERATIONS[operation](m, m.path / "f.txt")
    assert kept(m, key) == expected(any_server), operation
    # a new upload keeps no tags by itself: read once (only where the HEAD counts some);
    # a copy keeps them
    writes = operation in ("append", "dd conv=notrunc", "truncate")
    assert requests(m, "GetObjectTagging") == (1 if writes else 0)


@pytest.mark.timeout(120)
def test_a_directory_rename_keeps_them(any_server, mount_factory):
    bucket = new_bucket(any_server)
    put_foreign(any_server, bucket, "dir/f.txt")
    m = mount_factory(any_server, "storage_class=REDUCED_REDUNDANCY", "sse=AES256",
                      bucket=bucket)
    os.rename(m.path / "dir", m.path / "moved")
    assert m.keys() == ["moved/f.txt"]
    assert kept(m, "moved/f.txt") == expected(any_server)


@pytest.mark.timeout(120)
def test_new_objects_and_untagged_rewrites(any_server, mount_factory):
    """New objects get the mount's options; rewriting an untagged object costs no
    GetObjectTagging (its HEAD counts no tags)."""
    bucket = bucket_with(any_server, {"plain.bin": BODY})
    m = mount_factory(any_server, "storage_class=STANDARD_IA", bucket=bucket)
    (m.path / "new.txt").write_bytes(b"new")
    assert m.head("new.txt")["StorageClass"] == "STANDARD_IA"
    assert m.head("new.txt")["ContentType"] == "text/plain"
    with open(m.path / "plain.bin", "ab") as f:
        f.write(b"more")
    assert m.get("plain.bin") == BODY + b"more"
    assert m.head("plain.bin").get("StorageClass", "STANDARD") == "STANDARD"  # its own
    assert requests(m, "GetObjectTagging") == 0


ODD = {
    "uid-minus-one": {"uid": "-1", "gid": "4294967296"},
    "not-numbers": {"uid": "abc", "gid": "1e3", "mode": "rw-r--r--", "mtime": "abc"},
    "huge-mtime": {"mtime": "99999999999999999999", "atime": "nan", "ctime": "inf"},
    "negative-mode": {"mode": "-1", "mtime": "-1e9"},
    "fine": {"uid": "1234", "gid": "5678", "mode": str(stat.S_IFREG | 0o600),
             "mtime": "-86400.5"},  # before 1970 is a time like any other
}


@pytest.mark.timeout(120)
def test_odd_metadata_of_other_tools_is_shown_as_defaults(any_server, mount_factory):
    bucket = new_bucket(any_server)
    client = any_server.client()
    for name, meta in ODD.items():
        client.put_object(Bucket=bucket, Key=f"d/{name}", Body=b"x", Metadata=meta)
        client.put_object(Bucket=bucket, Key=f"d/sub-{name}/", Body=b"", Metadata=meta)
    m = mount_factory(any_server, bucket=bucket)
    for _ in range(2):  # a second listing logs nothing more
        listing = subprocess.run(["ls", "-l", str(m.path / "d")], capture_output=True,
                                 text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert len(listing.stdout.splitlines()) == 1 + 2 * len(ODD), listing.stdout
    now = time.time()
    for name in ODD:
        if name == "fine":
            continue
        st = os.stat(m.path / "d" / name)
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), name
        assert stat.S_IMODE(st.st_mode) == 0o644 and stat.S_ISREG(st.st_mode), name
        assert abs(st.st_mtime - now) < 600, name  # LastModified
        assert abs(st.st_atime - now) < 600 and abs(st.st_ctime - now) < 600, name
        assert os.stat(m.path / "d" / f"sub-{name}").st_uid == os.getuid()
    st = os.stat(m.path / "d" / "fine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o600)
    assert st.st_mtime_ns == -86_400_500_000_000
    lines = [line for line in m.log().splitlines() if "written by another tool?" in line]
    assert len(lines) == 1, lines
    assert " WARNING " in lines[0]


def test_parse_mtime_takes_seconds_only_within_64_bit_nanoseconds():
    from s3fs_stream.object_meta import parse_mtime

    assert parse_mtime("1700000000") == 1_700_000_000_000_000_000
    assert parse_mtime(" 12.5 ") == 12_500_000_000
    assert parse_mtime("-1.5") == -1_500_000_000
    assert parse_mtime("9223372036") == 9_223_372_036_000_000_000
    for odd in ("9223372037", "99999999999999999999", "nan", "inf", "abc", "1e9", "", "1.-5",
                "--1", "1.5x"):
        assert parse_mtime(odd) is None, odd


def test_renamed_type():
    from s3fs_stream.object_meta import renamed_type

    assert renamed_type("a.txt", "a.wav", "text/plain", "auto") == "audio/x-wav"
    assert renamed_type("a.tmp", "a.wav", "binary/octet-stream", "auto") == "audio/x-wav"
    assert renamed_type("a.txt", "a.wav", "application/x-foreign", "auto") == \
        "application/x-foreign"
    assert renamed_type("a.txt", "a.wav", "video/mp4", "video/mp4") == "video/mp4"


def test_a_rewrite_sends_the_objects_own_headers(monkeypatch):
    """What goes over the wire (S3 itself, unlike the test servers, is not at hand): a copy
    with new metadata sends the object's content headers, class and encryption instead of
    the mount's, and no tags (they stay); a plain copy sends its class and encryption; an
    upload sends its tags."""
    import datetime

    import trio
    from botocore.stub import Stubber

    from s3fs_stream.botocore_store import BotocoreStore
    from s3fs_stream.config import StoreConfig
    from s3fs_stream.object_store import PutOptions

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = BotocoreStore(StoreConfig(bucket="b", endpoint_url="http://127.0.0.1:9",
                                      storage_class="STANDARD_IA", sse="AES256",
                                      acl="private", direct_requests=False))
    own = {"content-encoding": "gzip", "cache-control": "no-cache", "expires": EXPIRES,
           "x-amz-storage-class": "GLACIER_IR", "x-amz-server-side-encryption": "aws:kms",
           "x-amz-server-side-encryption-aws-kms-key-id": KMS_KEY,
           "x-amz-server-side-encryption-bucket-key-enabled": "true"}
    storage = {"StorageClass": "GLACIER_IR", "ServerSideEncryption": "aws:kms",
               "SSEKMSKeyId": KMS_KEY, "BucketKeyEnabled": True, "ACL": "private"}
    source = {"Bucket": "b", "Key": "k"}
    with Stubber(store._client) as stub:
        stub.add_response("copy_object", {"CopyObjectResult": {"ETag": '"1"'}},
                          {"Bucket": "b", "Key": "k", "CopySource": source,
                           "MetadataDirective": "REPLACE",
                           "Metadata": {"foo": "bar", "mode": "33188"},
                           "ContentType": "application/x-foreign", "ContentEncoding": "gzip",
                           "CacheControl": "no-cache",
                           "Expires": datetime.datetime(2037, 10, 21, 7, 28,
                                                        tzinfo=datetime.UTC),
                           **storage})
        stub.add_response("copy_object", {"CopyObjectResult": {"ETag": '"2"'}},
                          {"Bucket": "b", "Key": "new", "CopySource": source, **storage})
        stub.add_response("create_multipart_upload", {"UploadId": "u"},
                          {"Bucket": "b", "Key": "k", "Metadata": {"mode": "33188"},
                           "Tagging": "a=1", "ACL": "private"})
        options = PutOptions({"foo": "bar", "mode": "33188"}, "application/x-foreign", own,
                             tags="a=1")
        assert trio.run(store.copy, "k", "k", options, 10) == '"1"'
        assert trio.run(functools.partial(store.copy, "k", "new", None, 10,
                                          headers=own)) == '"2"'
        assert trio.run(store.create_upload, "k",
                        PutOptions({"mode": "33188"}, None, {}, "a=1")) == "u"
        stub.assert_no_pending_responses()
