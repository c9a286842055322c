"""The verification plan end to end (issue #17): signed at marking, followed by default (its
tests, its kit, its probe), any deviation reported as exploratory in the JSON and on the console;
kits built once per record; several models tested together with Holm over models × keys."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.keys.plan import Plan
from radmark.keys.store import Keystore
from radmark.marking.kit import kit_records
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


# --- one shared world: what verify runs by default, kits, deviations, the console ----------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Shards, two clean probe sets, a marker, a keystore; record ``a`` of its own key, marked
    with the default plan and ``--plan-probe probe``, and a kit built for it afterwards (so not
    in its plan)."""
    root = tmp_path_factory.mktemp("plan-world")
    make_shards(root / "in", n=16, per_shard=16)
    make_shards(root / "probe", n=300, per_shard=300, offset=1000, with_json=False)
    make_shards(root / "probe2", n=300, per_shard=300, offset=2000, with_json=False)
    w: dict[str, Any] = {
        "root": root,
        "ks": root / "ks",
        "marker": make_marker(root / "m.safetensors"),
    }
    w["a"] = _mark(w, "a", "--plan-probe", str(root / "probe"))
    _kit(w, w["a"], "--decoys", "2", "--per-class", "1").check(0)
    return w


@dataclass
class _Res:
    code: int
    stdout: str
    stderr: str

    def check(self, *codes: int) -> _Res:
        assert self.code in codes, (self.code, self.stdout, self.stderr)
        return self


def _cli(*args: str) -> _Res:
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    return _Res(r.exit_code, r.stdout, r.stderr)


def _mark(w: dict[str, Any], name: str, *plan: str) -> str:
    """A mark record of ``in/`` with a fresh key of its own (so a carrier group of its own)."""
    fp = make_key(w["ks"])
    res = _cli("mark", w["root"] / "in", "--key", fp, "--keystore", w["ks"], "--out",
               w["root"] / f"out-{name}", "--marker", w["marker"], "--steps", "1", "--device",
               "cpu", "--json", *plan).check(0)  # fmt: skip
    return json.loads(res.stdout)["record"]


def _kit(w: dict[str, Any], record: str, *args: str) -> _Res:
    return _cli("kit", "build", record, "--probe", w["root"] / "probe", "--keystore", w["ks"],
                "--device", "cpu", "--json", *args)  # fmt: skip


def _check(w: dict[str, Any], record: str, *args: str, probe: str | None = "probe") -> dict:
    """``verify --json`` of the marker against one record: the one result."""
    extra = ["--probe", str(w["root"] / probe)] if probe else []
    res = _cli("verify", w["marker"], "--key", record, "--keystore", w["ks"], "--device", "cpu",
               "--json", *extra, *args).check(0, 1)  # fmt: skip
    doc = json.loads(res.stdout)
    (r,) = doc["results"]
    assert doc["preregistered"] is (not r["exploratory"])
    return r


def test_a_plan_followed_with_default_options(world: dict[str, Any]) -> None:
    r = _check(world, world["a"])
    assert r["plan"] == {"registered": True, "followed": True, "deviations": []}
    # the kit built after marking is not in the plan, so the default does not run it
    assert set(r["tests"]) == {"white_box_fisher", "white_box_zscore", "pullback_fisher"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--probe-limit", "250"], "probe-limit 250 instead of None"),
        (["--head", "fc"], "head fc instead of None"),
        (["--black-box"], "tests not in the plan: black_box_rank"),
        (["--probe", "PROBE2"], "another probe set than the one the plan pinned"),
        (["--alpha", "0.05"], "alpha 0.05 instead of 0.001"),
    ],
    ids=["probe-limit", "head", "black-box", "probe", "alpha"],
)
def test_each_deviation_is_flagged_through_the_cli(world: dict[str, Any], args: list[str],
                                                   needle: str) -> None:  # fmt: skip
    """Issue #17 item 2: every option that changes the answer, given on the command line, is
    named in the JSON and makes the result exploratory."""
    if args == ["--probe", "PROBE2"]:
        r = _check(world, world["a"], probe="probe2")
    else:
        r = _check(world, world["a"], *args)
    assert r["exploratory"] is True and r["plan"]["followed"] is False
    assert any(needle in d for d in r["plan"]["deviations"]), r["plan"]["deviations"]


def test_a_plan_of_one_test_is_followed_by_default(world: dict[str, Any]) -> None:
    """Before: the tests came from the options only, so a plan of `white_box_fisher` verified
    with defaults was exploratory ("tests not in the plan: pullback_fisher")."""
    rec = _mark(world, "one", "--plan-tests", "white_box_fisher", "--plan-probe",
                str(world["root"] / "probe"))  # fmt: skip
    r = _check(world, rec)
    assert r["plan"]["followed"] is True, r["plan"]
    assert set(r["tests"]) == {"white_box_fisher", "white_box_zscore"}
    more = _check(world, rec, "--pullback")  # set explicitly: the user's choice, a deviation
    assert "pullback_fisher" in more["tests"]
    assert more["plan"]["deviations"] == ["tests not in the plan: pullback_fisher"]


