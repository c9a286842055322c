"""Shared plumbing of the twins_* experiment scripts: data, cached marker, suspects, scoring."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.fmnist import load  # noqa: E402
from radmark.marker import train_classifier  # noqa: E402

torch.set_num_threads(1)
CACHE = Path("/tmp/twins")
CACHE.mkdir(exist_ok=True)
OUT = ROOT / "bench" / "results" / "experiments"
C = 10


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except Exception:
        return "unknown"


def env_info() -> dict:
    return dict(
        device="cpu (1 thread)",
        torch=torch.__version__,
        numpy=np.__version__,
        commit=commit(),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def balanced_subset(y: np.ndarray, per_class: int, rng) -> np.ndarray:
    return np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(C)]
        )
    )


class Net:
    """A trained smallcnn with its normalisation: logits(x01), features(x01)."""

    def __init__(self, model, mean, std):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def features(self, x01):
        h = self.model.features((x01 - self.mean) / self.std)
        return torch.flatten(self.model.pool(h), 1)

    def head(self, f):
        return self.model.fc(f)

    def logits(self, x01):
        return self.model((x01 - self.mean) / self.std)


def train_net(
    x_u8: np.ndarray,
    y: np.ndarray,
    seed: int,
    epochs: int = 10,
    cache_name: str | None = None,
    augment: bool = True,
) -> tuple:
    """Train smallcnn with the library recipe (crop pad 4 + flip, SGD Nesterov, one-cycle).

    augment=False: the same recipe without crop and flip (a model that memorises more)."""
    from radmark.models import build_model

    if cache_name and (CACHE / cache_name).exists():
        d = torch.load(CACHE / cache_name, weights_only=False)
        m = build_model("smallcnn", C, in_chans=1)
        m.load_state_dict(d["state"])
        return Net(m, d["mean"], d["std"]), d["train_acc"], d["seconds"]
    t0 = time.time()
    model, mean, std, acc, _ = train_classifier(
        np.ascontiguousarray(x_u8),
        y,
        arch="smallcnn",
        num_classes=C,
        epochs=epochs,
        seed=seed,
        augment=augment,
    )
    sec = time.time() - t0
    if cache_name:
        torch.save(
            dict(state=model.state_dict(), mean=mean, std=std, train_acc=acc, seconds=sec),
            CACHE / cache_name,
        )
    return Net(model, mean, std), acc, sec


@torch.no_grad()
def accuracy(net: Net, x_u8: np.ndarray, y: np.ndarray, batch: int = 2000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on un-augmented images."""
    correct, loss = 0, 0.0
    for s in range(0, len(y), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x_u8[s : s + batch])).float() / 255.0
        yb = torch.from_numpy(y[s : s + batch])
        z = net.logits(xb)
        correct += int((z.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(z, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


def marker(seed: int = 1000) -> Net:
    """The marking network φ: smallcnn on 20,000 clean class-balanced training images, 10 epochs."""
    xtr, ytr = load("train")
    idx = balanced_subset(ytr, 2000, np.random.default_rng(seed))
    net, acc, sec = train_net(
        xtr[idx][:, None], ytr[idx], seed=seed, cache_name=f"marker_s{seed}.pt"
    )
    return net


def dump(name: str, obj: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(obj, indent=1, default=float))
    print("wrote", OUT / name, flush=True)
