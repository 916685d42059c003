"""The file system's semantics in plain trio, with no pyfuse3 import (the adapter converts).

Composition only: the inode table, the namespace (paths, directories, attributes, with its
deferred metadata) and the open files (handles, writers, readers) over one object store.
Every failure is raised as an FsError carrying its errno.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .config import FsConfig
from .inode_table import InodeTable
from .memory_budget import MemoryBudget
from .namespace import Namespace
from .object_store import ObjectStore
from .open_files import OpenFiles
from .spill_area import SpillArea
from .upload_pool import UploadPool


class FileSystem:
    def __init__(self, store: ObjectStore, prefix: str, config: FsConfig,
                 nursery: trio.Nursery, pool: UploadPool, budget: MemoryBudget,
                 drop_pages: Callable[[int, int, int], None] | None = None,
                 notify: Callable[..., None] | None = None, mount_id: str | None = None):
        self.store = store
        self.config = config
        self.budget = budget
        self.table = InodeTable(config.uid, config.gid, config.dir_mode)
        self.spill = SpillArea(store, prefix, mount_id=mount_id)
        self.files = OpenFiles(store, prefix, config, self.table, nursery, pool, budget,
                               self.spill, drop_pages)
        self.namespace = Namespace(store, prefix, config, self.table, self.files, nursery,
                                   notify)
        self.deferred = self.namespace.deferred  # chmod/utimes of closed files, stored later

    @property
    def schedule(self):
        return self.files.schedule

    def forget(self, inode: int, count: int) -> None:
        self.table.forget(inode, count)
