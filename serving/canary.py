"""Canary assignment: a stable hash of the user id, so a user sees one variant until the decision."""

from __future__ import annotations

import hashlib

BUCKETS = 10_000


def bucket(user_id: str) -> int:
    """The user's bucket in [0, 10000): the same on every process, machine and Python version."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def variant_for(user_id: str, fraction: float, has_challenger: bool) -> str:
    """``challenger`` for the users whose bucket falls under ``fraction``, else ``champion``."""
    if not has_challenger or fraction <= 0:
        return "champion"
    return "challenger" if bucket(user_id) < fraction * BUCKETS else "champion"
