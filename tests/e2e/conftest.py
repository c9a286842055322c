"""One real radioactive-data run on the small Fashion-MNIST subset, shared by the e2e tests.

Built once per session (about 50 s on one CPU core):

* a ``smallcnn`` marker (d = 128) trained 2 epochs on the 3000 real training images;
* ``N_MARK`` training images written as WebDataset shards and marked at 100% by the real
  ``radmark mark`` CLI with a pinned key (tests/factories.py make_key);
* the suspect: the marker with its ``fc`` re-initialised and re-trained on the *marked* images
  (frozen marker features: the paper's easiest setting, where the alignment is exact), and the
  control trained the same way on the same images *unmarked*;
* a clean probe set: the 1000 real test images, never marked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.data.arrays import load_labelled_images
from radmark.data.writer import write_dataset
from radmark.demo import DATA
from radmark.models import load_model, resolve_head, save_model
from radmark.models.training import train_classifier
from tests.factories import make_key

N_MARK = 3000  # all the training images (marking costs ~0.5 ms per image per step, 1 thread)
MARK_STEPS = "30"
MARK_RADIUS = "8"
HEAD_EPOCHS = 50


def _train_head(marker_file: Path, shards: Path, out: Path, seed: int) -> float:
    """Re-train only the marker's classifier on ``shards`` (frozen features); save as smallcnn."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lm = load_model(marker_file)
    assert resolve_head(lm.model).name == "fc"
    data = load_labelled_images([str(shards)])
    x = torch.from_numpy(data.images).float().div_(255.0)
    with torch.no_grad():
        feats = torch.cat([lm.features(x[i : i + 500]) for i in range(0, len(x), 500)])
    y = torch.from_numpy(data.labels)
    fc = torch.nn.Linear(feats.shape[1], 10)
    opt = torch.optim.Adam(fc.parameters(), lr=1e-2)
    for _ in range(HEAD_EPOCHS):
        perm = torch.randperm(len(feats), generator=gen)
        for i in range(0, len(feats), 128):
            idx = perm[i : i + 128]
            loss = torch.nn.functional.cross_entropy(fc(feats[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((fc(feats).argmax(1) == y).float().mean())
    model = lm.model
    model.fc = fc
    save_model(model, out, arch="smallcnn", num_classes=10, mean=lm.mean, std=lm.std)
    return acc


@pytest.fixture(scope="session")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("verify-e2e")
    d = np.load(DATA)
    train, train_y = d["train_images"], d["train_labels"].astype(np.int64)
    test, test_y = d["test_images"], d["test_labels"].astype(np.int64)

    model, mean, std, _acc, _ = train_classifier(
        train[:, None], train_y, arch="smallcnn", num_classes=10, epochs=2, seed=0
    )
    marker = root / "marker.safetensors"
    save_model(model, marker, arch="smallcnn", num_classes=10, mean=mean, std=std)

    write_dataset(train[:N_MARK], train_y[:N_MARK], root / "train", samples_per_shard=1000)
    write_dataset(test, test_y, root / "probe", samples_per_shard=500)

    ks = root / "keys"
    # pinned: the suspect, and so every statistic the e2e tests bound, is the same on every run
    fingerprint = make_key(ks, root / "owner.key", pinned="e2e-world")
    res = CliRunner().invoke(
        app,
        [
            "mark", str(root / "train"),
            "--key", fingerprint,
            "--keystore", str(ks),
            "--out", str(root / "marked"),
            "--fraction", "1.0",
            "--steps", MARK_STEPS,
            "--radius", MARK_RADIUS,
            "--marker", str(marker),
            "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    mark = json.loads(res.stdout)
    assert mark["marked"] == N_MARK

    suspect, control = root / "suspect.safetensors", root / "control.safetensors"
    acc_s = _train_head(marker, root / "marked", suspect, seed=1)
    acc_c = _train_head(marker, root / "train", control, seed=1)
    return {
        "root": root,
        "marker": marker,
        "probe": root / "probe",
        "keystore": ks,
        "key_file": root / "owner.key",
        "fingerprint": fingerprint,
        "record": mark["record"],
        "suspect": suspect,
        "control": control,
        "accuracy": (acc_s, acc_c),
        "probe_labels": test_y,
    }
