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
