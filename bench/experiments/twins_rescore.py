"""Score cached twins candidates with cached suspect / clean models (lean: no marker residual).

usage: python twins_rescore.py TAG A_LIST SUSPECT_CACHE CLEAN_CACHE OUT_NAME
Written because twins_screen.py's scoring (3 models × 4 view counts) was too slow on the shared
CPU; the second screen's scoring crashed after its first group and was redone with this script.
Also reports the diagnostics of twins_diag.py (corr of the pair differences between suspect and
clean control, z of the suspect's shift) from the same scores.
"""

import sys
import time

import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import twins_common as tc  # noqa: E402
from radmark.models import build_model  # noqa: E402
from twins_core import score_all_kinds, top1_log10p, twin_test  # noqa: E402


def load_net(name):
    d = torch.load(tc.CACHE / name, weights_only=False)
    m = build_model("smallcnn", tc.C, in_chans=1)
    m.load_state_dict(d["state"])
    return tc.Net(m, d["mean"], d["std"]), d


def main():
    tag, a_list, sus_name, clean_name, out_name = (
        sys.argv[1],
        tuple(int(a) for a in sys.argv[2].split(",")),
        sys.argv[3],
        sys.argv[4],
        sys.argv[5],
    )
    t0 = time.time()
    d = torch.load(tc.CACHE / f"cands_{tag}.pt", weights_only=False)
    xtr, ytr = tc.load("train")
    xte, yte = tc.load("test")
    idx = d["idx"]
    x = xtr[idx][:, None].copy()
    y = ytr[idx].copy()
    x_pub = x.copy()
    for name, c in d["cands"].items():
        g = d["groups"][name]
        x_pub[g] = c[d["pub"][name], np.arange(len(g))].numpy()
    res = dict(
        env=tc.env_info(), tag=tag, suspect=sus_name, clean=clean_name, a_list=a_list, variants={}
    )
    nets = {}
    for lab, name, data in (("suspect", sus_name, x_pub), ("clean", clean_name, x)):
        net, meta = load_net(name)
        nets[lab] = net
        tr = tc.accuracy(net, data, y)
        te = tc.accuracy(net, xte[:, None], yte)
        res[lab] = dict(
            train_acc=tr[0],
            train_loss=tr[1],
            test_acc=te[0],
            test_loss=te[1],
            gap_acc=tr[0] - te[0],
            gap_loss=te[1] - tr[1],
            train_seconds=meta["seconds"],
        )
        print(lab, {k: round(v, 4) for k, v in res[lab].items()}, flush=True)
    for name, c in d["cands"].items():
        pub = d["pub"][name]
        yy = torch.from_numpy(y[d["groups"][name]])
        M = c.shape[0]
        x0 = torch.from_numpy(x[d["groups"][name]])
        psnr = 10 * torch.log10(
            255.0**2 / (c.double() - x0.double().unsqueeze(0)).square().flatten(2).mean(2)
        )
        out, diag = {}, {}
        for A in a_list:
            sc = {
                lab: score_all_kinds(net.logits, c, yy, A, torch.Generator().manual_seed(777 + A))
                for lab, net in nets.items()
            }
            for lab in sc:
                for kind, s in sc[lab].items():
                    ranks, lp = twin_test(s.numpy(), pub)
                    out[f"{lab}/A{A}/{kind}"] = dict(
                        win=float((ranks == 1).mean()),
                        log10p=lp,
                        top1_log10p=top1_log10p(ranks, M) if M > 2 else lp,
                    )
            if M == 2:
                ar = np.arange(len(pub))
                dd = {
                    lab: (
                        sc[lab]["margin"].numpy()[pub, ar] - sc[lab]["margin"].numpy()[1 - pub, ar]
                    )
                    for lab in sc
                }
                diag[f"A{A}/margin"] = dict(
                    mean_abs_d_suspect=float(np.abs(dd["suspect"]).mean()),
                    z_suspect=float(dd["suspect"].mean() / dd["suspect"].std() * np.sqrt(len(pub))),
                    corr_suspect_clean=float(np.corrcoef(dd["suspect"], dd["clean"])[0, 1]),
                    paired_win_suspect_over_clean=float((dd["suspect"] > dd["clean"]).mean()),
                )
        res["variants"][name] = dict(
            M=M,
            n=len(pub),
            psnr_mean=float(psnr.mean()),
            psnr_min=float(psnr.min()),
            tests=out,
            diag=diag,
        )
        for A in a_list:
            k = f"A{A}/margin"
            print(
                f"{name} {k}: suspect win {out['suspect/' + k]['win']:.4f} lp {out['suspect/' + k]['log10p']:.2f} | clean win {out['clean/' + k]['win']:.4f} lp {out['clean/' + k]['log10p']:.2f} | diag { ({kk: round(v, 3) for kk, v in diag.get(k, {}).items()}) }",
                flush=True,
            )
    res["seconds_total"] = time.time() - t0
    tc.dump(out_name, res)


if __name__ == "__main__":
    main()
