"""``radmark mark --method twins`` + ``radmark verify`` through the real CLI (issue #15).

The twin candidates are kept privately in the keystore per shard (so a resumed run keeps what it
finished), the record commits to them, and verify runs the twin rank test with no probe or kit.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

from typer.testing import CliRunner

from radmark.cli import app
from radmark.keys.store import Keystore
from radmark.marking.twins import twin_kits
from tests.factories import make_key, make_marker, make_shards


def test_twins_mark_and_verify(tmp_path: Path) -> None:
    make_shards(tmp_path / "in", n=24, per_shard=8)
    marker = make_marker(tmp_path / "m.safetensors")
    make_key(tmp_path / "ks", tmp_path / "owner.key")
    base = ["--keystore", str(tmp_path / "ks"), "--device", "cpu"]
    r = CliRunner().invoke(app, ["mark", str(tmp_path / "in"), "--key", str(tmp_path / "owner.key"),
                                 "--out", str(tmp_path / "out"), "--marker", str(marker),
                                 "--method", "twins", "--fraction", "0.5", "--steps", "2",
                                 "--json", *base])  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["method"] == "twins" and doc["marked"] > 0 and doc["psnr_min"] >= 42.0
    rec = Keystore.open(tmp_path / "ks").mark_record(doc["record"])
    kits = twin_kits(rec)
    assert rec.method == "twins" and rec.carriers_sha256 is None and 1 <= len(kits) <= 3
    # one kit a shard that has a marked image: with a random key and 8 images a shard, a shard may
    # hold none (CI saw 2 kits once)
    for addr in kits:  # private: 0600, content-addressed, never in --out
        path = next((tmp_path / "ks" / "kits").rglob(f"{addr}.safetensors"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "data-000000.tar", "data-000001.tar", "data-000002.tar"]  # fmt: skip
    v = CliRunner().invoke(app, ["verify", str(marker), "--key", doc["record"], "--json", *base])
    assert v.exit_code in (0, 1), v.output
    out = json.loads(v.stdout)
    (res,) = out["results"]
    assert set(res["tests"]) == {"twin_rank"} and res["method"] == "twins"
    extra = res["tests"]["twin_rank"]["extra"]  # the win rate, measured, over the marked images
    assert extra["images"] == doc["marked"] and 0.0 <= extra["win_rate"] <= 1.0
    rich = CliRunner().invoke(app, ["verify", str(marker), "--key", doc["record"], *base],
                              env={"COLUMNS": "250"})  # fmt: skip
    assert rich.exit_code in (0, 1) and "win rate" in rich.stdout, rich.output
    # 10 classes, but no class-row test ran: the white-box low-power warning would mislead
    assert not any("white-box" in w for w in out["warnings"]), out["warnings"]
    assert res["log10_p"] <= 0


def test_a_decoy_kit_for_twins_is_refused_before_any_work(tmp_path: Path) -> None:
    """The twins method has no decoy kit (``decoy_kit = None`` at the method seam): ``--kit-probe``
    is refused by the option check, before a shard or a record is written (it used to mark the
    whole dataset and sign a record first)."""
    make_shards(tmp_path / "in", n=8, per_shard=8)
    marker = make_marker(tmp_path / "m.safetensors")
    make_key(tmp_path / "ks", tmp_path / "owner.key")
    before = sorted(p.relative_to(tmp_path / "ks") for p in (tmp_path / "ks").rglob("*"))
    r = CliRunner().invoke(app, ["mark", str(tmp_path / "in"), "--key", str(tmp_path / "owner.key"),
                                 "--out", str(tmp_path / "out"), "--marker", str(marker),
                                 "--method", "twins", "--steps", "2", "--kit-probe",
                                 str(tmp_path / "in"), "--keystore", str(tmp_path / "ks"),
                                 "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert "--kit-probe" in line and "'twins'" in line and "no decoy kit" in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert sorted(p.relative_to(tmp_path / "ks") for p in (tmp_path / "ks").rglob("*")) == before
    assert Keystore.open(tmp_path / "ks").mark_records() == []
