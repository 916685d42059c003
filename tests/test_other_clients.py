"""Objects another client writes while the mount runs (issue 19): S3 is strongly consistent,
and pipelines rely on it (an uploader tells a consumer "x is there")."""

from __future__ import annotations

import errno

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_another_clients_new_object_opens_at_once(seaweed, mount_factory):
    m = mount_factory(seaweed)
    (m.path / "dir").mkdir()
    assert not (m.path / "dir" / "x").exists()  # looked up here: missing
    assert not (m.path / "top").exists()
    m.client.put_object(Bucket=m.bucket, Key="dir/x", Body=b"from elsewhere")
    m.client.put_object(Bucket=m.bucket, Key="top", Body=b"also")
    # at once: no entry timeout, no negative cache of the mount's own in between
    assert (m.path / "dir" / "x").read_bytes() == b"from elsewhere"
    assert (m.path / "top").read_bytes() == b"also"
    # a directory made by another client inside one made here
    m.client.put_object(Bucket=m.bucket, Key="dir/sub/y", Body=b"y")
    assert (m.path / "dir" / "sub" / "y").read_bytes() == b"y"


def test_negative_timeout_is_the_trade_a_user_may_choose(seaweed, mount_factory):
    """With -o negative_timeout=S a name found missing stays missing for S seconds (one
    request saved per new file when S3 is far away)."""
    m = mount_factory(seaweed, "negative_timeout=30")
    (m.path / "dir").mkdir()
    assert not (m.path / "dir" / "x").exists()
    m.client.put_object(Bucket=m.bucket, Key="dir/x", Body=b"from elsewhere")
    with pytest.raises(OSError) as raised:
        (m.path / "dir" / "x").read_bytes()
    assert raised.value.errno == errno.ENOENT
