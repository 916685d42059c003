"""Sizes past the largest object the mount can write are refused at once (EFBIG), before
anything changes: a `truncate -s 999999999999999` must not stream zeros into the bucket
until the part schedule runs out (it did: 12.8 GiB in 60 s, uninterruptible)."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from conftest import bucket_with

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HUGE = 999_999_999_999_999  # ~909 TiB: past any schedule's 10,000 parts


def test_huge_truncate_and_write_are_efbig_at_once(seaweed, mount_factory):
    bucket = bucket_with(seaweed, {"old": b"hello"})
    m = mount_factory(seaweed, bucket=bucket)
    start = time.monotonic()
    done = subprocess.run(["truncate", "-s", str(HUGE), m.path / "old"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0 and "too large" in done.stderr.lower(), done.stderr
    # a write there: EFBIG, or (the writeback cache takes the write into the page cache
    # and sends it at close) an error at close, which the kernel reports as EIO
    with pytest.raises(OSError) as raised:
        fd = os.open(m.path / "new", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"start")
            os.pwrite(fd, b"x", HUGE)
        finally:
            os.close(fd)
    assert raised.value.errno in (errno.EFBIG, errno.EIO)
    with pytest.raises(OSError) as raised:
        fd = os.open(m.path / "new", os.O_WRONLY)
        try:
            os.ftruncate(fd, HUGE)
        finally:
            os.close(fd)
    assert raised.value.errno == errno.EFBIG
    assert time.monotonic() - start < 20
    # nothing grew: the old object as it was; the new one holds what was written (the
    # kernel, believing the file huge, writes back the whole first page), no upload left
    assert m.get("old") == b"hello"
    new = m.get("new")
    assert new.startswith(b"start") and len(new) <= 4096 and not new.strip(b"\0")[5:]
    assert (m.path / "old").stat().st_size == 5
    assert m.uploads() == []
