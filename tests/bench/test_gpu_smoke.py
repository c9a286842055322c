"""The GPU benchmark's --smoke mode: the same script, tiny sizes, on the CPU (issue #14).

It must run every stage it will run on the GPU (data, marker, marking + kit, suspects, the
cross-architecture suspect, verification through the seam, the glyph cells) without a failed
stage, and write its result file, so that the one GPU run a session may get is not wasted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
DATA = REPO / "radmark" / "demo_data" / "fmnist-small.npz"

pytestmark = pytest.mark.slow


def test_gpu_script_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--data", str(DATA),
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = (tmp_path / "out").glob("gpu-smoke-*.json")
    doc = json.loads(result.read_text())
    stages = doc["stages"]
    assert not [k for k in stages if k.endswith(".failed")], {
        k: v for k, v in stages.items() if k.endswith(".failed")
    }
    for name in ("environment", "fmnist.marker", "fmnist.mark.radioactive-q5",
                 "fmnist.suspect.control", "fmnist.suspect.radioactive-q50-slimresnet",
                 "glyphs.marker", "glyphs.q1", "done"):  # fmt: skip
        assert name in stages, (name, sorted(stages))
    v = stages["fmnist.verify.radioactive-q50.vs.radioactive-q50"]
    assert {"white_box_fisher", "pullback_fisher", "black_box_rank"} <= set(v["tests"])
    assert v["log10_p"] <= 0
    # docs/benchmarks.md's GPU section renders from the same file
    from bench import gpu_report

    text = "\n".join(gpu_report.section({**doc, "_file": result.name}))
    assert "## The GPU run" in text and "`radioactive-q50-slimresnet`" in text
    assert "| `radioactive-q50` | `radioactive-q50` |" in text
