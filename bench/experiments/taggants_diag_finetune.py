"""Diagnostic (as run, output only printed; numbers quoted in README): fine-tune the cached N=2000
surrogate on clean vs poisoned data and rank the key labels. Usage: CRAFT.pt N K (cached by taggants_pilot.py)."""

import sys, torch, numpy as np, torch.nn.functional as F, copy

sys.path.insert(0, "/work/wt-taggants")
sys.path.insert(0, "/work/wt-taggants/bench/experiments")
torch.set_num_threads(1)
from bench.fmnist import load
from radmark.models import build_model
from radmark.marker import _crop_flip
from radmark.stats import rank_log_sf
import taggants_core as tc

C = 10
craftfile, N, K = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
xtr, ytr = load("train")
rng = np.random.default_rng(0)
per = N // C
sub = np.sort(
    np.concatenate([rng.choice(np.flatnonzero(ytr == c), per, replace=False) for c in range(C)])
)
X = xtr[sub][:, None].copy()
Y = ytr[sub].copy()
seed_bytes = b"radmark-taggants-pilot-key-0"
lab = tc.key_labels(seed_bytes, K, C)
imgs = torch.from_numpy(tc.key_images(seed_bytes, K, (1, 28, 28), "smooth"))
pidx, pas = tc.assign_poisons(
    seed_bytes, Y, lab, round(1.0 * N / K) if N == 2000 else round(0.1 * N / K)
)
cr = torch.load(craftfile, weights_only=False)
Xp = X.copy()
Xp[pidx] = cr["images"].numpy()
d = torch.load(f"/tmp/tg/sur_n{N}_d0_e10_s100.pt", weights_only=False)
m = torch.tensor(d["mean"]).view(1, -1, 1, 1)
s = torch.tensor(d["std"]).view(1, -1, 1, 1)


def run(data, epochs, lr):
    model = build_model("smallcnn", C, in_chans=1)
    model.load_state_dict(d["state"])
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xa = torch.from_numpy(data).float() / 255
    ya = torch.from_numpy(Y)
    for _ep in range(epochs):
        model.train()
        perm = torch.randperm(len(Y), generator=g)
        for i in range(0, len(Y), 128):
            idx = perm[i : i + 128]
            x = _crop_flip(xa[idx], g)
            loss = F.cross_entropy(model((x - m) / s), ya[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    fn = lambda x: model((x - m) / s)
    sc = tc.key_scores(fn, imgs, A=16, seed=12345)
    r = tc.ranks_from_scores(sc["logprob"], lab)
    return (r == 1).sum(), r.mean(), rank_log_sf(r, slots=C) / np.log(10)


for ep, lr in ((1, 0.01), (3, 0.01)):
    print("ft", ep, lr, "clean", run(X, ep, lr), "poisoned", run(Xp, ep, lr), flush=True)
