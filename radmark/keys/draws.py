"""Keyed uniform draws: the secret random choices every exact test rests on.

Each test's exactness needs a choice that is uniform and independent of everything a suspect can
depend on: which decoy slot holds the true carrier, which twin candidate is published. They are
all made here the same way: HMAC-SHA256 under a seed the key derives (its own HKDF label per use),
the first 8 bytes read as an integer, accepted below the largest multiple of m under 2⁶⁴
(rejection sampling: exactly uniform on 0..m−1 for any m), else retried with the next counter.
HMAC is a PRF, so without the key the draws are indistinguishable from independent uniform ones.
"""

from __future__ import annotations

import hashlib
import hmac


def uniform_index(seed: bytes, prefix: str, m: int) -> int:
    """A uniform draw on 0..m−1 from HMAC(seed, prefix + counter), counter = 0, 1, ..."""
    limit = (1 << 64) - ((1 << 64) % m)
    counter = 0
    while True:
        msg = f"{prefix}{counter}".encode("utf-8", "surrogateescape")  # names that are not UTF-8
        digest = hmac.new(seed, msg, hashlib.sha256).digest()
        v = int.from_bytes(digest[:8], "big")
        if v < limit:
            return v % m
        counter += 1
