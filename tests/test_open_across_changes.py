"""A file open for reading while its name changes under it (issue 19): replaced by a rename
over it (the editor and rsync pattern) or by another client."""

from __future__ import annotations

import errno
import os

import pytest

MiB = 1024 * 1024

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.mark.parametrize("how", ["rename", "other client", "deleted by another client"])
def test_a_replaced_file_is_estale_to_its_reader_with_one_log_line(mount, how):
    old = os.urandom(3 * MiB)
    (mount.path / "f").write_bytes(old)
    with open(mount.path / "f", "rb", buffering=0) as reader:
        assert reader.read(4096) == old[:4096]
        if how == "rename":
            (mount.path / "new").write_bytes(b"n" * MiB)
            os.rename(mount.path / "new", mount.path / "f")
        elif how == "other client":
            mount.client.put_object(Bucket=mount.bucket, Key="f", Body=b"n" * (3 * MiB))
        else:  # read() answered ENOENT ("No such file or directory") before
            mount.client.delete_object(Bucket=mount.bucket, Key="f")
        for _ in range(4):  # never the new object's bytes, never mixed
            reader.seek(2 * MiB)
            with pytest.raises(OSError) as raised:
                reader.read(MiB)
            assert raised.value.errno == errno.ESTALE
    if how == "deleted by another client":  # a new open finds no file
        with pytest.raises(FileNotFoundError):
            (mount.path / "f").read_bytes()
    else:  # a new open reads the new object
        assert (mount.path / "f").read_bytes()[:1] == b"n"
    log = mount.log()
    assert sum("deleted while open here" in line for line in log.splitlines()) == 1, \
        log[-3000:]
    assert sum(" WARNING " in line for line in log.splitlines()) == 1, log[-3000:]
