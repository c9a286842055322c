"""Data Taggants pilot: secret-label key images, clean-label gradient matching, exact rank test.

python bench/experiments/taggants_pilot.py --tag NAME [--n 20000 --q 0.01 --K 30 --family smooth
    --linf 16 --psnr 42 --steps 250 --restarts 1 --nsur 1 --aug 1 --key-views 8 --key-seed 0
    --data-seed 0 --suspect-seed 1000 --A 16 --epochs 10 --method craft|blend --device cpu]

Writes bench/results/experiments/taggants_NAME.json. Surrogates, clean controls and crafted
images are cached in /tmp/tg (keyed by their settings).
"""

import argparse, json, os, platform, subprocess, sys, time, hashlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "experiments"))
from bench.fmnist import load
from radmark.marker import train_classifier
from radmark.models import build_model
from radmark.stats import rank_log_sf
import taggants_core as tc

p = argparse.ArgumentParser()
p.add_argument("--tag", required=True)
p.add_argument("--n", type=int, default=20000)
p.add_argument("--q", type=float, default=0.01)
p.add_argument("--K", type=int, default=30)
p.add_argument("--family", default="smooth")
p.add_argument("--linf", type=float, default=16.0)
p.add_argument("--psnr", default="42")
p.add_argument("--steps", type=int, default=250)
p.add_argument("--lr", type=float, default=1.0)
p.add_argument("--restarts", type=int, default=1)
p.add_argument("--nsur", type=int, default=1)
p.add_argument("--aug", type=int, default=1)
p.add_argument("--key-views", type=int, default=8)
p.add_argument("--key-seed", type=int, default=0)
p.add_argument("--data-seed", type=int, default=0)
p.add_argument("--suspect-seed", type=int, default=1000)
p.add_argument("--suspects", type=int, default=1, help="suspects trained with seeds s, s+1, ...")
p.add_argument("--A", type=int, default=16)
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--method", default="craft")
p.add_argument("--retrain-every", type=int, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--cache", default="/tmp/tg")
p.add_argument("--out", default=str(ROOT / "bench" / "results" / "experiments"))
args = p.parse_args()
torch.set_num_threads(args.threads)
dev = args.device
CACHE = Path(args.cache)
CACHE.mkdir(parents=True, exist_ok=True)
C = 10
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def commit():
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except Exception:
        return None


# ---------------- data ----------------
xtr, ytr = load("train")
xte, yte = load("test")
rng = np.random.default_rng(args.data_seed)
per = args.n // C
sub = np.sort(
    np.concatenate([rng.choice(np.flatnonzero(ytr == c), per, replace=False) for c in range(C)])
)
X = xtr[sub][:, None].copy()  # uint8 [N, 1, 28, 28]
Y = ytr[sub].copy()
N = len(Y)
Xte = torch.from_numpy(xte[:, None].copy())


def train(images, labels, seed, path):
    if path is not None and Path(path).exists():
        d = torch.load(path, weights_only=False)
        model = build_model("smallcnn", C, in_chans=1)
        model.load_state_dict(d["state"])
        model.eval().to(dev)
        for q_ in model.parameters():
            q_.requires_grad_(True)
        return model, d["mean"], d["std"], d["train_acc"], d["seconds"]
    t = time.time()
    model, mean, std, acc, _ = train_classifier(
        images, labels, arch="smallcnn", num_classes=C, epochs=args.epochs, seed=seed, device=dev
    )
    secs = time.time() - t
    if path is not None:
        torch.save(
            dict(
                state={k: v.cpu() for k, v in model.state_dict().items()},
                mean=mean,
                std=std,
                train_acc=acc,
                seconds=secs,
            ),
            path,
        )
    model.eval()
    return model, mean, std, acc, secs


def logits_fn_of(model, mean, std):
    m = torch.tensor(mean).view(1, -1, 1, 1).to(dev)
    s = torch.tensor(std).view(1, -1, 1, 1).to(dev)

    def f(x):
        with torch.no_grad():
            return model((x.to(dev) - m) / s)

    return f


def accuracy(fn, images, labels, bs=2000):
    correct = 0
    for i in range(0, len(labels), bs):
        x = torch.as_tensor(images[i : i + bs]).float().div(255.0)
        correct += int((fn(x).argmax(1).cpu().numpy() == labels[i : i + bs]).sum())
    return correct / len(labels)


def evaluate(name, fn, key_imgs_t, key_lab, train_images):
    res = dict(name=name)
    ev = np.random.default_rng(7).choice(N, min(N, 5000), replace=False)
    res["test_acc"] = accuracy(fn, xte[:, None], yte)
    res["train_acc_eval"] = accuracy(fn, train_images[ev], Y[ev])
    res["gap"] = res["train_acc_eval"] - res["test_acc"]
    tests = {}
    for A in (1, args.A):
        sc = tc.key_scores(fn, key_imgs_t.to(dev), A=A, seed=12345)
        # residual score: minus the mean log-prob of the clean surrogates (clean references,
        # independent of the labels, so the ranks stay exactly uniform under H0)
        ref = np.mean(
            [
                tc.key_scores(logits_fn_of(*s_), key_imgs_t.to(dev), A=A, seed=12345)["logprob"]
                for s_ in surrogates
            ],
            axis=0,
        )
        sc["logprob_res"] = sc["logprob"] - ref
        for kind in (
            ("logit", "prob", "logprob", "logprob_res") if A > 1 else ("logit", "logprob_res")
        ):
            r = tc.ranks_from_scores(sc[kind], key_lab)
            lp = rank_log_sf(r, slots=C) / np.log(10)
            tests[f"{kind}_A{A}"] = dict(
                ranks=r.tolist(),
                hits=int((r == 1).sum()),
                top3=int((r <= 3).sum()),
                mean_rank=float(r.mean()),
                log10p=float(lp),
            )
        if A == 1:
            tests["pred_hist"] = np.bincount(sc["logit"].argmax(1), minlength=C).tolist()
    res["tests"] = tests
    t = tests[f"logit_A{args.A}"]
    log(
        f"{name}: test {res['test_acc']:.4f} train {res['train_acc_eval']:.4f} | "
        + " ".join(
            f"{k}: {v['hits']}/{len(key_lab)} r̄{v['mean_rank']:.2f} lp{v['log10p']:.2f}"
            for k, v in tests.items()
            if k != "pred_hist"
        )
    )
    return res


# ---------------- keys ----------------
seed_bytes = f"radmark-taggants-pilot-key-{args.key_seed}".encode()
K = args.K
key_lab = tc.key_labels(seed_bytes, K, C)
key_imgs = tc.key_images(seed_bytes, K, (1, 28, 28), args.family)
per_key = max(1, round(args.q * N / K))
pidx, passign = tc.assign_poisons(seed_bytes, Y, key_lab, per_key)
log(
    f"N={N} K={K} per_key={per_key} poisons={len(pidx)} labels={np.bincount(key_lab, minlength=C).tolist()}"
)

# ---------------- surrogates ----------------
surrogates = []
sur_info = []
for i in range(args.nsur):
    path = CACHE / f"sur_n{N}_d{args.data_seed}_e{args.epochs}_s{100 + i}.pt"
    model, mean, std, acc, secs = train(X, Y, 100 + i, path)
    surrogates.append((model, mean, std))
    sur_info.append(dict(seed=100 + i, train_acc=acc, seconds=secs))
    log(f"surrogate {i}: train acc {acc:.4f} ({secs:.0f}s)")

# ---------------- craft ----------------
RETRAINS = [0]


def retrain_fn(cur_uint8):
    RETRAINS[0] += 1
    Xr = X.copy()
    Xr[pidx] = cur_uint8.cpu().numpy()
    out = []
    for i in range(args.nsur):
        model, mean, std, acc, secs = train(Xr, Y, 100 + i + 1000 * RETRAINS[0], None)
        for q_ in model.parameters():
            q_.requires_grad_(True)
        out.append((model, mean, std))
    return out


psnr_floor = None if args.psnr == "none" else float(args.psnr)
params = tc.CraftParams(
    steps=args.steps,
    lr=args.lr,
    restarts=args.restarts,
    linf=args.linf,
    psnr_floor=psnr_floor,
    augment=bool(args.aug),
    key_views=args.key_views,
    retrain_every=args.retrain_every,
)
ckey = hashlib.sha256(
    json.dumps(
        [
            vars(args)[k]
            for k in (
                "n",
                "q",
                "K",
                "family",
                "linf",
                "psnr",
                "steps",
                "lr",
                "restarts",
                "nsur",
                "aug",
                "key_views",
                "key_seed",
                "data_seed",
                "epochs",
                "method",
            )
        ]
        + ([args.retrain_every] if args.retrain_every else [])
    ).encode()
).hexdigest()[:16]
cpath = CACHE / f"craft_{ckey}.pt"
gen = torch.Generator(device=dev).manual_seed(args.key_seed * 7919 + 17)
if cpath.exists():
    cr = torch.load(cpath, weights_only=False)
    log(f"crafted images from cache {cpath}")
elif args.method == "blend":
    t = time.time()
    x0 = torch.from_numpy(X[pidx]).float()
    kk = torch.from_numpy(key_imgs[passign]).float()
    pat = kk - kk.mean(dim=(1, 2, 3), keepdim=True)
    # scale each image's pattern to RMS 0.98 × the PSNR budget, clamp, round, enforce
    rms = 255.0 * 10 ** (-(psnr_floor or 42.0) / 20.0)
    pat = pat / pat.square().mean(dim=(1, 2, 3), keepdim=True).sqrt() * rms
    out = (x0 + pat).clamp(0, 255).round()
    from radmark.marking import _enforce_psnr, psnr as _psnr

    out = _enforce_psnr(out, x0, psnr_floor or 42.0).to(torch.uint8)
    cr = dict(
        images=out,
        psnr=_psnr(torch.from_numpy(X[pidx]), out).numpy(),
        linf=(out.int() - x0.int()).abs().amax(dim=(1, 2, 3)).numpy(),
        loss=np.zeros(K),
        seconds=time.time() - t,
        image_steps=0,
        params=dict(method="blend"),
    )
    torch.save(cr, cpath)
else:
    cr = tc.craft(
        torch.from_numpy(X[pidx]).to(dev),
        torch.from_numpy(Y[pidx]).to(dev),
        torch.from_numpy(key_imgs).to(dev),
        torch.from_numpy(key_lab).to(dev),
        torch.from_numpy(passign).to(dev),
        surrogates,
        params,
        gen,
        log=log,
        retrain=retrain_fn if args.retrain_every else None,
    )
    cr["images"] = cr["images"].cpu()
    torch.save(cr, cpath)
ps = np.asarray(cr["psnr"])
log(
    f"crafted {len(pidx)} images in {cr['seconds']:.0f}s ({cr['image_steps']} image-steps); "
    f"PSNR mean {ps.mean():.2f} min {ps.min():.2f}; Linf max {int(np.max(cr['linf']))}; "
    f"loss mean {float(np.mean(cr['loss'])):.4f}"
)

Xp = X.copy()
Xp[pidx] = cr["images"].numpy()
key_t = torch.from_numpy(key_imgs)

results = dict(
    script="bench/experiments/taggants_pilot.py",
    argv=sys.argv[1:],
    args=vars(args),
    device=dev if dev == "cpu" else torch.cuda.get_device_name(0),
    cpu=platform.processor() or platform.machine(),
    torch=torch.__version__,
    numpy=np.__version__,
    commit=commit(),
    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    N=N,
    K=K,
    per_key=per_key,
    poisons=int(len(pidx)),
    q_actual=len(pidx) / N,
    key_labels=key_lab.tolist(),
    surrogates=sur_info,
    craft=dict(
        seconds=cr["seconds"],
        image_steps=cr["image_steps"],
        params=cr["params"],
        psnr_mean=float(ps.mean()),
        psnr_min=float(ps.min()),
        psnr_median=float(np.median(ps)),
        linf_max=int(np.max(cr["linf"])),
        loss_per_key=[float(v) for v in cr["loss"]],
    ),
    models=[],
)

# surrogate 0 as an extra H0 sample (it never saw the poisons)
m0, mean0, std0 = surrogates[0]
results["models"].append(
    dict(
        kind="surrogate0_clean",
        seed=100,
        **evaluate("surrogate0 (clean)", logits_fn_of(m0, mean0, std0), key_t, key_lab, X),
    )
)
for j in range(args.suspects):
    sseed = args.suspect_seed + j
    cpath_c = CACHE / f"clean_n{N}_d{args.data_seed}_e{args.epochs}_s{sseed}.pt"
    mc, meanc, stdc, accc, secc = train(X, Y, sseed, cpath_c)
    rc = evaluate(f"clean control s{sseed}", logits_fn_of(mc, meanc, stdc), key_t, key_lab, X)
    results["models"].append(
        dict(kind="clean_control", seed=sseed, train_acc_aug=accc, seconds=secc, **rc)
    )
    ms_, means, stds, accs, secs = train(Xp, Y, sseed, CACHE / f"marked_{ckey}_s{sseed}.pt")
    log(f"suspect s{sseed} trained in {secs:.0f}s")
    rs = evaluate(f"MARKED suspect s{sseed}", logits_fn_of(ms_, means, stds), key_t, key_lab, Xp)
    results["models"].append(
        dict(kind="marked_suspect", seed=sseed, train_acc_aug=accs, seconds=secs, **rs)
    )
results["total_seconds"] = time.time() - T0
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / f"taggants_{args.tag}.json").write_text(json.dumps(results, indent=1))
log(f"wrote {out / f'taggants_{args.tag}.json'}")
