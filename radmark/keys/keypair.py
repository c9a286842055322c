"""Keys: one 32-byte secret, everything else derived from it.

From the secret, HKDF-SHA256 with distinct versioned ``info`` labels derives an Ed25519 signing
key and the carrier seed, so a single backed-up secret is enough to re-derive the carriers and
to prove authorship of every record. The public record (format version, public key, creation
time, parameters) is canonical JSON signed by that key; the fingerprint is SHA-256 of the
signed record's canonical bytes, printed ``sha256:<hex>``.

Labels: ``radmark/v1/ed25519-signing-key`` (signatures), ``carrier-seed`` (carriers),
``sample-selection`` (which samples are marked), ``decoy-carrier-seed`` and ``kit-slots`` (kits),
``selection-digest`` (the key of the HMAC that a mark record stores per shard over the marked
sample keys: a commitment the owner can open, which nobody without the secret can test guesses
against; records made before it stored an unkeyed SHA-256, see ``keys/records.py``).

Signed objects (key records and mark records) share one envelope: a JSON object whose
``signature`` field holds ``{"alg": "ed25519", "value": base64}`` over the canonical bytes of the
object without that field.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from radmark.canonical import b64decode, b64encode, canonical_json, sha256_hex, utc_timestamp
from radmark.errors import IntegrityError
from radmark.keys.carriers import CARRIER_FORMAT

SECRET_BYTES = 32
KEY_RECORD_TYPE = "radmark.key"
KEY_FORMAT_VERSION = 1
INFO_SIGNING = b"radmark/v1/ed25519-signing-key"
INFO_CARRIERS = b"radmark/v1/carrier-seed"
INFO_SELECTION = b"radmark/v1/sample-selection"
INFO_DECOYS = b"radmark/v1/decoy-carrier-seed"
INFO_KIT_SLOTS = b"radmark/v1/kit-slots"
INFO_TWINS = b"radmark/v1/twin-publication"
INFO_TAGGANTS = b"radmark/v1/key-images"
INFO_SELECTION_DIGEST = b"radmark/v1/selection-digest"
SELECTION_DIGEST = "hmac-sha256"  # how mark records digest the marked keys (absent: sha256)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def shard_digest_key(digest_key: bytes, output_sha256: str) -> bytes:
    """The HMAC key of one output shard's selection digest: HMAC(digest key, output hash).

    Per shard, so that opening one shard's commitment (revealing its marked keys and this key)
    lets nobody test guesses against any other shard or record of the same owner key.
    """
    return hmac.new(digest_key, f"shard|{output_sha256}".encode(), hashlib.sha256).digest()


def selection_digest(
    digest_key: bytes, output_sha256: str, shard: str, marked_keys: Sequence[str]
) -> str:
    """Hex HMAC-SHA256 over one shard's name and its marked sample keys (in shard order).

    ``digest_key`` is :meth:`SecretKey.selection_digest_key`; the HMAC key is
    :func:`shard_digest_key` of the output shard's hex SHA-256. The message is the canonical JSON
    ``{"marked": [...], "shard": name}``, so keys holding newlines cannot collide.
    """
    msg = canonical_json({"marked": list(marked_keys), "shard": shard})
    key = shard_digest_key(digest_key, output_sha256)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def pixel_digest(seed: bytes, image: Any) -> bytes:
    """A keyed digest of one image's decoded pixels, uint8 [C, H, W] (the layout marking and probe
    loading share). ``seed`` is :meth:`SecretKey.selection_seed`: the private index of marked
    images (``verify/guard.py``) reveals nothing without the key."""
    import numpy as np

    arr = np.ascontiguousarray(image, dtype=np.uint8)
    shape = ",".join(str(v) for v in arr.shape).encode()
    msg = b"radmark/v1/pixels|" + shape + b"|" + arr.tobytes()
    return hmac.new(seed, msg, hashlib.sha256).digest()[:16]


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_body(signer: Ed25519PrivateKey, body: dict[str, Any]) -> dict[str, Any]:
    """Return ``body`` plus its Ed25519 signature over the canonical bytes of ``body``."""
    if "signature" in body:
        raise ValueError("body is already signed")
    sig = signer.sign(canonical_json(body))
    return {**body, "signature": {"alg": "ed25519", "value": b64encode(sig)}}


def verify_body(public_key: Ed25519PublicKey, signed: dict[str, Any], what: str) -> None:
    """Check the envelope's signature; raise IntegrityError naming ``what`` if it does not hold."""
    sig = signed.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519" or "value" not in sig:
        raise IntegrityError(f"{what}: missing or malformed signature")
    body = {k: v for k, v in signed.items() if k != "signature"}
    try:
        public_key.verify(b64decode(sig["value"]), canonical_json(body))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise IntegrityError(
            f"{what}: signature does not verify (tampered or signed by another key)"
        ) from exc


