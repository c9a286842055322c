"""Tests for bench.map (the power map) and the suspect trainer it drives.

The smoke configuration runs every stage at tiny sizes (Fashion-MNIST from tests/data, synthetic
glyph masters: no fonts, no Debian package), with all four training regimes; running it twice
checks resumability (the second run recomputes nothing), and a unit left without its
``result.json`` (a killed attempt) is the only one redone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import map as bmap
from bench import map_report, report
from bench.train_suspect import fit
from radmark.models.registry import build_model
from radmark.models.training import random_crop, train_classifier


def test_fit_with_flip_is_train_classifier_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 1, 12, 12), dtype=np.uint8)
    y = rng.integers(0, 3, 64)
    m1, mean, std, acc1, _ = train_classifier(
        x, y, arch="smallcnn", num_classes=3, epochs=2, batch_size=16, seed=5
    )
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    m2 = build_model("smallcnn", 3, small_stem=False, in_chans=1)
    acc2 = fit(m2, x, y, mean=torch.tensor(mean), std=torch.tensor(std), epochs=2,
               batch_size=16, lr=0.05, gen=gen, device="cpu", aug="crop+flip")  # fmt: skip
    assert acc1 == acc2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_crop_only_never_mirrors() -> None:
    # an asymmetric image: with pad 0 the crop is the identity, so any change would be a flip
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(random_crop(x, gen, flip=False, pad=0), x)
    flipped = any(
        not torch.equal(random_crop(x, gen, flip=True, pad=0), x) for _ in range(20)
    )  # the control: with flip some draws mirror
    assert flipped


def test_plan_keys_follow_the_configuration() -> None:
    """A changed setting recomputes exactly what depends on it."""
    cfg = copy.deepcopy(bmap.SMOKE)
    a = bmap.build_plan(cfg)
    glyph = next(b for b in cfg["blocks"] if b["variant"] == "glyphs-tiny")
    glyph["regimes"]["finetune"] = 2  # the glyph fine-tune epochs
    b = bmap.build_plan(cfg)
    changed = {u for u in a.units if a.units[u].key != b.units[u].key}
    assert changed
    assert all("glyphs-tiny.finetune" in u for u in changed), changed
    assert {u.split("/")[0] for u in changed} == {"suspect", "verify"}
    # method is a cell field: a block's second method adds cells and marking runs, keeps the
    # others (a block without "methods" has the configuration's first)
    cfg2 = copy.deepcopy(bmap.SMOKE)
    next(b for b in cfg2["blocks"] if b["variant"] == "glyphs-tiny")["methods"] = [
        "radioactive", "twins"]  # fmt: skip
    c = bmap.build_plan(cfg2)
    assert {x.key for x in a.units.values()} <= {x.key for x in c.units.values()}
    added = set(c.units) - set(a.units)
    assert added and all("glyphs-tiny" in u and "twins" in u for u in added), added
    assert any(u.startswith("marking/") and ".twins." in u for u in added)
    assert any(cell.method == "twins" and cell.variant == "glyphs-tiny" for cell in c.cells)


def test_map_config_has_the_headline_cells_at_full_scale() -> None:
    plan = bmap.build_plan(copy.deepcopy(bmap.MAP))
    names = {c.name for c in plan.cells}
    for s in (0, 1):
        for q in ("q1", "q10"):
            assert f"fmnist-60k/scratch/radioactive/{q}/s{s}" in names
        assert f"glyphs1000-60k/scratch/radioactive/q1/s{s}" in names
        for q in ("q1", "q10"):  # twin marks on the cells issue #15 names
            assert f"fmnist-60k/scratch/twins/{q}/s{s}" in names
    assert {"fmnist-20k/cross/twins/q10/s0", "fmnist-20k/finetune/twins/q10/s0"} <= names
    regimes = {c.regime for c in plan.cells}
    assert regimes == {"scratch", "cross", "finetune", "probe"}
    for c in plan.cells:  # the reduced scale is at least 20k training images
        assert bmap.variant_train_images(plan.config, c.variant) >= 20_000
    assert {bmap.variant_classes(plan.config, c.variant) for c in plan.cells} == {10, 100, 1000}


@pytest.mark.slow
def test_smoke_map_runs_every_stage_and_resumes(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "results"
    args = ["--smoke", "--work", str(work), "--out", str(out), "--no-docs"]
    assert bmap.main(args) == 0
    files = sorted(out.glob("smoke-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["complete"] and res["units_done"] == res["units_total"]
    assert {c["regime"] for c in res["cells"]} == {"scratch", "probe", "cross", "finetune"}
    for c in res["cells"]:
        s = c["suspect"]
        assert 0.0 <= s["train_accuracy"] <= 1.0 and 0.0 <= s["test_accuracy"] <= 1.0
        assert s["train_test_gap"] == pytest.approx(s["train_accuracy"] - s["test_accuracy"])
        assert c["verify"], c["name"]
        for v in c["verify"].values():
            if c["method"] == "twins":  # its own test only: no carriers in a twins record
                assert set(v["tests"]) == {"twin_rank"}
                assert 0.0 <= v["test_extra"]["twin_rank"]["win_rate"] <= 1.0
            else:
                assert {"white_box_fisher", "pullback_fisher"} <= set(v["tests"])
            assert v["exit_code"] in (0, 1)
    assert {c["method"] for c in res["cells"]} == {"radioactive", "twins"}
    twins = [m for k, m in res["markings"].items() if ".twins." in k]
    assert twins and all(m["image_steps_per_marked"] == 4 for m in twins)  # 2 candidates x 2 steps
    kit_cells = [
        c for c in res["cells"] if c["variant"] == "fmnist-tiny" and c["method"] != "twins"
    ]
    assert all("black_box_rank" in v["tests"] for c in kit_cells for v in c["verify"].values())
    assert res["null"] and all(n["keys"] == 50 for n in res["null"].values())
    assert any("pullback_fisher[80 keys]" in n["tests"] for n in res["null"].values())
    for d in res["data"].values():
        assert len(d["train_sha256"]) == 64
    assert res["stages"]["suspects"]["units"] == 7  # the twins control shares its suspect

    # resumability: the second run recomputes nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("result.json")}
    assert bmap.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("result.json")} == stamps
    sessions = [json.loads(x) for x in (work / "sessions.jsonl").read_text().splitlines()]
    assert sessions[-1]["ran"] == 0 and not sessions[-1]["failed"]

    # a killed unit (its directory without result.json) is redone, and only it
    plan = bmap.build_plan(copy.deepcopy(bmap.SMOKE))
    victim = next(u for u in plan.units.values() if u.kind == "null")
    (victim.dir(work) / "result.json").unlink()
    (victim.dir(work) / "partial").write_text("left by a killed run")
    assert bmap.main([*args, "--stage", "null"]) == 0
    sessions = [json.loads(x) for x in (work / "sessions.jsonl").read_text().splitlines()]
    assert sessions[-1]["ran"] == 1
    assert not (victim.dir(work) / "partial").exists()

    # the report: docs from the result file, the map's tables and its plot
    doc, img = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "img"
    report.build(out, doc, img)
    text = doc.read_text()
    assert "## The power map" in text and "### Null calibration" in text
    assert "fmnist-tiny/probe/radioactive/q10/s0" in text
    assert "### Twin marks" in text and "`fmnist-tiny/scratch/twins/q10/s0`" in text
    assert (img / "map-log10p.png").stat().st_size > 0
    assert map_report.latest_map(out) is not None


def test_a_unit_computed_by_a_live_process_is_left_alone(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "unit"
    out.mkdir()
    assert not bmap.busy_elsewhere(out)  # no pid file: a partial attempt, redone
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / bmap.PID_FILE).write_text(f"{p.pid}\n")
        assert bmap.busy_elsewhere(out)
        (out / "result.json").write_text("{}")
        assert not bmap.busy_elsewhere(out)  # done
        (out / "result.json").unlink()
    finally:
        p.kill()
        p.wait()
    assert not bmap.busy_elsewhere(out)  # its process is gone: redone from scratch
