"""Derived seeds: one cell seed fans out to per-task, per-parameter streams by name."""

from __future__ import annotations

import hashlib


def derive(seed: int, *names: object) -> int:
    """A 56-bit seed from ``seed`` and names; the same inputs always give the same seed."""
    text = "/".join(map(str, (seed, *names)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")
