"""Canonical bytes for everything that is hashed or signed.

A signature or a content address is only meaningful if every implementation serialises the
same object to the same bytes, so all signed records go through :func:`canonical_json`:
UTF-8, keys sorted, no insignificant whitespace, no NaN/Infinity.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from typing import Any

ADDRESS_PREFIX = "sha256:"


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` deterministically (sorted keys, compact separators, UTF-8)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def utc_timestamp() -> str:
    """Now, as every signed record writes it: UTC, whole seconds, ``Z`` suffix."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def address(hex_digest: str) -> str:
    """The one printed form of a content address: ``sha256:<hex>``."""
    return ADDRESS_PREFIX + hex_digest


def strip_address(text: str) -> str:
    """Accept ``sha256:<hex>``, ``SHA256:<hex>`` or bare hex; return lower-case hex (maybe a prefix)."""
    text = text.strip()
    if text.lower().startswith(ADDRESS_PREFIX):
        text = text[len(ADDRESS_PREFIX) :]
    return text.lower()


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)
