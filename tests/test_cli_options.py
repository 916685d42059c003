"""Option parsing of mount.s3stream and the s3stream commands (no mount, no server)."""

import errno
import importlib.metadata
import logging
import os
import socket
import subprocess
import uuid

import pytest
from conftest import VENV_BIN

from s3fs_stream.botocore_store import payload_signing
from s3fs_stream.cli import (
    KernelGaveUpFilter,
    build_config,
    check_before_mount,
    install_helper,
    main,
    mount_main,
    mount_parser,
    notify_systemd,
)
from s3fs_stream.errors import QuietError
from s3fs_stream.options import OPTIONS, parse_size

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
                           "rw,defaults,_netdev,nofail,noauto,user,x-systemd.automount,"
                           "user=alice,comment=systemd.automount,x-systemd.requires=a.service,"
                           "nosymfollow,nosuid,nodev"])
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


VERSION = importlib.metadata.version("s3fs-stream")


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    """mount.s3stream ARGV fails with exit code 2 and one stderr line holding `words`
    (argparse's own errors exit through SystemExit)."""
    try:
        code = mount_main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("command", [[], ["mount"], ["recover"], ["local-server"],
                                     ["install-helper"]])
def test_version_on_every_command(command, capsys):
    run = (lambda argv: main(command + argv)) if command else main
    with pytest.raises(SystemExit) as info:
        run(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.split() == [*(["s3stream"] + command), VERSION]


def test_mount_helper_version_and_help_from_the_installed_script():
    result = subprocess.run([str(VENV_BIN / "mount.s3stream"), "--version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.split() == ["mount.s3stream", VERSION]
    result = subprocess.run([str(VENV_BIN / "mount.s3stream"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--endpoint-url URL" in result.stdout and "LONG_" not in result.stdout


def test_help_describes_every_option_with_a_real_metavar():
    text = mount_parser("mount.s3stream").format_help()
    assert "LONG_" not in text
    for name, option in OPTIONS.items():
        assert option.help and option.metavar, name
        assert option.metavar == option.metavar.strip() and "_" not in option.metavar.strip(
            "KEY_ID"), name
        assert f"--{name.replace('_', '-')} " in text, name
    for metavar in ("URL", "SIZE", "MODE", "N ", "SECONDS", "PATH", "LEVEL"):
        assert metavar in text, metavar
    # the examples: AWS, an S3-compatible endpoint, an fstab line
    assert "region=eu-west-1" in text
    assert "endpoint_url=http" in text and "force_path_style" in text
    assert "  s3stream  _netdev" in text
    assert "install-helper" in text


@pytest.mark.parametrize("option, words", [
    ("uid=abc", ["option uid", "user name or a numeric id"]),
    ("gid=no-such-group-here", ["option gid", "group"]),
    ("uid=", ["option uid", "needs a value"]),
    ("uid", ["option uid", "needs a value"]),
    ("log_level=loud", ["option log_level", "debug, info, warning, error"]),
    ("part_size=6G,max_memory=20G", ["option part_size", "between 5M and 5G"]),
    ("part_size=1M", ["option part_size", "between 5M and 5G"]),
    ("part_size=lots", ["option part_size", "not a size"]),
    ("part_size=32M,max_memory=48M", ["option max_memory", "twice part_size"]),
    ("file_mode=999", ["option file_mode", "octal mode"]),
    ("dir_mode=rwx", ["option dir_mode", "octal mode"]),
    ("max_connections=0", ["option max_connections", "whole number"]),
    ("retries=1.5", ["option retries", "whole number"]),
    ("upload_concurrency=many", ["option upload_concurrency", "whole number"]),
    ("attr_timeout=-1", ["option attr_timeout", "seconds"]),
    ("entry_timeout=nan", ["option entry_timeout", "seconds"]),
    ("read_ahead_max=100K", ["option read_ahead_max", "at least 1M"]),
    ("endpoint_url=localhost:9000", ["option endpoint_url", "http://"]),
    ("region=eu west", ["option region", "region name"]),
    ("ro=maybe", ["option ro", "yes/no"]),
    ("checksum=sha1", ["option checksum", "crc32, md5, off"]),
    ("acl=everyone", ["option acl", "public-read"]),
    ("sse=rot13", ["option sse", "AES256"]),
    ("sse_kms_key_id=k", ["option sse_kms_key_id", "sse=aws:kms"]),
    ("content_type=video", ["option content_type", "MIME type"]),
])
def test_bad_value_is_one_line_naming_the_option_exit_2(option, words, capsys):
    one_line_error(capsys, ["b", "/mnt", "-o", option], *words)


def test_bad_long_option_value_is_the_same_one_line(capsys):
    one_line_error(capsys, ["b", "/mnt", "--uid", "abc"], "option uid")
    one_line_error(capsys, ["b", "/mnt", "--uid"], "--uid", "see mount.s3stream --help")
    one_line_error(capsys, ["b/key", "/mnt"], "BUCKET:PREFIX")
    one_line_error(capsys, ["b"], "MOUNTPOINT")


def test_good_values_are_normalised():
    config = build_config(["b", "/mnt", "-o", "uid=root,gid=root,file_mode=0640,dir_mode=750,"
                           "log_level=DEBUG,sse=aes256,acl=Private,part_size=5G,"
                           "max_memory=10G,attr_timeout=0,"
                           "endpoint_url=https://s3.example.com:9000,content_type=Video/MP4,"
                           "log_file=rel.log"])
    assert (config.fs.uid, config.fs.gid) == (0, 0)
    assert (config.fs.file_mode, config.fs.dir_mode) == (0o640, 0o750)
    assert config.log_level == "debug" and config.store.sse == "AES256"
    assert config.store.acl == "private" and config.fs.part_size == 5 * 1024**3
    assert config.fs.content_type == "Video/MP4"
    assert config.log_file == os.path.abspath("rel.log")
    assert build_config(["b", "/mnt", "--part-size", "5M", "--ro"]).fs.read_only


@pytest.mark.parametrize("foreground", [True, False])
def test_unwritable_log_file_is_refused_before_daemonizing(foreground, tmp_path):
    """In the real script: one line and exit code 2, not a dead background process."""
    for log_file in (tmp_path / "missing-dir" / "mount.log", tmp_path):
        args = [str(VENV_BIN / "mount.s3stream"), "b", str(tmp_path), "-o",
                f"log_file={log_file}"] + (["--foreground"] if foreground else [])
        result = subprocess.run(args, capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "option log_file" in result.stderr and str(log_file) in result.stderr
        assert "died" not in result.stderr and "Traceback" not in result.stderr


def test_unknown_profile_is_refused_before_mounting(capsys, tmp_path, monkeypatch):
    config = tmp_path / "config"
    config.write_text("[profile known]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    one_line_error(capsys, ["b", str(tmp_path / "nowhere"), "-o", "profile=unknown"],
                   "option profile", "'unknown'")
    check_before_mount(build_config(["b", "/mnt", "-o", "profile=known"]))  # passes


def test_install_helper_symlinks_the_script(tmp_path, capsys):
    link, target, changed = install_helper(str(tmp_path))
    assert changed and link == str(tmp_path / "mount.s3stream")
    assert os.readlink(link) == target == os.path.realpath(VENV_BIN / "mount.s3stream")
    assert install_helper(str(tmp_path))[2] is False  # idempotent
    os.unlink(link)
    (tmp_path / "mount.s3stream").write_text("#!/bin/sh\n")
    with pytest.raises(QuietError) as info:
        install_helper(str(tmp_path))
    assert "--force" in str(info.value)
    assert install_helper(str(tmp_path), force=True)[2]
    assert os.path.realpath(link) == target
    assert main(["install-helper", "--dir", str(tmp_path / "missing")]) == 1
    assert "cannot create" in capsys.readouterr().err


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_systemd_sends_ready_to_the_notify_socket(abstract, tmp_path, monkeypatch):
    name = f"@s3stream-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        notify_systemd()
        assert sock.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    notify_systemd()  # nobody to tell: nothing happens


def test_kernel_gave_up_replies_are_not_errors(caplog):
    """pyfuse3's 'fuse_reply_* failed with ENOENT' (the kernel dropped the request, e.g. a
    RELEASE at unmount) becomes a debug line; other pyfuse3 errors stay errors."""
    fuse_log = logging.getLogger("pyfuse3.test-filter")
    fuse_log.addFilter(KernelGaveUpFilter())
    with caplog.at_level(logging.INFO):
        fuse_log.error("fuse_release(): fuse_reply_* failed with %s", os.strerror(errno.ENOENT))
        fuse_log.error("fuse_read(): fuse_reply_* failed with %s", os.strerror(errno.EINVAL))
    assert [(r.levelname, r.getMessage()[:12]) for r in caplog.records] == [
        ("ERROR", "fuse_read():")]
