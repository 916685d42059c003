"""`s3stream recover`: list, complete or abort the multipart uploads a dead mount left behind.

Completion joins the contiguous parts from part 1 up to the first short (provisional) part,
as `part_schedule.recoverable_prefix` decides, so a recording cut off by a crash becomes a
truncated but playable object and never one with bytes silently missing in the middle.
"""

from __future__ import annotations

import sys
import time

import trio

from .botocore_store import BotocoreStore
from .config import StoreConfig
from .errors import FsError
from .part_schedule import recoverable_prefix


def recover_main(argv: list[str]) -> int:
    from .cli import Parser  # cli imports this module lazily: no import cycle at load time

    parser = Parser("s3stream recover", __doc__)
    parser.add_argument("source", metavar="BUCKET[:PREFIX]",
                        help="the bucket, and optionally the prefix, of the dead mount")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--complete", action="store_true",
                        help="complete each upload from its recoverable parts")
    action.add_argument("--abort", action="store_true", help="abort each upload")
    parser.add_argument("--key", metavar="KEY", help="only the upload(s) of this key")
    parser.add_argument("--endpoint-url", metavar="URL",
                        help="S3 endpoint of a non-AWS server, e.g. http://127.0.0.1:8333")
    parser.add_argument("--region", metavar="REGION", help="AWS region (default: from the profile, else "
                        "us-east-1)")
    parser.add_argument("--profile", metavar="NAME", help="credentials profile from ~/.aws")
    parser.add_argument("--force-path-style", action="store_true",
                        help="address buckets as URL/BUCKET (most non-AWS servers need it)")
    args = parser.parse_args(argv)
    bucket, _, prefix = args.source.partition(":")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    config = StoreConfig(bucket=bucket, prefix=prefix, endpoint_url=args.endpoint_url,
                         region=args.region, profile=args.profile,
                         force_path_style=args.force_path_style)
    try:
        return trio.run(_recover, BotocoreStore(config), prefix, args)
    except FsError as exc:
        print(f"s3stream recover: {exc}", file=sys.stderr)
        return 1


async def _recover(store: BotocoreStore, prefix: str, args) -> int:
    uploads = [u for u in await store.list_uploads(prefix) if not args.key or u.key == args.key]
    if not uploads:
        print("no incomplete uploads")
        return 0
    for upload in uploads:
        parts = await store.list_parts(upload.key, upload.upload_id)
        by_number = {p.number: p for p in parts}
        keep = recoverable_prefix({p.number: p.size for p in parts})
        size = sum(by_number[n].size for n in keep)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(upload.initiated))
        print(f"{upload.key}  started {started}  {len(parts)} parts  recoverable: "
              f"{len(keep)} parts, {size} bytes")
        if args.complete and keep:
            await store.complete(upload.key, upload.upload_id, [by_number[n] for n in keep])
            print(f"  completed s3://{store.bucket}/{upload.key} ({size} bytes)")
        elif args.complete:
            print("  nothing recoverable (no part 1); use --abort to remove it")
        elif args.abort:
            await store.abort(upload.key, upload.upload_id)
            print("  aborted")
    return 0
