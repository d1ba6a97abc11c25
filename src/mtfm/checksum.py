"""The checksum of stored files (data shards, checkpoints): CRC-32, written ``crc32:<8 hex>``.

CRC-32 because the threat is accidental damage (a truncated copy, a bit flip, a file from
another run), not tampering, and it is the cheapest checksum at hand: measured 1.7 GB/s on
the development machine against 0.55 GB/s for blake2b and 0.95 GB/s for sha256 (zlib
releases the GIL, so it also runs beside other threads). The prefix names the algorithm, so a
later format can change it without ambiguity.
"""

from __future__ import annotations

import zlib
from pathlib import Path

_CHUNK = 8 << 20


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The checksum of ``data`` (any object with the buffer protocol, e.g. a ``pyarrow.Buffer``)."""
    return f"crc32:{zlib.crc32(data):08x}"


def file_checksum(path: str | Path) -> tuple[int, str]:
    """(size in bytes, checksum) of a file, read in chunks (checkpoints may be large)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"crc32:{crc:08x}"
