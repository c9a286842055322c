"""Training classifiers: a marking network on the owner's own shards (``radmark marker train``),
and the benchmark's suspects, with the recipe a data user would use (SGD + Nesterov momentum,
one-cycle schedule, random crop with reflect padding and horizontal flip).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radmark.data.arrays import load_labelled_images
from radmark.errors import ModelError, UsageError, check_count, check_positive

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class TrainResult:
    path: Path
    sha256: str
    arch: str
    num_classes: int
    images: int
    epochs: int
    train_accuracy: float
    seconds: float


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    arch: str,
    num_classes: int,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str = "cpu",
    small_stem: bool | None = None,
    augment: bool = True,
    progress: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...], float, bool]:
    """Train ``arch`` from scratch on uint8 [N, C, H, W] images: SGD + momentum, cosine schedule,
    random crop (pad 4) and flip. Used by ``radmark marker train`` and by the benchmark.

    Returns (model in eval mode, mean [C] and std [C] of the images in [0, 1] units, the last
    epoch's train accuracy, whether the small-image stem was used)."""
    import torch

    from radmark.models.registry import build_model

    check_count("--epochs", epochs)
    check_count("--batch-size", batch_size)
    check_positive("--lr", lr)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UsageError(f"weight decay must be a finite number >= 0, got {weight_decay}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    if small_stem is None:
        small_stem = arch.startswith("resnet") and max(h, w) <= 64
    model = build_model(arch, num_classes, small_stem=small_stem, in_chans=c).to(device)
    try:  # images too small for the architecture's pooling: the user's input, exit 2 (#12)
        with torch.no_grad():
            model.eval()(torch.zeros(2, c, h, w, device=device))
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise ModelError(
            f"{arch} cannot take {w}x{h} images: they are too small for its layers "
            f"({' '.join(str(exc).split())[:160]}); use larger images or another --arch"
        ) from None
    x_all = torch.from_numpy(images).float().div_(255.0)
    mean = x_all.mean(dim=(0, 2, 3))
    std = x_all.std(dim=(0, 2, 3)).clamp_min(1e-3)
    del x_all  # fit_epochs makes its own float copy
    acc = fit_epochs(
        model, images, labels, mean=mean, std=std, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, gen=gen, device=device, crop=augment, flip=augment,
        progress=progress,
        on_step=on_step,
    )  # fmt: skip
    model.eval()
    return model, tuple(mean.tolist()), tuple(std.tolist()), acc, small_stem


def random_crop(x: torch.Tensor, gen: torch.Generator, *, flip: bool, pad: int = 4) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding), then (``flip``) a horizontal
    flip with probability 1/2, per image; x float [B, C, H, W]. Glyphs are cropped, never
    flipped: a mirrored character is another character."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(x.device)
    out = xp[
        torch.arange(b, device=x.device).view(b, 1, 1), :, rows.view(b, h, 1), cols.view(b, 1, w)
    ].permute(0, 3, 1, 2)
    if not flip:
        return out
    mirrored = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    return torch.where(mirrored.view(b, 1, 1, 1), out.flip(3), out)


def fit_epochs(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    device: str,
    weight_decay: float = 5e-4,
    crop: bool = True,
    flip: bool = True,
    progress: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> float:
    """The one training loop (the marker's and the benchmark's suspects'): SGD + Nesterov
    momentum 0.9, one-cycle (15% warm-up), optional random crop and flip. ``images`` uint8
    [N, C, H, W]; ``mean``/``std`` float tensors [C] in [0, 1] pixel units. Returns the running
    (augmented) train accuracy of the last epoch."""
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    x_all = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    y_all = torch.from_numpy(np.asarray(labels))
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True
    )
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    m_dev, s_dev = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
    correct = total = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        correct = total = 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = x_all[idx].to(device)
            y = y_all[idx].to(device)
            if crop:
                x = random_crop(x, gen, flip=flip)
            logits = model((x - m_dev) / s_dev)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
            if on_step is not None:  # (steps done, steps in all): the CLI's progress bar
                on_step(epoch * steps_per_epoch + i + 1, epochs * steps_per_epoch)
        if progress is not None:
            progress(epoch + 1, correct / max(total, 1))
    return correct / max(total, 1)


def train_marker(
    specs: Sequence[str],
    out: Path,
    *,
    arch: str = "resnet18",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    device: str = "cpu",
    label_field: str = "cls",
    num_classes: int | None = None,
    limit: int | None = None,
    progress: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> TrainResult:
    """Train a marking network on the user's own shards and save it as safetensors.

    Every option is checked, and ``out`` too, before any image is read: an existing ``out`` is
    refused unless ``force`` (mark records bind a marker by its hash, so replacing one silently
    would orphan them).
    """
    from radmark.fsutil import check_new_target
    from radmark.models.files import save_model
    from radmark.models.registry import get_arch

    check_count("--epochs", epochs)
    check_count("--batch-size", batch_size)
    check_positive("--lr", lr)
    check_count("--limit", limit)
    check_count("--num-classes", num_classes)
    get_arch(arch)  # a UsageError naming the known architectures
    from radmark.data.sources import expand_shards, input_files

    # never over one of the training shards; they are listed only if --force meets a file
    check_new_target(Path(out), force=force, what="--out",
                     inputs=lambda: input_files(expand_shards(specs)))  # fmt: skip
    t0 = time.perf_counter()
    data = load_labelled_images(
        specs, label_field=label_field, num_classes=num_classes, limit=limit
    )
    k = num_classes or data.num_classes_seen
    model, mean, std, acc, small_stem = train_classifier(
        data.images,
        data.labels,
        arch=arch,
        num_classes=k,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        progress=progress,
        on_step=on_step,
    )
    sha = save_model(
        model.cpu(),
        out,
        arch=arch,
        num_classes=k,
        small_stem=small_stem,
        mean=mean,
        std=std,
        extra={"radmark.trained_by": "radmark marker train"},
        overwrite=force,
    )
    return TrainResult(Path(out), sha, arch, k, len(data), epochs, acc, time.perf_counter() - t0)
