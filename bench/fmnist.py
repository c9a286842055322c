"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (or any directory with the IDX files)."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as fh:
                data = fh.read()
            break
    else:
        raise FileNotFoundError(f"{path}(.gz) not found")
    zero, dtype, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def ensure_installed(directory: Path = DEFAULT_DIR) -> Path:
    """Install Debian's package when the files are missing and apt is there (we are root)."""
    if (directory / (FILES["train"][0] + ".gz")).exists() or (
        directory / FILES["train"][0]
    ).exists():
        return directory
    if directory == DEFAULT_DIR and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)
        return directory
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {directory}: install Debian's dataset-fashion-mnist or pass "
        "--data DIR with the four IDX files"
    )


def load(split: str, directory: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels [N] of ``split`` ("train" or "test")."""
    img_name, lab_name = FILES[split]
    images = _read_idx(directory / img_name)
    labels = _read_idx(directory / lab_name).astype(np.int64)
    return images, labels
