"""Which samples are marked: a keyed, secret, class-independent draw per sample key.

HMAC-SHA256(selection seed, ``__key__``) read as a fraction below q: deterministic (a resumed or
re-run marking selects the same samples), secret (without the key nobody can tell which samples
were selected), and independent of the class (so uniform across classes in expectation).
"""

from __future__ import annotations

import hashlib
import hmac

from radmark.data.samples import name_bytes

SELECTION_RULE = "hmac-sha256(selection-seed, __key__)[:8] < fraction * 2^64"


def is_selected(selection_seed: bytes, key: str, fraction: float) -> bool:
    """Whether sample ``key`` is marked: HMAC-SHA256(seed, key) read as a fraction < q."""
    if fraction >= 1.0:
        return True
    digest = hmac.new(selection_seed, name_bytes(key), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < int(fraction * 2**64)
