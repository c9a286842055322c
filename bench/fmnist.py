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


#: The command that installs the files at :data:`DEFAULT_DIR` (Debian, as root).
INSTALL_COMMAND = "apt-get install -y dataset-fashion-mnist"


def ensure_installed(directory: Path = DEFAULT_DIR, *, install: bool = False) -> Path:
    """``directory`` if it holds the IDX files; else install Debian's package only if ``install``.

    The benchmark never runs a package manager behind the user's back: without ``install``
    (``python -m bench.run --install``) a missing dataset is an error that prints the command.
    """
    if (directory / (FILES["train"][0] + ".gz")).exists() or (
        directory / FILES["train"][0]
    ).exists():
        return directory
    hint = (
        f"Fashion-MNIST not found in {directory}: install Debian's dataset-fashion-mnist as root "
        f"({INSTALL_COMMAND}), rerun with --install to let the benchmark run that command, or "
        "pass --data DIR with the four IDX files"
    )
    if not install or directory != DEFAULT_DIR:
        raise FileNotFoundError(hint)
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise FileNotFoundError(f"--install needs apt-get and root; {hint}")
    print(f"running: apt-get update -qq && {INSTALL_COMMAND}", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(INSTALL_COMMAND.split(), check=True)
    return directory


def load(split: str, directory: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels [N] of ``split`` ("train" or "test")."""
    img_name, lab_name = FILES[split]
    images = _read_idx(directory / img_name)
    labels = _read_idx(directory / lab_name).astype(np.int64)
    return images, labels
