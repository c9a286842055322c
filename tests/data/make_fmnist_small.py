"""Regenerate radmark/demo_data/fmnist-small.npz: a small, real, class-balanced Fashion-MNIST subset.

Fashion-MNIST (Zalando Research) is MIT-licensed (radmark/demo_data/LICENSE-fashion-mnist.txt).
The file is package data: the demo (``python -m radmark.demo``) and the tests' factories read it.
Run: python -m tests.data.make_fmnist_small [--install] (``--install`` lets bench.fmnist run apt).
"""

from __future__ import annotations

import sys

import numpy as np

from bench import fmnist
from radmark.demo import DATA

PER_CLASS = {"train": 300, "test": 100}


def main(argv: list[str] | None = None) -> None:
    install = "--install" in (sys.argv[1:] if argv is None else argv)
    out = {}
    for split, k in PER_CLASS.items():
        images, labels = fmnist.load(split, fmnist.ensure_installed(install=install))
        idx = np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(10)])
        idx.sort()
        out[f"{split}_images"] = images[idx]
        out[f"{split}_labels"] = labels[idx].astype(np.uint8)
    np.savez_compressed(DATA, **out)


if __name__ == "__main__":
    main()
