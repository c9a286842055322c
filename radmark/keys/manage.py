"""Key and keystore operations behind ``radmark keygen`` and ``radmark keys``.

Each command calls one function here, which returns a small dataclass for ``report/`` to render
(JSON in ``report/jsonout.py``, rich text in ``report/console.py``); none prints.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radmark.canonical import address, canonical_json, sha256_hex
from radmark.fsutil import atomic_write_bytes, check_new_target
from radmark.keys.keypair import KEY_RECORD_TYPE, PublicKeyRecord, SecretKey
from radmark.keys.records import MARK_RECORD_TYPE
from radmark.keys.sealing import SCRYPT_N, PassphraseFn, keyfile_bytes, load_keyfile, seal_secret
from radmark.keys.store import Entry, Keystore


@dataclass(frozen=True)
class KeygenResult:
    fingerprint: str  # sha256:<hex>
    path: Path  # the secret file in the keystore
    keystore: Path
    encrypted: bool
    key_file: Path | None


def generate_key(
    keystore: Path,
    *,
    passphrase: str | None,
    out_file: Path | None = None,
    scrypt_n: int = SCRYPT_N,
    force: bool = False,
) -> KeygenResult:
    """Make a fresh secret, sign its public record, store both; optionally a portable key file.

    An existing ``out_file`` is refused unless ``force`` (it is usually another key's only copy).
    """
    if out_file is not None:
        check_new_target(out_file, force=force, what="--out", may_replace_secret=True)
    store = Keystore.open(keystore, create=True)
    key = SecretKey.generate()
    record = key.public_record()
    path = store.add_key(key, record, passphrase, scrypt_n=scrypt_n)
    if out_file is not None:
        doc = seal_secret(key, record.fingerprint, passphrase, scrypt_n=scrypt_n)
        atomic_write_bytes(out_file, keyfile_bytes(record, doc), 0o600, overwrite=force)
    return KeygenResult(
        address(record.fingerprint), path, Path(keystore), bool(passphrase), out_file
    )


@dataclass(frozen=True)
class ImportResult:
    fingerprint: str  # sha256:<hex>
    path: Path  # the secret file in the keystore
    keystore: Path
    encrypted: bool
    already_present: bool  # the keystore held this key's secret already


def import_key(
    keystore: Path, key_file: Path, passphrase: PassphraseFn, *, scrypt_n: int = SCRYPT_N
) -> ImportResult:
    """Bring a portable owner key file (``keygen --out``, made on another machine) into a keystore.

    The file is verified (its public record's signature, and that its secret derives that public
    key, which needs the passphrase of an encrypted file); the secret is stored sealed again with
    the same passphrase, so an encrypted key stays encrypted.
    """
    pw = passphrase()
    key, record = load_keyfile(Path(key_file), lambda: pw)
    store = Keystore.open(keystore, create=True)
    fp = address(record.fingerprint)
    if record.fingerprint in store.secrets:
        return ImportResult(fp, store.secrets[record.fingerprint], Path(keystore), bool(pw), True)
    path = store.add_key(key, record, pw, scrypt_n=scrypt_n)
    return ImportResult(fp, path, Path(keystore), bool(pw), False)


@dataclass(frozen=True)
class KeyListing:
    keystore: Path
    entries: list[Entry]  # every stored object, verified, oldest first


def list_keystore(keystore: Path) -> KeyListing:
    """Every key, mark record and kit in ``keystore`` (each re-hashed, its signature checked)."""
    return KeyListing(Path(keystore), Keystore.open(keystore).entries())


@dataclass(frozen=True)
class ShownObject:
    address: str  # sha256:<hex>
    kind: str  # "key" | "mark" | another record type
    record: dict[str, Any]
    has_secret: bool


def show_object(keystore: Path, ref: str) -> ShownObject:
    store = Keystore.open(keystore)
    hexd = store.resolve(ref)
    obj = store.objects[hexd]
    kind_name = str(obj.get("type"))
    kind = {KEY_RECORD_TYPE: "key", MARK_RECORD_TYPE: "mark"}.get(kind_name, kind_name)
    return ShownObject(address(hexd), kind, obj, hexd in store.secrets)


@dataclass(frozen=True)
class PublicExport:
    address: str  # sha256:<hex> of ``data``
    record: dict[str, Any]  # the signed public record
    path: Path | None  # the file written (``--out``), or None
    data: bytes  # the record's canonical bytes: what is published


def export_public(
    keystore: Path, ref: str, out_file: Path | None = None, *, force: bool = False
) -> PublicExport:
    """The signed public record ``ref`` as canonical bytes, written to ``out_file`` when given.

    An existing ``out_file`` is refused unless ``force`` (checked before anything is read).
    """
    if out_file is not None:
        check_new_target(out_file, force=force, what="--out")
    store = Keystore.open(keystore)
    data = canonical_json(store.objects[store.resolve(ref)])
    if out_file is not None:
        atomic_write_bytes(out_file, data + b"\n", overwrite=force)
    return PublicExport(address(sha256_hex(data)), json.loads(data), out_file, data)


def is_key_file(ref: str) -> bool:
    p = Path(ref)
    return p.suffix in (".key", ".json") or (
        os.path.lexists(p) and stat.S_ISREG(os.lstat(p).st_mode)
    )


def load_secret_key(
    keystore: Path, ref: str, passphrase: PassphraseFn
) -> tuple[SecretKey, PublicKeyRecord]:
    """``--key`` resolution: an owner key file path, or a fingerprint (prefix) in the keystore."""
    if is_key_file(ref):
        return load_keyfile(Path(ref), passphrase)
    return Keystore.open(keystore).secret(ref, passphrase)
