"""The power map's sections of ``docs/benchmarks.md``, from the latest ``bench/results/map-*.json``.

Called by ``bench/report.py`` (which keeps the quick/full run sections for the older result
files). Every number comes from the result file written by ``python -m bench.map``; tests are
read generically from each verify result, so a new marking method or detection test shows up
without a change here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

ALPHA_LOG10 = -3.0  # radmark verify's default --alpha 1e-3
#: the spec's targets for the map (shared/spec/benchmarks.md)
TARGETS = {"g1000_q1_white_box": -4.0, "fm_q10": -6.0, "fm_q1": -4.0, "cross_q10": -6.0}
REGIME_LABEL = {
    "scratch": "from scratch (smallcnn, = marker's arch)",
    "cross": "from scratch, other arch (slimresnet)",
    "finetune": "fine-tuned from the marker",
    "probe": "linear probe on the marker's features",
}


def _qs(run: dict[str, Any]) -> list[float]:
    return sorted({float(c["q"]) for c in run["cells"]})


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    v = float(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "−inf" if v < 0 else "inf"
    text = f"{v:.{nd}f}"
    if float(text) == 0.0:
        text = text.lstrip("-")
    return text.replace("-", "−")


def _pct(q: float) -> str:
    return f"{100 * q:g}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def latest_map(folder: Path) -> dict[str, Any] | None:
    """The newest map result file (by its write time) with schema radmark-bench-map-v1; a file
    of the full configuration ("map") wins over a smoke test's."""
    best = None
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("schema") != "radmark-bench-map-v1":
            continue
        data["_file"] = path.name
        rank = (data.get("config_name") == "map", data.get("written", ""))
        if best is None or rank >= (best.get("config_name") == "map", best.get("written", "")):
            best = data
    return best


