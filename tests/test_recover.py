"""`s3stream recover`: the mount's option syntax, the age guard, and completion with the
last upload of every part number (SeaweedFS lists each upload of a re-uploaded part)."""

from __future__ import annotations

import logging
import subprocess
import time

import pytest
from conftest import VENV_BIN, new_bucket

from s3fs_stream.object_store import PendingUpload, UploadedPart
from s3fs_stream.options import parse_age, show_age
from s3fs_stream.recover import last_uploads, warn_of_old_uploads
from tests.memory_store import MemoryStore

MiB = 1024 * 1024


def recover(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "s3stream"), "recover", *args], env=server.env(),
                          capture_output=True, text=True, timeout=60)


def test_ages():
    assert [parse_age(t) for t in ("0", "90", "30m", "2h", "1d", "1.5h")] == \
        [0, 90, 1800, 7200, 86400, 5400]
    with pytest.raises(ValueError):
        parse_age("soon")
    assert [show_age(s) for s in (0, 42, 190, 7500, 93600)] == ["0s", "42s", "3m10s", "2h5m",
                                                                "1d2h"]


def test_the_last_upload_of_each_part_number_is_chosen():
    old, new = UploadedPart(2, '"old"', 1000, 100.0), UploadedPart(2, '"new"', 5 * MiB, 101.0)
    assert last_uploads([new, old])[2] is new and last_uploads([old, new])[2] is new
    short = UploadedPart(2, '"short"', 1000, 200.0)  # the later upload wins though shorter
    assert last_uploads([short, new, old])[2] is short
    # SeaweedFS gives LastModified in whole seconds: within one, the larger (a provisional
    # tail grows into a full part)
    tie = [UploadedPart(2, '"full"', 5 * MiB, 300.0), UploadedPart(2, '"tail"', 10, 300.0)]
    assert last_uploads(tie)[2].etag == '"full"' and last_uploads(tie[::-1])[2].etag == '"full"'


async def test_mount_warns_once_of_old_uploads_under_its_prefix(caplog):
    store = MemoryStore()
    store.uploads["u1"] = ("rec/a.wav", {}, None)
    store.uploads["u2"] = ("other/b.wav", {}, None)
    caplog.set_level(logging.DEBUG)
    await warn_of_old_uploads(store, "rec/")  # MemoryStore's uploads started in 1970
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 incomplete upload" in warnings[0], warnings
    assert "'rec/a.wav'" in warnings[0] and "s3stream recover unit:rec" in warnings[0]
    caplog.clear()

    async def young(prefix="", max_uploads=None):
        return [PendingUpload("rec/a.wav", "u1", time.time() - 60)]

    store.list_uploads = young
    await warn_of_old_uploads(store, "rec/")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("sizes", [(1000, 5 * MiB), (5 * MiB, 1000)],
                         ids=["short-then-full", "full-then-short"])
def test_complete_uses_the_last_upload_of_a_part(any_server, sizes):
    """SeaweedFS lists both uploads of part 2 in a random order: four uploads make a
    recovery that trusts the order fail with a probability of 15/16."""
    server = any_server
    bucket = new_bucket(server)
    client = server.client()
    keys = [f"rec/take{i}.wav" for i in range(4)]
    part1 = b"1" * (5 * MiB)
    bodies = [b"a" * sizes[0], b"b" * sizes[1]]
    uploads = {}
    for key in keys:
        uploads[key] = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        client.upload_part(Bucket=bucket, Key=key, UploadId=uploads[key], PartNumber=1,
                           Body=part1)
    for index, body in enumerate(bodies):
        if index:
            time.sleep(1.1)  # SeaweedFS's LastModified has whole seconds
        for key in keys:
            client.upload_part(Bucket=bucket, Key=key, UploadId=uploads[key], PartNumber=2,
                               Body=body)
    options = ["-o", f"endpoint_url={server.endpoint_url},force_path_style"]
    size = 5 * MiB + sizes[1]

    listed = recover(server, f"{bucket}:rec", *options, "--list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 4, lines
    for key in keys:
        line = next(line for line in lines if line.startswith(key))
        assert line.startswith(f"{key}  upload {uploads[key]}  2 parts, {size} bytes, "
                               "last written "), line
        assert f"recoverable: 2 parts, {size} bytes" in line

    # fresh uploads may be a live mount's: left alone unless --older-than says otherwise
    young = recover(server, f"{bucket}:rec", *options, "--complete")
    assert young.returncode == 0 and young.stdout.count("left alone") == 4, young.stdout
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)

    done = recover(server, bucket, "--endpoint-url", server.endpoint_url, "--force-path-style",
                   "--complete", "--older-than", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("completed") == 4, done.stdout
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert len(body) == size and body == part1 + bodies[1], key
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_abort_respects_the_age_and_the_key(seaweed):
    bucket = new_bucket(seaweed)
    client = seaweed.client()
    ids = {key: client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
           for key in ("keep.bin", "drop.bin")}
    options = ["-o", f"endpoint_url={seaweed.endpoint_url}", "-o", "force_path_style=yes"]
    result = recover(seaweed, bucket, *options, "--abort", "--key", "drop.bin")
    assert result.returncode == 0 and "left alone" in result.stdout, result.stdout
    assert len(client.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 2
    result = recover(seaweed, bucket, *options, "--abort", "--key", "drop.bin",
                     "--older-than", "0s")
    assert result.returncode == 0 and "aborted" in result.stdout, result.stdout
    left = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in left] == [("keep.bin", ids["keep.bin"])]


def test_bad_option_is_one_line_exit_2(seaweed):
    result = recover(seaweed, "b", "-o", "endpoint_url=ftp://x")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "endpoint_url" in result.stderr
