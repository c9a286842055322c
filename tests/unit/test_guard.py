"""The probe guard (radmark/verify/guard.py, issue #17): marked images never reach the probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.data.arrays import load_probe
from radmark.errors import InputError
from radmark.keys.keypair import SecretKey
from radmark.verify.guard import check_probe_pixels, pixel_digest
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
    marked = {pixel_digest(key, probe.images[7])}
    with pytest.raises(InputError, match="is an image marked by"):
        check_probe_pixels(probe, key, marked, "sha256:abcd")
    check_probe_pixels(probe, SecretKey.generate(), marked, "sha256:abcd")  # another key: no hit
    other = probe.images[7].copy()
    other[0, 0, 0] ^= 1  # one level changed: not the same image
    assert pixel_digest(key, other) not in marked
    assert pixel_digest(key, np.ascontiguousarray(probe.images[7])) in marked
