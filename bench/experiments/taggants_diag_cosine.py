"""Diagnostic (as run, output only printed; numbers quoted in README): on the cached N=2000 surrogate,
cosine (overall, per layer, and of the gradient change) between poison-group gradients and key gradients.
Usage: CRAFT.pt (cached by taggants_pilot.py)."""

import sys, torch, numpy as np, torch.nn.functional as F

sys.path.insert(0, "/work/wt-taggants")
sys.path.insert(0, "/work/wt-taggants/bench/experiments")
torch.set_num_threads(1)
from bench.fmnist import load
from radmark.models import build_model
import taggants_core as tc

C = 10
N = 2000
K = 30
xtr, ytr = load("train")
rng = np.random.default_rng(0)
per = N // C
sub = np.sort(
    np.concatenate([rng.choice(np.flatnonzero(ytr == c), per, replace=False) for c in range(C)])
)
X = xtr[sub][:, None].copy()
Y = ytr[sub].copy()
sb = b"radmark-taggants-pilot-key-0"
lab = tc.key_labels(sb, K, C)
imgs = torch.from_numpy(tc.key_images(sb, K, (1, 28, 28), "smooth")).float() / 255
pidx, pas = tc.assign_poisons(sb, Y, lab, 67)
cr = torch.load(sys.argv[1], weights_only=False)
d = torch.load(f"/tmp/tg/sur_n{N}_d0_e10_s100.pt", weights_only=False)
model = build_model("smallcnn", C, in_chans=1)
model.load_state_dict(d["state"])
model.eval()
m = torch.tensor(d["mean"]).view(1, -1, 1, 1)
s = torch.tensor(d["std"]).view(1, -1, 1, 1)
names = [n for n, _ in model.named_parameters()]
ps = list(model.parameters())


def grads(x, y):
    loss_ = F.cross_entropy(model((x - m) / s), y, reduction="sum")
    return torch.autograd.grad(loss_, ps)


def cos(a, b):
    return float(
        F.cosine_similarity(
            torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b]), dim=0
        )
    )


def lcos(a, b):
    return [
        round(float(F.cosine_similarity(x.flatten(), y.flatten(), dim=0)), 2) for x, y in zip(a, b)
    ]


x0 = torch.from_numpy(X[pidx]).float() / 255
x1 = cr["images"].float() / 255
yp = torch.from_numpy(Y[pidx])
print([(n, tuple(p.shape)) for n, p in model.named_parameters()])
for k in range(4):
    gi = np.flatnonzero(pas == k)
    gt = grads(imgs[k : k + 1], torch.tensor([int(lab[k])]))
    g0 = grads(x0[gi], yp[gi])
    g1 = grads(x1[gi], yp[gi])
    print(
        k,
        "label",
        lab[k],
        "n",
        len(gi),
        f"cos clean {cos(g0, gt):.3f} crafted {cos(g1, gt):.3f}",
        f"|gt| {float(torch.cat([t.flatten() for t in gt]).norm()):.3f} |g0| {float(torch.cat([t.flatten() for t in g0]).norm()):.3f} |g1| {float(torch.cat([t.flatten() for t in g1]).norm()):.3f}",
    )
    print("  per-layer clean  ", lcos(g0, gt))
    print("  per-layer crafted", lcos(g1, gt))
    print("  layer norms gt", [round(float(t.norm()), 2) for t in gt])
print("marginal")
for k in range(8):
    gi = np.flatnonzero(pas == k)
    gt = grads(imgs[k : k + 1], torch.tensor([int(lab[k])]))
    g0 = grads(x0[gi], yp[gi])
    g1 = grads(x1[gi], yp[gi])
    dg = [a - b for a, b in zip(g1, g0)]
    print(
        k,
        f"cos(g1-g0,gt) {cos(dg, gt):.3f}  |g1-g0| {float(torch.cat([t.flatten() for t in dg]).norm()):.1f}  |g0| {float(torch.cat([t.flatten() for t in g0]).norm()):.1f}",
    )
