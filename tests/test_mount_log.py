"""What a mount writes to its log: nothing alarming for normal events, and at debug level one
line per S3 request without any credential."""

from __future__ import annotations

import os
import subprocess

from conftest import bucket_with

MiB = 1024 * 1024


def alarming(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]


def test_read_then_unmount_at_once_logs_no_error_or_warning(seaweed, mount_factory):
    """Closing a file right before the unmount leaves its RELEASE racing the unmount; the
    kernel may drop it, which pyfuse3 reports as an error that is none."""
    body = os.urandom(3 * MiB)
    bucket = bucket_with(seaweed, {"big.bin": body, "small": b"hi"})
    first = mount_factory(seaweed, bucket=bucket)
    assert (first.path / "big.bin").read_bytes() == body
    assert (first.path / "small").read_bytes() == b"hi"
    assert first.unmount() == 0
    # the same from one shell: read-ahead still in flight when the unmount arrives
    second = mount_factory(seaweed, bucket=bucket)
    script = f"head -c 100000 {second.path}/big.bin >/dev/null && cat {second.path}/small " \
             f">/dev/null && umount {second.path}"
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert second.unmount() == 0
    for mount in (first, second):
        assert "unmounted" in mount.log()
        assert alarming(mount.log()) == [], mount.log()[-3000:]


def test_debug_log_has_one_line_per_request_and_no_secret(seaweed, mount_factory):
    mount = mount_factory(seaweed, "part_size=5M")  # conftest mounts at log_level=debug
    small, large = os.urandom(1000), os.urandom(11 * MiB)
    (mount.path / "small.txt").write_bytes(small)
    (mount.path / "large.bin").write_bytes(large)
    with open(mount.path / "large.bin", "rb") as f:
        f.seek(6 * MiB)
        assert f.read(4096) == large[6 * MiB:6 * MiB + 4096]
    assert mount.unmount() == 0
    log = mount.log()
    requests = [line for line in log.splitlines() if "botocore_store: S3 " in line]
    assert any(f" PutObject s3://{mount.bucket}/small.txt -> 200 in " in line
               for line in requests)
    for operation in ("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload",
                      "HeadBucket", "ListObjectsV2"):
        assert any(f" {operation} " in line for line in requests), operation
    reads = [line for line in requests
             if f" GetObject s3://{mount.bucket}/large.bin Range=bytes=" in line]
    assert reads and all(" -> 206 in " in line and line.endswith(" ms") for line in reads)
    assert any(" UploadPart " in line and "PartNumber=2 -> 200" in line for line in requests)
    for secret in (seaweed.secret_key, "Signature=", "Authorization", "Credential=",
                   "X-Amz-Security-Token", "x-amz-security-token"):
        assert secret not in log, secret


def test_info_log_has_no_request_lines(seaweed, mount_factory):
    mount = mount_factory(seaweed, "log_level=info")
    (mount.path / "a").write_bytes(b"x")
    assert (mount.path / "a").read_bytes() == b"x"
    assert mount.unmount() == 0
    assert " S3 " not in mount.log() and "mounted" in mount.log()
