from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from radmark.cli import app

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})


def _keygen(ks: Path, *extra: str, env=None) -> dict:
    res = run("keygen", "--keystore", str(ks), "--json", *extra, env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_keygen_json_fields_and_exit_code(tmp_path: Path) -> None:
    out = _keygen(tmp_path / "ks", "--no-passphrase")
    assert out["schema_version"] == 1
    assert out["fingerprint"].startswith("sha256:") and len(out["fingerprint"]) == 71
    assert Path(out["path"]).exists()
    assert os.stat(out["path"]).st_mode & 0o777 == 0o600


def test_keygen_with_env_passphrase_and_key_file(tmp_path: Path) -> None:
    out = _keygen(
        tmp_path / "ks",
        "--passphrase",
        "--out",
        str(tmp_path / "owner.key"),
        env={"RADMARK_PASSPHRASE": "s3cret"},
    )
    assert out["encrypted"] is True
    assert (tmp_path / "owner.key").stat().st_mode & 0o777 == 0o600
    res = run("keygen", "--keystore", str(tmp_path / "ks"), "--passphrase")
    assert res.exit_code == 2 and "RADMARK_PASSPHRASE" in res.stderr


def test_keys_list_show_export(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    fp = _keygen(ks, "--no-passphrase")["fingerprint"]
    res = run("keys", "list", "--keystore", str(ks), "--json")
    assert res.exit_code == 0, res.output
    entries = json.loads(res.stdout)["entries"]
    assert [e["address"] for e in entries] == [fp] and entries[0]["kind"] == "key"
    res = run("keys", "show", fp[:15], "--keystore", str(ks), "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["address"] == fp and shown["has_secret"] is True
    assert shown["record"]["type"] == "radmark.key"
    res = run("keys", "show", fp, "--keystore", str(ks))
    assert res.exit_code == 0 and fp in res.stdout
    res = run("keys", "export-public", fp[7:20], "--keystore", str(ks))
    assert res.exit_code == 0, res.output
    exported = json.loads(res.stdout)
    assert exported["public_key"] == shown["record"]["public_key"]
    secret_file = Path(
        json.loads(
            run("keygen", "--keystore", str(tmp_path / "k2"), "--json", "--no-passphrase").stdout
        )["path"]
    )
    assert "secret" not in exported and secret_file.name not in res.stdout


def test_flipped_byte_exit_2_one_line(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    fp = _keygen(ks, "--no-passphrase")["fingerprint"]
    for f in sorted(p for p in ks.rglob("*") if p.is_file()):
        original = f.read_bytes()
        data = bytearray(original)
        data[len(data) // 3] ^= 0x20
        f.write_bytes(bytes(data))
        res = run("keys", "show", fp, "--keystore", str(ks))
        assert res.exit_code == 2, (f, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("radmark: error:"), res.stderr
        assert "Traceback" not in res.output
        f.write_bytes(original)
    assert run("keys", "show", fp, "--keystore", str(ks)).exit_code == 0


def test_unknown_and_ambiguous_refs_exit_2(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    _keygen(ks, "--no-passphrase")
    res = run("keys", "show", "ffffffffff", "--keystore", str(ks))
    assert res.exit_code == 2 and "no object matching" in res.stderr
    res = run("keys", "show", "xyz", "--keystore", str(ks))
    assert res.exit_code == 2
    res = run("keys", "list", "--keystore", str(tmp_path / "missing"))
    assert res.exit_code == 2 and "no keystore" in res.stderr


def test_keystore_from_environment(tmp_path: Path) -> None:
    ks = tmp_path / "envks"
    res = run("keygen", "--no-passphrase", "--json", env={"RADMARK_KEYSTORE": str(ks)})
    assert res.exit_code == 0, res.output
    assert (ks / "objects").is_dir()


def test_version_and_help() -> None:
    assert run("--version").exit_code == 0
    res = run("--help")
    assert res.exit_code == 0 and "keygen" in res.stdout


def test_keys_import_a_key_file_from_another_machine(tmp_path) -> None:
    """keys import: verified, stored 0600, usable for marking; idempotent; a tampered file is 2."""
    import json
    import os
    import stat

    from typer.testing import CliRunner

    from radmark.cli import app
    from radmark.keys.manage import generate_key
    from radmark.keys.store import Keystore

    made = generate_key(tmp_path / "elsewhere", passphrase=None, out_file=tmp_path / "owner.key",
                        scrypt_n=2**10)  # fmt: skip
    r = CliRunner().invoke(app, ["keys", "import", str(tmp_path / "owner.key"), "--keystore",
                                 str(tmp_path / "ks"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["fingerprint"] == made.fingerprint and not doc["already_present"]
    path = os.stat(doc["path"])
    assert stat.S_IMODE(path.st_mode) == 0o600
    store = Keystore.open(tmp_path / "ks")
    key, pub = store.secret(made.fingerprint, lambda: None)
    assert key.matches(pub)
    again = CliRunner().invoke(app, ["keys", "import", str(tmp_path / "owner.key"), "--keystore",
                                     str(tmp_path / "ks"), "--json"])  # fmt: skip
    assert again.exit_code == 0 and json.loads(again.stdout)["already_present"]
    bad = tmp_path / "bad.key"
    raw = bytearray((tmp_path / "owner.key").read_bytes())
    raw[len(raw) // 2] ^= 1
    bad.write_bytes(bytes(raw))
    bad.chmod(0o600)
    r = CliRunner().invoke(app, ["keys", "import", str(bad), "--keystore", str(tmp_path / "ks")])
    assert r.exit_code == 2 and "Traceback" not in r.output


# --------------------------------------------------------------------------------------------
# issue #12: never overwrite silently


def _one_line(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("radmark: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_export_public_never_replaces_the_owner_key_file(tmp_path: Path) -> None:
    """Before #12, ``export-public FP --out owner.key`` replaced the secret key file (0600 →
    0644)."""
    ks, key_file = tmp_path / "ks", tmp_path / "owner.key"
    fp = _keygen(ks, "--no-passphrase", "--out", str(key_file))["fingerprint"]
    secret = key_file.read_bytes()
    for extra in ([], ["--json"]):
        res = run("keys", "export-public", fp, "--keystore", str(ks), "--out", str(key_file),
                  *extra)  # fmt: skip
        _one_line(res, str(key_file), "already exists", "--force")
        if extra:
            assert json.loads(res.stdout)["error"]["kind"] == "TargetExistsError"
    assert key_file.read_bytes() == secret and key_file.stat().st_mode & 0o777 == 0o600
    # not even with --force: a public record never replaces a secret key (the audit found it did)
    res = run("keys", "export-public", fp, "--keystore", str(ks), "--out", str(key_file), "--force")
    _one_line(res, str(key_file), "holds a radmark secret key")
    assert key_file.read_bytes() == secret and key_file.stat().st_mode & 0o777 == 0o600
    # a new file is written, and --force replaces an existing one on purpose
    pub = tmp_path / "public.json"
    res = run("keys", "export-public", fp, "--keystore", str(ks), "--out", str(pub), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (
        doc["address"] == fp and doc["path"] == str(pub) and doc["record"]["type"] == "radmark.key"
    )
    assert json.loads(pub.read_bytes()) == doc["record"]
    pub.write_bytes(b"stale")
    res = run("keys", "export-public", fp, "--keystore", str(ks), "--out", str(pub), "--force")
    assert res.exit_code == 0, res.output
    assert json.loads(pub.read_bytes()) == doc["record"]


def test_keygen_out_never_replaces_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "owner.key"
    _keygen(tmp_path / "ks", "--no-passphrase", "--out", str(key_file))
    first = key_file.read_bytes()
    res = run("keygen", "--keystore", str(tmp_path / "ks"), "--no-passphrase", "--out",
              str(key_file))  # fmt: skip
    _one_line(res, "already exists", "--force")
    assert key_file.read_bytes() == first
    assert len(list((tmp_path / "ks" / "secrets").iterdir())) == 1  # refused before any key
    _keygen(tmp_path / "ks", "--no-passphrase", "--out", str(key_file), "--force")
    assert key_file.read_bytes() != first and key_file.stat().st_mode & 0o777 == 0o600


def test_keystore_open_to_others_is_refused_with_the_chmod(tmp_path: Path) -> None:
    ks = tmp_path / "ks"
    _keygen(ks, "--no-passphrase")
    ks.chmod(0o755)
    _one_line(run("keys", "list", "--keystore", str(ks)), f"run: chmod 700 {ks}")
    ks.chmod(0o700)
    (ks / "secrets").chmod(0o755)
    _one_line(run("keys", "list", "--keystore", str(ks)), f"run: chmod 700 {ks / 'secrets'}")


def test_json_documents_keep_their_field_names_and_order(tmp_path: Path) -> None:
    """Each keys command's JSON is derived from its result dataclass (``report/jsonout.py``) with
    the field names, order and values scripts read (shared/spec/cli.md)."""
    ks = tmp_path / "ks"
    doc = _keygen(ks, "--no-passphrase", "--out", str(tmp_path / "owner.key"))
    assert list(doc) == ["schema_version", "fingerprint", "path", "keystore", "encrypted",
                         "key_file"]  # fmt: skip
    assert doc["keystore"] == str(ks) and doc["key_file"] == str(tmp_path / "owner.key")
    assert doc["encrypted"] is False and doc["path"].startswith(str(ks))
    fp = doc["fingerprint"]
    (entry,) = json.loads(run("keys", "list", "--keystore", str(ks), "--json").stdout)["entries"]
    assert list(entry) == ["kind", "address", "created", "secret"]
    assert entry["kind"] == "key" and entry["address"] == fp and entry["secret"] is True
    shown = json.loads(run("keys", "show", fp, "--keystore", str(ks), "--json").stdout)
    assert list(shown) == ["schema_version", "address", "kind", "record", "has_secret"]
    assert shown["kind"] == "key" and shown["has_secret"] is True
    exported = json.loads(run("keys", "export-public", fp, "--keystore", str(ks), "--json").stdout)
    assert list(exported) == ["schema_version", "address", "record", "path"]
    assert exported["address"] == fp and exported["path"] is None
    assert exported["record"] == shown["record"]
    res = run("keys", "import", str(tmp_path / "owner.key"), "--keystore", str(ks), "--json")
    imported = json.loads(res.stdout)
    assert list(imported) == ["schema_version", "fingerprint", "path", "keystore", "encrypted",
                              "already_present"]  # fmt: skip
    assert imported["fingerprint"] == fp and imported["already_present"] is True
