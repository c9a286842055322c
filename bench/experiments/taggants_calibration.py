"""Null calibration of the secret-label key test: clean models (never trained on any marked data)
scored on many fresh keys. Ranks must be uniform on 1..10 and the combined p-values (blocks of K
keys) super-uniform.

python bench/experiments/taggants_calibration.py REFERENCE.pt MODEL.pt [MODEL.pt ...]
(models as cached by taggants_pilot.py: surrogates and clean controls in /tmp/tg). Each MODEL is
scored raw and residualised on REFERENCE (log-prob minus the reference's log-prob), as the pilot
does with its surrogates.
"""

import json, sys, time, platform, subprocess
from pathlib import Path

import numpy as np
import torch
from scipy.stats import chisquare

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "experiments"))
from radmark.models import build_model
from radmark.stats import rank_log_sf
import taggants_core as tc

torch.set_num_threads(1)
C = 10
KEYS = 1500  # per family
BLOCK = 30
out = dict(
    script="bench/experiments/taggants_calibration.py",
    torch=torch.__version__,
    device="cpu",
    cpu=platform.processor() or platform.machine(),
    commit=subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip(),
    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    keys_per_family=KEYS,
    block=BLOCK,
    rows=[],
)


def load_fn(path):
    d = torch.load(path, weights_only=False)
    model = build_model("smallcnn", C, in_chans=1)
    model.load_state_dict(d["state"])
    model.eval()
    m = torch.tensor(d["mean"]).view(1, -1, 1, 1)
    s = torch.tensor(d["std"]).view(1, -1, 1, 1)
    return lambda x: model((x - m) / s)


ref_fn = load_fn(sys.argv[1])
out["reference"] = Path(sys.argv[1]).name
for path in sys.argv[2:]:
    fn = load_fn(path)
    for fam in tc.FAMILIES:
        seed = f"calibration-{fam}".encode()
        imgs = torch.from_numpy(tc.key_images(seed, KEYS, (1, 28, 28), fam))
        lab = tc.key_labels(seed, KEYS, C)
        for A in (1, 16):
            sc = tc.key_scores(fn, imgs, A=A, seed=12345)
            sc["logprob_res"] = (
                sc["logprob"] - tc.key_scores(ref_fn, imgs, A=A, seed=12345)["logprob"]
            )
            for kind in ("logit", "prob", "logprob_res") if A > 1 else ("logit", "logprob_res"):
                r = tc.ranks_from_scores(sc[kind], lab)
                hist = np.bincount(r, minlength=C + 1)[1:]
                chi = chisquare(hist)
                lps = np.array(
                    [
                        rank_log_sf(r[i : i + BLOCK], slots=C) / np.log(10)
                        for i in range(0, KEYS, BLOCK)
                    ]
                )
                pred = np.bincount(sc[kind].argmax(1), minlength=C)
                row = dict(
                    model=Path(path).name,
                    family=fam,
                    A=A,
                    score=kind,
                    rank_hist=hist.tolist(),
                    chi2_p=float(chi.pvalue),
                    top1_rate=float((r == 1).mean()),
                    mean_rank=float(r.mean()),
                    blocks=len(lps),
                    frac_block_p_le_0p05=float((lps <= np.log10(0.05)).mean()),
                    frac_block_p_le_0p01=float((lps <= -2).mean()),
                    min_block_log10p=float(lps.min()),
                    predicted_class_hist=pred.tolist(),
                )
                out["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "rank_hist"}), flush=True)
dst = ROOT / "bench" / "results" / "experiments" / "taggants_calibration.json"
dst.write_text(json.dumps(out, indent=1))
print("wrote", dst)
