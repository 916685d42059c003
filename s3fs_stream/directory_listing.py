"""One directory's entries from paged ListObjectsV2, as a snapshot with stable offsets.

The snapshot is taken when a directory handle first reads; offsets index into it, so entries
that appear or vanish in S3 while `ls` pages through do not shift anything. Keys that cannot
be file names are skipped with one log line each; where both `a` and `a/...` exist the
directory wins and the object is hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .object_store import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

NAME_MAX = 255


def invalid_name_reason(name: str) -> str | None:
    if not name:
        return "empty path segment (a '//' in the key)"
    if name in (".", ".."):
        return f"'{name}' path segment"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"name longer than {NAME_MAX} bytes"
    if "\0" in name:
        return "NUL byte in name"
    return control_character_reason(name)


def control_character_reason(name: str) -> str | None:
    """Control characters (newlines, escape sequences) in names break scripts and terminals
    that list the mount; S3 advises against them, so they are refused like bad segments."""
    for char in name:
        if char < " " or char == "\x7f":
            return f"control character {char!r} in name"
    return None


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    info: ObjectInfo | None  # the listed object, for files


async def list_directory(store: ObjectStore, key_prefix: str) -> list[Entry]:
    """Every valid entry directly under `key_prefix` ("" or ending in "/"), sorted by name."""
    files: dict[str, ObjectInfo] = {}
    dirs: set[str] = set()
    token = None
    while True:
        page = await store.list_page(key_prefix, "/", token)
        for info in page.objects:
            name = info.key[len(key_prefix):]
            if not name:
                continue  # the directory's own marker object
            _add(files, name, info, info.key)
        for prefix in page.prefixes:
            name = prefix[len(key_prefix):-1]
            if invalid_name_reason(name) is None:
                dirs.add(name)
            else:
                log.warning("skipping key prefix %r: %s", prefix, invalid_name_reason(name))
        token = page.next_token
        if token is None:
            break
    for name in sorted(dirs & files.keys()):
        log.warning("object %r is hidden by the directory of the same name", key_prefix + name)
        del files[name]
    entries = [Entry(name, True, None) for name in dirs]
    entries += [Entry(name, False, info) for name, info in files.items()]
    entries.sort(key=lambda e: e.name)
    return entries


def _add(files: dict[str, ObjectInfo], name: str, info: ObjectInfo, key: str) -> None:
    reason = invalid_name_reason(name)
    if reason is None:
        files[name] = info
    else:
        log.warning("skipping key %r: %s", key, reason)
