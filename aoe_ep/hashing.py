"""SHA-256 digests the package takes in more than one place: of a file (tokenizers, checkpoint manifests) and the
63-bit integer of a byte string (seeds, agreement checks across ranks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 22


def file_sha256(path: Path | str) -> bytes:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.digest()


def digest63(data: bytes) -> int:
    """A non-negative int64 from SHA-256 of `data`: its first 8 bytes, little-endian, shifted right by one bit
    (unlike Python's `hash`, the same in every process)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1
