"""Frozen configuration, built once by the CLI from argv and -o options."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MiB = 1024 * 1024


def default_max_memory() -> int:
    """An eighth of the machine's memory, between 256 MiB and 4 GiB (3 GiB on a 24 GiB
    box: room for 5 TiB objects, whose largest parts are 2 GiB). It is a ceiling: a single
    stream uses about 100 MiB of it, each further writer about two parts more."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 2048 * MiB
    return min(max(ram // 8 // MiB * MiB, 256 * MiB), 4096 * MiB)


@dataclass(frozen=True)
class StoreConfig:
    bucket: str
    prefix: str = ""  # "" or ends with "/"
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    force_path_style: bool = False
    max_connections: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5  # botocore "standard" retry mode, exponential backoff
    # then the whole request again, until this many seconds after its first attempt, while
    # the endpoint is unreachable or answers 5xx (docs/SEMANTICS.md "Failures")
    retry_time: float = 60.0
    checksum: str = "crc32"  # crc32 | md5 | off
    sign_payload: str = "auto"  # auto (only when no checksum is sent) | on | off
    storage_class: str | None = None
    sse: str | None = None  # AES256 | aws:kms
    sse_kms_key_id: str | None = None
    acl: str | None = None
    client_cert: str | None = None  # PEM with the certificate (and key, else client_key)
    client_key: str | None = None
    # HEAD, small PUT and DELETE over our own connections (direct_requests.py), botocore
    # for everything else and whenever those get no plain answer
    direct_requests: bool = True
    # x-amz-request-payer: requester on every request (a requester-pays bucket)
    requester_pays: bool = False


@dataclass(frozen=True)
class FsConfig:
    uid: int = 0
    gid: int = 0
    file_mode: int = 0o644
    dir_mode: int = 0o755
    read_only: bool = False
    part_size: int = 8 * MiB
    max_memory: int = field(default_factory=default_max_memory)
    upload_concurrency: int = 4
    fsync_interval: float = 1.0  # an fsync this soon after the last one waits (one tail upload)
    max_unsynced: float = 30.0  # seconds before held data is uploaded without an fsync; 0: off
    read_ahead_initial: int = 1 * MiB
    read_ahead_max: int = 32 * MiB
    read_concurrency: int = 4
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    # seconds a name found missing here stays missing without asking S3 (also the names a
    # directory listed whole or made here lacks); 0: every lookup of an unknown name asks
    negative_timeout: float = 0.0
    content_type: str = "auto"  # auto (guess from extension) | none | a fixed MIME type
    writeback_cache: bool = True
    # close() of a file of one part returns once its bytes are held; its PutObject is queued
    queued_uploads: bool = False


@dataclass(frozen=True)
class MountConfig:
    store: StoreConfig
    fs: FsConfig = field(default_factory=FsConfig)
    mountpoint: str = ""
    foreground: bool = False
    allow_other: bool = False
    log_level: str = "info"
    log_file: str | None = None
    on_read_only: str = "mount"  # writes refused at mount: mount | refuse
    fake: bool = False
    verbose: bool = False
