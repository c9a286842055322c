"""``make demo``: the whole chain on an embedded default, in a fresh directory.

Runs the real CLI as a user would, on a small real dataset shipped with the repository
(a class-balanced Fashion-MNIST subset in tests/data, MIT-licensed), so it needs no network:

keygen → shards → marker train → mark → train two suspects (one on the marked shards, one on the
clean shards) → verify both. The suspects are linear classifiers on the frozen marker features,
the paper's easiest setting: on 10 classes the paper's white-box test has little power for
models trained from scratch (see docs/method.md), and the demo does not pretend otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "fmnist-small.npz"


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


def main(workdir: str = "demo-out") -> None:
    import numpy as np

    from radmark.data.writer import write_dataset

    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ks = work / "keys"
    data = np.load(DATA)
    write_dataset(
        data["train_images"], data["train_labels"].tolist(), work / "train", samples_per_shard=1000
    )
    write_dataset(
        data["test_images"], data["test_labels"].tolist(), work / "probe", samples_per_shard=1000
    )
    print(
        f"shards: {work / 'train'} (3000 training images), {work / 'probe'} (1000 clean probe images)"
    )

    _radmark("keygen", "--keystore", str(ks), "--no-passphrase", "--out", str(work / "owner.key"))
    _radmark(
        "marker",
        "train",
        str(work / "train"),
        "--arch",
        "smallcnn",
        "--epochs",
        "3",
        "--out",
        str(work / "marker.safetensors"),
    )
    _radmark(
        "mark",
        str(work / "train"),
        "--key",
        str(work / "owner.key"),
        "--keystore",
        str(ks),
        "--marker",
        str(work / "marker.safetensors"),
        "--out",
        str(work / "marked"),
        "--fraction",
        "1.0",
        "--radius",
        "4",
        "--steps",
        "40",
        # the black-box test's verification kit: 5 clean probe images per class, 19 decoys
        "--kit-probe",
        str(work / "probe"),
        "--kit-decoys",
        "19",
        "--kit-per-class",
        "5",
    )
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
            "verify",
            str(work / f"{name}.safetensors"),
            "--probe",
            str(work / "probe"),
            "--key",
            str(work / "owner.key"),
            "--keystore",
            str(ks),
            "--marker",
            str(work / "marker.safetensors"),
            "--black-box",
        )
        verdicts[name] = res.returncode
    print(
        "\nsummary: "
        + ", ".join(
            f"{k}: exit {v} ({'detected' if v == 1 else 'not detected'})"
            for k, v in verdicts.items()
        )
        + " (log10 p of each test in the reports above)"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
