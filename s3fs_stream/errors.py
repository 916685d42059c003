"""Errors that carry the errno the file system answers with.

Every failure is raised with its errno at the place that knows what went wrong; the FUSE
adapter only converts. `message` is one line for the log that says what happened and what to
do; it must never contain credentials or signed URLs.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Awaitable, Callable, Iterable

import trio


class FsError(Exception):
    """A failure with the errno the calling program should see."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self)


def error_reason(exc: FsError) -> str:
    """The failure's own line, else its errno's name: what a log line says went wrong."""
    return exc.message or os.strerror(exc.errno)


class StoreError(FsError):
    """The object store failed (after botocore's retries)."""


class NotFound(StoreError):
    errno = _errno.ENOENT


class AccessDenied(StoreError):
    errno = _errno.EACCES


class NoSuchBucket(StoreError):
    errno = _errno.ENOENT


class PreconditionFailed(StoreError):
    """The object changed since it was opened (If-Match failed)."""

    errno = _errno.ESTALE


class NoSuchUpload(StoreError):
    errno = _errno.EIO


class Unreachable(StoreError):
    """The endpoint could not be reached within the retry budget."""

    errno = _errno.EIO


def transient(exc: FsError) -> bool:
    """Whether a failure may go away by itself: the endpoint unreachable, a timeout, a 5xx
    (the store marks those `transient` and has already retried them for its budget)."""
    return isinstance(exc, Unreachable) or getattr(exc, "transient", False)


class IntegrityError(StoreError):
    """The server's checksum or length disagrees with what we sent or expected."""

    errno = _errno.EIO


class QuietError(Exception):
    """An error the user should read as one line, with the exit code to use."""

    def __init__(self, message: str, exitcode: int = 1):
        super().__init__(message)
        self.exitcode = exitcode


async def run_parallel(jobs: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Run the jobs concurrently; when some fail, raise the first FsError alone (the others
    were cancelled, or are the same outage seen twice)."""
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except* FsError as group:
        raise first_error(group) from None


def first_error(group: BaseExceptionGroup) -> FsError:
    """The first FsError of a (possibly nested) exception group from parallel requests."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if isinstance(exc, FsError):
            return exc
    return FsError(str(group))
