"""Experiment: per-image radioactive marks vs class-universal perturbations, black-box ranks."""

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, "/work/main")
from bench.fmnist import load  # noqa: E402
from radmark.keys.carriers import derive_carriers  # noqa: E402
from radmark.models.training import train_classifier  # noqa: E402
from radmark.marking.budget import psnr
from radmark.marking.radioactive import get_preset, mark_batch  # noqa: E402
from radmark.verify.ranks import rank_log_sf  # noqa: E402

torch.set_num_threads(2)
SEED = int(sys.argv[1]) if len(sys.argv) > 1 else 0
PER_CLASS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
Q = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
K1 = 20  # slots
NK = 20  # kit images per class
C = 10
PSNR_FLOOR = 42.0
rng = np.random.default_rng(SEED)


def subset(x, y, per, rng):
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per, replace=False) for c in range(C)])
    return x[idx], y[idx]


xtr, ytr = load("train")
xte, yte = load("test")
xtr, ytr = subset(xtr, ytr, PER_CLASS, rng)
xte, yte = subset(xte, yte, 200, rng)
xtr = xtr[:, None]
xte = xte[:, None]
print("data", xtr.shape, xte.shape, flush=True)

t0 = time.time()
marker, mm, ms, _, _ = train_classifier(
    xtr, ytr, arch="smallcnn", num_classes=C, epochs=10, seed=SEED
)
marker.eval()
for p in marker.parameters():
    p.requires_grad_(False)
mmean = torch.tensor(mm).view(1, -1, 1, 1)
mstd = torch.tensor(ms).view(1, -1, 1, 1)


def phi(x01):
    x01 = x01[:, :1]
    h = marker.features((x01 - mmean) / mstd)
    return torch.flatten(marker.pool(h), 1)


def marker_logits(x01):
    return marker((x01[:, :1] - mmean) / mstd)


print("marker", time.time() - t0, flush=True)
d = 128
carriers = [
    torch.from_numpy(derive_carriers(rng.bytes(32), d, C, "m")).float() for _ in range(K1)
]  # slot s carriers [C, d]
pi = rng.integers(0, K1, size=C)  # true slot per class
true_u = torch.stack([carriers[pi[c]][c] for c in range(C)])  # [C, d]

# which training images are marked
marked_idx = np.concatenate(
    [
        rng.choice(np.flatnonzero(ytr == c), int(round(Q * PER_CLASS)), replace=False)
        for c in range(C)
    ]
)
budget_l2 = np.sqrt(28 * 28) * 10 ** (-PSNR_FLOOR / 20)  # in [0,1] units
LINF = 8 / 255


def project(delta):
    delta = delta.clamp(-LINF, LINF)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * torch.clamp(budget_l2 / n, max=1.0)


def crop_flip(x, gen):
    # random translation by up to 2 px and flip, as a differentiable view
    b = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    out = pad[:, :, dy : dy + 28, dx : dx + 28]
    if torch.rand(1, generator=gen).item() < 0.5:
        out = out.flip(3)
    return out


