from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from radmark.canonical import address, canonical_json
from radmark.errors import IntegrityError, KeystoreError, RadmarkError
from radmark.keys.keypair import PublicKeyRecord, SecretKey, selection_digest, shard_digest_key
from radmark.keys.manage import generate_key, load_secret_key
from radmark.keys.sealing import load_keyfile
from radmark.keys.store import Keystore

VECTORS = json.loads((Path(__file__).parents[2] / "keys" / "test-vectors.json").read_text())
FAST_N = 2**10  # scrypt cost for tests; production uses 2**15


def test_pinned_public_record_and_fingerprint() -> None:
    key = SecretKey(bytes.fromhex(VECTORS["secret_hex"]))
    rec = key.public_record(created=VECTORS["created"])
    assert rec.signed == VECTORS["public_record"]
    assert address(rec.fingerprint) == VECTORS["fingerprint"]
    assert PublicKeyRecord.from_signed(VECTORS["public_record"]).fingerprint == rec.fingerprint


def test_secret_never_in_repr() -> None:
    key = SecretKey.generate()
    assert key.secret_bytes().hex() not in repr(key) and "redacted" in repr(key)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(key)


def test_selection_digest_is_pinned_keyed_and_per_shard() -> None:
    """The record's digest of a shard's marked keys (issue #12): HMAC under HKDF(secret,
    'radmark/v1/selection-digest') then the output shard's hash. Pinned, so a record made today
    can be opened by every later version."""
    key = SecretKey(bytes.fromhex(VECTORS["secret_hex"]))
    dk = key.selection_digest_key()
    assert dk.hex() == "d11cd3dc0216a59f25efed71e13f9df8922c864abd140412cd85dc30aa95485e"
    out, keys = "0" * 64, ["00000001", "00000007"]
    d = selection_digest(dk, out, "data-000000.tar", keys)
    assert d == "b01fdc31bf9a8990aa5f866ac95169e8cf6f88d273c701a53ca2da96e149dde8"
    others = {
        selection_digest(SecretKey.generate().selection_digest_key(), out, "data-000000.tar", keys),
        selection_digest(dk, "1" * 64, "data-000000.tar", keys),  # another output shard
        selection_digest(dk, out, "data-000001.tar", keys),
        selection_digest(dk, out, "data-000000.tar", keys[::-1]),
        selection_digest(dk, out, "data-000000.tar", ["00000001\n00000007"]),  # no join collision
    }
    assert d not in others and len(others) == 5
    assert dk not in (key.selection_seed(), key.carrier_seed(), key.decoy_seed())
    assert shard_digest_key(dk, out) != dk


def test_record_tampering_and_foreign_signatures_refused() -> None:
    a, b = SecretKey.generate(), SecretKey.generate()
    ra, rb = a.public_record(), b.public_record()
    tampered = {**ra.signed, "created": "1999-01-01T00:00:00Z"}
    with pytest.raises(IntegrityError):
        PublicKeyRecord.from_signed(tampered)
    swapped = {**ra.signed, "signature": rb.signed["signature"]}
    with pytest.raises(IntegrityError):
        PublicKeyRecord.from_signed(swapped)
    other_key = {**ra.signed, "public_key": rb.signed["public_key"]}
    with pytest.raises(IntegrityError):
        PublicKeyRecord.from_signed(other_key)


def test_round_trip_plain_and_encrypted(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    plain = generate_key(ks, passphrase=None, scrypt_n=FAST_N)
    enc = generate_key(ks, passphrase="correct horse", scrypt_n=FAST_N)
    store = Keystore.open(ks)
    k1, r1 = store.secret(plain.fingerprint, lambda: None)
    assert address(r1.fingerprint) == plain.fingerprint
    k2, r2 = store.secret(enc.fingerprint[:14], lambda: "correct horse")
    assert k2.matches(r2)
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        store.secret(enc.fingerprint, lambda: "wrong")
    with pytest.raises(KeystoreError, match="passphrase-protected"):
        store.secret(enc.fingerprint, lambda: None)
    # the encrypted file holds no plaintext secret
    assert k2.secret_bytes() not in enc.path.read_bytes()
    assert b'"secret":' not in enc.path.read_bytes()


def test_secret_files_are_created_0600(tmp_path: Path) -> None:
    old = os.umask(0o000)  # even a permissive umask must not widen them
    try:
        res = generate_key(
            tmp_path / "ks", passphrase=None, out_file=tmp_path / "owner.key", scrypt_n=FAST_N
        )
    finally:
        os.umask(old)
    assert res.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "owner.key").stat().st_mode & 0o777 == 0o600
    key, rec = load_keyfile(tmp_path / "owner.key", lambda: None)
    assert address(rec.fingerprint) == res.fingerprint


