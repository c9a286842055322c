"""README's limits quote the power map: every number there is read back from the result file it
names, so the README cannot claim what the map did not measure (issue #14 / #16)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

#: (cell, key's q, test or "combined", the text README shows)
CLAIMS = [
    ("fmnist-60k/scratch/radioactive/q1/s0", "q1", "combined", "−1.78"),
    ("fmnist-60k/scratch/radioactive/q1/s1", "q1", "combined", "−0.38"),
    ("fmnist-60k/scratch/radioactive/q10/s0", "q10", "combined", "0.00"),
    ("fmnist-60k/scratch/radioactive/q10/s1", "q10", "combined", "−2.17"),
    ("fmnist-60k/scratch/radioactive/q0/s0", "q1", "combined", "−1.31"),
    ("glyphs10-20k/scratch/radioactive/q10/s0", "q10", "combined", "−0.50"),
    ("glyphs100-20k/scratch/radioactive/q10/s0", "q10", "combined", "−1.30"),
    ("glyphs1000-60k/scratch/radioactive/q1/s0", "q1", "combined", "−0.43"),
    ("glyphs1000-60k/scratch/radioactive/q1/s1", "q1", "combined", "−0.48"),
    ("glyphs1000-20k/probe/radioactive/q10/s0", "q10", "combined", "−11.1"),
    ("glyphs1000-20k/probe/radioactive/q10/s0", "q10", "white_box_fisher", "−2.1"),
    ("glyphs1000-20k/probe/radioactive/q1/s0", "q1", "combined", "−1.5"),
    ("glyphs1000-20k/probe/radioactive/q0/s0", "q1", "combined", "−1.2"),
    ("glyphs1000-20k/finetune/radioactive/q10/s0", "q10", "combined", "−1.16"),
    ("glyphs1000-20k/finetune/radioactive/q1/s0", "q1", "combined", "−1.52"),
    ("glyphs1000-20k/finetune/radioactive/q0/s0", "q1", "combined", "−1.41"),
    ("fmnist-20k/cross/radioactive/q10/s0", "q10", "combined", "−0.71"),
    ("fmnist-20k/scratch/radioactive/q100/s0", "q100", "combined", "−5.08"),
    ("fmnist-20k/finetune/radioactive/q10/s0", "q10", "combined", "0.00"),
    ("fmnist-20k/finetune/radioactive/q100/s0", "q100", "combined", "−2.44"),
    ("fmnist-60k/scratch/twins/q10/s0", "q10", "combined", "−0.58"),
    ("fmnist-60k/scratch/twins/q10/s1", "q10", "combined", "−0.04"),
    ("fmnist-20k/cross/twins/q10/s0", "q10", "combined", "−0.44"),
    ("fmnist-20k/finetune/twins/q10/s0", "q10", "combined", "−0.13"),
    ("fmnist-20k/scratch/twins/q100/s0", "q100", "combined", "−0.54"),
]

#: (cell, key's q, win rate as README shows it in percent, images)
WIN_RATES = [
    ("fmnist-60k/scratch/twins/q10/s0", "q10", "50.4%", "5,903"),
    ("fmnist-60k/scratch/twins/q10/s1", "q10", "49.1%", "6,039"),
    ("fmnist-60k/scratch/twins/q0/s0", "q10", "50.3%", None),
    ("fmnist-20k/scratch/twins/q100/s0", "q100", "50.2%", "20,000"),
]


def _readme_and_cells() -> tuple[str, dict[str, Any]]:
    """README's text and the cells of the one map result file it names, by cell name."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (name,) = set(re.findall(r"bench/results/(map-\d{8}T\d{6}Z\.json)", readme))
    run = json.loads((REPO / "bench" / "results" / name).read_text(encoding="utf-8"))
    cells = {c["name"]: c for c in run["cells"]}
    return readme, cells


def test_readme_map_numbers_are_the_result_files() -> None:
    readme, cells = _readme_and_cells()
    for cell, q, test, shown in CLAIMS:
        v = cells[cell]["verify"][q]
        value = v["log10_p"] if test == "combined" else v["tests"][test]
        decimals = len(shown.split(".")[1])
        assert f"{value:.{decimals}f}".replace("-", "−") in (shown, shown.replace("−", "")), (
            cell, test, value)  # fmt: skip
        assert shown in readme, shown


def test_readme_twin_win_rates_are_the_result_files() -> None:
    readme, cells = _readme_and_cells()
    for cell, q, shown, images in WIN_RATES:
        extra = cells[cell]["verify"][q]["test_extra"]["twin_rank"]
        assert f"{100 * extra['win_rate']:.1f}%" == shown and shown in readme, (cell, extra)
        if images is not None:
            assert f"{int(extra['images']):,}" == images and images in readme, (cell, extra)


#: (stage of the GPU result file, README's text of its combined log10 p)
GPU_CLAIMS = [
    ("fmnist.verify.radioactive-q1.vs.radioactive-q1", "−0.22"),
    ("fmnist.verify.radioactive-q10.vs.radioactive-q10", "−1.45"),
    ("fmnist.verify.radioactive-q10-slimresnet.vs.radioactive-q10", "−1.68"),
    ("fmnist.verify.control.vs.radioactive-q10", "0.00"),
]


def test_readme_gpu_numbers_are_the_result_file() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (name,) = set(re.findall(r"bench/results/(gpu-\d{8}T\d{6}Z\.json)", readme))
    stages = json.loads((REPO / "bench" / "results" / name).read_text(encoding="utf-8"))["stages"]
    for stage, shown in GPU_CLAIMS:
        assert f"{stages[stage]['log10_p']:.2f}".replace("-", "−") == shown and shown in readme
    for key, shown in (("q1", "−1.55"), ("control", "−0.19")):
        assert f"{stages[f'glyphs.{key}']['verify']['log10_p']:.2f}".replace("-", "−") == shown
        assert shown in readme
