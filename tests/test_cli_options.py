"""Option parsing of mount.s3stream (no mount, no server)."""

import pytest

from s3fs_stream.botocore_store import payload_signing
from s3fs_stream.cli import build_config, parse_size
from s3fs_stream.errors import QuietError

MiB = 1024 * 1024


def test_sizes():
    assert parse_size("8M") == 8 * MiB
    assert parse_size("64MiB") == 64 * MiB
    assert parse_size("1g") == 1024 * MiB
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_o_options_and_long_options_are_equivalent():
    a = build_config(["b:pre/fix", "/mnt", "-o", "endpoint_url=http://x,force_path_style,"
                      "part_size=16M,max_memory=128M,uid=5,file_mode=600,ro"])
    b = build_config(["b:pre/fix", "/mnt", "--endpoint-url", "http://x", "--force-path-style",
                      "--part-size", "16M", "--max-memory", "128M", "--uid", "5",
                      "--file-mode", "600", "--ro"])
    assert a == b
    assert a.store.prefix == "pre/fix/" and a.store.force_path_style
    assert a.fs.part_size == 16 * MiB and a.fs.file_mode == 0o600 and a.fs.read_only


def test_mount8_generic_options_are_accepted():
    config = build_config(["b", "/mnt", "-f", "-n", "-v", "-o",
                           "rw,defaults,_netdev,nofail,noauto,user,x-systemd.automount"])
    assert config.fake and config.verbose


def test_unknown_option_is_exit_2_with_the_valid_list():
    with pytest.raises(QuietError) as info:
        build_config(["b", "/mnt", "-o", "bogus=1"])
    assert info.value.exitcode == 2
    assert "bogus" in str(info.value) and "endpoint_url" in str(info.value)
    assert build_config(["b", "/mnt", "-s", "-o", "bogus=1"]).store.bucket == "b"


def test_budget_must_hold_two_parts():
    with pytest.raises(QuietError):
        build_config(["b", "/mnt", "-o", "part_size=32M,max_memory=48M"])
    with pytest.raises(QuietError):
        build_config(["b", "/mnt", "-o", "part_size=1M"])


def test_sign_payload_follows_the_checksum_unless_set():
    def signing(options: str) -> bool:
        return payload_signing(build_config(["b", "/mnt", "-o", options]).store)

    assert signing("checksum=crc32") is False  # the server verifies each body's CRC32
    assert signing("checksum=md5") is False
    assert signing("checksum=off") is True  # nothing else would protect the body
    assert signing("checksum=crc32,sign_payload=on") is True
    assert signing("checksum=off,sign_payload=off") is False
    with pytest.raises(QuietError) as info:
        build_config(["b", "/mnt", "-o", "sign_payload=maybe"])
    assert info.value.exitcode == 2
