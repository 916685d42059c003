"""What is known without asking S3: names known missing, directories known whole.

With `negative_timeout` (0 by default: S3 is strongly consistent, and nothing is known
missing) a lookup of a name found missing within it, or of a name a directory listed whole
(or made here) within it lacks, needs no request. A directory known before and expired is
listed again (one request, `list_dir`: the namespace's listing of its names, those being
written here included) rather than HEAD + LIST, once for all lookups that wait on it.

State owned here: the names known missing with their expiry (`_negative`, at most
NEGATIVE_MAX), the directories known whole (`_known`, the KNOWN_DIRS most recent) and the
refreshes in flight (`_refreshing`). The namespace tells it what it changed
(`forget_missing`, `gone`, `know_dir`, `dir_moved`) and asks `known_missing`.

Whatever `negative_timeout` is, a name S3 just answered missing (HEAD and LIST, for the
kernel's LOOKUP) is remembered for `entry_timeout` in `_asked`, for one use only: the
request the kernel sends right after such a LOOKUP -- MKDIR, SYMLINK, or a RENAME onto the
name -- takes that answer instead of asking S3 again a few milliseconds later
(`take_asked_missing`). The kernel holds the directory locked from its LOOKUP to that
request; another client's object made in between is overwritten (a rename, like a copy made
just after its check) or reported by S3 later, as it would be had it come a moment after the
check. Any change here to the name (`forget_missing`, `dir_moved`) drops it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable

import trio

from .config import FsConfig
from .inode_table import parent_of

NEGATIVE_MAX = 20_000  # remembered missing names
KNOWN_DIR_MAX = 1_000  # a directory known whole (names) only up to one listing page
KNOWN_DIRS = 256


class KnownNames:
    def __init__(self, config: FsConfig,
                 list_dir: Callable[[str], Awaitable[set[str] | None]]):
        self.config = config
        self._list_dir = list_dir  # every name in a directory, None if over KNOWN_DIR_MAX
        self._negative: dict[str, float] = {}  # path -> monotonic expiry
        # directory path -> (expiry, every name in it): lookups of other names need no request
        self._known: collections.OrderedDict[str, tuple[float, set[str]]] = \
            collections.OrderedDict()
        self._refreshing: dict[str, trio.Event] = {}
        # path -> monotonic expiry: missing as S3 answered just now (`take_asked_missing`)
        self._asked: dict[str, float] = {}

    def forget_missing(self, path: str) -> None:
        """`path` exists now (created here): no cache may call it missing."""
        self._negative.pop(path, None)
        self._asked.pop(path, None)
        known = self._known.get(parent_of(path))
        if known is not None:
            known[1].add(path.rpartition("/")[2])

    def gone(self, path: str) -> None:
        """`path` was removed here."""
        known = self._known.get(parent_of(path))
        if known is not None:
            known[1].discard(path.rpartition("/")[2])
        self._known.pop(path, None)

    def remember_missing(self, path: str) -> None:
        self._negative = _with_expiry(self._negative, path, self.config.negative_timeout)
        if self.config.entry_timeout > 0:
            self._asked = _with_expiry(self._asked, path, self.config.entry_timeout)

    def found(self, path: str) -> None:
        """S3 showed `path` (a lookup found it): no earlier "missing" of it is taken."""
        self._asked.pop(path, None)

    def take_asked_missing(self, path: str) -> bool:
        """True once if S3 answered `path` missing within `entry_timeout` (see the module
        docstring): the caller, creating the name, need not ask again."""
        expiry = self._asked.pop(path, None)
        return expiry is not None and expiry > time.monotonic()

    def know_dir(self, path: str, names: set[str]) -> None:
        self._known[path] = (time.monotonic() + self.config.negative_timeout, names)
        self._known.move_to_end(path)
        while len(self._known) > KNOWN_DIRS:
            self._known.popitem(last=False)

    async def known_missing(self, path: str) -> bool:
        """True when `path` is known not to exist: a missing name seen within
        `negative_timeout`, or a directory listed whole (or made) within it that lacks the
        name. A small directory known before is listed again (one request) rather than
        HEAD + LIST. With `negative_timeout` 0 (the default) nothing is known missing: S3 is
        strongly consistent, and a pipeline's consumer told "x is there" by another client
        must find it."""
        if not self.config.negative_timeout:
            return False
        expiry = self._negative.get(path)
        now = time.monotonic()
        if expiry is not None:
            if expiry > now:
                return True
            del self._negative[path]
        parent = parent_of(path)
        known = self._known.get(parent)
        if known is None:
            return False
        if known[0] <= now:
            known = await self._refresh(parent)
            if known is None:
                return False
        return path.rpartition("/")[2] not in known[1]

    async def _refresh(self, parent: str) -> tuple[float, set[str]] | None:
        busy = self._refreshing.get(parent)
        if busy is not None:
            await busy.wait()
            known = self._known.get(parent)
            return known if known is not None and known[0] > time.monotonic() else None
        done = self._refreshing[parent] = trio.Event()
        try:
            names = await self._list_dir(parent)
        finally:
            del self._refreshing[parent]
            done.set()
        if names is None:
            self._known.pop(parent, None)
            return None
        self.know_dir(parent, names)
        return self._known[parent]

    def dir_moved(self, old: str, new: str) -> None:
        """A directory was renamed from `old` to `new` here: what was known inside either
        (and of the target directory itself) no longer holds."""
        for path in [p for p in self._known
                     if p.startswith(old + "/") or p == new or p.startswith(new + "/")]:
            del self._known[path]
        for path in [p for p in self._negative if p.startswith(new + "/")]:
            del self._negative[path]
        for path in [p for p in self._asked if p == new or p.startswith(new + "/")]:
            del self._asked[path]


def _with_expiry(expiries: dict[str, float], path: str, seconds: float) -> dict[str, float]:
    """`expiries` with `path` expiring in `seconds`; at NEGATIVE_MAX entries the expired
    ones go first, and all of them if none has expired."""
    if len(expiries) >= NEGATIVE_MAX:
        now = time.monotonic()
        expiries = {p: t for p, t in expiries.items() if t > now}
        if len(expiries) >= NEGATIVE_MAX:
            expiries.clear()
    expiries[path] = time.monotonic() + seconds
    return expiries
