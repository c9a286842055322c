"""``make demo``: the whole chain on an embedded default, in a fresh directory.

Runs the real CLI as a user would, on a small real dataset shipped inside the package
(``radmark/demo_data/fmnist-small.npz``: a class-balanced Fashion-MNIST subset, MIT-licensed, see
``demo_data/LICENSE-fashion-mnist.txt``), so it needs no network and works from an installed wheel
(``python -m radmark.demo [DIR]``):

keygen → shards → marker train → mark → train two suspects (one on the marked shards, one on the
clean shards) → verify both. The suspects are linear classifiers on the frozen marker features,
the paper's easiest setting: on 10 classes the paper's white-box test has little power for
models trained from scratch (see docs/method.md), and the demo does not pretend otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The embedded dataset: ``train_images`` uint8 [3000, 28, 28], ``train_labels`` uint8 [3000],
#: ``test_images`` uint8 [1000, 28, 28], ``test_labels`` uint8 [1000] (package data).
DATA = Path(__file__).resolve().with_name("demo_data") / "fmnist-small.npz"
#: A file the demo leaves in its directory, so that a rerun may replace that directory (and only
#: a directory the demo made: ``python -m radmark.demo ~`` must never wipe a home directory).
STAMP = ".radmark-demo"


def load_data() -> dict[str, Any]:
    """The embedded Fashion-MNIST subset as numpy arrays (see :data:`DATA`)."""
    import numpy as np

    if not DATA.is_file():
        raise SystemExit(
            f"radmark demo: the embedded dataset {DATA} is missing from this installation; "
            "reinstall radmark (it is package data of the wheel)"
        )
    with np.load(DATA) as z:
        return {name: z[name] for name in z.files}


def _radmark(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "radmark", *args]
    print("\n$ radmark " + " ".join(args), flush=True)
    res = subprocess.run(cmd, text=True, capture_output=True, env={"COLUMNS": "110", **_env()})
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode not in (0, 1):
        raise SystemExit(f"demo step failed with exit code {res.returncode}")
    return res


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _train_head(marker_path: Path, shards: Path, out: Path, seed: int) -> None:
    """A linear classifier on the frozen marker features (the marker with a re-trained head)."""
    import torch

    from radmark.data.arrays import load_labelled_images
    from radmark.models import load_model, save_model

    torch.manual_seed(seed)
    m = load_model(str(marker_path))
    data = load_labelled_images([str(shards)])
    x = torch.from_numpy(data.images).float() / 255.0
    y = torch.from_numpy(data.labels)
    with torch.no_grad():
        feats = torch.cat([m.features(x[i : i + 500]) for i in range(0, len(x), 500)])
    lin = m.head.linear
    torch.nn.init.normal_(lin.weight, std=0.01)
    torch.nn.init.zeros_(lin.bias)
    lin.requires_grad_(True)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(lin(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = m.metadata
    save_model(
        m.model,
        out,
        arch=m.arch,
        num_classes=m.num_classes,
        small_stem=meta.get("radmark.small_stem") == "1",
        mean=m.mean,
        std=m.std,
    )


def _fresh_dir(work: Path) -> None:
    """Empty ``work`` if the demo made it; refuse any other non-empty directory or file."""
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise SystemExit(f"radmark demo: {work} is not a directory; choose another one")
    if work.is_dir() and any(work.iterdir()):
        if not (work / STAMP).is_file():
            raise SystemExit(
                f"radmark demo: {work} is not empty and was not made by the demo; "
                "choose a new directory, or remove this one yourself"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / STAMP).write_text("made by python -m radmark.demo; rerunning the demo replaces it\n")


@dataclass(frozen=True)
class Scale:
    """How much work the demo does: the full demo, or a quick run that only shows the chain works."""

    train: int = 3000  # training images (the marked fraction is 100%)
    probe: int = 1000  # clean probe images (the white-box alignment needs well above d = 128)
    epochs: int = 3  # marker training
    steps: int = 40  # marking optimisation steps per image
    kit_decoys: int = 19
    kit_per_class: int = 5


#: ``--quick``: seconds instead of minutes; no detection is expected at this size.
QUICK = Scale(train=300, probe=200, epochs=1, steps=2, kit_decoys=3, kit_per_class=1)


def main(workdir: str = "demo-out", scale: Scale | None = None) -> None:
    from radmark.data.writer import write_dataset

    sc = scale or Scale()
    work = Path(workdir)
    data = load_data()
    _fresh_dir(work)
    ks = work / "keys"
    write_dataset(
        data["train_images"][: sc.train],
        data["train_labels"][: sc.train].tolist(),
        work / "train",
        samples_per_shard=1000,
    )
    write_dataset(
        data["test_images"][: sc.probe],
        data["test_labels"][: sc.probe].tolist(),
        work / "probe",
        samples_per_shard=1000,
    )
    print(
        f"shards: {work / 'train'} ({sc.train} training images), "
        f"{work / 'probe'} ({sc.probe} clean probe images)"
    )

    _radmark("keygen", "--keystore", str(ks), "--no-passphrase", "--out", str(work / "owner.key"))
    _radmark(
        "marker", "train", str(work / "train"),
        "--arch", "smallcnn", "--epochs", str(sc.epochs),
        "--out", str(work / "marker.safetensors"),
    )  # fmt: skip
    _radmark(
        "mark", str(work / "train"),
        "--key", str(work / "owner.key"), "--keystore", str(ks),
        "--marker", str(work / "marker.safetensors"), "--out", str(work / "marked"),
        "--fraction", "1.0", "--radius", "4", "--steps", str(sc.steps),
        # the black-box test's verification kit: clean probe images, marked once per slot
        "--kit-probe", str(work / "probe"),
        "--kit-decoys", str(sc.kit_decoys), "--kit-per-class", str(sc.kit_per_class),
        # the verification plan pins the probe set by content before any suspect exists
        "--plan-probe", str(work / "probe"),
    )  # fmt: skip
    _radmark("keys", "list", "--keystore", str(ks))
    print(
        "\ntraining two suspects: a linear head on the frozen marker, on marked and on clean data"
    )
    _train_head(
        work / "marker.safetensors", work / "marked", work / "suspect-marked.safetensors", 1
    )
    _train_head(work / "marker.safetensors", work / "train", work / "suspect-clean.safetensors", 1)
    verdicts = {}
    for name in ("suspect-marked", "suspect-clean"):
        res = _radmark(
            "verify", str(work / f"{name}.safetensors"),
            "--probe", str(work / "probe"),
            "--key", str(work / "owner.key"), "--keystore", str(ks),
            # no test options: the plan's tests run (white box, pull-back, the kit's black box)
            "--marker", str(work / "marker.safetensors"),
        )  # fmt: skip
        verdicts[name] = res.returncode
    print(
        "\nsummary: "
        + ", ".join(
            f"{k}: exit {v} ({'detected' if v == 1 else 'not detected'})"
            for k, v in verdicts.items()
        )
        + " (log10 p of each test in the reports above)"
    )


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m radmark.demo",
        description="keygen -> marker train -> mark -> train two suspects -> verify, on an "
        "embedded Fashion-MNIST subset (offline, CPU, a few minutes).",
    )
    ap.add_argument(
        "workdir",
        nargs="?",
        default="demo-out",
        help="where everything is written (default: demo-out; replaced on a rerun, and only if "
        "the demo made it)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a small, fast run (seconds) that shows the chain works; it detects nothing",
    )
    args = ap.parse_args(argv)
    main(args.workdir, QUICK if args.quick else None)


if __name__ == "__main__":
    cli()
