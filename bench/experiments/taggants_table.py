"""Print the markdown table of the taggants pilots from bench/results/experiments/taggants_*.json."""

import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
files = sorted((ROOT / "bench" / "results" / "experiments").glob("taggants_p*.json"))
print(
    "| run | N | K | poisons (q) | craft | PSNR mean/min | model | test acc (gap) | "
    "hits top-1 (A16 logit) | mean rank | log10 p logit A1 / A16 / residual A16 |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for f in files:
    d = json.loads(f.read_text())
    a = d["args"]
    cr = d["craft"]
    if a["method"] == "blend":
        how = "blend key (no crafting)"
    else:
        how = (
            f"{a['steps']} steps, {a['nsur']} sur"
            + (f", retrain/{a['retrain_every']}" if a.get("retrain_every") else "")
            + (f", L∞ {a['linf']:g}" + ("" if a["psnr"] == "none" else f" + PSNR {a['psnr']}"))
            + f", {a['family']}"
        )
    for m in d["models"]:
        if m["kind"] == "surrogate0_clean":
            continue
        t = m["tests"]
        k = f"logit_A{a['A']}"
        print(
            f"| {f.stem.removeprefix('taggants_')} | {d['N']} | {d['K']} | {d['poisons']} "
            f"({d['q_actual']:.0%}) | {how} | {cr['psnr_mean']:.1f}/{cr['psnr_min']:.1f} | "
            f"{'marked' if m['kind'] == 'marked_suspect' else 'clean ctrl'} s{m['seed']} | "
            f"{m['test_acc']:.3f} ({m['gap']:+.3f}) | {t[k]['hits']}/{d['K']} | "
            f"{t[k]['mean_rank']:.2f} | {t['logit_A1']['log10p']:.2f} / {t[k]['log10p']:.2f} / "
            + (f"{t[rk]['log10p']:.2f} |" if (rk := f"logprob_res_A{a['A']}") in t else "n/a |")
        )

# Compact table (the one in README.md): one row per run and suspect seed, marked vs its clean control.
print()
print(
    "| run | N | poisons (q) | crafting | PSNR mean/min | seed | test acc ctrl → marked "
    "(marked gap) | top-1 hits marked (ctrl) | mean rank marked (ctrl) | log10 p logit A16 "
    "marked (ctrl) | log10 p residual A16 marked (ctrl) | craft s (image-steps) |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for f in files:
    d = json.loads(f.read_text())
    a = d["args"]
    cr = d["craft"]
    if a["method"] == "blend":
        how = "blend key, no crafting"
    else:
        how = (
            f"{a['steps']} st, {a['nsur']} sur"
            + (f", retrain/{a['retrain_every']}" if a.get("retrain_every") else "")
            + (f", L∞ {a['linf']:g}" + ("" if a["psnr"] == "none" else " + 42 dB"))
            + f", {a['family']}"
        )
    ms = {(m["kind"], m["seed"]): m for m in d["models"]}
    for (kind, seed), mk in ms.items():
        if kind != "marked_suspect":
            continue
        mc = ms[("clean_control", seed)]
        k = f"logit_A{a['A']}"
        rk = f"logprob_res_A{a['A']}"
        tk, tc_ = mk["tests"], mc["tests"]
        res = f"{tk[rk]['log10p']:.2f} ({tc_[rk]['log10p']:.2f})" if rk in tk else "n/a"
        print(
            f"| {f.stem.removeprefix('taggants_')} | {d['N']} | {d['poisons']} ({d['q_actual']:.0%}) "
            f"| {how} | {cr['psnr_mean']:.1f}/{cr['psnr_min']:.1f} | {seed} | "
            f"{mc['test_acc']:.3f} → {mk['test_acc']:.3f} ({mk['gap']:+.3f}) | "
            f"{tk[k]['hits']}/{d['K']} ({tc_[k]['hits']}) | {tk[k]['mean_rank']:.2f} "
            f"({tc_[k]['mean_rank']:.2f}) | {tk[k]['log10p']:.2f} ({tc_[k]['log10p']:.2f}) | {res} | "
            f"{cr['seconds']:.0f} ({cr['image_steps']}) |"
        )
