"""Power of a key-withheld pair sign test: loss on released (trained-on) vs withheld images."""

import sys, time, json
import numpy as np, torch, torch.nn.functional as F

sys.path.insert(0, "/work/main")
from bench.fmnist import load
from radmark.models.training import train_classifier
from scipy.stats import binom

torch.set_num_threads(2)
SEED = int(sys.argv[1])
PER = int(sys.argv[2])
M = int(sys.argv[3])
EPOCHS = int(sys.argv[4])
ARCH = sys.argv[5] if len(sys.argv) > 5 else "smallcnn"
rng = np.random.default_rng(SEED)
xtr, ytr = load("train")
xte, yte = load("test")
C = 10
idx = np.concatenate([rng.choice(np.flatnonzero(ytr == c), PER, replace=False) for c in range(C)])
# pairs: within class, one training image + one never-trained image (from the rest of train split)
rest = np.setdiff1d(np.arange(len(ytr)), idx)
pairs = []
for c in range(C):
    a = rng.choice(idx[ytr[idx] == c], M // C, replace=False)
    b = (
        rng.choice(rest[ytr[rest] == c], M // C, replace=False)
        if len(rest)
        else rng.choice(np.flatnonzero(yte == c), M // C, replace=False)
    )
    pairs.append((a, b))
t0 = time.time()
model, mm, ms, tracc, _ = train_classifier(
    xtr[idx][:, None], ytr[idx], arch=ARCH, num_classes=C, epochs=EPOCHS, seed=SEED + 1
)
model.eval()
m_ = torch.tensor(mm).view(1, -1, 1, 1)
s_ = torch.tensor(ms).view(1, -1, 1, 1)


def loss(x, y):
    with torch.no_grad():
        z = model((torch.from_numpy(x[:, None]).float() / 255 - m_) / s_)
        return F.cross_entropy(z, torch.from_numpy(y).long(), reduction="none").numpy()


wins = 0
n = 0
for (a, b), c in zip(pairs, range(C)):
    la = loss(xtr[a], ytr[a])
    lb = loss(xtr[b] if len(rest) else xte[b], np.full(len(b), c))
    wins += int((la < lb).sum())
    n += len(a)
lp = binom.logsf(wins - 1, n, 0.5) / np.log(10)
print(
    json.dumps(
        dict(
            seed=SEED,
            per=PER,
            m=n,
            epochs=EPOCHS,
            arch=ARCH,
            train_acc=tracc,
            wins=wins,
            frac=wins / n,
            log10p=lp,
            sec=time.time() - t0,
        )
    )
)
