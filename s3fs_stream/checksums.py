"""The checksums every body carries, for the server to verify (`checksum` option).

CRC32 (`x-amz-checksum-crc32`) is the default. zlib's CRC32 cost 0.26 CPU-seconds per GiB on
the reference box, 15 % of the daemon's CPU while writing; ISA-L's (the optional `isal`
package: `pip install s3fs-stream[fast]`) computes the same CRC32 with carry-less multiply
instructions in 0.02 s per GiB. Both release the GIL for large buffers (they run in the
upload's worker thread). Without `isal` installed, zlib's is used: same values, same header.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable

try:
    from isal.isal_zlib import crc32 as _isal_crc32
except ImportError:  # the optional accelerated path is not installed
    _isal_crc32 = None

Buffer = bytes | bytearray | memoryview


def _pick() -> tuple[str, Callable[[Buffer], int]]:
    if _isal_crc32 is not None and _isal_crc32(b"123456789") == zlib.crc32(b"123456789"):
        return "isal", _isal_crc32
    return "zlib", zlib.crc32


CRC32_IMPL, crc32 = _pick()


def crc32_base64(data: Buffer) -> str:
    """The value of `x-amz-checksum-crc32`: the CRC32 of `data`, big-endian, base64."""
    return base64.b64encode(crc32(data).to_bytes(4, "big")).decode()


def md5_base64(data: Buffer) -> str:
    """The value of `Content-MD5`."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()
