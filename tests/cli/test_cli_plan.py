"""The verification plan end to end (issue #17): signed at marking, followed by default, any
deviation reported as exploratory; several models tested together with Holm over models × keys."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from radmark.cli import app
from radmark.keys.plan import Plan
from radmark.keys.store import Keystore
from tests.factories import make_key, make_marker, make_shards


def _world(tmp_path: Path, *extra: str) -> dict[str, object]:
    make_shards(tmp_path / "in", n=16, per_shard=16)
    make_shards(tmp_path / "probe", n=300, per_shard=300, offset=1000, with_json=False)
    marker = make_marker(tmp_path / "m.safetensors")
    make_key(tmp_path / "ks", tmp_path / "owner.key")
    r = CliRunner().invoke(app, ["mark", str(tmp_path / "in"), "--key", str(tmp_path / "owner.key"),
                                 "--keystore", str(tmp_path / "ks"), "--out", str(tmp_path / "out"),
                                 "--marker", str(marker), "--steps", "1", "--device", "cpu",
                                 "--json", *extra])  # fmt: skip
    assert r.exit_code == 0, r.output
    return {"marker": marker, "record": json.loads(r.stdout)["record"], "ks": tmp_path / "ks"}


def _verify(w: dict[str, object], tmp_path: Path, *args: str) -> dict:
    r = CliRunner().invoke(app, ["verify", *args, "--probe", str(tmp_path / "probe"), "--keystore",
                                 str(w["ks"]), "--device", "cpu", "--json"])  # fmt: skip
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.stdout)


def test_the_plan_is_signed_followed_and_deviations_flagged(tmp_path: Path) -> None:
    w = _world(tmp_path, "--plan-probe", str(tmp_path / "probe"), "--plan-alpha", "0.01")
    rec = Keystore.open(w["ks"]).mark_record(str(w["record"]))
    plan = Plan.from_record(rec.plan)
    assert plan.tests == ("white_box_fisher", "pullback_fisher") and plan.alpha == 0.01
    assert plan.probe_sha256 is not None
    doc = _verify(w, tmp_path, str(w["marker"]))
    (r,) = doc["results"]
    assert doc["alpha"] == 0.01 and doc["preregistered"] is True
    assert r["plan"] == {"registered": True, "followed": True, "deviations": []}
    assert r["exploratory"] is False
    dev = _verify(w, tmp_path, str(w["marker"]), "--alpha", "0.05", "--center")
    (r,) = dev["results"]
    assert dev["preregistered"] is False and r["exploratory"] is True
    assert any("alpha 0.05" in d for d in r["plan"]["deviations"])
    assert any("center True" in d for d in r["plan"]["deviations"])
    few = _verify(w, tmp_path, str(w["marker"]), "--no-pullback")
    assert any("planned tests not run: pullback_fisher" in d
               for d in few["results"][0]["plan"]["deviations"])  # fmt: skip


def test_holm_over_models_and_keys(tmp_path: Path) -> None:
    w = _world(tmp_path)
    other = make_marker(tmp_path / "other.safetensors", seed=3)
    doc = _verify(w, tmp_path, str(w["marker"]), str(other))
    assert [m["model"] for m in doc["models"]] == [str(w["marker"]), str(other)]
    assert doc["correction"] == "holm over 2 models x 1 keys"
    assert len(doc["results"]) == 2
    assert {r["model_sha256"] for r in doc["results"]} == {m["model_sha256"] for m in doc["models"]}
    for r in doc["results"]:  # Holm with two tests: the smaller p at least doubled
        assert r["log10_p_adjusted"] >= r["log10_p"]
    smallest = min(doc["results"], key=lambda r: r["log10_p"])
    assert smallest["log10_p_adjusted"] >= min(0.0, smallest["log10_p"] + 0.30102999)
