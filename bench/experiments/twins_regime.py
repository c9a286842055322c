"""Twin marks: the same published candidates (cached by twins_screen.py), another training recipe.

usage: python twins_regime.py TAG EPOCHS AUGMENT [A_LIST]
  TAG: the cache tag of a twins_screen.py run (its candidates, published indices and groups);
  EPOCHS: suspect epochs; AUGMENT: 1 = crop pad 4 + flip (the library recipe), 0 = no augmentation.
Trains the suspect (published data) and the clean control (clean data) with the same recipe and
seed, and scores both on the cached candidates. Asks whether the win rate follows memorisation
(train-test gap) when the recipe memorises more.
"""

import sys
import time

import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import twins_common as tc  # noqa: E402
from radmark.marker import train_classifier  # noqa: E402
from twins_core import residualise, score_all_kinds, twin_test  # noqa: E402


def main():
    tag, epochs, augment = sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3]))
    a_list = tuple(int(a) for a in (sys.argv[4] if len(sys.argv) > 4 else "0,8").split(","))
    seed = int(tag.split("_")[0][1:])
    t_start = time.time()
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
    phi = tc.marker()
    res = dict(
        env=tc.env_info(),
        tag=tag,
        seed=seed,
        epochs=epochs,
        augment=augment,
        a_list=a_list,
        variants={},
    )
    nets = {}
    for label, data in (("suspect", x_pub), ("clean", x)):
        cache = f"regime_{label}_{tag if label == 'suspect' else f's{seed}_n{len(y)}'}_e{epochs}_aug{int(augment)}.pt"
        if (tc.CACHE / cache).exists():
            net, acc, sec = tc.train_net(data, y, seed=seed + 1, cache_name=cache)
        else:
            t0 = time.time()
            model, mean, std, acc, _ = train_classifier(
                np.ascontiguousarray(data),
                y,
                arch="smallcnn",
                num_classes=tc.C,
                epochs=epochs,
                seed=seed + 1,
                augment=augment,
            )
            sec = time.time() - t0
            torch.save(
                dict(state=model.state_dict(), mean=mean, std=std, train_acc=acc, seconds=sec),
                tc.CACHE / cache,
            )
            net = tc.Net(model, mean, std)
        nets[label] = net
        tr = tc.accuracy(net, data, y)
        te = tc.accuracy(net, xte[:, None], yte)
        res[label] = dict(
            train_acc=tr[0],
            train_loss=tr[1],
            test_acc=te[0],
            test_loss=te[1],
            gap_acc=tr[0] - te[0],
            gap_loss=te[1] - tr[1],
            train_seconds=sec,
        )
        print(label, res[label], flush=True)
    for name, c in d["cands"].items():
        pub = d["pub"][name]
        yy = torch.from_numpy(y[d["groups"][name]])
        out = {}
        for A in a_list:
            sc = {
                lab: score_all_kinds(net.logits, c, yy, A, torch.Generator().manual_seed(777 + A))
                for lab, net in (*nets.items(), ("marker", phi))
            }
            for lab in ("suspect", "clean"):
                for kind in sc[lab]:
                    for rr in (False, True):
                        s = residualise(sc[lab][kind], sc["marker"][kind]) if rr else sc[lab][kind]
                        ranks, lp = twin_test(s.numpy(), pub)
                        out[f"{lab}/A{A}/{kind}{'_res' if rr else ''}"] = dict(
                            win=float((ranks == 1).mean()), log10p=lp
                        )
        res["variants"][name] = dict(n=len(pub), M=int(c.shape[0]), tests=out)
        for k in [f"A{A}/{kind}" for A in a_list for kind in ("margin", "neg_loss")]:
            print(
                f"{name} {k}: suspect win {out['suspect/' + k]['win']:.4f} lp {out['suspect/' + k]['log10p']:.2f} | clean win {out['clean/' + k]['win']:.4f} lp {out['clean/' + k]['log10p']:.2f}",
                flush=True,
            )
    res["seconds_total"] = time.time() - t_start
    tc.dump(f"twins_regime_{tag}_e{epochs}_aug{int(augment)}.json", res)


if __name__ == "__main__":
    main()
