"""docs/benchmarks.md's section for the GPU run (``make bench-gpu``, ``bench/gpu.py``).

Read from the latest ``gpu-*.json`` result file (not the smoke ones), stage by stage, so a
skipped or failed stage shows as such rather than vanishing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .map_report import _f, _table

#: the issue-#14 targets this run speaks to
THROUGHPUT_TARGET = 0.90


def latest_gpu(folder: Path) -> dict[str, Any] | None:
    files = sorted(p for p in folder.glob("gpu-*.json") if not p.name.startswith("gpu-smoke"))
    if not files:
        return None
    run: dict[str, Any] = json.loads(files[-1].read_text())
    run["_file"] = files[-1].name
    return run


def _by_prefix(stages: dict[str, Any], prefix: str) -> list[tuple[str, dict[str, Any]]]:
    return [(k[len(prefix) :], v) for k, v in stages.items() if k.startswith(prefix)]


def _suspect_row(name: str, s: dict[str, Any]) -> list[str]:
    if "skipped" in s or "error" in s:
        return [f"`{name}`", s.get("skipped") or s.get("error", "failed"), *["–"] * 5]
    return [f"`{name}`", s.get("arch", "?"), str(s.get("epochs")), _f(s.get("train_acc_running"), 3),
            _f(s.get("test_acc"), 3), _f(s.get("gap"), 3), _f(s.get("seconds"), 1)]  # fmt: skip


def _verify_row(name: str, v: dict[str, Any], tests: list[str]) -> list[str]:
    suspect, _, key = name.partition(".vs.")
    t = v.get("tests") or {}
    return [f"`{suspect}`", f"`{key}`", *[_f(t.get(n)) for n in tests], _f(v.get("log10_p"))]


def section(run: dict[str, Any]) -> list[str]:
    st = run["stages"]
    env = st.get("environment", {})
    sc = run.get("scale", {})
    lines = [
        "## The GPU run (`make bench-gpu`)",
        "",
        f"File `bench/results/{run['_file']}`: {env.get('gpu', '?')}, torch {env.get('torch')}, "
        f"{env.get('cpus')} CPUs; {_f(run.get('elapsed_s'), 0)} s for the script (budget "
        f"{_f(sc.get('budget_s'), 0)} s; machine start-up and wheel install not included). "
        f"Fashion-MNIST, all 60,000 training images; marker {sc.get('marker_arch')} (small "
        f"stem) for {sc.get('marker_epochs')} epochs; suspects from scratch for "
        f"{sc.get('suspect_epochs')} epochs, the cross-architecture one a {sc.get('cross_arch')}; "
        "default presets.",
        "",
    ]
    marker = st.get("fmnist.marker", {})
    rows = [_suspect_row("marker", marker)] if marker else []
    rows += [_suspect_row(n, s) for n, s in _by_prefix(st, "fmnist.suspect.")]
    lines += _table(["model", "arch", "epochs", "train acc", "test acc", "gap", "seconds"], rows)
    marks = _by_prefix(st, "fmnist.mark.") + [("glyphs " + n, m)
                                              for n, m in _by_prefix(st, "glyphs.mark.")]  # fmt: skip
    lines += _table(
        ["marking run", "marked", "seconds", "image-steps/s", "PSNR mean / min"],
        [[f"`{n}`", str(m.get("marked")), _f(m.get("seconds"), 1), _f(m.get("image_steps_per_s"), 0),
          f"{_f(m.get('psnr_mean'), 1)} / {_f(m.get('psnr_min'), 1)}"] for n, m in marks],
    )  # fmt: skip
    ver = _by_prefix(st, "fmnist.verify.")
    tests = list(dict.fromkeys(t for _n, v in ver for t in (v.get("tests") or {})))
    lines += ["log10 p of each suspect against each key (`control` = trained on clean data):", ""]
    lines += _table(
        ["suspect", "key", *tests, "combined"], [_verify_row(n, v, tests) for n, v in ver]
    )
    g = [(n, st[f"glyphs.{n}"]) for n in ("q1", "control") if f"glyphs.{n}" in st]
    if g:
        gd = st.get("glyphs.data", {})
        lines += [
            f"Glyphs, C = {gd.get('classes')}, {gd.get('train')} training images, q = 1%:",
            "",
        ]
        lines += _table(
            ["suspect", "test acc", "white box", "combined", "alignment R²"],
            [[n, _f((r.get("suspect") or {}).get("test_acc"), 3),
              _f(((r.get("verify") or {}).get("tests") or {}).get("white_box_fisher")),
              _f((r.get("verify") or {}).get("log10_p")), _f((r.get("verify") or {}).get("alignment_r2"), 3)]
             for n, r in g],
        )  # fmt: skip
    rad, roof = st.get("throughput.radmark") or {}, st.get("throughput.roofline") or {}
    if "images_per_s_90_steps" not in rad or "bound_img_per_s_90steps" not in roof:
        why = roof.get("skipped") or rad.get("skipped") or roof.get("error") or "no stage"
        lines += [f"Marking throughput against the roofline: not measured ({why}).", ""]
    else:
        frac = rad["images_per_s_90_steps"] / roof["bound_img_per_s_90steps"]
        lines += [
            f"Marking throughput, 224 px ResNet-18, 90 steps, batch {rad.get('batch')}, "
            f"{rad.get('dtype')}: radmark {_f(rad['images_per_s_90_steps'], 1)} images/s "
            f"(NCHW {_f(rad['nchw']['images_per_s_90_steps'], 1)}, channels-last "
            f"{_f(rad['channels_last']['images_per_s_90_steps'], 1)}); the same run's bound "
            f"(`mark_roofline.py`, bf16 channels-last with torch.compile) "
            f"{_f(roof['bound_img_per_s_90steps'], 1)} images/s, without compile "
            f"{_f(roof.get('bf16_cl_img_per_s_90steps'), 1)}: **{_f(100 * frac, 0)}% of the "
            f"bound** (target ≥ {THROUGHPUT_TARGET:.0%}: "
            f"{'met' if frac >= THROUGHPUT_TARGET else 'not met'}).",
            "",
        ]
    return lines
