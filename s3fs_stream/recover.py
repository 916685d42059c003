"""`s3stream recover`: list, complete or abort the multipart uploads a dead mount left behind.

Completion joins the contiguous parts from part 1 up to the first short (provisional) part,
as `part_schedule.recoverable_prefix` decides, so a recording cut off by a crash becomes a
truncated but playable object and never one with bytes silently missing in the middle.

The age guard: a mount that is alive uploads a part of every file it is writing each time a
part fills, so the uploads of a live mount stay young. --complete and --abort act only on
uploads whose newest part (or, without parts, whose start) is older than --older-than
(default 1h); younger ones are listed and left alone. A writer that fills less than one part
per --older-than looks idle too, so give --older-than 0 only when no mount is writing under
the prefix. Ages come from the server's timestamps and this machine's clock.

A part number uploaded more than once: S3 keeps the last upload, but SeaweedFS lists every
upload of the number (in an order of its own) and completes with whichever ETag it is given,
old bytes included. So each number's last upload is chosen (newest LastModified; SeaweedFS
gives it to the second, and within one second the larger wins, as a provisional tail only
grows into a full part) and the upload is completed with exactly its ETag.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import trio

from .botocore_store import BotocoreStore
from .config import StoreConfig
from .errors import FsError, QuietError, StoreError
from .object_store import ObjectStore, PendingUpload, UploadedPart
from .options import parse_age, show_age
from .part_schedule import recoverable_prefix

log = logging.getLogger(__name__)

DEFAULT_OLDER_THAN = 3600.0

USAGE = ("%(prog)s BUCKET[:PREFIX] [-o OPT[,OPT...]] [--list | --complete | --abort] "
         "[--older-than AGE] [--key KEY]")
EPILOG = """\
Every --NAME VALUE option also works as -o NAME=VALUE, as for the mount.

examples:
  s3stream recover my-bucket:rec -o endpoint_url=http://127.0.0.1:8333,force_path_style
  s3stream recover my-bucket --complete --older-than 2h
  s3stream recover my-bucket --abort --key rec/broken.wav --older-than 0
"""


@dataclass(frozen=True)
class Found:
    """One incomplete upload with the last upload of each of its part numbers."""

    upload: PendingUpload
    parts: dict[int, UploadedPart]

    @property
    def keep(self) -> list[int]:
        return recoverable_prefix({n: p.size for n, p in self.parts.items()})

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts.values())

    @property
    def recoverable_size(self) -> int:
        return sum(self.parts[n].size for n in self.keep)

    @property
    def last_activity(self) -> float:
        """When a part was last uploaded (the upload's start if none was)."""
        return max([self.upload.initiated] + [p.last_modified for p in self.parts.values()])


def last_uploads(parts: list[UploadedPart]) -> dict[int, UploadedPart]:
    """Each part number's last upload: newest LastModified, then the larger (see above)."""
    chosen: dict[int, UploadedPart] = {}
    for part in parts:
        current = chosen.get(part.number)
        if current is None or (part.last_modified, part.size) > \
                (current.last_modified, current.size):
            chosen[part.number] = part
    return chosen


def _age_argument(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def recover_parser():
    from .arguments import Parser, add_options

    parser = Parser("s3stream recover", __doc__, usage=USAGE, epilog=EPILOG)
    parser.add_argument("source", metavar="BUCKET[:PREFIX]",
                        help="the bucket, and optionally the prefix, of the dead mount")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        metavar="OPT[,OPT...]", help="S3 options as NAME=VALUE or NAME, the "
                        "same as the --NAME below")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true",
                        help="list the uploads with their parts, bytes and age (default)")
    action.add_argument("--complete", action="store_true",
                        help="complete each old enough upload from its recoverable parts")
    action.add_argument("--abort", action="store_true", help="abort each old enough upload")
    parser.add_argument("--older-than", type=_age_argument, default=DEFAULT_OLDER_THAN,
                        metavar="AGE", help="act only on uploads with no part uploaded for "
                        "AGE, e.g. 30m, 2h, 1d, 0 (default 1h: a live mount's uploads are "
                        "younger)")
    parser.add_argument("--key", metavar="KEY", help="only the upload(s) of this key")
    add_options(parser, {"store": "S3 options"})
    return parser


def recover_main(argv: list[str]) -> int:
    from .arguments import parse_options, parse_source

    args = recover_parser().parse_args(argv)
    try:
        bucket, prefix = parse_source(args.source)
        config = StoreConfig(bucket=bucket, prefix=prefix,
                             **parse_options(args, {"store"})["store"])
        return trio.run(_recover, BotocoreStore(config), prefix, args)
    except QuietError as exc:
        print(f"s3stream recover: {exc}", file=sys.stderr)
        return exc.exitcode
    except FsError as exc:
        print(f"s3stream recover: {exc}", file=sys.stderr)
        return 1


async def find_uploads(store: ObjectStore, prefix: str, key: str | None) -> list[Found]:
    uploads = [u for u in await store.list_uploads(prefix)
               if key is None or u.key in (key, prefix + key)]
    return [Found(u, last_uploads(await store.list_parts(u.key, u.upload_id)))
            for u in uploads]


async def _recover(store: ObjectStore, prefix: str, args) -> int:
    found = await find_uploads(store, prefix, args.key)
    if not found:
        print("no incomplete uploads")
        return 0
    failed = 0
    now = time.time()
    for item in found:
        age = now - item.last_activity
        print(f"{item.upload.key}  upload {item.upload.upload_id}  {len(item.parts)} parts, "
              f"{item.size} bytes, last written {show_age(age)} ago  recoverable: "
              f"{len(item.keep)} parts, {item.recoverable_size} bytes")
        if not (args.complete or args.abort):
            continue
        if age < args.older_than:
            print(f"  left alone: younger than --older-than {show_age(args.older_than)} "
                  "(a live mount may be writing it)")
            continue
        try:
            await _act(store, item, args.complete)
        except StoreError as exc:
            print(f"  failed: {exc}")
            failed += 1
    return 1 if failed else 0


async def _act(store: ObjectStore, item: Found, complete: bool) -> None:
    upload = item.upload
    if not complete:
        await store.abort(upload.key, upload.upload_id)
        print("  aborted")
    elif item.keep:
        await store.complete(upload.key, upload.upload_id, [item.parts[n] for n in item.keep])
        print(f"  completed s3://{store.bucket}/{upload.key} ({item.recoverable_size} bytes)")
    else:
        print("  nothing recoverable (no part 1); use --abort to remove it")


async def warn_of_old_uploads(store: ObjectStore, prefix: str) -> None:
    """At mount: one ListMultipartUploads; uploads older than recover's default are likely
    the files of a mount that crashed, so say once where they are and how to recover them."""
    try:
        uploads = await store.list_uploads(prefix, max_uploads=1000)
    except StoreError as exc:
        log.debug("could not look for incomplete uploads: %s", exc)
        return
    now = time.time()
    old = sorted((u for u in uploads if now - u.initiated > DEFAULT_OLDER_THAN),
                 key=lambda u: u.initiated)
    if old:
        source = store.bucket + (":" + prefix.rstrip("/") if prefix else "")
        log.warning("%d incomplete upload(s) started over %s ago under s3://%s/%s (oldest: "
                    "%r, %s ago), perhaps of a mount that crashed: `s3stream recover %s` "
                    "lists them", len(old), show_age(DEFAULT_OLDER_THAN), store.bucket, prefix,
                    old[0].key, show_age(now - old[0].initiated), source)
