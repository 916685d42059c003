"""One directory's entries, streamed from paged ListObjectsV2 with stable readdir offsets.

A `DirectoryStream` belongs to one open directory handle. Entries are numbered in the order
they come (offset N is the N-th entry of this handle's listing), so entries that appear or
vanish in S3 while `ls` pages through shift nothing. Only a window is held: the entries the
kernel has not yet consumed of the pages fetched so far (a 100,000-entry directory holds one
page of it), and the next page is fetched while the kernel consumes the current one. A seek
back before the window (rewinddir, seekdir) lists again from the start and skips.

Keys that cannot be file names are skipped and logged once per mount (`Warnings`); where both
`a` and `a/...` exist the directory wins and the object is hidden. An object `a` is held back
until the listing has passed the key `a/`, where that prefix would have come (keys such as
`a-b` or `a.txt` sort between them), so hiding needs no second listing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .object_store import ListPage, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

NAME_MAX = 255
KEY_MAX = 1024  # S3's limit on a key, in UTF-8 bytes
KNOWN = 1000  # a listing this small keeps its names (lookups of others need no request)


def invalid_name_reason(name: str) -> str | None:
    if not name:
        return "empty path segment (a '//' in the key)"
    if name in (".", ".."):
        return f"'{name}' path segment"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"name longer than {NAME_MAX} bytes"
    if "\0" in name:
        return "NUL byte in name"
    return None  # every other byte is a name, control characters included (Icon\r, \n, \t)


class Warnings:
    """Log each problem key once per mount (listings repeat; the log should not)."""

    LIMIT = 10_000  # distinct keys remembered; beyond that, repeats may be logged again

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def once(self, key: str, message: str, *args) -> None:
        if key in self._seen:
            return
        if len(self._seen) >= self.LIMIT:
            self._seen.clear()
        self._seen.add(key)
        log.warning(message, *args)


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    info: ObjectInfo | None  # the listed object, for files


class DirectoryStream:
    """Entries of the directory at `key_prefix` ("" or ending in "/"), fetched page by page.

    `extra()` is called once the last page is in: entries the store does not show yet (files
    still being written) that were not listed; `skip` names are never shown."""

    def __init__(self, store: ObjectStore, key_prefix: str, warnings: Warnings,
                 extra: Callable[[set[str]], list[Entry]] = lambda seen: [],
                 skip: frozenset[str] = frozenset()):
        self._store = store
        self._prefix = key_prefix
        self._warnings = warnings
        self._extra = extra
        self._skip = skip
        self._window: list[Entry] = []
        self._base = 0  # offset of _window[0]
        self._token: str | None = None
        self._started = False
        self._done = False
        self._held: dict[str, ObjectInfo] = {}  # objects waiting for their "name/" position
        self._next_page: trio.Event | None = None  # the page fetched ahead
        self._prefetched: ListPage | BaseException | None = None
        self.seen_writing: set[str] = set()  # names of files being written that were listed
        self.names: set[str] | None = set()  # every name, while there are few (<= KNOWN)

    def seek(self, offset: int) -> None:
        """A readdir call starts at `offset`: the entries before it are the kernel's now and
        are forgotten; an offset before the window lists again from the start."""
        if offset < self._base:
            self._restart()
        drop = min(offset - self._base, len(self._window))
        if drop > 0:
            del self._window[:drop]
            self._base += drop

    async def entry_at(self, offset: int) -> tuple[Entry, int] | None:
        """The entry at `offset` (at or after the last `seek`) and the offset after it, or
        None at the end."""
        while offset >= self._base + len(self._window):
            if self._done:
                return None
            await self._fetch()
        if offset < self._base:
            raise ValueError(f"offset {offset} is before the window at {self._base}")
        return self._window[offset - self._base], offset + 1

    def _restart(self) -> None:
        self._window, self._base, self._token = [], 0, None
        self._started = self._done = False
        self._held = {}
        self._next_page, self._prefetched = None, None
        self.seen_writing = set()
        self.names = set()

    async def _fetch(self) -> None:
        if self._next_page is not None:
            await self._next_page.wait()
            page, self._next_page, self._prefetched = self._prefetched, None, None
            if isinstance(page, BaseException):
                raise page
        else:
            page = await self._store.list_page(self._prefix, "/", self._token)
        self._started = True
        self._absorb(page)

    def prefetch_next(self, nursery: trio.Nursery) -> None:
        """Fetch the next page in the background while the kernel consumes this one."""
        if self._done or not self._started or self._next_page is not None:
            return
        done = self._next_page = trio.Event()
        token = self._token

        async def fetch() -> None:
            try:
                page: ListPage | BaseException = await self._store.list_page(
                    self._prefix, "/", token)
            except Exception as exc:  # delivered to the reader that waits for this page
                page = exc
            # a seek back (_restart) meanwhile made this page someone else's past
            if self._next_page is done:
                self._prefetched = page
            done.set()

        nursery.start_soon(fetch)

    def _absorb(self, page: ListPage) -> None:
        items: list[tuple[str, ObjectInfo | None]] = [(o.key, o) for o in page.objects]
        items += [(p, None) for p in page.prefixes]
        items.sort(key=lambda item: item[0])
        cut = len(self._prefix)
        for raw, info in items:
            self._release_before(raw)
            if info is not None:
                name = raw[cut:]
                if not name or name in self._skip:
                    continue  # the directory's own marker object
                reason = invalid_name_reason(name)
                if reason is not None:
                    self._warnings.once(raw, "skipping key %r: %s", raw, reason)
                    continue
                self._held[name] = info
            else:
                name = raw[cut:-1]
                if name in self._skip:
                    continue
                reason = invalid_name_reason(name)
                if reason is not None:
                    self._warnings.once(raw, "skipping key prefix %r: %s", raw, reason)
                    continue
                if self._held.pop(name, None) is not None:
                    self._warnings.once(self._prefix + name, "object %r is hidden by the "
                                        "directory of the same name", self._prefix + name)
                self._add(Entry(name, True, None))
        self._token = page.next_token
        if self._token is None:
            self._done = True
            self._release_before(None)
            # files being written that were listed: those handed out and those still here
            listed = self.seen_writing | {e.name for e in self._window if not e.is_dir}
            for entry in self._extra(listed):
                self._add(entry)
        elif items:
            self._release_before(items[-1][0])

    def _release_before(self, raw: str | None) -> None:
        """Objects whose "name/" sorts before `raw` can no longer be hidden (None: all)."""
        if not self._held:
            return
        for name in [n for n in self._held
                     if raw is None or self._prefix + n + "/" < raw]:
            self._add(Entry(name, False, self._held.pop(name)))

    def _add(self, entry: Entry) -> None:
        self._window.append(entry)
        if self.names is not None:
            self.names.add(entry.name)
            if len(self.names) > KNOWN:
                self.names = None


async def list_names(store: ObjectStore, key_prefix: str, warnings: Warnings,
                     limit: int) -> set[str] | None:
    """Every name directly under `key_prefix` if there are at most `limit` (one page), else
    None."""
    page = await store.list_page(key_prefix, "/", None, max_keys=limit)
    if page.next_token is not None:
        return None
    stream = DirectoryStream(store, key_prefix, warnings)
    stream._absorb(page)
    return {entry.name for entry in stream._window}
