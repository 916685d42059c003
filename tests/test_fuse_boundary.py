"""The FUSE adapter's one boundary (fuse_adapter._converted): every failure becomes an errno
for the kernel, and only what is truly unexpected is logged as such."""

from __future__ import annotations

import collections
import errno
import logging

import pyfuse3
import pytest

from s3fs_stream.errors import FsError
from s3fs_stream.fuse_adapter import _converted


class Operations:
    in_flight = 0
    last_request = 0.0

    def __init__(self, failure: BaseException):
        self.failure = failure
        self.kernel_requests: collections.Counter[str] = collections.Counter()

    @_converted
    async def fsync(self):
        raise self.failure


async def answer(failure: BaseException) -> int:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await Operations(failure).fsync()
    return raised.value.errno


async def test_our_errors_from_parallel_work_are_their_errno(caplog):
    """A nursery (parallel uploads, copies, HEADs) wraps what fails in an exception group:
    its first FsError is the answer, and no 'unexpected error' line is logged."""
    group = ExceptionGroup("parallel", [FsError("", errno.EACCES), FsError("", errno.EIO)])
    assert await answer(group) == errno.EACCES
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [FsError("x", errno.ENOSPC)])])
    assert await answer(nested) == errno.ENOSPC
    assert "unexpected error" not in caplog.text


async def test_anything_else_is_eio_and_logged(caplog):
    caplog.set_level(logging.ERROR)
    assert await answer(ValueError("bug")) == errno.EIO
    assert await answer(ExceptionGroup("g", [FsError("", errno.EACCES), KeyError("bug")])) \
        == errno.EIO
    assert caplog.text.count("unexpected error in fsync") == 2