def test_a_planned_kit_test_runs_without_black_box_and_its_kit_is_built_once(
    world: dict[str, Any],
) -> None:
    """The plan names the kit test: verify uses the record's kit without --black-box; with no
    kit in the keystore it runs the rest and names the missing test. `kit build` refuses other
    parameters than the plan's and a second kit without --force."""
    rec = _mark(world, "kit", "--plan-tests", "white_box_fisher,pullback_fisher,black_box_rank",
                "--kit-decoys", "2", "--kit-per-class", "1",
                "--plan-probe", str(world["root"] / "probe"))  # fmt: skip
    plan = Plan.from_record(Keystore.open(world["ks"]).mark_record(rec).plan)
    assert plan.kit == {"decoys": 2, "per_class": 1}  # pinned although no kit was built yet
    r = _check(world, rec)
    assert set(r["tests"]) == {"white_box_fisher", "white_box_zscore", "pullback_fisher"}
    assert r["plan"]["deviations"] == [
        "planned tests not run: black_box_rank (no verification kit in the keystore)"
    ]
    other = _kit(world, rec, "--decoys", "3", "--per-class", "1", "--force").check(2)
    assert "planned a kit of 2 decoys and 1 images per class" in other.stderr
    _kit(world, rec, "--decoys", "2", "--per-class", "1").check(0)
    r = _check(world, rec)
    assert r["plan"]["followed"] is True, r["plan"]
    assert "black_box_rank" in r["tests"] and r["black_box"]["slots"] == 3
    again = _kit(world, rec, "--decoys", "2", "--per-class", "1").check(2)
    assert "has a verification kit already" in again.stderr and "--force" in again.stderr
    off = _check(world, rec, "--no-black-box")
    assert "black_box_rank" not in off["tests"]
    assert off["plan"]["deviations"] == ["planned tests not run: black_box_rank"]
    alone = _check(world, rec, probe=None)  # no probe: the kit test alone, still a verdict
    assert set(alone["tests"]) == {"black_box_rank"}
    assert alone["plan"]["deviations"] == [
        "planned tests not run: white_box_fisher, pullback_fisher"
    ]


def test_verify_uses_the_first_kit_even_after_another_is_forced(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kits are built once per record: a second kit (other decoys, so another true-slot draw)
    is refused without --force, and with it verification still uses the first."""
    rec = _mark(world, "first-kit")  # no kit test planned: kit build may choose its decoys
    _kit(world, rec, "--decoys", "2", "--per-class", "1").check(0)
    refused = _kit(world, rec, "--decoys", "3", "--per-class", "1").check(2)
    assert "has a verification kit already" in refused.stderr
    import radmark.keys.records as records

    monkeypatch.setattr(records, "utc_timestamp", lambda: "2099-01-01T00:00:00Z")  # newer
    _kit(world, rec, "--decoys", "3", "--per-class", "1", "--force").check(0)
    monkeypatch.undo()
    assert [
        k.decoys
        for k in kit_records(
            Keystore.open(world["ks"]), Keystore.open(world["ks"]).mark_record(rec)
        )
    ] == [2, 3]
    r = _check(world, rec, "--black-box", probe=None)
    assert r["black_box"]["slots"] == 3  # the first kit's 2 decoys + the true carrier


def _verdict_line(stdout: str) -> str:
    """The top panel's verdict row (not the tests table's "combined (verdict)")."""
    (line,) = [ln for ln in stdout.splitlines() if ln.lstrip("│ ").startswith("verdict ")]
    return line


def test_the_console_says_whether_the_verdict_was_pre_registered(world: dict[str, Any]) -> None:
    """The rich report off a terminal (CliRunner: not a TTY): the top verdict line says when the
    result is exploratory, and the per-key plan row names the deviations."""
    base = ["verify", world["marker"], "--key", world["a"], "--keystore", world["ks"],
            "--device", "cpu", "--probe", world["root"] / "probe"]  # fmt: skip
    followed = _cli(*base).check(0, 1)
    verdict = _verdict_line(followed.stdout)
    assert (
        "no mark detected" in verdict or "MARK DETECTED" in verdict
    ) and "exploratory" not in verdict
    assert "followed the plan signed at marking (pre-registered)" in followed.stdout
    shopped = _cli(*base, "--alpha", "0.05").check(0, 1)
    verdict = _verdict_line(shopped.stdout)
    assert verdict.rstrip(" │").endswith("(exploratory: not pre-registered)"), verdict
    assert "EXPLORATORY: deviates from the plan signed at marking: alpha 0.05" in " ".join(
        shopped.stdout.split()
    )
