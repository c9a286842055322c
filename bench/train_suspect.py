"""The benchmark's suspects: models trained by someone who (maybe) used the marked data.

Not part of radmark's CLI: this plays the role of the data user. Two recipes:

- ``--arch A``: train architecture A from scratch on the (marked or clean) training shards with
  :func:`radmark.marker.train_classifier` (SGD + Nesterov momentum, one-cycle schedule, random
  crop with 4 px reflect padding and horizontal flip), a different seed than the marker's.
- ``--linear-probe MARKER``: the paper's easiest setting. The marker's feature extractor is frozen
  (eval mode, batch-norm statistics included) and only its final linear layer is re-initialised
  and trained (cross-entropy, Adam, mini-batches) on the marker's features of the training images,
  un-augmented. The result is saved as a full model of the marker's architecture, so that
  ``radmark verify`` loads it like any other suspect.

Either way the model is written as safetensors with :func:`radmark.models.save_model`, and a JSON
sidecar ``<out>.json`` holds its test accuracy on ``--test`` shards, train accuracy and timings.

    python -m bench.train_suspect TRAIN_SHARDS --test TEST_SHARDS --arch smallcnn --out S.safetensors
    python -m bench.train_suspect TRAIN_SHARDS --test TEST_SHARDS --linear-probe M.safetensors --out S.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _accuracy(logits_fn: Any, images: np.ndarray, labels: np.ndarray, device: str) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, images.shape[0], 512):
            x = torch.from_numpy(images[i : i + 512]).to(device).float().div_(255.0)
            pred = logits_fn(x).argmax(1).cpu().numpy()
            correct += int((pred == labels[i : i + 512]).sum())
    return correct / max(int(labels.shape[0]), 1)


def train_from_scratch(
    train: Any,
    test: Any,
    *,
    arch: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    out: Path,
) -> dict[str, Any]:
    import torch

    from radmark.models import save_model
    from radmark.models.training import train_classifier

    num_classes = int(max(train.num_classes_seen, test.num_classes_seen))
    t0 = time.perf_counter()
    model, mean, std, train_acc, small_stem = train_classifier(
        train.images,
        train.labels,
        arch=arch,
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )
    seconds = time.perf_counter() - t0
    model.eval()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    acc = _accuracy(lambda x: model((x - m) / s), test.images, test.labels, device)
    sha = save_model(
        model.cpu(),
        out,
        arch=arch,
        num_classes=num_classes,
        small_stem=small_stem,
        mean=mean,
        std=std,
        extra={"radmark.trained_by": "bench.train_suspect"},
    )
    return {
        "kind": "scratch",
        "arch": arch,
        "small_stem": bool(small_stem),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_accuracy": train_acc,
        "test_accuracy": acc,
        "train_seconds": seconds,
        "sha256": sha,
        "train_images": int(train.images.shape[0]),
        "train_images_per_s": epochs * train.images.shape[0] / max(seconds, 1e-9),
    }


def train_linear_probe(
    train: Any,
    test: Any,
    *,
    marker_path: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    out: Path,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from radmark.models import load_model, save_model

    marker = load_model(marker_path, device=device)
    net = marker.model.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    linear = marker.head.linear
    t0 = time.perf_counter()

    def feats(images: np.ndarray) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, images.shape[0], 512):
                x = torch.from_numpy(images[i : i + 512]).to(device).float().div_(255.0)
                out.append(marker.features(x))
        return torch.cat(out)

    f_train = feats(train.images)
    y_train = torch.from_numpy(train.labels).to(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    linear.reset_parameters()  # forget the marker's own head: trained only on the user's data
    params = list(linear.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    n = f_train.shape[0]
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    correct = total = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        correct = total = 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            logits = linear(f_train[idx])
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y_train[idx]).sum())
            total += int(idx.numel())
    seconds = time.perf_counter() - t0
    for p in params:
        p.requires_grad_(False)
    acc = _accuracy(lambda x: linear(marker.features(x)), test.images, test.labels, device)
    meta = marker.metadata
    sha = save_model(
        net.cpu(),
        out,
        arch=marker.arch,
        num_classes=marker.num_classes,
        small_stem=meta.get("radmark.small_stem", "0") == "1",
        mean=marker.mean,
        std=marker.std,
        extra={"radmark.trained_by": "bench.train_suspect --linear-probe"},
    )
    return {
        "kind": "linear_probe",
        "arch": marker.arch,
        "marker": marker_path,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_accuracy": correct / max(total, 1),
        "test_accuracy": acc,
        "train_seconds": seconds,
        "sha256": sha,
        "train_images": int(train.images.shape[0]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="+", help="training shards (files or directories)")
    ap.add_argument("--test", action="append", required=True, help="test shards (accuracy)")
    ap.add_argument("--out", required=True, type=Path, help="model file (.safetensors)")
    kind = ap.add_mutually_exclusive_group(required=True)
    kind.add_argument("--arch", help="train this architecture from scratch")
    kind.add_argument("--linear-probe", metavar="MARKER", help="train only the head on MARKER")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default 0.05 (SGD) / 0.01 (probe)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)

    import torch

    from radmark.data.arrays import load_labelled_images

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train = load_labelled_images(args.shards)
    test = load_labelled_images(args.test)
    load_s = time.perf_counter() - t0
    if args.arch:
        info = train_from_scratch(
            train,
            test,
            arch=args.arch,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else 0.05,
            seed=args.seed,
            device=args.device,
            out=args.out,
        )
    else:
        info = train_linear_probe(
            train,
            test,
            marker_path=args.linear_probe,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else 0.01,
            seed=args.seed,
            device=args.device,
            out=args.out,
        )
    info.update(
        path=str(args.out),
        load_seconds=load_s,
        test_images=int(test.images.shape[0]),
        command=[sys.executable, "-m", "bench.train_suspect", *(argv or sys.argv[1:])],
    )
    sidecar = args.out.with_suffix(args.out.suffix + ".json")
    sidecar.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
