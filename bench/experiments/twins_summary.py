"""Print the markdown tables of the twins_* results (bench/results/experiments/twins_*.json)."""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "bench" / "results" / "experiments"
PRIMARY = "A8/margin"


def row(name, v, key=PRIMARY):
    t = v["tests"]
    for k in (key, "A8/margin", "A4/margin", "A0/margin"):
        if f"suspect/{k}" in t:
            key = k
            break
    s, c = t[f"suspect/{key}"], t[f"clean/{key}"]
    sus = {k: x for k, x in t.items() if k.startswith("suspect/")}
    bk = min(sus, key=lambda k: sus[k]["log10p"])
    m = v.get("M", 2)
    psnr = f"{v['psnr_mean']:.2f} / {v['psnr_min']:.2f}" if "psnr_mean" in v else "(same)"
    extra = ""
    if "diag" in v and key in v["diag"]:
        g = v["diag"][key]
        extra = f" corr(d_sus, d_clean) {g['corr_suspect_clean']:.2f}; paired win over clean {g['paired_win_suspect_over_clean']:.3f} |"
    return f"| {name} | {key} | {m} | {v['n']} | {psnr} | {s['win']:.3f} | {s['log10p']:.2f} | {c['win']:.3f} | {c['log10p']:.2f} | {bk.split('/', 1)[1]}: {sus[bk]['win']:.3f} ({sus[bk]['log10p']:.2f}) |{extra or ' |'}"


def main():
    files = sys.argv[1:] or sorted(str(p) for p in OUT.glob("twins_*.json"))
    for f in files:
        r = json.loads(Path(f).read_text())
        print(f"\n### {Path(f).name}")
        for lab in ("suspect", "clean"):
            if lab in r:
                a = r[lab]
                print(
                    f"- {lab}: train acc {a['train_acc']:.4f}, test acc {a['test_acc']:.4f}, gap {a['gap_acc']:+.4f} (loss gap {a['gap_loss']:+.4f})"
                )
        print(
            "\n| variant | score | M | pairs | PSNR mean / min | suspect win | log10 p | clean win | clean log10 p | suspect's best of all scores (not corrected) | diagnostics |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, v in r["variants"].items():
            print(row(name, v))


if __name__ == "__main__":
    main()