def test_world_readable_secret_refused(tmp_path: Path) -> None:
    res = generate_key(tmp_path / "ks", passphrase=None, scrypt_n=FAST_N)
    res.path.chmod(0o644)
    with pytest.raises(KeystoreError, match="too open"):
        Keystore.open(tmp_path / "ks")


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_any_flipped_byte_is_refused(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    generate_key(ks, passphrase="pw", scrypt_n=FAST_N)
    generate_key(ks, passphrase=None, scrypt_n=FAST_N)
    files = _all_files(ks)
    assert len(files) == 4
    for f in files:
        original = f.read_bytes()
        for pos in (0, len(original) // 2, len(original) - 1):
            data = bytearray(original)
            data[pos] ^= 0x01
            f.write_bytes(bytes(data))
            with pytest.raises(RadmarkError):
                Keystore.open(ks)
        f.write_bytes(original)
    Keystore.open(ks)  # restored: fine again


def test_symlinked_keystore_refused(tmp_path: Path) -> None:
    generate_key(tmp_path / "real", passphrase=None, scrypt_n=FAST_N)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(KeystoreError, match="symbolic link"):
        Keystore.open(tmp_path / "link")


def test_prefixes_and_key_files(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    res = generate_key(ks, passphrase=None, out_file=tmp_path / "o.key", scrypt_n=FAST_N)
    hexd = res.fingerprint.removeprefix("sha256:")
    for ref in (res.fingerprint, hexd, hexd[:8], "SHA256:" + hexd[:10]):
        _, rec = load_secret_key(ks, ref, lambda: None)
        assert rec.fingerprint == hexd
    _, rec = load_secret_key(ks, str(tmp_path / "o.key"), lambda: None)
    assert rec.fingerprint == hexd
    with pytest.raises(RadmarkError):
        load_secret_key(ks, "zz", lambda: None)
    with pytest.raises(KeystoreError, match="no key"):
        load_secret_key(ks, "0000000", lambda: None)
    # a truncated key file
    data = (tmp_path / "o.key").read_bytes()
    (tmp_path / "t.key").write_bytes(data[: len(data) // 2])
    (tmp_path / "t.key").chmod(0o600)
    with pytest.raises(IntegrityError):
        load_keyfile(tmp_path / "t.key", lambda: None)


def test_objects_are_canonical_and_content_addressed(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    res = generate_key(ks, passphrase=None, scrypt_n=FAST_N)
    hexd = res.fingerprint.removeprefix("sha256:")
    obj = ks / "objects" / hexd[:2] / f"{hexd}.json"
    # same JSON, non-canonical whitespace: the hash no longer matches, refused
    pretty = json.dumps(json.loads(obj.read_bytes()), indent=1).encode()
    assert pretty != canonical_json(json.loads(obj.read_bytes()))
    obj.write_bytes(pretty)
    with pytest.raises(IntegrityError):
        Keystore.open(ks)


def test_mark_record_signed_by_another_key_refused(tmp_path: Path) -> None:
    """A record that names key A but carries key B's signature is refused at open."""
    from radmark.keys.records import MARK_RECORD_TYPE

    ks = tmp_path / "ks"
    a = generate_key(ks, passphrase=None, scrypt_n=FAST_N)
    store = Keystore.open(ks)
    fp_a = a.fingerprint.removeprefix("sha256:")
    other = SecretKey.generate()
    body = {"type": MARK_RECORD_TYPE, "format_version": 1, "key": fp_a, "created": "x"}
    store.put(other.sign(body))
    with pytest.raises(IntegrityError, match="signature"):
        Keystore.open(ks)


# --------------------------------------------------------------------------------------------
# issue #12: directories, links and unauthenticated KDF parameters


def _store_with_kit(tmp_path: Path) -> Path:
    ks = tmp_path / "ks"
    generate_key(ks, passphrase=None, scrypt_n=FAST_N)
    Keystore.open(ks).put_kit(b"kit bytes")
    return ks


@pytest.mark.parametrize(
    ("sub", "mode", "fix"),
    [
        ("", 0o755, "chmod 700"),  # the root: readable by others lists every key and record
        ("", 0o770, "chmod 700"),
        ("secrets", 0o755, "chmod 700"),
        ("kits", 0o750, "chmod 700"),
        ("objects", 0o775, "chmod go-w"),  # public records, but nobody else may plant one
    ],
)
def test_keystore_directories_open_to_others_are_refused_with_the_chmod(
    tmp_path: Path, sub: str, mode: int, fix: str
) -> None:
    ks = _store_with_kit(tmp_path)
    d = ks / sub if sub else ks
    d.chmod(mode)
    with pytest.raises(KeystoreError, match=f"too open.*run: {fix} {d}"):
        Keystore.open(ks)
    d.chmod(0o700)
    Keystore.open(ks)


def test_objects_world_readable_is_fine(tmp_path: Path) -> None:
    ks = _store_with_kit(tmp_path)
    (ks / "objects").chmod(0o755)
    Keystore.open(ks)


def test_a_permissive_umask_still_makes_an_openable_keystore(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        ks = _store_with_kit(tmp_path)
    finally:
        os.umask(old)
    for d in [ks, *(p for p in ks.rglob("*") if p.is_dir())]:
        assert not d.stat().st_mode & 0o022, d
    Keystore.open(ks)


@pytest.mark.parametrize("which", ["objects", "objects/xx", "secrets", "kits", "kits/xx"])
def test_symlinked_directories_inside_the_keystore_are_refused(tmp_path: Path, which: str) -> None:
    ks = _store_with_kit(tmp_path)
    top = which.split("/")[0]
    sub = next(p for p in (ks / top).iterdir()) if which.endswith("/xx") else ks / top
    real = tmp_path / "elsewhere"
    sub.rename(real)
    sub.symlink_to(real)
    with pytest.raises(KeystoreError, match="symbolic link"):
        Keystore.open(ks)


def _edit_secret(path: Path, **changes: int) -> Path:
    """Edit the scrypt parameters of an encrypted secret and rename it to its new hash."""
    from radmark.canonical import sha256_hex

    doc = json.loads(path.read_bytes())
    doc["encryption"].update(changes)
    data = canonical_json(doc)
    fp = path.name.split(".")[0]
    new = path.with_name(f"{fp}.{sha256_hex(data)}.secret")
    path.unlink()
    new.write_bytes(data)
    new.chmod(0o600)
    return new


@pytest.mark.parametrize(
    "changes",
    [
        {"n": 2**40},
        {"n": 2**62},
        {"n": 2**21},
        {"n": 3000},
        {"p": 2**20},
        {"p": 17},
        {"r": 2**10},
        {"n": 0},
        {"n": True},
        {"p": "1"},
    ],  # fmt: skip
)
def test_edited_scrypt_parameters_are_refused_before_use(
    tmp_path: Path, changes: dict[str, int]
) -> None:
    """Before issue #12: n = 2^40 was a MemoryError, n = 2^62 a panic and p = 2^20 a hang."""
    import time

    ks = tmp_path / "ks"
    res = generate_key(ks, passphrase="pw", scrypt_n=FAST_N)
    _edit_secret(res.path, **changes)
    store = Keystore.open(ks)  # the file is well-formed and content-addressed: it opens
    t0 = time.perf_counter()
    with pytest.raises(IntegrityError, match="scrypt parameters"):
        store.secret(res.fingerprint, lambda: "pw")
    assert time.perf_counter() - t0 < 2.0


def test_edited_scrypt_parameters_in_a_key_file_are_refused(tmp_path: Path) -> None:
    from radmark.keys.sealing import keyfile_bytes

    ks = tmp_path / "ks"
    res = generate_key(ks, passphrase="pw", out_file=tmp_path / "o.key", scrypt_n=FAST_N)
    doc = json.loads((tmp_path / "o.key").read_bytes())
    doc["secret"]["encryption"]["p"] = 2**20
    pub = PublicKeyRecord.from_signed(doc["public_record"])
    (tmp_path / "o.key").write_bytes(keyfile_bytes(pub, doc["secret"]))
    with pytest.raises(IntegrityError, match="scrypt parameters"):
        load_keyfile(tmp_path / "o.key", lambda: "pw")
    assert res.fingerprint == address(pub.fingerprint)


@pytest.mark.parametrize("where", ["key file", "secret"])
@pytest.mark.parametrize("version", [2, 99, "1", None, True])
def test_unknown_format_versions_are_refused(tmp_path: Path, where: str, version: object) -> None:
    """A key file or secret of a version this radmark does not know is refused, not guessed at
    (before issue #12's fuzz found it, format_version 99 imported with exit 0)."""
    res = generate_key(tmp_path / "ks", passphrase=None, out_file=tmp_path / "o.key")
    doc = json.loads((tmp_path / "o.key").read_bytes())
    target = doc if where == "key file" else doc["secret"]
    if version is None:
        del target["format_version"]
    else:
        target["format_version"] = version
    (tmp_path / "o.key").write_bytes(canonical_json(doc))
    with pytest.raises(IntegrityError, match="format version"):
        load_keyfile(tmp_path / "o.key", lambda: None)
    assert res.fingerprint
