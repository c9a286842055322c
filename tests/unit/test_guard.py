"""The probe guard (radmark/verify/guard.py, issue #17): marked images never reach the probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.data.arrays import load_probe
from radmark.errors import InputError
from radmark.keys.keypair import SecretKey, pixel_digest
from radmark.verify.guard import check_probe_pixels
from tests.factories import make_key, make_marker, make_shards


def test_marked_shards_as_probe_are_refused(tmp_path: Path) -> None:
    make_shards(tmp_path / "in", n=16, per_shard=8)
    marker = make_marker(tmp_path / "m.safetensors")
    make_key(tmp_path / "ks", tmp_path / "owner.key")
    base = ["--keystore", str(tmp_path / "ks")]
    res = CliRunner().invoke(app, ["mark", str(tmp_path / "in"), "--key", str(tmp_path / "owner.key"),
                                   "--out", str(tmp_path / "out"), "--marker", str(marker),
                                   "--fraction", "1.0", "--steps", "1", "--device", "cpu", *base])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["verify", str(marker), "--probe", str(tmp_path / "out"),
                                   "--device", "cpu", *base])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "is the marked shard" in res.output and "held-out" in res.output


def test_marked_pixels_in_the_probe_are_refused(tmp_path: Path) -> None:
    make_shards(tmp_path / "p", n=20, per_shard=20, with_json=False)
    probe = load_probe([str(tmp_path / "p")])
    key = SecretKey.generate()
    marked = {pixel_digest(key.selection_seed(), probe.images[7])}
    with pytest.raises(InputError, match="is an image marked by"):
        check_probe_pixels(probe, key, marked, "sha256:abcd")
    check_probe_pixels(probe, SecretKey.generate(), marked, "sha256:abcd")  # another key: no hit
    other = probe.images[7].copy()
    other[0, 0, 0] ^= 1  # one level changed: not the same image
    assert pixel_digest(key.selection_seed(), other) not in marked
    assert pixel_digest(key.selection_seed(), np.ascontiguousarray(probe.images[7])) in marked


def test_marked_images_repacked_into_the_probe_are_refused(tmp_path: Path) -> None:
    """Shards re-packed (other names, other file hashes) still hold the marked pixels."""
    from radmark.data.arrays import load_labelled_images
    from radmark.data.writer import write_dataset

    make_shards(tmp_path / "in", n=16, per_shard=8)
    marker = make_marker(tmp_path / "m.safetensors")
    make_key(tmp_path / "ks", tmp_path / "owner.key")
    base = ["--keystore", str(tmp_path / "ks")]
    res = CliRunner().invoke(app, ["mark", str(tmp_path / "in"), "--key", str(tmp_path / "owner.key"),
                                   "--out", str(tmp_path / "out"), "--marker", str(marker),
                                   "--fraction", "1.0", "--steps", "2", "--device", "cpu", *base])  # fmt: skip
    assert res.exit_code == 0, res.output
    marked = load_labelled_images([str(tmp_path / "out")])
    clean = load_labelled_images([str(tmp_path / "in")])
    # a probe of 2 marked images among 14 clean ones, re-packed under new keys
    imgs = np.concatenate([clean.images[2:], marked.images[:2]])[:, 0]
    write_dataset(imgs, [int(v) for v in np.concatenate([clean.labels[2:], marked.labels[:2]])],
                  tmp_path / "probe", prefix="repacked")  # fmt: skip
    res = CliRunner().invoke(app, ["verify", str(marker), "--probe", str(tmp_path / "probe"),
                                   "--key", str(tmp_path / "owner.key"), "--device", "cpu", *base])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "is an image marked by" in res.output