def universal(x_imgs_per_class, u_rows, steps=60, lr=0.01, seed=0):
    """x_imgs_per_class: list of uint8 [n_c,1,28,28]; u_rows [C,d]. One δ per class."""
    gen = torch.Generator().manual_seed(seed)
    deltas = []
    for c, xc in enumerate(x_imgs_per_class):
        x01 = torch.from_numpy(xc).float() / 255
        with torch.no_grad():
            f0 = phi(x01)
        delta = torch.zeros(1, 1, 28, 28, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(steps):
            xa = (x01 + delta).clamp(0, 1)
            shift = phi(crop_flip(xa, gen)) - f0
            loss = -(shift @ u_rows[c]).mean()
            (g,) = torch.autograd.grad(loss, [delta])
            delta.grad = g
            opt.step()
            with torch.no_grad():
                delta.copy_(project(delta))
        deltas.append(delta.detach()[0])
    return torch.stack(deltas)  # [C,1,28,28]


def apply(x_u8, delta):
    x = torch.from_numpy(x_u8).float() / 255
    return ((x + delta).clamp(0, 1) * 255).round().to(torch.uint8)


results = {"seed": SEED, "per_class": PER_CLASS, "q": Q}
variants = {}

# A: per-image radioactive marks (default preset)
t0 = time.time()
params = get_preset("default")
xa = xtr.copy()
g = torch.Generator().manual_seed(SEED)
for i in range(0, len(marked_idx), 100):
    idx = marked_idx[i : i + 100]
    r = mark_batch(
        torch.from_numpy(xtr[idx]),
        torch.from_numpy(ytr[idx]).long(),
        true_u,
        phi,
        params,
        generator=g,
    )
    xa[idx] = r.images.numpy()
variants["A_perimage"] = xa
print("A mark", time.time() - t0, flush=True)

# B: universal per class, optimised on the marked images of that class; decoys the same way
t0 = time.time()
per_class_imgs = [xtr[marked_idx[ytr[marked_idx] == c]] for c in range(C)]
deltas_B = [universal(per_class_imgs, carriers[s], seed=SEED) for s in range(K1)]  # [K1][C,...]
true_dB = torch.stack([deltas_B[pi[c]][c] for c in range(C)])
xb = xtr.copy()
for c in range(C):
    idx = marked_idx[ytr[marked_idx] == c]
    xb[idx] = apply(xtr[idx], true_dB[c]).numpy()
variants["B_universal"] = xb
print("B", time.time() - t0, flush=True)

# C: random pixel pattern per class
gC = torch.Generator().manual_seed(SEED + 7)
deltas_C = [project(torch.randn(C, 1, 28, 28, generator=gC) * 0.05) for _ in range(K1)]
true_dC = torch.stack([deltas_C[pi[c]][c] for c in range(C)])
xc = xtr.copy()
for c in range(C):
    idx = marked_idx[ytr[marked_idx] == c]
    xc[idx] = apply(xtr[idx], true_dC[c]).numpy()
variants["C_random"] = xc

for name, xv in variants.items():
    p = psnr(torch.from_numpy(xtr[marked_idx]), torch.from_numpy(xv[marked_idx]))
    results[name + "_psnr"] = float(p.mean())
    print(name, "psnr mean", float(p.mean()), "min", float(p.min()), flush=True)

# kits: NK held-out images per class
kit_idx = np.concatenate([np.flatnonzero(yte == c)[:NK] for c in range(C)])
kx, ky = xte[kit_idx], yte[kit_idx]
all_idx = np.arange(len(xte))[:400]  # any-class images for the "other classes" statistic
ox = xte[np.setdiff1d(np.arange(len(xte)), kit_idx)[:400]]

# kit A: per-image marks of kit images for each slot
t0 = time.time()
kitA = []
for s in range(K1):
    gk = torch.Generator().manual_seed(1234)
    r = mark_batch(
        torch.from_numpy(kx), torch.from_numpy(ky).long(), carriers[s], phi, params, generator=gk
    )
    kitA.append(r.images)
print("kitA", time.time() - t0, flush=True)


def centred(fn, x_u8):
    with torch.no_grad():
        z = fn(x_u8.float() / 255).double()
    return z - z.mean(1, keepdim=True)


def stats_same_class(fn, kits):
    T = np.zeros((K1, C))
    for s in range(K1):
        z = centred(fn, kits[s]).numpy()
        for c in range(C):
            T[s, c] = z[ky == c, c].mean()
    return T


def stats_universal(fn, deltas, x_u8, y=None, same=True):
    T = np.zeros((K1, C))
    for s in range(K1):
        for c in range(C):
            if same:
                xs = kx[ky == c]
            else:
                xs = x_u8
            z = centred(fn, apply(xs, deltas[s][c])).numpy()
            T[s, c] = z[:, c].mean()
    return T


def resid(T, R):
    y = T - T.mean(0)
    x = R - R.mean(0)
    b = (x * y).sum(0) / np.maximum((x * x).sum(0), 1e-300)
    return y - b * x


def rank_p(T):
    true = T[pi, np.arange(C)]
    ranks = (T >= true).sum(0)
    return ranks.tolist(), float(rank_log_sf(ranks, K1) / np.log(10))


ref = {
    "A_same": stats_same_class(marker_logits, kitA),
    "B_same": stats_universal(marker_logits, deltas_B, None, same=True),
    "B_other": stats_universal(marker_logits, deltas_B, ox, same=False),
    "C_same": stats_universal(marker_logits, deltas_C, None, same=True),
    "C_other": stats_universal(marker_logits, deltas_C, ox, same=False),
}

training = {"control": xtr, **variants}
for tname, xt in training.items():
    t0 = time.time()
    model, sm, ss, _, _ = train_classifier(
        xt, ytr, arch="smallcnn", num_classes=C, epochs=10, seed=SEED + 1
    )
    model.eval()
    m_ = torch.tensor(sm).view(1, -1, 1, 1)
    s_ = torch.tensor(ss).view(1, -1, 1, 1)
    fn = lambda x, model=model, m_=m_, s_=s_: model((x[:, :1] - m_) / s_)  # noqa: E731
    with torch.no_grad():
        acc = float((fn(torch.from_numpy(xte).float() / 255).argmax(1).numpy() == yte).mean())
    out = {"acc": acc}
    tests = {
        "A_same": stats_same_class(fn, kitA),
        "B_same": stats_universal(fn, deltas_B, None, same=True),
        "B_other": stats_universal(fn, deltas_B, ox, same=False),
        "C_same": stats_universal(fn, deltas_C, None, same=True),
        "C_other": stats_universal(fn, deltas_C, ox, same=False),
    }
    for k, T in tests.items():
        out[k] = rank_p(T)
        out[k + "_res"] = rank_p(resid(T, ref[k]))
    results[tname] = out
    print(tname, json.dumps(out), f"{time.time() - t0:.0f}s", flush=True)

json.dump(results, open(f"/tmp/exp/exp1_s{SEED}_n{PER_CLASS}_q{Q}.json", "w"), indent=1)
