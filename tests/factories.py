"""Tiny, real fixtures for the mark tests: Fashion-MNIST shards, a smallcnn marker and a key.

Everything is built in a test's tmp_path from the embedded Fashion-MNIST subset
(``radmark/demo_data/fmnist-small.npz``, package data shared with ``python -m radmark.demo``), small
enough that a full ``radmark mark`` run with ``--steps 2`` takes about a second on one CPU thread.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from radmark.demo import DATA


def fmnist(n: int, *, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real Fashion-MNIST training images [n, 28, 28] uint8 and their labels."""
    with np.load(DATA) as z:
        return (
            z["train_images"][offset : offset + n].copy(),
            z["train_labels"][offset : offset + n].astype(np.int64).copy(),
        )


def make_shards(
    directory: Path,
    *,
    n: int = 48,
    per_shard: int = 16,
    prefix: str = "data",
    with_json: bool = True,
    offset: int = 0,
) -> list[Path]:
    """Write ``n`` images as WebDataset shards of ``per_shard`` samples (png + cls [+ json])."""
    from radmark.data.writer import write_dataset

    images, labels = fmnist(n, offset=offset)

    def extra(i: int) -> dict[str, bytes]:
        doc = {"index": i, "source": "fmnist-small", "note": "kept byte-identical"}
        return {"json": json.dumps(doc, sort_keys=True).encode()} if with_json else {}

    return write_dataset(
        images, labels, directory, prefix=prefix, samples_per_shard=per_shard, extra=extra
    )


def make_marker(path: Path, *, num_classes: int = 10, seed: int = 0) -> Path:
    """An untrained but fixed grayscale smallcnn marker saved as .safetensors."""
    import torch

    from radmark.models import build_model, save_model

    torch.manual_seed(seed)
    model = build_model("smallcnn", num_classes, in_chans=1).eval()
    save_model(model, path, arch="smallcnn", num_classes=num_classes, mean=(0.5,), std=(0.25,))
    return Path(path)


def make_broken_marker(path: Path, kind: str) -> Path:
    """A smallcnn marker that loads (finite weights) but cannot mark (issue #12).

    ``overflow``: first conv weights ±3e38, so its features overflow to inf/NaN; ``dead``: the
    last batch-norm shifted by -1e4, so every ReLU is dead and every gradient vanishes (what a
    marker trained with a huge learning rate can end up as).
    """
    import torch

    from radmark.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("smallcnn", 10, in_chans=1).eval()
    with torch.no_grad():
        if kind == "overflow":
            w = model.features[0].weight
            w.copy_(torch.where(torch.rand_like(w) < 0.5, -3e38, 3e38))
        elif kind == "dead":
            model.features[9].bias.fill_(-1e4)
        else:
            raise ValueError(kind)
    save_model(model, path, arch="smallcnn", num_classes=10, mean=(0.5,), std=(0.25,))
    return Path(path)


def make_key(keystore: Path, key_file: Path | None = None, *, pinned: str | None = None) -> str:
    """An unencrypted key (fast scrypt); returns its ``sha256:`` fingerprint.

    Fresh by default. ``pinned`` names a fixed key instead: the secret and the creation time
    derive from the name, so the fingerprint, the selection, the carriers and the marked bytes are
    the same on every run. Use it wherever an assertion depends on which samples the key selects
    or on a statistic of one key (a fresh key made such tests fail one run in a few hundred).
    """
    if pinned is None:
        from radmark.keys.manage import generate_key

        return generate_key(
            keystore, passphrase=None, out_file=key_file, scrypt_n=2**10
        ).fingerprint
    from radmark.canonical import address
    from radmark.fsutil import atomic_write_bytes
    from radmark.keys.keypair import SecretKey
    from radmark.keys.sealing import keyfile_bytes, seal_secret
    from radmark.keys.store import Keystore

    key = SecretKey(hashlib.sha256(f"radmark test key {pinned}".encode()).digest())
    record = key.public_record(created="2026-01-01T00:00:00Z")
    Keystore.open(keystore, create=True).add_key(key, record, None, scrypt_n=2**10)
    if key_file is not None:
        doc = seal_secret(key, record.fingerprint, None, scrypt_n=2**10)
        atomic_write_bytes(key_file, keyfile_bytes(record, doc), 0o600)
    return address(record.fingerprint)


def sha256_tree(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def temp_files(directory: Path) -> list[str]:
    """Leftover temporary files (``.NAME....tmp``) in ``directory``."""
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")
    )


def make_record(keystore: Path, marker_path: Path, *, num_classes: int = 10):  # -> MarkRecord
    """A signed mark record for ``marker_path`` made with a fresh key, without marking anything.

    For tests and benchmarks that score keys against a record (null calibration, the verification
    seam, verify timings): only the record's marker, d and C matter there. Returns the verified
    record from the keystore (the key's secret is stored there too, unencrypted).
    """
    from radmark.keys.carriers import CARRIER_FORMAT, carriers_digest, derive_carriers
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkerRef, mark_record_body
    from radmark.keys.store import Keystore
    from radmark.marking.radioactive import get_preset
    from radmark.marking.selection import SELECTION_RULE
    from radmark.models import load_model

    marker = load_model(str(marker_path))
    store = Keystore.open(keystore, create=True)
    key = SecretKey.generate()
    pub = key.public_record()
    store.add_key(key, pub, None, scrypt_n=2**10)
    carriers = derive_carriers(key.carrier_seed(), marker.dim, num_classes, marker.identity)
    body = mark_record_body(
        key_fingerprint=pub.fingerprint,
        method="radioactive",
        marker=MarkerRef(
            marker.identity, marker.name, marker.arch, marker.sha256, marker.dim, str(marker_path)
        ),
        num_classes=num_classes,
        carriers={"format": CARRIER_FORMAT, "sha256": carriers_digest(carriers)},
        params=get_preset("default").to_dict(),
        fraction=0.1,
        selection_rule=SELECTION_RULE,
        label_field="cls",
        counts={"images": 0, "marked": 0, "skipped": 0},
        shards=[],
    )
    return store.mark_record(store.put(key.sign(body)))
