"""Why the twin test has (no) power: effect size and shared noise, from cached candidates/models.

usage: python twins_diag.py TAG [REGIME_SUFFIX]
For each variant group: d_model[i] = score(published) − score(other twin) (A = 8 shared crop+flip
views, margin), for the suspect, the clean control and the marker. Reports
- the suspect's mean d in units of its spread (z of the H1 shift; the exact test is the sign test),
- corr(d_suspect, d_clean) and corr(d_suspect, d_marker): how much of a pair's score difference is
  a property of the candidates that any clean model shares (removable with clean references),
- the paired win rate of the suspect over the clean control: #{d_suspect > d_clean} / N.
Diagnostic only: these numbers are not p-values of a deployable test.
"""

import sys

import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import twins_common as tc  # noqa: E402
from radmark.models import build_model  # noqa: E402
from twins_core import score_all_kinds  # noqa: E402


def load_net(name):
    d = torch.load(tc.CACHE / name, weights_only=False)
    m = build_model("smallcnn", tc.C, in_chans=1)
    m.load_state_dict(d["state"])
    return tc.Net(m, d["mean"], d["std"])


def main():
    tag = sys.argv[1]
    sus_name = sys.argv[2] if len(sys.argv) > 2 else f"suspect_{tag}.pt"
    clean_name = sys.argv[3] if len(sys.argv) > 3 else None
    seed = int(tag.split("_")[0][1:])
    d = torch.load(tc.CACHE / f"cands_{tag}.pt", weights_only=False)
    n = len(d["idx"])
    clean_name = clean_name or f"clean_s{seed}_n{n}_e10.pt"
    nets = {"suspect": load_net(sus_name), "clean": load_net(clean_name), "marker": tc.marker()}
    _, ytr = tc.load("train")
    y = ytr[d["idx"]]
    out = {}
    for name, c in d["cands"].items():
        if c.shape[0] != 2:
            continue
        pub = d["pub"][name]
        yy = torch.from_numpy(y[d["groups"][name]])
        dd = {}
        for lab, net in nets.items():
            s = score_all_kinds(net.logits, c, yy, 8, torch.Generator().manual_seed(785))[
                "margin"
            ].numpy()
            ar = np.arange(len(pub))
            dd[lab] = s[pub, ar] - s[1 - pub, ar]
        z = dd["suspect"].mean() / dd["suspect"].std() * np.sqrt(len(pub))
        out[name] = dict(
            mean_abs_d_suspect=float(np.abs(dd["suspect"]).mean()),
            z_suspect=float(z),
            corr_suspect_clean=float(np.corrcoef(dd["suspect"], dd["clean"])[0, 1]),
            corr_suspect_marker=float(np.corrcoef(dd["suspect"], dd["marker"])[0, 1]),
            paired_win_suspect_over_clean=float((dd["suspect"] > dd["clean"]).mean()),
            z_suspect_minus_clean=float(
                (dd["suspect"] - dd["clean"]).mean()
                / (dd["suspect"] - dd["clean"]).std()
                * np.sqrt(len(pub))
            ),
        )
        print(name, {k: round(v, 3) for k, v in out[name].items()}, flush=True)
    tc.dump(
        f"twins_diag_{tag}{'_' + sus_name[:-3] if len(sys.argv) > 2 else ''}.json",
        dict(
            env=tc.env_info(),
            tag=tag,
            suspect=sus_name,
            clean=clean_name,
            score="margin, A=8",
            groups=out,
        ),
    )


if __name__ == "__main__":
    main()
