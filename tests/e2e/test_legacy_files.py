"""Keys, records and kits made by an earlier version still load and verify (issue #13).

The files under tests/data/legacy/v0.1.0 were written by radmark at commit 32cb40f, before the
package was reorganised; they must keep working in every later version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.keys.carriers import carriers_digest, derive_carriers
from radmark.keys.sealing import load_keyfile
from radmark.keys.store import Keystore
from tests.factories import make_marker, make_shards

LEGACY = Path(__file__).parents[1] / "data" / "legacy" / "v0.1.0"


@pytest.fixture()
def legacy(tmp_path: Path) -> dict[str, object]:
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root)
    for p in root.rglob("*"):  # git keeps no 0600: restore what radmark wrote
        if p.is_dir():
            p.chmod(0o700)
        elif p.suffix in (".secret", ".key", ".safetensors"):
            p.chmod(0o600)
    made = json.loads((root / "made-by-32cb40f.json").read_text())
    return {"root": root, **made}


def test_legacy_keystore_opens_and_lists(legacy: dict[str, object]) -> None:
    root = legacy["root"]
    store = Keystore.open(root / "keys")
    rec = store.mark_record(str(legacy["record"]))
    assert rec.method == "radioactive" and rec.num_classes == 10 and rec.dim == 128
    assert rec.selection_digest == "sha256"  # made before the keyed digest (issue #12)
    key, pub = store.secret(rec.fingerprint, lambda: None)
    rec.check_carriers(carriers_digest(derive_carriers(key.carrier_seed(), 128, 10, rec.marker.id)))
    assert [k.address for k in store.kit_records()] == [str(legacy["kit"]).removeprefix("sha256:")]
    file_key, file_pub = load_keyfile(root / "owner.key", lambda: None)
    assert file_pub.fingerprint == pub.fingerprint and file_key.matches(pub)
    res = CliRunner().invoke(app, ["keys", "list", "--keystore", str(root / "keys"), "--json"])
    assert res.exit_code == 0, res.output
    kinds = sorted(e["kind"] for e in json.loads(res.stdout)["entries"])
    assert kinds == ["key", "kit", "mark"]


def test_legacy_encrypted_secret_unlocks(legacy: dict[str, object]) -> None:
    store = Keystore.open(legacy["root"] / "keys-encrypted")
    ((fp, _path),) = store.secrets.items()
    key, pub = store.secret(fp, lambda: "legacy passphrase")
    assert key.matches(pub)


def test_legacy_record_and_kit_verify(legacy: dict[str, object], tmp_path: Path) -> None:
    root = legacy["root"]
    make_shards(tmp_path / "probe", n=300, per_shard=300, offset=2100, with_json=False)
    suspect = make_marker(tmp_path / "suspect.safetensors", seed=5)
    args = [
        "verify", str(suspect), "--keystore", str(root / "keys"), "--key", str(legacy["record"]),
        "--marker", str(root / "marker.safetensors"), "--probe", str(tmp_path / "probe"),
        "--black-box", "--json", "--device", "cpu",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    res = CliRunner().invoke(app, args, env={**os.environ, **env})
    assert res.exit_code in (0, 1), res.output
    (r,) = json.loads(res.stdout)["results"]
    assert r["record"] == legacy["record"]
    assert set(r["tests"]) >= {"white_box_fisher", "pullback_fisher", "black_box_rank"}
    assert r["black_box"]["slots"] == 4 and len(r["black_box"]["ranks"]) == 10
