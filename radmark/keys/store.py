"""The content-addressed keystore.

Layout (root defaults to ``./keys``)::

    objects/<h[:2]>/<h>.json        public key records, mark records, kit records;
                                    h = SHA-256 of the bytes
    secrets/<fingerprint>.<h>.secret  a key's secret (0600, optionally passphrase-encrypted);
                                      h = SHA-256 of the file's own bytes
    kits/<h[:2]>/<h>.safetensors    verification kits (0600: they hold images marked with the
                                    true carriers); h = SHA-256 of the bytes, checked on load

Every object's name is derived from its own hash, and every open of the store re-hashes every
object, checks it is canonical JSON and verifies its signature (objects are a few KB, so a full
check costs milliseconds and a flipped byte anywhere is refused before anything is used).
Secrets are encrypted with scrypt + ChaCha20-Poly1305 when a passphrase is given; the AEAD's
associated data binds the ciphertext to its fingerprint.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from radmark.canonical import (
    address,
    b64decode,
    b64encode,
    canonical_json,
    sha256_hex,
    strip_address,
)
from radmark.errors import InputError, IntegrityError, KeystoreError, UsageError
from radmark.fsutil import atomic_write_bytes, read_regular_file
from radmark.keys.keypair import KEY_RECORD_TYPE, PublicKeyRecord, SecretKey, verify_body

SECRET_TYPE = "radmark.secret"
KEYFILE_TYPE = "radmark.keyfile"
MARK_RECORD_TYPE = "radmark.mark"
KIT_RECORD_TYPE = "radmark.kit"
MAX_KIT_BYTES = 8 << 30
SCRYPT_N = 2**15
PassphraseFn = Callable[[], "str | None"]


def default_keystore() -> Path:
    return Path(os.environ.get("RADMARK_KEYSTORE", "keys"))


# ---------------------------------------------------------------- secret documents


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def seal_secret(
    key: SecretKey, fingerprint: str, passphrase: str | None, *, scrypt_n: int = SCRYPT_N
) -> dict[str, Any]:
    """The secret as a JSON document: plain (rely on 0600) or scrypt + ChaCha20-Poly1305."""
    doc: dict[str, Any] = {"type": SECRET_TYPE, "format_version": 1, "fingerprint": fingerprint}
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
            k = _scrypt(pw, b64decode(enc["salt"]), int(enc["n"]), int(enc["r"]), int(enc["p"]))
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


def _parse_canonical(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where}: not valid JSON (corrupt)") from exc
    if not isinstance(obj, dict) or canonical_json(obj) != data:
        raise IntegrityError(f"{where}: not in canonical form (altered)")
    return obj


def _check_private(path: Path) -> None:
    """A secret-bearing file (key secret, kit) must be a regular file readable by its owner only."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeystoreError(
            f"permissions {oct(st.st_mode & 0o777)} for {path} are too open; run: chmod 600 {path}"
        )


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class MarkRecord:
    """A verified mark record: built only after its signature checked against its key."""

    signed: dict[str, Any]
    address: str  # hex SHA-256 of the canonical bytes
    key: PublicKeyRecord

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint


@dataclass
class Entry:
    kind: str  # "key" | "mark" | other type names
    address: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Keystore:
    """A verified view of a keystore directory. Use :meth:`open`."""

    root: Path
    objects: dict[str, dict[str, Any]]  # hex -> parsed object (already verified)
    secrets: dict[str, Path]  # fingerprint -> secret file

    # ----------------------------------------------------------- opening and checking
    @classmethod
    def open(cls, root: Path | None = None, *, create: bool = False) -> Keystore:
        root = Path(root) if root is not None else default_keystore()
        if root.is_symlink():
            raise KeystoreError(f"keystore {root} is a symbolic link; refusing to follow it")
        if not root.exists():
            if not create:
                raise KeystoreError(
                    f"no keystore at {root} (run `radmark keygen` or pass --keystore)"
                )
            root.mkdir(parents=True, mode=0o700)
        elif not root.is_dir():
            raise KeystoreError(f"keystore {root} is not a directory")
        for sub in ("objects", "secrets", "kits"):
            p = root / sub
            if p.is_symlink():
                raise KeystoreError(f"keystore {p} is a symbolic link; refusing to follow it")
        store = cls(root=root, objects={}, secrets={})
        store._check_all()
        return store

    def _object_path(self, hexd: str) -> Path:
        return self.root / "objects" / hexd[:2] / f"{hexd}.json"

    def _kit_path(self, hexd: str) -> Path:
        return self.root / "kits" / hexd[:2] / f"{hexd}.safetensors"

    def _check_all(self) -> None:
        raw: dict[str, dict[str, Any]] = {}
        objdir = self.root / "objects"
        if objdir.is_dir():
            for path in sorted(objdir.glob("*/*")):
                if path.name.startswith("."):
                    continue  # a temp file from an interrupted write
                hexd = path.name.removesuffix(".json")
                if path.parent.name != hexd[:2] or path.suffix != ".json":
                    raise IntegrityError(f"{path}: unexpected file in the keystore")
                data = read_regular_file(path)
                if sha256_hex(data) != hexd:
                    raise IntegrityError(
                        f"{path}: content does not match its address (tampered or corrupt)"
                    )
                raw[hexd] = _parse_canonical(data, str(path))
        keys: dict[str, PublicKeyRecord] = {}
        for hexd, obj in raw.items():
            if obj.get("type") == KEY_RECORD_TYPE:
                keys[hexd] = PublicKeyRecord.from_signed(obj, str(self._object_path(hexd)))
        for hexd, obj in raw.items():
            if obj.get("type") == KEY_RECORD_TYPE:
                continue
            signer = obj.get("key")
            if signer not in keys:
                raise IntegrityError(
                    f"{self._object_path(hexd)}: signed by key {signer!r}, which is not in the keystore"
                )
            verify_body(keys[signer].public_key, obj, str(self._object_path(hexd)))
        self.objects = raw
        secdir = self.root / "secrets"
        if secdir.is_dir():
            for path in sorted(secdir.iterdir()):
                if path.name.startswith("."):
                    continue
                parts = path.name.split(".")
                if len(parts) != 3 or parts[2] != "secret":
                    raise IntegrityError(f"{path}: unexpected file in the keystore")
                _check_private(path)
                data = read_regular_file(path)
                if sha256_hex(data) != parts[1]:
                    raise IntegrityError(
                        f"{path}: content does not match its address (tampered or corrupt)"
                    )
                doc = _parse_canonical(data, str(path))
                if doc.get("fingerprint") != parts[0] or parts[0] not in keys:
                    raise IntegrityError(f"{path}: secret for an unknown key")
                self.secrets[parts[0]] = path
        kitdir = self.root / "kits"
        if kitdir.is_dir():  # names and permissions now; kits are large, hashed when loaded
            for path in sorted(kitdir.glob("*/*")):
                if path.name.startswith("."):
                    continue
                hexd = path.name.removesuffix(".safetensors")
                if path.parent.name != hexd[:2] or path.suffix != ".safetensors":
                    raise IntegrityError(f"{path}: unexpected file in the keystore")
                _check_private(path)

    # ----------------------------------------------------------- writing
    def put(self, signed: dict[str, Any]) -> str:
        """Store a signed object; return its hex address. Idempotent."""
        data = canonical_json(signed)
        hexd = sha256_hex(data)
        path = self._object_path(hexd)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data, 0o644)
        self.objects[hexd] = json.loads(data)
        return hexd

    def add_key(
        self,
        key: SecretKey,
        record: PublicKeyRecord,
        passphrase: str | None,
        *,
        scrypt_n: int = SCRYPT_N,
    ) -> Path:
        hexd = self.put(record.signed)
        assert hexd == record.fingerprint
        doc = seal_secret(key, record.fingerprint, passphrase, scrypt_n=scrypt_n)
        data = canonical_json(doc)
        secdir = self.root / "secrets"
        secdir.mkdir(mode=0o700, exist_ok=True)
        path = secdir / f"{record.fingerprint}.{sha256_hex(data)}.secret"
        atomic_write_bytes(path, data, 0o600)
        self.secrets[record.fingerprint] = path
        return path

    def put_kit(self, data: bytes) -> str:
        """Store a verification kit (0600, content-addressed); return its hex address."""
        hexd = sha256_hex(data)
        path = self._kit_path(hexd)
        if not path.exists():
            for d in (path.parent.parent, path.parent):
                d.mkdir(mode=0o700, exist_ok=True)
            atomic_write_bytes(path, data, 0o600)
        return hexd

    def read_kit(self, hexd: str) -> bytes:
        """A kit's bytes, refused unless they hash to ``hexd`` (tampered or corrupt)."""
        path = self._kit_path(strip_address(hexd))
        if not path.exists():
            raise KeystoreError(f"keystore {self.root} is missing kit {address(hexd)[:19]}")
        _check_private(path)
        data = read_regular_file(path, max_bytes=MAX_KIT_BYTES)
        if sha256_hex(data) != strip_address(hexd):
            raise IntegrityError(
                f"{path}: content does not match its address (tampered or corrupt)"
            )
        return data

    # ----------------------------------------------------------- reading
    def resolve(self, ref: str, kind: str | None = None) -> str:
        """Unique hex address for a fingerprint/address or a prefix of one (>= 4 hex chars)."""
        prefix = strip_address(ref)
        if len(prefix) < 4 or any(ch not in "0123456789abcdef" for ch in prefix):
            raise UsageError(
                f"{ref!r} is not a fingerprint or address (hex, at least 4 characters)"
            )
        hits = [
            h
            for h, o in self.objects.items()
            if h.startswith(prefix) and (kind is None or o.get("type") == kind)
        ]
        what = {
            KEY_RECORD_TYPE: "key",
            MARK_RECORD_TYPE: "mark record",
            KIT_RECORD_TYPE: "kit record",
        }.get(kind or "", "object")
        if not hits:
            raise KeystoreError(f"no {what} matching {ref!r} in keystore {self.root}")
        if len(hits) > 1:
            raise KeystoreError(
                f"{ref!r} is ambiguous in keystore {self.root}: give more characters"
            )
        return hits[0]

    def key_record(self, ref: str) -> PublicKeyRecord:
        hexd = self.resolve(ref, KEY_RECORD_TYPE)
        return PublicKeyRecord.from_signed(self.objects[hexd], str(self._object_path(hexd)))

    def mark_record(self, ref: str) -> MarkRecord:
        hexd = self.resolve(ref, MARK_RECORD_TYPE)
        obj = self.objects[hexd]
        return MarkRecord(signed=obj, address=hexd, key=self.key_record(obj["key"]))

    def mark_records(self, key_fingerprint: str | None = None) -> list[MarkRecord]:
        out = []
        for hexd, obj in sorted(
            self.objects.items(), key=lambda kv: (str(kv[1].get("created")), kv[0])
        ):
            if obj.get("type") == MARK_RECORD_TYPE and key_fingerprint in (None, obj.get("key")):
                out.append(MarkRecord(signed=obj, address=hexd, key=self.key_record(obj["key"])))
        return out

    def secret(self, ref: str, passphrase: PassphraseFn) -> tuple[SecretKey, PublicKeyRecord]:
        record = self.key_record(ref)
        path = self.secrets.get(record.fingerprint)
        if path is None:
            raise KeystoreError(
                f"keystore {self.root} has only the public part of key {address(record.fingerprint)}"
            )
        doc = _parse_canonical(read_regular_file(path), str(path))
        return open_secret(doc, record, passphrase, str(path)), record

    def entries(self) -> list[Entry]:
        out = []
        for hexd, obj in sorted(
            self.objects.items(), key=lambda kv: (str(kv[1].get("created")), kv[0])
        ):
            t = obj.get("type", "?")
            if t == KEY_RECORD_TYPE:
                out.append(
                    Entry(
                        "key", hexd, {"created": obj.get("created"), "secret": hexd in self.secrets}
                    )
                )
            elif t == MARK_RECORD_TYPE:
                out.append(
                    Entry(
                        "mark",
                        hexd,
                        {
                            "created": obj.get("created"),
                            "key": obj.get("key"),
                            "images": obj.get("counts", {}).get("marked"),
                        },
                    )
                )
            else:
                out.append(
                    Entry(
                        str(t).removeprefix("radmark."),
                        hexd,
                        {"created": obj.get("created"), "key": obj.get("key")},
                    )
                )
        return out


# ---------------------------------------------------------------- portable key files


def keyfile_bytes(record: PublicKeyRecord, secret_doc: dict[str, Any]) -> bytes:
    return canonical_json(
        {
            "type": KEYFILE_TYPE,
            "format_version": 1,
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
    doc = _parse_canonical(data, str(path))
    if doc.get("type") != KEYFILE_TYPE or not isinstance(doc.get("secret"), dict):
        raise IntegrityError(f"{path}: not a radmark key file")
    record = PublicKeyRecord.from_signed(doc.get("public_record"), str(path))
    return open_secret(doc["secret"], record, passphrase, str(path)), record