@dataclass(frozen=True)
class PublicKeyRecord:
    """A verified public key record. Only :meth:`from_signed` and :meth:`SecretKey.public_record`
    make one, so an unverified record never exists in memory."""

    signed: dict[str, Any]
    canonical: bytes
    fingerprint: str  # hex SHA-256 of ``canonical``

    @classmethod
    def from_signed(cls, signed: dict[str, Any], what: str = "key record") -> PublicKeyRecord:
        if not isinstance(signed, dict) or signed.get("type") != KEY_RECORD_TYPE:
            raise IntegrityError(f"{what}: not a radmark key record")
        if signed.get("format_version") != KEY_FORMAT_VERSION:
            raise IntegrityError(
                f"{what}: unsupported key format version {signed.get('format_version')!r}"
            )
        try:
            pub = Ed25519PublicKey.from_public_bytes(b64decode(signed["public_key"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise IntegrityError(f"{what}: malformed public key") from exc
        verify_body(pub, signed, what)
        data = canonical_json(signed)
        return cls(signed=signed, canonical=data, fingerprint=sha256_hex(data))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(b64decode(self.signed["public_key"]))

    @property
    def created(self) -> str:
        return str(self.signed.get("created", ""))

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.signed.get("params", {}))


class SecretKey:
    """The 32-byte secret. Its repr never shows the bytes; nothing in radmark prints them."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise IntegrityError(f"a radmark secret is {SECRET_BYTES} bytes")
        self._secret = secret

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(os.urandom(SECRET_BYTES))

    def __repr__(self) -> str:
        return "SecretKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never let a secret be pickled by accident
        raise TypeError("SecretKey cannot be pickled")

    def secret_bytes(self) -> bytes:
        """Raw secret, for the keystore's encrypted or 0600 storage only."""
        return self._secret

    def signing_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(_hkdf(self._secret, INFO_SIGNING))

    def carrier_seed(self) -> bytes:
        return _hkdf(self._secret, INFO_CARRIERS)

    def selection_seed(self) -> bytes:
        """Seed for choosing which samples get marked (independent of the carriers)."""
        return _hkdf(self._secret, INFO_SELECTION)

    def decoy_seed(self) -> bytes:
        """Seed of the decoy carrier sets of verification kits (radmark/kit.py).

        Independent of the carrier seed (another HKDF label), so decoys are drawn exactly like the
        true carriers but never equal them.
        """
        return _hkdf(self._secret, INFO_DECOYS)

    def twin_seed(self) -> bytes:
        """Seed of which twin candidate is published (marking/twins.py): its own HKDF label, so
        the twin test's randomisation is independent of the carriers'."""
        return _hkdf(self._secret, INFO_TWINS)

    def taggant_seed(self) -> bytes:
        """Seed of the key images and their secret labels (marking/taggants.py)."""
        return _hkdf(self._secret, INFO_TAGGANTS)

    def kit_slot_seed(self) -> bytes:
        """Seed that hides which slot of a kit holds the true carrier (radmark/kit.py)."""
        return _hkdf(self._secret, INFO_KIT_SLOTS)

    def selection_digest_key(self) -> bytes:
        """Key of the per-shard HMAC over the marked sample keys in mark records (issue #12).

        An unkeyed hash of a few marked keys per shard is inverted by trying every subset; an HMAC
        under a key derived from this one reveals nothing without the secret, yet the owner can
        open one shard's digest (show its marked keys and :func:`shard_digest_key`, which reveals
        neither the carriers, the selection seed nor any other shard's digest key).
        """
        return _hkdf(self._secret, INFO_SELECTION_DIGEST)

    def public_key_b64(self) -> str:
        return b64encode(_raw_public(self.signing_key().public_key()))

    def public_record(self, created: str | None = None) -> PublicKeyRecord:
        """The signed public record; deterministic given ``created`` (Ed25519 is deterministic)."""
        if created is None:
            created = utc_timestamp()
        body = {
            "type": KEY_RECORD_TYPE,
            "format_version": KEY_FORMAT_VERSION,
            "public_key": self.public_key_b64(),
            "created": created,
            "params": {
                "kdf": "hkdf-sha256",
                "signature": "ed25519",
                "carriers": CARRIER_FORMAT,
                "secret_bytes": SECRET_BYTES,
            },
        }
        return PublicKeyRecord.from_signed(sign_body(self.signing_key(), body))

    def sign(self, body: dict[str, Any]) -> dict[str, Any]:
        return sign_body(self.signing_key(), body)

    def matches(self, record: PublicKeyRecord) -> bool:
        return record.signed.get("public_key") == self.public_key_b64()
