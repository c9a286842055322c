"""The benchmark's suspects: models trained by someone who (maybe) used the marked data.

Not part of radmark's CLI: this plays the role of the data user. Three recipes:

- ``--arch A``: train architecture A from scratch on the (marked or clean) training shards with
  the recipe of :func:`radmark.models.training.train_classifier` (SGD + Nesterov momentum,
  weight decay 5e-4, one-cycle schedule, random crop with 4 px reflect padding), re-implemented
  here so that the augmentation can follow the data: ``--aug crop+flip`` (the default, natural
  images such as Fashion-MNIST; bit-identical to ``train_classifier``, a test checks it) or
  ``--aug crop`` (glyphs: a mirrored character is another character, or none).
- ``--finetune MARKER``: the data user fine-tunes a public backbone that the owner also used as
  marker: every layer starts from MARKER's weights (its input normalisation kept), the final
  linear layer is re-initialised, and the whole network is trained with the same recipe (a lower
  ``--lr``, default 0.01, and fewer epochs).
- ``--linear-probe MARKER``: the paper's easiest setting. The marker's feature extractor is frozen
  (eval mode, batch-norm statistics included) and only its final linear layer is re-initialised
  and trained (cross-entropy, Adam, mini-batches) on the marker's features of the training images,
  un-augmented. The result is saved as a full model of the marker's architecture, so that
  ``radmark verify`` loads it like any other suspect.

Either way the model is written as safetensors with :func:`radmark.models.save_model`, and a JSON
sidecar ``<out>.json`` holds its test accuracy on ``--test`` shards, its train accuracy measured
the same way (eval mode, no augmentation, on up to ``--train-eval`` training images: the
membership-style signals the tests look for grow with the train-test gap), the running accuracy
of the last epoch, and timings.

    python -m bench.train_suspect TRAIN_SHARDS --test TEST_SHARDS --arch smallcnn --out S.safetensors
    python -m bench.train_suspect TRAIN_SHARDS --test TEST_SHARDS --arch smallcnn --aug crop --out S.safetensors
    python -m bench.train_suspect TRAIN_SHARDS --test TEST_SHARDS --finetune M.safetensors --out S.safetensors
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

AUGMENTATIONS = ("crop+flip", "crop", "none")


def _accuracy(logits_fn: Any, images: np.ndarray, labels: np.ndarray, device: str) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, images.shape[0], 512):
            x = torch.from_numpy(images[i : i + 512]).to(device).float().div_(255.0)
            pred = logits_fn(x).argmax(1).cpu().numpy()
            correct += int((pred == labels[i : i + 512]).sum())
    return correct / max(int(labels.shape[0]), 1)


def _train_eval_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` training images (a seeded random subset, sorted)."""
    n = int(labels.shape[0])
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def accuracies(
    logits_fn: Any, train: Any, test: Any, *, device: str, train_eval: int, seed: int
) -> dict[str, float]:
    """Train and test accuracy measured the same way (eval mode, no augmentation), and the gap."""
    idx = _train_eval_subset(train.labels, train_eval, seed)
    tr = _accuracy(logits_fn, train.images[idx], train.labels[idx], device)
    te = _accuracy(logits_fn, test.images, test.labels, device)
    return {
        "train_accuracy": tr,
        "test_accuracy": te,
        "train_test_gap": tr - te,
        "train_eval_images": int(idx.size),
    }


def fit(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Any,
    std: Any,
    epochs: int,
    batch_size: int,
    lr: float,
    gen: Any,
    device: str,
    aug: str,
    weight_decay: float = 5e-4,
) -> float:
    """The library's loop (``radmark.models.training.fit_epochs``, as ``train_classifier`` runs
    it) with the data's augmentation by name: ``crop+flip``, ``crop`` (glyphs) or ``none``.
    Returns the running train accuracy of the last epoch (augmented)."""
    from radmark.models.training import fit_epochs

    if aug not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {aug!r}; choose one of {AUGMENTATIONS}")
    return fit_epochs(
        model, images, labels, mean=mean, std=std, epochs=epochs, batch_size=batch_size, lr=lr,
        gen=gen, device=device, weight_decay=weight_decay, crop=aug != "none",
        flip=aug == "crop+flip",
    )  # fmt: skip


