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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radmark.canonical import (
    address,
    canonical_json,
    sha256_hex,
    strip_address,
)
from radmark.errors import IntegrityError, KeystoreError, UsageError
from radmark.fsutil import atomic_write_bytes, read_regular_file
from radmark.keys.keypair import KEY_RECORD_TYPE, PublicKeyRecord, SecretKey, verify_body
from radmark.keys.records import (
    KIT_RECORD_TYPE,
    MARK_RECORD_TYPE,
    KitRecord,
    MarkRecord,
    check_schema,
)
from radmark.keys.sealing import (
    SCRYPT_N,
    PassphraseFn,
    check_private,
    load_keyfile,
    open_secret,
    parse_canonical,
    seal_secret,
)

MAX_KIT_BYTES = 8 << 30
__all__ = ["Entry", "Keystore", "PassphraseFn", "load_keyfile"]


def default_keystore() -> Path:
    return Path(os.environ.get("RADMARK_KEYSTORE", "keys"))


# ---------------------------------------------------------------- directories


def _check_dir(path: Path, *, private: bool) -> None:
    """A keystore directory: a real directory (never a symlink), not writable by others, and for
    the root, ``secrets/`` and ``kits/`` not readable by others either (issue #12).

    A directory others can write lets them plant or swap objects and secrets; one they can read
    lists which keys and records exist. The message says which ``chmod`` to run, as for files.
    """
    try:
        st = path.lstat()
    except OSError as exc:
        raise KeystoreError(f"keystore {path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode):
        raise KeystoreError(f"keystore {path} is a symbolic link; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError(f"keystore {path}: expected a directory")
    bad = st.st_mode & (0o077 if private else 0o022)
    if bad:
        fix = "700" if private else "go-w"
        raise KeystoreError(
            f"permissions {oct(st.st_mode & 0o777)} for keystore directory {path} are too open "
            f"({'readable or writable' if private else 'writable'} by others); run: chmod {fix} "
            f"{path}"
        )


def _files(directory: Path, *, private: bool) -> list[Path]:
    """The files of ``directory/<xx>/``, each ``<xx>`` checked like the directory above it."""
    out: list[Path] = []
    for sub in sorted(directory.iterdir()):
        if sub.name.startswith("."):
            continue  # a temp file or directory from an interrupted write
        _check_dir(sub, private=private)
        out.extend(sorted(sub.iterdir()))
    return out


# ---------------------------------------------------------------- records


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
        _check_dir(root, private=True)
        for sub, private in (("objects", False), ("secrets", True), ("kits", True)):
            if os.path.lexists(root / sub):
                _check_dir(root / sub, private=private)
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
            for path in _files(objdir, private=False):
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
                raw[hexd] = parse_canonical(data, str(path))
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
            where = str(self._object_path(hexd))
            verify_body(keys[signer].public_key, obj, where)
            check_schema(obj, hexd, keys[signer], where)  # authentic first, then well-formed
        self.objects = raw
        secdir = self.root / "secrets"
        if secdir.is_dir():
            for path in sorted(secdir.iterdir()):
                if path.name.startswith("."):
                    continue
                parts = path.name.split(".")
                if len(parts) != 3 or parts[2] != "secret":
                    raise IntegrityError(f"{path}: unexpected file in the keystore")
                check_private(path)
                data = read_regular_file(path)
                if sha256_hex(data) != parts[1]:
                    raise IntegrityError(
                        f"{path}: content does not match its address (tampered or corrupt)"
                    )
                doc = parse_canonical(data, str(path))
                if doc.get("fingerprint") != parts[0] or parts[0] not in keys:
                    raise IntegrityError(f"{path}: secret for an unknown key")
                self.secrets[parts[0]] = path
        kitdir = self.root / "kits"
        if kitdir.is_dir():  # names and permissions now; kits are large, hashed when loaded
            for path in _files(kitdir, private=True):
                if path.name.startswith("."):
                    continue
                hexd = path.name.removesuffix(".safetensors")
                if path.parent.name != hexd[:2] or path.suffix != ".safetensors":
                    raise IntegrityError(f"{path}: unexpected file in the keystore")
                check_private(path)

    # ----------------------------------------------------------- writing
    def put(self, signed: dict[str, Any]) -> str:
        """Store a signed object; return its hex address. Idempotent."""
        data = canonical_json(signed)
        hexd = sha256_hex(data)
        path = self._object_path(hexd)
        if not path.exists():
            for d in (path.parent.parent, path.parent):  # 0755 whatever the umask (_check_dir)
                d.mkdir(mode=0o755, exist_ok=True)
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
        check_private(path)
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
        return MarkRecord.from_signed(obj, hexd, self.key_record(obj["key"]))

    def mark_records(self, key_fingerprint: str | None = None) -> list[MarkRecord]:
        out = []
        for hexd, obj in sorted(
            self.objects.items(), key=lambda kv: (str(kv[1].get("created")), kv[0])
        ):
            if obj.get("type") == MARK_RECORD_TYPE and key_fingerprint in (None, obj.get("key")):
                out.append(MarkRecord.from_signed(obj, hexd, self.key_record(obj["key"])))
        return out

    def kit_records(self) -> list[KitRecord]:
        """Every kit record in the store (verified and schema-checked on open), oldest first."""
        return sorted(
            (
                KitRecord.from_signed(obj, hexd)
                for hexd, obj in self.objects.items()
                if obj.get("type") == KIT_RECORD_TYPE
            ),
            key=lambda k: (k.created, k.address),
        )

    def secret(self, ref: str, passphrase: PassphraseFn) -> tuple[SecretKey, PublicKeyRecord]:
        record = self.key_record(ref)
        path = self.secrets.get(record.fingerprint)
        if path is None:
            raise KeystoreError(
                f"keystore {self.root} has only the public part of key {address(record.fingerprint)}"
            )
        doc = parse_canonical(read_regular_file(path), str(path))
        return open_secret(doc, record, passphrase, str(path)), record

    def entries(self) -> list[Entry]:
        """One summary per stored object, oldest first (for ``radmark keys list``)."""
        out = []
        for hexd, obj in sorted(
            self.objects.items(), key=lambda kv: (str(kv[1].get("created")), kv[0])
        ):
            t = obj.get("type")
            if t == KEY_RECORD_TYPE:
                summary = {"created": obj.get("created"), "secret": hexd in self.secrets}
                out.append(Entry("key", hexd, summary))
            elif t == MARK_RECORD_TYPE:
                rec = self.mark_record(hexd)
                summary = {"created": rec.created, "key": rec.fingerprint, "images": rec.marked,
                           "method": rec.method}  # fmt: skip
                out.append(Entry("mark", hexd, summary))
            elif t == KIT_RECORD_TYPE:
                kit = KitRecord.from_signed(obj, hexd)
                summary = {"created": kit.created, "key": kit.key_fingerprint,
                           "mark_record": kit.mark_record}  # fmt: skip
                out.append(Entry("kit", hexd, summary))
            else:
                summary = {"created": obj.get("created"), "key": obj.get("key")}
                out.append(Entry(str(t).removeprefix("radmark."), hexd, summary))
        return out
