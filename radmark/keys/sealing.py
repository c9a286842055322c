"""Secrets at rest: the sealed secret document and the portable owner key file.

A secret is stored plain (relying on mode 0600) or encrypted with a passphrase: scrypt derives the
key of a ChaCha20-Poly1305 AEAD whose associated data binds the ciphertext to its fingerprint. The
scrypt parameters are read before anything can authenticate them, so they are bounded first.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from radmark.canonical import address, b64decode, b64encode, canonical_json
from radmark.errors import InputError, IntegrityError, KeystoreError
from radmark.fsutil import read_regular_file
from radmark.keys.keypair import PublicKeyRecord, SecretKey

SECRET_TYPE = "radmark.secret"
KEYFILE_TYPE = "radmark.keyfile"
SCRYPT_N = 2**15
PassphraseFn = Callable[[], "str | None"]


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


#: The largest scrypt cost a secret file may ask for. Its parameters are read before anything
#: authenticates them (the AEAD tag needs the derived key), so an edited file could otherwise make
#: us allocate 128·r·n bytes or spin for hours. 2^20 × r = 8 is 1 GiB, scrypt's documented
#: "sensitive storage" setting; p > 16 only multiplies time.
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_R = 8
MAX_SCRYPT_P = 16


def _kdf_params(enc: dict[str, Any], where: str) -> tuple[int, int, int]:
    vals = [enc.get(f) for f in ("n", "r", "p")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise IntegrityError(f"{where}: malformed secret file (scrypt parameters)")
    n, r, p = (int(v) for v in vals)  # type: ignore[arg-type]
    if not (2 <= n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= MAX_SCRYPT_R
            and 1 <= p <= MAX_SCRYPT_P):  # fmt: skip
        raise IntegrityError(
            f"{where}: scrypt parameters n={n}, r={r}, p={p} are outside the accepted range "
            f"(n a power of two <= 2^20, r <= {MAX_SCRYPT_R}, p <= {MAX_SCRYPT_P}); the file was "
            "altered or made by another tool"
        )
    return n, r, p


def seal_secret(
    key: SecretKey, fingerprint: str, passphrase: str | None, *, scrypt_n: int = SCRYPT_N
) -> dict[str, Any]:
    """The secret as a JSON document: plain (rely on 0600) or scrypt + ChaCha20-Poly1305."""
    doc: dict[str, Any] = {
        "type": SECRET_TYPE,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
    }
    if not passphrase:
        return {**doc, "encryption": "none", "secret": b64encode(key.secret_bytes())}
    salt, nonce = os.urandom(16), os.urandom(12)
    enc = {
        "kdf": "scrypt",
        "n": scrypt_n,
        "r": 8,
        "p": 1,
        "salt": b64encode(salt),
        "aead": "chacha20poly1305",
        "nonce": b64encode(nonce),
    }
    head = {**doc, "encryption": enc}
    k = _scrypt(passphrase, salt, scrypt_n, 8, 1)
    ct = ChaCha20Poly1305(k).encrypt(nonce, key.secret_bytes(), canonical_json(head))
    return {**head, "ciphertext": b64encode(ct)}


def open_secret(
    doc: dict[str, Any], record: PublicKeyRecord, passphrase: PassphraseFn, where: str
) -> SecretKey:
    """Decrypt (if needed) and check that the secret derives exactly ``record``'s public key."""
    if doc.get("type") != SECRET_TYPE or doc.get("fingerprint") != record.fingerprint:
        raise IntegrityError(f"{where}: not the secret of key {address(record.fingerprint)}")
    _check_format_version(doc, where, "secret")
    enc = doc.get("encryption")
    try:
        if enc == "none":
            key = SecretKey(b64decode(doc["secret"]))
        elif isinstance(enc, dict) and enc.get("kdf") == "scrypt":
            pw = passphrase()
            if not pw:
                raise KeystoreError(
                    f"{where}: the secret is passphrase-protected; set RADMARK_PASSPHRASE or run "
                    "interactively"
                )
            head = {k: v for k, v in doc.items() if k != "ciphertext"}
            n, r, p = _kdf_params(enc, where)  # bounded before use: the file is not yet trusted
            k = _scrypt(pw, b64decode(enc["salt"]), n, r, p)
            try:
                raw = ChaCha20Poly1305(k).decrypt(
                    b64decode(enc["nonce"]), b64decode(doc["ciphertext"]), canonical_json(head)
                )
            except InvalidTag as exc:
                raise KeystoreError(f"{where}: wrong passphrase (or the file was altered)") from exc
            key = SecretKey(raw)
        else:
            raise IntegrityError(f"{where}: unknown secret encryption")
    except (KeyError, ValueError, TypeError) as exc:
        raise IntegrityError(f"{where}: malformed secret file") from exc
    if not key.matches(record):
        raise IntegrityError(f"{where}: secret does not match key {address(record.fingerprint)}")
    return key


FORMAT_VERSION = 1  # of the secret document and the key file; later versions read this one


def _check_format_version(doc: dict[str, Any], where: str, what: str) -> None:
    """A version this radmark does not know is refused, never guessed at (a newer radmark may
    seal differently; an edited version field is tampering)."""
    version = doc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise IntegrityError(
            f"{where}: {what} format version {version!r} is not one this radmark reads "
            f"({FORMAT_VERSION}); upgrade radmark or check the file"
        )


def parse_canonical(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where}: not valid JSON (corrupt)") from exc
    if not isinstance(obj, dict) or canonical_json(obj) != data:
        raise IntegrityError(f"{where}: not in canonical form (altered)")
    return obj


def check_private(path: Path) -> None:
    """A secret-bearing file (key secret, kit) must be a regular file readable by its owner only."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeystoreError(
            f"permissions {oct(st.st_mode & 0o777)} for {path} are too open; run: chmod 600 {path}"
        )


def keyfile_bytes(record: PublicKeyRecord, secret_doc: dict[str, Any]) -> bytes:
    return canonical_json(
        {
            "type": KEYFILE_TYPE,
            "format_version": FORMAT_VERSION,
            "public_record": record.signed,
            "secret": secret_doc,
        }
    )


def load_keyfile(path: Path, passphrase: PassphraseFn) -> tuple[SecretKey, PublicKeyRecord]:
    """A self-contained owner key file (``keygen --out``): verified record + its secret."""
    st = os.lstat(path) if os.path.lexists(path) else None
    if st is None:
        raise InputError(f"{path}: no such key file")
    if st.st_mode & 0o077 and stat.S_ISREG(st.st_mode):
        raise KeystoreError(
            f"permissions {oct(st.st_mode & 0o777)} for {path} are too open; run: chmod 600 {path}"
        )
    data = read_regular_file(Path(path), max_bytes=1 << 20)
    doc = parse_canonical(data, str(path))
    public = doc.get("public_record")
    if doc.get("type") != KEYFILE_TYPE or not isinstance(doc.get("secret"), dict):
        raise IntegrityError(f"{path}: not a radmark key file")
    if not isinstance(public, dict):
        raise IntegrityError(f"{path}: not a radmark key file (no public record)")
    _check_format_version(doc, str(path), "key file")
    record = PublicKeyRecord.from_signed(public, str(path))
    return open_secret(doc["secret"], record, passphrase, str(path)), record