def _run_fields(
    epochs: int, batch_size: int, lr: float, seed: int, acc: dict[str, Any], running: float,
    seconds: float, sha: str, train: Any,
) -> dict[str, Any]:  # fmt: skip
    """What every suspect's sidecar records about its run, whatever the regime."""
    n = int(train.images.shape[0])
    return {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, **acc,
        "train_accuracy_running": running, "train_seconds": seconds, "sha256": sha,
        "train_images": n, "train_images_per_s": epochs * n / max(seconds, 1e-9),
    }  # fmt: skip


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
    aug: str = "crop+flip",
    train_eval: int = 10_000,
) -> dict[str, Any]:
    """``arch`` from scratch, as ``train_classifier`` builds and normalises it."""
    import torch

    from radmark.models import save_model
    from radmark.models.registry import build_model

    num_classes = int(max(train.num_classes_seen, test.num_classes_seen))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    _, c, h, w = train.images.shape
    small_stem = arch.startswith("resnet") and max(h, w) <= 64
    model = build_model(arch, num_classes, small_stem=small_stem, in_chans=c).to(device)
    x_all = torch.from_numpy(np.ascontiguousarray(train.images)).float().div_(255.0)
    mean = x_all.mean(dim=(0, 2, 3))
    std = x_all.std(dim=(0, 2, 3)).clamp_min(1e-3)
    del x_all
    running = fit(
        model,
        train.images,
        train.labels,
        mean=mean,
        std=std,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        gen=gen,
        device=device,
        aug=aug,
    )
    seconds = time.perf_counter() - t0
    m = mean.view(1, -1, 1, 1).to(device)
    s = std.view(1, -1, 1, 1).to(device)
    acc = accuracies(
        lambda x: model((x - m) / s), train, test, device=device, train_eval=train_eval, seed=seed
    )
    sha = save_model(
        model.cpu(),
        out,
        arch=arch,
        num_classes=num_classes,
        small_stem=small_stem,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        extra={"radmark.trained_by": "bench.train_suspect"},
    )
    return {
        "kind": "scratch",
        "arch": arch,
        "small_stem": bool(small_stem),
        "aug": aug,
        **_run_fields(epochs, batch_size, lr, seed, acc, running, seconds, sha, train),
    }


def finetune(
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
    aug: str = "crop+flip",
    train_eval: int = 10_000,
) -> dict[str, Any]:
    """Every layer from the marker's weights, a fresh head, the whole network trained."""
    import torch

    from radmark.models import load_model, save_model

    marker = load_model(marker_path, device=device)
    net = marker.model
    for p in net.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    marker.head.linear.reset_parameters()  # the user's own task head, trained on their data
    mean = torch.tensor(marker.mean, dtype=torch.float32)
    std = torch.tensor(marker.std, dtype=torch.float32)
    running = fit(
        net,
        train.images,
        train.labels,
        mean=mean,
        std=std,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        gen=gen,
        device=device,
        aug=aug,
    )
    seconds = time.perf_counter() - t0
    for p in net.parameters():
        p.requires_grad_(False)
    acc = accuracies(marker.logits, train, test, device=device, train_eval=train_eval, seed=seed)
    sha = save_model(
        net.cpu(),
        out,
        arch=marker.arch,
        num_classes=marker.num_classes,
        small_stem=marker.metadata.get("radmark.small_stem", "0") == "1",
        mean=marker.mean,
        std=marker.std,
        extra={"radmark.trained_by": "bench.train_suspect --finetune"},
    )
    return {
        "kind": "finetune",
        "arch": marker.arch,
        "marker": marker_path,
        "aug": aug,
        **_run_fields(epochs, batch_size, lr, seed, acc, running, seconds, sha, train),
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
    train_eval: int = 10_000,
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
    acc = accuracies(
        lambda x: linear(marker.features(x)),
        train,
        test,
        device=device,
        train_eval=train_eval,
        seed=seed,
    )
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
        **_run_fields(
            epochs, batch_size, lr, seed, acc, correct / max(total, 1), seconds, sha, train
        ),
    }


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(train(argv)))
    return 0


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, train, write the model and its sidecar; the sidecar's content."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="+", help="training shards (files or directories)")
    ap.add_argument("--test", action="append", required=True, help="test shards (accuracy)")
    ap.add_argument("--out", required=True, type=Path, help="model file (.safetensors)")
    kind = ap.add_mutually_exclusive_group(required=True)
    kind.add_argument("--arch", help="train this architecture from scratch")
    kind.add_argument("--finetune", metavar="MARKER", help="fine-tune every layer of MARKER")
    kind.add_argument("--linear-probe", metavar="MARKER", help="train only the head on MARKER")
    ap.add_argument("--aug", choices=AUGMENTATIONS, default="crop+flip", help="augmentation")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default 0.05 / 0.01 (fine-tune, probe)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument(
        "--train-eval", type=int, default=10_000, help="training images for the train accuracy"
    )
    args = ap.parse_args(argv)

    import torch

    from radmark.data.arrays import load_labelled_images

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train = load_labelled_images(args.shards)
    test = load_labelled_images(args.test)
    load_s = time.perf_counter() - t0
    common = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
        "out": args.out,
        "train_eval": args.train_eval,
    }
    if args.arch:
        info = train_from_scratch(
            train,
            test,
            arch=args.arch,
            lr=args.lr if args.lr is not None else 0.05,
            aug=args.aug,
            **common,
        )
    elif args.finetune:
        info = finetune(
            train,
            test,
            marker_path=args.finetune,
            lr=args.lr if args.lr is not None else 0.01,
            aug=args.aug,
            **common,
        )
    else:
        info = train_linear_probe(
            train,
            test,
            marker_path=args.linear_probe,
            lr=args.lr if args.lr is not None else 0.01,
            **common,
        )
    info.update(
        path=str(args.out),
        load_seconds=load_s,
        test_images=int(test.images.shape[0]),
        threads=torch.get_num_threads(),
        command=[sys.executable, "-m", "bench.train_suspect", *(argv or sys.argv[1:])],
    )
    sidecar = args.out.with_suffix(args.out.suffix + ".json")
    sidecar.write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    raise SystemExit(main())
