"""Twin test residualised on an owner-trained clean shadow model (key-independent reference).

usage: python twins_shadow.py TAG SHADOW_SEED A OUT_NAME
The shadow is smallcnn trained by the owner with the library recipe on the clean originals of the
training set (the owner has them), with its own seed (SHADOW_SEED: different initialisation and
batch order from the suspect). It never sees any candidate, so it is independent of the publishing
key and any score that subtracts its score keeps the test exact. Statistic: residualise(s_model,
s_shadow) (β by least squares on within-image centred scores, generation order; see twins_core)
and the plain difference s_model − s_shadow (β = 1). Scored: the suspect and the clean control
(same seed as the suspect, clean data: its residualised win rate must sit at chance).
"""

import sys
import time

import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import twins_common as tc  # noqa: E402
from twins_core import residualise, score_all_kinds, twin_test  # noqa: E402
from twins_rescore import load_net  # noqa: E402


def main():
    tag, shadow_seed, A, out_name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    t0 = time.time()
    seed = int(tag.split("_")[0][1:])
    d = torch.load(tc.CACHE / f"cands_{tag}.pt", weights_only=False)
    xtr, ytr = tc.load("train")
    xte, yte = tc.load("test")
    idx = d["idx"]
    x = xtr[idx][:, None].copy()
    y = ytr[idx].copy()
    n = len(y)
    shadow, s_acc, s_sec = tc.train_net(
        x, y, seed=shadow_seed, cache_name=f"shadow_s{seed}_n{n}_e10_seed{shadow_seed}.pt"
    )
    nets = {
        "suspect": load_net(f"suspect_{tag}.pt")[0],
        "clean": load_net(f"clean_s{seed}_n{n}_e10.pt")[0],
        "shadow": shadow,
    }
    te = tc.accuracy(shadow, xte[:, None], yte)
    res = dict(
        env=tc.env_info(),
        tag=tag,
        shadow_seed=shadow_seed,
        A=A,
        shadow=dict(test_acc=te[0], train_seconds=s_sec),
        variants={},
    )
    for name, c in d["cands"].items():
        pub = d["pub"][name]
        yy = torch.from_numpy(y[d["groups"][name]])
        sc = {
            lab: score_all_kinds(net.logits, c, yy, A, torch.Generator().manual_seed(777 + A))
            for lab, net in nets.items()
        }
        out = {}
        for lab in ("suspect", "clean"):
            for kind in sc[lab]:
                for stat in ("raw", "res_shadow", "minus_shadow"):
                    s = sc[lab][kind]
                    if stat == "res_shadow":
                        s = residualise(s, sc["shadow"][kind])
                    elif stat == "minus_shadow":
                        s = s - sc["shadow"][kind]
                    ranks, lp = twin_test(s.numpy(), pub)
                    out[f"{lab}/A{A}/{kind}/{stat}"] = dict(
                        win=float((ranks == 1).mean()), log10p=lp
                    )
        corr = {}
        if c.shape[0] == 2:
            ar = np.arange(len(pub))
            dd = {
                lab: sc[lab]["margin"].numpy()[pub, ar] - sc[lab]["margin"].numpy()[1 - pub, ar]
                for lab in sc
            }
            corr = dict(
                suspect_clean=float(np.corrcoef(dd["suspect"], dd["clean"])[0, 1]),
                suspect_shadow=float(np.corrcoef(dd["suspect"], dd["shadow"])[0, 1]),
                clean_shadow=float(np.corrcoef(dd["clean"], dd["shadow"])[0, 1]),
            )
        res["variants"][name] = dict(
            M=int(c.shape[0]), n=len(pub), tests=out, corr_margin_pair_diff=corr
        )
        for kind in ("margin", "neg_loss"):
            k = f"A{A}/{kind}/res_shadow"
            print(
                f"{name} {k}: suspect win {out['suspect/' + k]['win']:.4f} lp {out['suspect/' + k]['log10p']:.2f} | clean win {out['clean/' + k]['win']:.4f} lp {out['clean/' + k]['log10p']:.2f} | corr { ({kk: round(v, 3) for kk, v in corr.items()}) }",
                flush=True,
            )
    res["seconds_total"] = time.time() - t0
    tc.dump(out_name, res)


if __name__ == "__main__":
    main()
