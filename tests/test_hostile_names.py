"""Names the mount refuses or skips: kernel names that are not UTF-8, keys that cannot be
file names, and directory markers that hold bytes (real mounts)."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import bucket_with

BAD_UTF8 = b"\xff\xfe.txt"


def test_names_that_are_not_utf8_get_eilseq_and_one_log_line(mount):
    (mount.path / "good.txt").write_bytes(b"x")
    bad = os.fsencode(mount.path) + b"/" + BAD_UTF8
    good = os.fsencode(mount.path / "good.txt")
    attempts = {"create": lambda: os.open(bad, os.O_CREAT | os.O_WRONLY, 0o644),
                "mkdir": lambda: os.mkdir(bad), "stat": lambda: os.stat(bad),
                "rename": lambda: os.rename(good, bad), "unlink": lambda: os.unlink(bad),
                "rmdir": lambda: os.rmdir(bad)}
    for name, attempt in attempts.items():
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EILSEQ, (name, info.value)
    assert sorted(os.listdir(mount.path)) == ["good.txt"]
    assert mount.unmount() == 0
    log = mount.log()
    assert "Traceback" not in log and "UnicodeEncodeError" not in log
    assert sum(" WARNING " in line and "not UTF-8" in line for line in log.splitlines()) == 1


HOSTILE_KEYS = ["a//b", "../x", "up/../../y", "./z", ".", "dots/./w", "L" * 1000,
                "ctl\x01name", "nl\nname", "esc\x1b[31mred", "/lead", "d", "d/inner", "m/", "m",
                "long/" + "s" * 300 + "/f", "NOT-UTF8"]


def put_what_the_server_takes(server, bucket: str) -> list[str]:
    """Put each hostile key with botocore; the keys the server stored. A key that is not
    UTF-8 cannot be a str for botocore: its bytes go into the signed URL directly."""
    client = server.client()

    def raw_bytes(request, **_):
        request.url = request.url.replace("NOT-UTF8", "bad%FF%FE")

    client.meta.events.register("before-sign.s3.PutObject", raw_bytes)
    for key in HOSTILE_KEYS:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"h")
        except Exception:  # servers refuse some of these keys, which is fine
            pass
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_hostile_keys_are_skipped_without_escaping_or_crashing(any_server, mount_factory):
    bucket = bucket_with(any_server, {"ok.txt": b"fine"})
    stored = put_what_the_server_takes(any_server, bucket)
    assert "ctl\x01name" in stored and len(stored) > 5, stored
    mount = mount_factory(any_server, bucket=bucket)
    root = os.path.realpath(mount.path)
    seen = []
    for directory, dirs, files in os.walk(mount.path):
        assert os.path.realpath(directory).startswith(root), directory
        for name in dirs + files:
            assert name not in (".", "..") and "/" not in name and "\0" not in name
            assert len(os.fsencode(name)) <= 255
            path = os.path.join(directory, name)
            assert os.path.realpath(path).startswith(root + os.sep), path
            seen.append(os.path.relpath(path, mount.path))
    assert "ok.txt" in seen and (mount.path / "ok.txt").read_bytes() == b"fine"
    # control characters are bytes like any other in a name (Linux and S3 allow them)
    for name in ("ctl\x01name", "nl\nname", "esc\x1b[31mred"):
        if name in stored:
            assert name in seen and (mount.path / name).read_bytes() == b"h"
    assert os.path.isdir(mount.path / "d") and "d/inner" in seen  # the directory wins
    assert mount.process.poll() is None
    assert mount.unmount() == 0
    log = mount.log()
    assert "Traceback" not in log
    assert "skipping key" in log and "hidden by the directory" in log, log[-3000:]


def test_rmdir_never_deletes_a_marker_that_holds_bytes(moto_server, mount_factory):
    """moto keeps the bytes of a `name/` object (SeaweedFS turns it into a directory and
    drops them, so there is nothing to lose there)."""
    bucket = bucket_with(moto_server, {"name/": b"precious bytes", "top/inner/": b"more",
                                       "empty/": b""})
    mount = mount_factory(moto_server, bucket=bucket)
    assert os.listdir(mount.path / "name") == []
    with pytest.raises(OSError) as info:
        os.rmdir(mount.path / "name")
    assert info.value.errno == errno.ENOTEMPTY
    assert mount.get("name/") == b"precious bytes"
    os.rmdir(mount.path / "empty")  # an empty marker goes as before
    assert "empty/" not in mount.keys()
    # renaming the parent copies such a marker with its bytes instead of writing an empty one
    os.rename(mount.path / "top", mount.path / "top2")
    assert mount.get("top2/inner/") == b"more" and "top/inner/" not in mount.keys()
    assert mount.unmount() == 0
    assert "'name/' holds 14 bytes" in mount.log()


CONTROL_NAMES = ["Icon\r", "new\nline", "tab\there", "esc\x1b[0m", "bell\x07", "del\x7f"]


def test_names_with_control_characters_work_everywhere(seaweed, mount_factory):
    """`Icon\\r` is in every macOS home directory, `\\n` and `\\t` come from scripts: Linux
    allows every byte but `/` and NUL, S3 keys allow them too (listings come URL-encoded).
    (moto's server cannot store a key with a newline: its URL routes stop at one.) Log lines
    stay one line each: control characters in names are written as \\xNN."""
    mount = mount_factory(seaweed, "log_level=debug")
    (mount.path / "dir\n1").mkdir()
    for index, name in enumerate(CONTROL_NAMES):
        (mount.path / "dir\n1" / name).write_bytes(b"%d" % index)
    assert sorted(os.listdir(mount.path / "dir\n1")) == sorted(CONTROL_NAMES)
    os.rename(mount.path / "dir\n1" / "Icon\r", mount.path / "dir\n1" / "moved\r\n")
    os.symlink("tab\there", mount.path / "dir\n1" / "link\x01")
    assert os.readlink(mount.path / "dir\n1" / "link\x01") == "tab\there"
    assert (mount.path / "dir\n1" / "link\x01").read_bytes() == b"2"
    keys = set(mount.keys())
    assert "dir\n1/moved\r\n" in keys and "dir\n1/Icon\r" not in keys
    assert {f"dir\n1/{name}" for name in CONTROL_NAMES[1:]} <= keys
    assert mount.get("dir\n1/new\nline") == b"1"
    os.unlink(mount.path / "dir\n1" / "bell\x07")
    assert "dir\n1/bell\x07" not in mount.keys()
    # a fresh mount lists them as they are
    assert mount.unmount() == 0
    assert "new\\x0aline" in mount.log()  # the name is in the log, on one line
    assert not any(line and not line.startswith("20") for line in mount.log().splitlines())
    again = mount_factory(seaweed, bucket=mount.bucket)
    assert sorted(os.listdir(again.path / "dir\n1")) == sorted(
        ["moved\r\n", "new\nline", "tab\there", "esc\x1b[0m", "del\x7f", "link\x01"])
