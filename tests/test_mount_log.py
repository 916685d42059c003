"""What a mount writes to its log: nothing alarming for normal events, and at debug level one
line per S3 request without any credential."""

from __future__ import annotations

import errno
import os
import subprocess

from conftest import VENV_BIN, bucket_with

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
        # a request that fails: the object is replaced under the open file (If-Match: 412)
        mount.client.put_object(Bucket=mount.bucket, Key="large.bin", Body=b"replaced")
        f.seek(1024)
        try:
            f.read(4096)
        except OSError as exc:
            assert exc.errno == errno.ESTALE
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
    assert reads and all(line.endswith(" ms") for line in reads)
    assert " -> 206 in " in reads[0] and " -> 412 in " in reads[-1]  # the failed request
    assert any(" UploadPart " in line and "PartNumber=2 -> 200" in line for line in requests)
    assert_no_secrets(log, seaweed.secret_key)


SECRET_FRAGMENTS = ("Signature=", "Authorization", "Credential=", "X-Amz-Security-Token",
                    "x-amz-security-token", "X-Amz-Signature", "X-Amz-Credential",
                    "AWSAccessKeyId=", "SignedHeaders=")


def assert_no_secrets(log: str, *secrets: str) -> None:
    for secret in (*secrets, *SECRET_FRAGMENTS):
        assert secret.lower() not in log.lower(), secret


def test_failed_mounts_log_no_secret_at_debug(seaweed, tmp_path):
    """Requests that fail (a bucket that does not exist, a wrong secret with a session
    token) leave no credential, signature or token in a debug log."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    wrong = seaweed.env()
    wrong.update(AWS_SECRET_ACCESS_KEY="wrong-secret-4a1f", AWS_SESSION_TOKEN="token-77b2c9")
    for bucket, env in ((f"missing-{os.getpid()}", seaweed.env()),
                        (bucket_with(seaweed, {}), wrong)):
        log_file = tmp_path / f"{bucket}.log"
        result = subprocess.run(
            [str(VENV_BIN / "mount.s3stream"), bucket, str(mountpoint), "--foreground", "-o",
             f"endpoint_url={seaweed.endpoint_url},force_path_style,log_level=debug,"
             f"log_file={log_file},retries=1"],
            env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 32, result.stderr
        log = log_file.read_text() + result.stderr
        assert " S3 HeadBucket " in log, log
        assert_no_secrets(log, seaweed.secret_key, "wrong-secret-4a1f", "token-77b2c9")


def test_info_log_has_no_request_lines(seaweed, mount_factory):
    mount = mount_factory(seaweed, "log_level=info")
    (mount.path / "a").write_bytes(b"x")
    assert (mount.path / "a").read_bytes() == b"x"
    assert mount.unmount() == 0
    assert " S3 " not in mount.log() and "mounted" in mount.log()