def _cell_results(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """The verify results of a cell that ran (a control has one per key)."""
    return [v for v in cell["verify"].values() if v is not None]


def _own(cell: dict[str, Any]) -> dict[str, Any] | None:
    """A marked cell's result against its own key; a control's worst (lowest p) over its keys."""
    rs = _cell_results(cell)
    if not rs:
        return None
    if cell["q"] > 0:
        return rs[0]
    return min(rs, key=lambda r: r.get("log10_p") or 0.0)


def _rows(run: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variant, regime, method) in the configuration's variant order, then regime order."""
    out: list[tuple[str, str, str]] = []
    for c in run["cells"]:
        k = (c["variant"], c["regime"], c["method"])
        if k not in out:
            out.append(k)
    variants = list(run["config"]["variants"])
    regimes = list(REGIME_LABEL)
    methods = list(run["config"].get("methods", []))

    def order(k: tuple[str, str, str]) -> tuple[int, int, int]:
        v, r, m = k
        return (
            variants.index(v) if v in variants else len(variants),
            regimes.index(r) if r in regimes else len(regimes),
            methods.index(m) if m in methods else len(methods),
        )

    return sorted(out, key=order)


def _variant_label(run: dict[str, Any], variant: str) -> str:
    v = run["config"]["variants"][variant]
    name = "Fashion-MNIST" if v["source"] == "fmnist" else f"glyphs C = {v['classes']}"
    n = v.get("train") or 60_000
    return f"{name}, {n:,}"


def _fmt_cell(cells: list[dict[str, Any]], test: str | None = None) -> str:
    """'a / b' over seeds: combined log10 p (or one test's); bold when detected."""
    parts = []
    for c in sorted(cells, key=lambda c: c["seed"]):
        r = _own(c)
        if r is None:
            parts.append("…")
            continue
        v = r.get("log10_p") if test is None else (r.get("tests") or {}).get(test)
        s = _f(v)
        if test is None and r.get("detected"):
            s = f"**{s}**"
        parts.append(s)
    return " / ".join(parts) if parts else ""


def map_table(run: dict[str, Any], test: str | None = None) -> list[str]:
    qs = _qs(run)
    header = ["data (train images)", "regime", "method", *[f"q = {_pct(q)}" for q in qs]]
    rows = []
    for variant, regime, method in _rows(run):
        mine = [c for c in run["cells"] if (c["variant"], c["regime"], c["method"]) == (
            variant, regime, method)]  # fmt: skip
        if test is not None and not any(test in r.get("tests", {}) for c in mine
                                        for r in _cell_results(c)):  # fmt: skip
            continue  # a method without this test (twins have no white-box test)
        row = [_variant_label(run, variant), REGIME_LABEL.get(regime, regime), method]
        for q in qs:
            cells = [
                c
                for c in run["cells"]
                if (c["variant"], c["regime"], c["method"]) == (variant, regime, method)
                and abs(c["q"] - q) < 1e-9
            ]
            row.append(_fmt_cell(cells, test))
        rows.append(row)
    return _table(header, rows)


def test_names(run: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for c in run["cells"]:
        for r in _cell_results(c):
            names += [t for t in r.get("tests", {}) if t not in names]
    return names


def detail_rows(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tests = test_names(run)
    header = ["cell", "key", *tests, "combined", "detected", "R²", "train acc", "test acc",
              "gap", "epochs", "PSNR mean / min"]  # fmt: skip
    rows = []
    for c in run["cells"]:
        s = c.get("suspect") or {}
        mk = c.get("mark") or {}
        for key, r in c["verify"].items():
            if r is None:
                rows.append([f"`{c['name']}`", key, *["…"] * (len(header) - 2)])
                continue
            rows.append(
                [
                    f"`{c['name']}`",
                    key,
                    *[_f((r.get("tests") or {}).get(t)) for t in tests],
                    _f(r.get("log10_p")),
                    "yes" if r.get("detected") else "no",
                    _f(r.get("alignment_r2"), 3),
                    _f(s.get("train_accuracy"), 3),
                    _f(s.get("test_accuracy"), 3),
                    _f(s.get("train_test_gap"), 3),
                    str(s.get("epochs", "–")),
                    (f"{_f(mk.get('psnr_mean'), 1)} / {_f(mk.get('psnr_min'), 1)}" if mk else "–"),
                ]
            )
    return header, rows


def _cells(run: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    out = []
    for c in run["cells"]:
        if all(
            (abs(c[k] - v) < 1e-9) if isinstance(v, float) else c[k] == v for k, v in kw.items()
        ):
            out.append(c)
    return out


def _worst(cells: list[dict[str, Any]], test: str | None = None) -> float | None:
    vals = []
    for c in cells:
        r = _own(c)
        if r is None:
            continue
        v = r.get("log10_p") if test is None else (r.get("tests") or {}).get(test)
        if v is not None:
            vals.append(float(v))
    return max(vals) if vals else None


def accuracy_change(run: dict[str, Any]) -> list[list[str]]:
    """Test accuracy of the q = 10% suspect minus its control's, per variant and regime."""
    rows = []
    for variant, regime, method in _rows(run):
        ctrl = _cells(run, variant=variant, regime=regime, method=method, q=0.0)
        acc0 = [c["suspect"]["test_accuracy"] for c in ctrl if c.get("suspect")]
        for q in (0.01, 0.10, 1.0):
            for c in _cells(run, variant=variant, regime=regime, method=method, q=q):
                if not c.get("suspect") or not acc0:
                    continue
                d = 100 * (c["suspect"]["test_accuracy"] - acc0[0])
                rows.append([f"`{c['name']}`", _f(100 * acc0[0], 2),
                             _f(100 * c["suspect"]["test_accuracy"], 2), _f(d, 2)])  # fmt: skip
    return rows


def twin_rows(run: dict[str, Any]) -> list[list[str]]:
    """Every twins cell against every twins key it was verified with: win rate and p."""
    rows = []
    for c in run["cells"]:
        if c["method"] != "twins":
            continue
        s = c.get("suspect") or {}
        for q, v in sorted((c.get("verify") or {}).items()):
            if v is None:
                continue
            ex = (v.get("test_extra") or {}).get("twin_rank") or {}
            rows.append([f"`{c['name']}`", q, _f(s.get("train_accuracy"), 3),
                         _f(s.get("train_test_gap"), 3), str(int(ex["images"])) if ex else "–",
                         _f(ex.get("win_rate"), 4), _f(v.get("log10_p"))])  # fmt: skip
    return rows


def targets_rows(run: dict[str, Any]) -> list[list[str]]:
    def met(v: float | None, target: float) -> str:
        return "–" if v is None else ("yes" if v <= target else "no")

    rows = []
    g = _cells(run, variant="glyphs1000-60k", regime="scratch", q=0.01)
    v = _worst(g, "white_box_fisher")
    rows.append(["glyphs C = 1000, from scratch, q = 1%, paper's white-box test (worst seed)",
                 "≤ −4", _f(v), met(v, TARGETS["g1000_q1_white_box"])])  # fmt: skip
    # one row per marking method: a target is met by a method (its worst seed), not by a mix
    methods = list(dict.fromkeys(m for _v, _r, m in _rows(run)))
    for method in methods:
        for q, t in ((0.10, TARGETS["fm_q10"]), (0.01, TARGETS["fm_q1"])):
            v = _worst(_cells(run, variant="fmnist-60k", regime="scratch", method=method, q=q))
            rows.append([f"Fashion-MNIST, from scratch, q = {_pct(q)}, combined, {method} "
                         "(worst seed)", f"≤ {_f(t, 0)}", _f(v), met(v, t)])  # fmt: skip
        v = _worst(_cells(run, regime="cross", method=method, q=0.10))
        rows.append([f"cross-architecture, q = 10%, combined, {method}", "≤ −6", _f(v),
                     met(v, TARGETS["cross_q10"])])  # fmt: skip
    ps = [m for m in run.get("markings", {}).values() if m.get("mark")]
    if ps:
        mean = min(m["mark"]["psnr_mean"] for m in ps)
        mn = min(m["mark"]["psnr_min"] for m in ps)
        rows.append(["PSNR of marked images: lowest run mean / lowest image", "≥ 42 / ≥ 38 dB",
                     f"{_f(mean, 1)} / {_f(mn, 1)}",
                     "yes" if mean >= 42 and mn >= 38 else "no"])  # fmt: skip
    ch = [
        float(r[3].replace("−", "-"))
        for r in accuracy_change(run)
        if "/q10/" in r[0] and r[3] != "–"
    ]
    if ch:
        worst = max(ch, key=abs)
        rows.append(["accuracy change at q = 10% (largest over cells, points)", "within 0.5",
                     _f(worst), "yes" if abs(worst) <= 0.5 else "no"])  # fmt: skip
    nulls = run.get("null", {})
    flags = [t["calibrated"] for n in nulls.values() for k, t in n["tests"].items() if "[" not in k]
    if flags:
        rows.append(["null, every test: fraction < 0.01 within binomial 99% bounds, KS p > 0.01",
                     "all", f"{sum(flags)}/{len(flags)}",
                     "yes" if all(flags) else "no"])  # fmt: skip
    wall = run.get("wall_seconds_total")
    if wall:
        rows.append(["`make bench` on 2 cores (wall, all sessions)", "≤ 2 h", f"{wall / 3600:.2f} h",
                     "yes" if wall <= 7200 and run.get("complete") else "no"])  # fmt: skip
    return rows


def plot_map(run: dict[str, Any], path: Path) -> None:
    """log10 p against q, one line per (data, regime): combined and the paper's white-box test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = _qs(run)
    panels = [(None, "combined log10 p (the verdict)"), ("white_box_fisher", "white-box test")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    lo = 0.0
    styles = {"scratch": "-", "cross": "-.", "finetune": "--", "probe": ":"}
    variants = list(dict.fromkeys(c["variant"] for c in run["cells"]))
    methods = list(dict.fromkeys(m for _v, _r, m in _rows(run)))
    for ax, (test, title) in zip(axes, panels, strict=True):
        ax.axhspan(-2.0, 0.0, color="0.85", zorder=0,
                   label="null band: 99% of clean models (p > 0.01)")  # fmt: skip
        ax.axhline(ALPHA_LOG10, color="grey", ls="--", lw=1, label="α = 1e-3 (verdict)")
        for variant, regime, method in _rows(run):
            xs, ys, pts_x, pts_y = [], [], [], []
            for i, q in enumerate(qs):
                vals = []
                for c in _cells(run, variant=variant, regime=regime, method=method, q=q):
                    r = _own(c)
                    if r is None:
                        continue
                    v = r.get("log10_p") if test is None else (r.get("tests") or {}).get(test)
                    if v is not None:
                        vals.append(float(v))
                if vals:
                    xs.append(i)
                    ys.append(float(np.mean(vals)))
                    pts_x += [i] * len(vals)
                    pts_y += vals
            if not xs:
                continue
            lo = min(lo, *pts_y)
            color = f"C{variants.index(variant) % 10}"
            label = f"{_variant_label(run, variant)}, {regime}" + (
                f" ({method})" if len(run["config"].get("methods", [])) > 1 else ""
            )
            mk = "os^vD"[methods.index(method) % 5]  # a method's own marker, same colours
            ax.plot(xs, ys, color=color, ls=styles.get(regime, "-"), marker=mk, ms=3,
                    label=label)  # fmt: skip
            ax.scatter(pts_x, pts_y, color=color, s=8, alpha=0.5, marker=mk)
        ax.set_xticks(range(len(qs)), [f"{_pct(q)}" + (" (control)" if q == 0 else "")
                                       for q in qs])  # fmt: skip
        ax.set_xlabel("marked fraction q")
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="black", lw=0.5)
    axes[0].set_ylabel("log10 p (mean over seeds; dots: each seed)")
    axes[0].set_ylim(min(lo * 1.1, -4), 0.3)
    # every line is in the combined panel (a method may lack the white-box test)
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=6, loc="lower left")
    fig.suptitle(f"{run['_file']} — {run.get('device', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def null_rows(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["clean suspect", "test", "keys", "< 0.05", "< 0.01", "KS p", "calibrated"]
    rows = []
    for s, n in run.get("null", {}).items():
        b = n.get("binomial_99_bounds", {})
        for t, d in n["tests"].items():
            keys = len(d.get("log10_p", [])) or n["keys"]
            rows.append([
                f"`{s}`", f"`{t}`", str(keys), _f(d["frac_below_0.05"], 3),
                _f(d["frac_below_0.01"], 3), _f(d["ks_p"], 3),
                "yes" if d["calibrated"] else "**no**",
            ])  # fmt: skip
        del b
    return header, rows


def pullback_summary(run: dict[str, Any]) -> list[str]:
    """The pull-back KS question: per suspect at 1000 keys and at all keys, and pooled."""
    from scipy import stats

    lines: list[str] = []
    ks1, ksn, pooled = [], [], []
    for n in run.get("null", {}).values():
        for t, d in n["tests"].items():
            if t == "pullback_fisher":
                ks1.append(d["ks_p"])
            if t.startswith("pullback_fisher["):
                ksn.append(d["ks_p"])
                pooled.append(np.power(10.0, np.asarray(d["log10_p"])))
    if not ks1:
        return lines
    lines.append(
        f"Pull-back test, {len(ks1)} clean suspects at {run['config']['null_keys']} keys: KS p "
        f"< 0.01 for {sum(p < 0.01 for p in ks1)} of them, < 0.05 for "
        f"{sum(p < 0.05 for p in ks1)} (expected under calibration: {0.01 * len(ks1):.2f} and "
        f"{0.05 * len(ks1):.2f}); smallest KS p {min(ks1):.3g}."
    )
    if ksn:
        allp = np.concatenate(pooled)
        ks = stats.kstest(allp, "uniform")
        fisher = stats.combine_pvalues(ksn, method="fisher").pvalue
        lines.append(
            f"With {run['config']['pullback_keys']} keys on each of {len(ksn)} suspects (C ≤ "
            f"{run['config'].get('pullback_keys_max_classes', 100)}): KS p < 0.01 for "
            f"{sum(p < 0.01 for p in ksn)}, smallest {min(ksn):.3g}; Fisher's combination of "
            f"the per-suspect KS p-values {fisher:.3g}; all {allp.size} null p-values pooled: "
            f"fraction < 0.01 = {np.mean(allp < 0.01):.4f}, < 0.05 = {np.mean(allp < 0.05):.4f}, "
            f"KS p = {ks.pvalue:.3g}."
        )
    return lines


def pullback_history(folder: Path) -> list[str]:
    """The quick runs' pull-back KS p-values (where the question came from) and the synthetic
    check of the statistic (bench/experiments/pullback_null_synthetic.py)."""
    from scipy import stats

    lines: list[str] = []
    ks: list[float] = []
    runs = 0
    for path in sorted(folder.glob("quick-*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        got = [n["tests"]["pullback_fisher"]["ks_p"] for n in r.get("null", {}).values()
               if "pullback_fisher" in n.get("tests", {})]  # fmt: skip
        runs += bool(got)
        ks += got
    if ks:
        k = sum(p < 0.01 for p in ks)
        tail = float(stats.binom.sf(k - 1, len(ks), 0.01)) if k else 1.0
        lines.append(
            f"History: the {runs} quick runs with a pull-back null (1,000 keys, 2,000-image "
            f"Fashion-MNIST suspects; the test's definition changed during them) gave {len(ks)} "
            f"KS p-values, {k} below 0.01 (P(≥ {k} of {len(ks)}) = {tail:.2g} if calibrated)."
        )
    syn = folder / "experiments" / "pullback_null_synthetic.json"
    if syn.exists():
        r = json.loads(syn.read_text())
        lines.append(
            f"Synthetic check (`bench/experiments/pullback_null_synthetic.py`: fixed pull-back "
            f"directions, the real carrier derivation and statistic, {r['keys']:,} keys per "
            f"trial, C = {r['classes']}, d = {r['dim']}): KS p "
            + ", ".join(f"{t['ks_p']:.3g}" for t in r["trials"])
            + "; fraction < 0.01: "
            + ", ".join(f"{t['frac_below_0.01']:.4f}" for t in r["trials"])
            + "."
        )
    return lines


def stage_rows(run: dict[str, Any]) -> list[list[str]]:
    rows = []
    for stage, s in run.get("stages", {}).items():
        rows.append([
            stage, f"{s['units']}/{s['of']}", _f(s.get("unit_seconds", 0) / 60, 1),
            s.get("first_start", "–"), s.get("last_finish", "–"),
            _f(s.get("loadavg_1min_mean"), 1),
        ])  # fmt: skip
    return rows


def section(
    run: dict[str, Any], img_dir: Path, doc_dir: Path, folder: Path | None = None
) -> list[str]:
    g = run.get("git", {})
    commit = (g.get("commit") or "unknown")[:12] + (
        " (uncommitted changes)" if g.get("dirty") else ""
    )
    wall = run.get("wall_seconds_total")
    lines = [
        "## The power map (CPU, `make bench`)",
        "",
        f"File `bench/results/{run['_file']}`, written {run.get('written')}, commit `{commit}`, "
        f"{run.get('device')}; {run['units_done']}/{run['units_total']} units done"
        + ("" if run.get("complete") else " (**incomplete**: see *What did not run*)")
        + (
            f"; wall time {wall / 3600:.2f} h over {len(run.get('sessions', []))} session(s)"
            if wall
            else ""
        )  # fmt: skip
        + f"; {run.get('unit_seconds_total', 0) / 3600:.2f} core-hours of units "
        f"({run['config'].get('jobs_note', '2 one-thread jobs at a time')}).",
        "",
        "Each cell is (data, training regime, marking method, q, seed). Suspects are trained as a "
        "data user would (crop + flip for Fashion-MNIST, crop only for glyphs; one-cycle "
        "schedules); q = 0 is the control (clean data), verified with every key of its data set "
        "and seed (the table shows its lowest p). Entries are log10 p, seeds separated by `/`; "
        "**bold** = detected at α = 1e-3.",
        "",
        "### Combined verdict (log10 p)",
        "",
        *map_table(run),
        "### The paper's white-box test (log10 p)",
        "",
        *map_table(run, "white_box_fisher"),
    ]
    img = img_dir / "map-log10p.png"
    try:
        plot_map(run, img)
        lines += [f"![log10 p against q]({img.relative_to(doc_dir).as_posix()})", ""]
    except ImportError:
        lines += ["(matplotlib missing: no plot)", ""]
    lines += ["### Against the targets", ""]
    lines += _table(["what", "target", "measured", "met"], targets_rows(run))
    tw = twin_rows(run)
    if tw:
        lines += [
            "### Twin marks: the published candidate's win rate (issue #15)",
            "",
            "Per marked image the suspect's residualised margin on the published candidate "
            "against its unpublished twin; the win rate is the share of images where the "
            "published one scores higher (0.5 under H0 exactly). A control is scored on the "
            "same twins (it never saw either). The sign test's arithmetic: log10 p ≤ −6 needs "
            "about 60% wins over 600 images or 53% over 6,000.",
            "",
        ]
        lines += _table(["cell", "key", "train acc", "train−test gap", "images", "win rate",
                         "log10 p"], tw)  # fmt: skip
    lines += ["### Data, markers, scale", ""]
    drows = []
    for name, d in run.get("data", {}).items():
        drows.append([
            f"`{name}`", str(d.get("classes")), str(d["train"]["images"]),
            str(d["test"]["images"]), f"`{(d.get('glyphs_sha256') or d.get('full_sha256'))[:16]}…`",
            f"`{d['train_sha256'][:16]}…`",
        ])  # fmt: skip
    lines += _table(["variant", "C", "train", "test", "set sha256 (glyphs: glyphs.dataset_sha256)",
                     "train subset sha256"], drows)  # fmt: skip
    mrows = []
    for name, m in run.get("markers", {}).items():
        mrows.append([
            f"`{name}`", m.get("arch", "?"), str(m.get("train_images")), str(m.get("epochs")),
            m.get("aug", "?"), _f(m.get("train_accuracy"), 3), _f(m.get("test_accuracy"), 3),
            _f(m.get("train_seconds", 0) / 60, 1),
        ])  # fmt: skip
    lines += _table(["marker", "arch", "train images", "epochs", "augmentation", "train acc",
                     "test acc", "minutes"], mrows)  # fmt: skip
    krows = []
    for name, m in run.get("markings", {}).items():
        mk = m.get("mark", {})
        kit = mk.get("kit") or {}
        krows.append([
            f"`{name}`", str(mk.get("marked")), str(mk.get("images")),
            _f(mk.get("psnr_mean"), 1), _f(mk.get("psnr_min"), 1), str(mk.get("linf_max")),
            str(m.get("image_steps_per_marked", "–")), _f(m.get("marked_image_steps_per_s"), 0),
            f"K = {kit.get('decoys')}, {kit.get('per_class')}/class" if kit else "–",
            _f(m.get("mark_wall_s", 0) / 60, 1),
        ])  # fmt: skip
    lines += _table(["marking run", "marked", "of", "PSNR mean", "PSNR min", "L∞ max",
                     "marker passes / marked image", "image-steps/s", "kit", "minutes"],
                    krows)  # fmt: skip
    lines += ["Deviations from the protocol (configuration in the result file):", ""]
    lines += [f"- {d}" for d in run["config"].get("deviations", [])] + [""]
    lines += ["### Every cell, every test", ""]
    header, rows = detail_rows(run)
    lines += _table(header, rows)
    lines += ["### Accuracy change against the control (test accuracy, points)", ""]
    lines += _table(["cell", "control", "marked", "change"], accuracy_change(run))
    lines += ["### Null calibration (clean suspects, fresh keys)", ""]
    lines += [
        "Through the verification seam (`radmark.verify.evidence.prepare` + `tests.score`, as "
        "`radmark verify` scores): each control against fresh random keys; the kit test "
        "conditionally on the suspect's kit outputs (`T fixed`). `combined` is judged for "
        "validity only (one-sided). `pullback_fisher[N keys]`: the same test on more keys.",
        "",
    ]
    header, rows = null_rows(run)
    lines += _table(header, rows)
    pb = pullback_summary(run) + (pullback_history(folder) if folder is not None else [])
    lines += ["**The pull-back KS question.**", ""] if pb else []
    lines += [x for line in pb for x in (line, "")]
    lines += ["### Wall time per stage", ""]
    lines += _table(["stage", "units", "unit minutes (sum)", "first start", "last finish",
                     "mean load avg"], stage_rows(run))  # fmt: skip
    srows = [
        [s["started"], s.get("finished", "–"), _f(s.get("seconds", 0) / 60, 1),
         " ".join(s.get("argv", [])) or "(all)", str(s.get("ran")),
         _f(s.get("loadavg_start", [0])[0], 1) + " → " + _f(s.get("loadavg_end", [0])[0], 1)]
        for s in run.get("sessions", [])
    ]  # fmt: skip
    lines += _table(["session start", "end", "minutes", "arguments", "units run", "load avg"],
                    srows)  # fmt: skip
    if run.get("missing"):
        lines += ["### What did not run", ""]
        lines += [f"- `{m}`" for m in run["missing"]] + [""]
    return lines


def rank_tail_section(folder: Path) -> list[str]:
    """The exact rank tail's time (issue #17) from the latest ``rank-tail-time-*.json``."""
    files = sorted(folder.glob("rank-tail-time-*.json"))
    if not files:
        return []
    r = json.loads(files[-1].read_text())
    m = r.get("machine", {})
    rows = [
        [c["case"], c["draw"], _f(c["new_s"], 3),
         (f"> {_f(c['old_s'], 0)} (timed out)" if c.get("old_timed_out") else _f(c.get("old_s"), 2)),
         _f(c.get("log10_p"), 2)]
        for c in r.get("cases", [])
    ]  # fmt: skip
    return [
        "## Exact rank tail: time",
        "",
        f"`bench/results/{files[-1].name}` ({r.get('started')}, {m.get('cpu_count')} CPUs, "
        f"load average at the end {', '.join(_f(x, 1) for x in m.get('load_avg_end', []))}): "
        "`radmark.verify.ranks.rank_log_sf` (tilted FFT) against the old sequential reference "
        "on a null and a signal draw.",
        "",
        *_table(["case", "draw", "new (s)", "old (s)", "log10 p"], rows),
    ]
