"""Checksums of stored bytes. v1 uses XXH3-64 (seed 0) for the header, the index and every chunk."""

from __future__ import annotations

import xxhash

from .constants import Checksum


def xxh3_64(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 of `data` with seed 0, as an unsigned int."""
    return xxhash.xxh3_64_intdigest(data)


CHECKSUM_FUNCTIONS = {Checksum.XXH3_64: xxh3_64}
