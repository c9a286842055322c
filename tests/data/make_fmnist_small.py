"""Regenerate tests/data/fmnist-small.npz: a small, real, class-balanced Fashion-MNIST subset.

Fashion-MNIST (Zalando Research) is MIT-licensed. Run: python -m tests.data.make_fmnist_small
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import fmnist

PER_CLASS = {"train": 300, "test": 100}


def main() -> None:
    out = {}
    for split, k in PER_CLASS.items():
        images, labels = fmnist.load(split, fmnist.ensure_installed())
        idx = np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(10)])
        idx.sort()
        out[f"{split}_images"] = images[idx]
        out[f"{split}_labels"] = labels[idx].astype(np.uint8)
    np.savez_compressed(Path(__file__).with_name("fmnist-small.npz"), **out)


if __name__ == "__main__":
    main()
