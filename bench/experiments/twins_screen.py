"""Twin marks, screening run: several candidate designs on disjoint image groups, one suspect.

usage: python twins_screen.py SEED KEY PER_CLASS GROUP VARIANTS [EPOCHS]
  SEED: data subset + suspect training seed; KEY: the publishing key (HMAC secret "twins-key-KEY");
  PER_CLASS: clean training images per class (N_train = 10 × PER_CLASS); GROUP: marked images per
  variant; VARIANTS: comma list of names from VARIANTS below. Every variant gets its own disjoint
  group of GROUP images of the training set, so one suspect training measures all of them
  (q = len(VARIANTS) × GROUP / N_train in total). The clean control is the same recipe and seed
  on the clean training set, scored on the same candidates.
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import twins_common as tc  # noqa: E402
from twins_core import (
    TwinParams,
    make_candidates,
    published_index,
    residualise,
    score_all_kinds,
    top1_log10p,
    twin_test,
)  # noqa: E402

# name: (M, TwinParams, selection)
VARIANTS = {
    "pm_feat": (2, TwinParams(mode="pm_feat"), "random"),
    "pm_noise": (2, TwinParams(mode="noise"), "random"),
    "dir2": (2, TwinParams(mode="dir"), "random"),
    "dir4": (4, TwinParams(mode="dir"), "random"),
    "dir8": (8, TwinParams(mode="dir"), "random"),
    "adv2": (2, TwinParams(mode="adv"), "random"),
    "adv4": (4, TwinParams(mode="adv"), "random"),
    "pm_feat_hi": (2, TwinParams(mode="pm_feat"), "hiloss"),
    "adv2_hi": (2, TwinParams(mode="adv"), "hiloss"),
    "pm_noise_hi": (2, TwinParams(mode="noise"), "hiloss"),
    "pm_feat_fg": (2, TwinParams(mode="pm_feat", mask="fg"), "random"),
    "pm_feat_bg": (2, TwinParams(mode="pm_feat", mask="bg"), "random"),
    "pm_feat_linf4": (2, TwinParams(mode="pm_feat", linf=4.0), "random"),
    "adv2_fg": (2, TwinParams(mode="adv", mask="fg"), "random"),
    # budget ladder (beyond the imperceptibility target: to see where the signal starts)
    "pm_feat_p36": (2, TwinParams(mode="pm_feat", psnr_floor=36.0, linf=16.0), "random"),
    "pm_feat_p30": (2, TwinParams(mode="pm_feat", psnr_floor=30.0, linf=16.0), "random"),
    "pm_noise_p30": (2, TwinParams(mode="noise", psnr_floor=30.0, linf=16.0), "random"),
    "adv2_p30": (2, TwinParams(mode="adv", psnr_floor=30.0, linf=16.0), "random"),
    "pm_feat_p24": (2, TwinParams(mode="pm_feat", psnr_floor=24.0, linf=32.0), "random"),
    "pm_feat_hi_p30": (2, TwinParams(mode="pm_feat", psnr_floor=30.0, linf=16.0), "hiloss"),
}
A_LIST = tuple(int(a) for a in __import__("os").environ.get("TWINS_A", "0,1,8,32").split(","))


def main():
    seed, key, per_class, group = (int(a) for a in sys.argv[1:5])
    names = sys.argv[5].split(",")
    epochs = int(sys.argv[6]) if len(sys.argv) > 6 else 10
    t_start = time.time()
    xtr, ytr = tc.load("train")
    xte, yte = tc.load("test")
    rng = np.random.default_rng(seed)
    idx = tc.balanced_subset(ytr, per_class, rng)  # ids into the 60k training split
    x = xtr[idx][:, None].copy()
    y = ytr[idx].copy()
    n = len(y)
    phi = tc.marker()

    # marker loss on the clean training images (for "hiloss" selection: the owner may use anything)
    with torch.no_grad():
        mloss = torch.cat(
            [
                torch.nn.functional.cross_entropy(
                    phi.logits(torch.from_numpy(x[s : s + 2000]).float() / 255),
                    torch.from_numpy(y[s : s + 2000]),
                    reduction="none",
                )
                for s in range(0, n, 2000)
            ]
        ).numpy()
    order_hi = np.argsort(-mloss)
    free = np.ones(n, bool)
    groups = {}
    for name in names:  # hi-loss groups first take the highest-loss free images
        if VARIANTS[name][2] == "hiloss":
            pick = [i for i in order_hi if free[i]][:group]
            free[pick] = False
            groups[name] = np.array(sorted(pick))
    for name in names:
        if VARIANTS[name][2] == "random":
            pick = rng.choice(np.flatnonzero(free), group, replace=False)
            free[pick] = False
            groups[name] = np.sort(pick)

    secret = f"twins-key-{key}".encode()
    res = dict(
        env=tc.env_info(),
        seed=seed,
        key=secret.decode(),
        per_class=per_class,
        n_train=n,
        group=group,
        epochs=epochs,
        q_total=len(names) * group / n,
        a_list=A_LIST,
        variants={},
    )
    x_pub = x.copy()
    cands = {}
    for name in names:
        M, params, sel = VARIANTS[name]
        g = groups[name]
        gen = torch.Generator().manual_seed(10_000 + seed)  # candidate seed: independent of the key
        t0 = time.time()
        outs, ps = [], []
        for s in range(0, len(g), 500):
            b = g[s : s + 500]
            c, p = make_candidates(
                torch.from_numpy(x[b]),
                phi.features,
                M,
                params,
                gen,
                labels=torch.from_numpy(y[b]),
                head=phi.head,
            )
            outs.append(c)
            ps.append(p)
        c = torch.cat(outs, 1)
        p = torch.cat(ps, 1)
        sec = time.time() - t0
        pub = published_index(secret, idx[g], M)
        x_pub[g] = c[pub, np.arange(len(g))].numpy()
        cands[name] = (c, pub)
        linf = (c.int() - torch.from_numpy(x[g]).int().unsqueeze(0)).abs().amax(dim=(2, 3, 4))
        steps = 0 if params.mode == "noise" else params.steps
        res["variants"][name] = dict(
            M=M,
            params=params.to_dict(),
            selection=sel,
            n=len(g),
            psnr_mean=float(p[torch.isfinite(p)].mean()),
            psnr_min=float(p.min()),
            linf_max=int(linf.max()),
            marker_loss_mean=float(mloss[g].mean()),
            mark_seconds=sec,
            image_steps_per_image=steps * (M + (1 if params.mode == "dir" else 0)),
            seconds_per_image=sec / len(g),
            pub_counts=np.bincount(pub, minlength=M).tolist(),
        )
        print(name, res["variants"][name], flush=True)

    aug = (
        os.environ.get("TWINS_AUG", "1") == "1"
    )  # 0: suspect and control trained without crop+flip
    res["train_augment"] = aug
    tag = f"s{seed}_k{key}_n{n}_g{group}_e{epochs}{'' if aug else '_noaug'}_{'-'.join(names)}"
    torch.save(
        dict(
            cands={k: v[0] for k, v in cands.items()},
            pub={k: v[1] for k, v in cands.items()},
            groups=groups,
            idx=idx,
        ),
        tc.CACHE / f"cands_{tag}.pt",
    )
    suspect, s_acc, s_sec = tc.train_net(
        x_pub, y, seed=seed + 1, epochs=epochs, cache_name=f"suspect_{tag}.pt", augment=aug
    )
    clean, c_acc, c_sec = tc.train_net(
        x,
        y,
        seed=seed + 1,
        epochs=epochs,
        cache_name=f"clean_s{seed}_n{n}_e{epochs}{'' if aug else '_noaug'}.pt",
        augment=aug,
    )
    for label, net, acc_t, sec in (
        ("suspect", suspect, s_acc, s_sec),
        ("clean", clean, c_acc, c_sec),
    ):
        tr = tc.accuracy(net, x_pub if label == "suspect" else x, y)
        te = tc.accuracy(net, xte[:, None], yte)
        res[label] = dict(
            train_acc_aug_last_epoch=acc_t,
            train_acc=tr[0],
            train_loss=tr[1],
            test_acc=te[0],
            test_loss=te[1],
            gap_acc=tr[0] - te[0],
            gap_loss=te[1] - tr[1],
            train_seconds=sec,
        )
        print(label, res[label], flush=True)

    for name in names:
        c, pub = cands[name]
        M = c.shape[0]
        yy = torch.from_numpy(y[groups[name]])
        out = {}
        for A in A_LIST:
            sc = {}
            for label, net in (("suspect", suspect), ("clean", clean), ("marker", phi)):
                sc[label] = score_all_kinds(
                    net.logits, c, yy, A, torch.Generator().manual_seed(777 + A)
                )
            for label in ("suspect", "clean"):
                for kind in sc[label]:
                    for res_ref in (False, True):
                        s = sc[label][kind]
                        if res_ref:
                            s = residualise(s, sc["marker"][kind])
                        ranks, lp = twin_test(s.numpy(), pub)
                        key_ = f"{label}/A{A}/{kind}{'_res' if res_ref else ''}"
                        out[key_] = dict(
                            win=float((ranks == 1).mean()),
                            mean_rank=float(ranks.mean()),
                            log10p=lp,
                            top1_log10p=top1_log10p(ranks, M) if M > 2 else lp,
                        )
        res["variants"][name]["tests"] = out
        best = sorted(((v["log10p"], k) for k, v in out.items() if k.startswith("suspect")))[:4]
        print(
            name,
            "best suspect:",
            [(k, round(out[k]["win"], 4), round(lp, 2)) for lp, k in best],
            flush=True,
        )
        for k in [
            k
            for k in ("A8/margin", "A8/neg_loss", "A0/margin", "A32/margin", "A8/margin_res")
            if "suspect/" + k in out
        ]:
            print(
                f"   {k}: suspect win {out['suspect/' + k]['win']:.4f} lp {out['suspect/' + k]['log10p']:.2f} | clean win {out['clean/' + k]['win']:.4f} lp {out['clean/' + k]['log10p']:.2f}",
                flush=True,
            )
    res["seconds_total"] = time.time() - t_start
    tc.dump(f"twins_screen_{tag}.json", res)


if __name__ == "__main__":
    main()
