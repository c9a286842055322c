"""Tests for bench.glyphs: the offline many-class CJK glyph set.

The build step (masters -> images) is tested on small synthetic masters made here, so nothing
needs the fonts; the one test that renders from fonts is skipped where they are not installed
(CI machines do not have them).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import glyphs
from bench.glyphs import (
    GlyphFontsMissing,
    Masters,
    build_dataset,
    candidate_chars,
    dataset_sha256,
    load_masters,
    make_glyph_dataset,
)
from radmark.data.images import decode_image, parse_label
from radmark.data.sources import iter_samples

REPO = Path(__file__).resolve().parents[2]

#: build_dataset(_synthetic_masters(), classes=6, seed=0, n_train=120, n_test=30).sha256, pinned:
#: the same masters and seed must give the same bytes on every machine (GPU machine included).
GOLDEN_SHA256 = "01ba44fc52eca338f1aa8b8eb3693966726e5fc8bc804f8937071b936eeb9f47"


def _synthetic_masters(chars: int = 8, faces: int = 5) -> Masters:
    return glyphs.synthetic_masters(chars, faces)


@pytest.fixture(scope="module")
def masters() -> Masters:
    return _synthetic_masters()


def _small(masters: Masters, classes: int = 6, seed: int = 0, **kw) -> glyphs.GlyphData:
    return build_dataset(masters, classes, seed, n_train=kw.get("n_train", 120), n_test=30)


def test_shapes_labels_balance(masters: Masters) -> None:
    d = _small(masters)
    assert d.train_images.shape == (120, 32, 32) and d.train_images.dtype == np.uint8
    assert d.test_images.shape == (30, 32, 32) and d.test_images.dtype == np.uint8
    assert d.train_labels.dtype == np.int64
    assert np.bincount(d.train_labels, minlength=6).tolist() == [20] * 6
    assert np.bincount(d.test_labels, minlength=6).tolist() == [5] * 6
    # faces spread evenly within each class: counts differ by at most one
    for c in range(6):
        counts = np.bincount(d.train_faces[d.train_labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    # not sorted by class (the order is shuffled)
    assert (np.diff(d.train_labels) != 0).sum() > 20
    # white glyph on a dark background, with some variety
    assert d.train_images.mean() < 128
    assert d.train_images.std() > 20
    assert len({img.tobytes() for img in d.train_images}) == 120


def test_default_sizes_are_60k_10k() -> None:
    assert (glyphs.N_TRAIN, glyphs.N_TEST) == (60_000, 10_000)
    for c in (10, 100, 1000):
        assert glyphs.N_TRAIN % c == 0 and glyphs.N_TEST % c == 0


def test_unbalanced_counts_differ_by_one(masters: Masters) -> None:
    d = build_dataset(masters, 7, 3, n_train=100, n_test=9)
    for labels, n in ((d.train_labels, 100), (d.test_labels, 9)):
        counts = np.bincount(labels, minlength=7)
        assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_deterministic_from_seed(masters: Masters) -> None:
    a, b, c = _small(masters, seed=5), _small(masters, seed=5), _small(masters, seed=6)
    assert a.sha256 == b.sha256
    assert np.array_equal(a.train_images, b.train_images)
    assert np.array_equal(a.test_labels, b.test_labels)
    assert c.sha256 != a.sha256
    assert not np.array_equal(a.train_images, c.train_images)


def test_golden_hash(masters: Masters) -> None:
    """Pins the bytes: a change here means the data set changed (or this platform differs)."""
    assert _small(masters).sha256 == GOLDEN_SHA256


def test_hash_definition(masters: Masters) -> None:
    d = _small(masters)
    h = hashlib.sha256()
    for arr in (d.train_images, d.train_labels, d.test_images, d.test_labels):
        h.update(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    assert h.hexdigest() == d.sha256
    assert d.sha256 == dataset_sha256(d.train_images, d.train_labels, d.test_images, d.test_labels)


def test_train_and_test_independent(masters: Masters) -> None:
    d = build_dataset(masters, 6, 0, n_train=30, n_test=30)
    assert not np.array_equal(d.train_images, d.test_images)


def test_nested_classes(masters: Masters) -> None:
    small, big = _small(masters, classes=3), _small(masters, classes=8)
    assert small.chars == big.chars[:3]
    assert small.faces == big.faces
    assert small.train_labels.max() == 2 and big.train_labels.max() == 7
    with pytest.raises(ValueError, match="masters hold 8 characters"):
        _small(masters, classes=9)


def test_masters_roundtrip(masters: Masters, tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    masters.save(path)
    back = load_masters(path)
    assert np.array_equal(back.bits, masters.bits)
    assert back.chars == masters.chars and back.faces == masters.faces
    assert back.sha256 == masters.sha256
    assert masters.subset(3).sha256 != masters.sha256
    d1 = make_glyph_dataset(6, 0, masters=path, n_train=120, n_test=30)
    assert d1.sha256 == _small(masters).sha256
    assert d1.masters_sha256 == masters.sha256


def test_masters_damaged_is_refused(masters: Masters, tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    masters.save(path)
    with np.load(path) as z:
        packed, meta = z["bits"].copy(), z["meta"]
    packed[0, 0, 30, 3] ^= 0xFF
    np.savez_compressed(path, bits=packed, meta=meta)
    with pytest.raises(ValueError, match="hash mismatch"):
        load_masters(path)


def test_write_shards(masters: Masters, tmp_path: Path) -> None:
    data = build_dataset(masters, 4, 7, n_train=60, n_test=12)
    meta = glyphs.write_glyph_shards(data, tmp_path / "out", samples_per_shard=25)
    assert meta["shards"]["train"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    saved = json.loads((tmp_path / "out" / "glyphs.json").read_text())
    assert saved["sha256"] == data.sha256 and saved["classes"] == 4
    assert saved["chars"] == [0x4E00 + k for k in range(4)]
    imgs, labels = [], []
    for shard in sorted((tmp_path / "out" / "train").glob("*.tar")):
        for s in iter_samples(str(shard)):
            imgs.append(decode_image(s.get("png"), shard=str(shard), key=s.key)[..., 0])
            labels.append(parse_label(s, shard=str(shard)))
    assert np.array_equal(np.stack(imgs), data.train_images)
    assert labels == data.train_labels.tolist()


def test_cli_build(masters: Masters, tmp_path: Path, capsys) -> None:
    masters.save(tmp_path / "m.npz")
    args = ["build", "--masters", str(tmp_path / "m.npz"), "--seed", "0"]
    small = ["--train", "120", "--test", "30", "--samples-per-shard", "50"]
    assert glyphs.main([*args, "--classes", "6", *small, "--out", str(tmp_path / "o")]) == 0
    meta = json.loads((tmp_path / "o" / "glyphs.json").read_text())
    assert meta["sha256"] == _small(masters).sha256
    assert meta["masters_sha256"] == masters.sha256
    assert (meta["train"], meta["test"], meta["seed"]) == (120, 30, 0)
    assert len(list((tmp_path / "o" / "test").glob("test-*.tar"))) == 1
    # 9 classes > 8 characters: a one-line error and exit code 2, not a traceback
    assert glyphs.main([*args, "--classes", "9", *small, "--out", str(tmp_path / "p")]) == 2
    assert "masters hold 8 characters" in capsys.readouterr().err


def test_build_needs_no_fonts_pil_or_scipy(masters: Masters, tmp_path: Path) -> None:
    """The GPU machine has numpy but no fonts: the build step must not import PIL or scipy."""
    masters.save(tmp_path / "m.npz")
    code = (
        "import sys; sys.modules['PIL'] = None; sys.modules['scipy'] = None\n"
        "sys.modules['fontTools'] = None\n"
        "from bench.glyphs import load_masters, build_dataset\n"
        f"d = build_dataset(load_masters({str(tmp_path / 'm.npz')!r}), 6, 0, n_train=120, n_test=30)\n"
        "print(d.sha256)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _small(masters).sha256


def test_candidate_chars() -> None:
    chars = candidate_chars()
    assert len(chars) == 1711
    assert len(set(chars)) == 1711
    assert chars[:5] == list("阿挨哀癌碍")
    # GB2312 order: the encoded bytes increase
    enc = [c.encode("gb2312") for c in chars]
    assert enc == sorted(enc)
    for c in chars[:50]:
        c.encode("euc_jp")  # a JIS X 0208 character


def test_missing_fonts_message(monkeypatch) -> None:
    monkeypatch.setattr(glyphs.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(glyphs, "_dpkg_status", lambda p: None if "noto" in p else "1.0")
    with pytest.raises(GlyphFontsMissing) as exc:
        glyphs._require_fonts()
    msg = str(exc.value)
    assert "apt-get install -y --no-install-recommends fonts-noto-cjk fonts-noto-cjk-extra" in msg
    assert "fonts-wqy-zenhei" not in msg


@pytest.mark.skipif(
    bool(glyphs.missing_packages()),
    reason="CJK font packages not installed (CI machines do not have them); "
    "see bench/README.md for the apt-get command",
)
def test_render_from_fonts() -> None:
    """A few real masters: non-empty, centred, and identical when rendered twice."""
    faces = [f for f in glyphs.find_faces() if f.package == "fonts-wqy-microhei"]
    assert faces
    face = faces[0]
    cmap = glyphs._cmap(face)
    chars = candidate_chars()[:3]
    a = glyphs._render_face(face, chars, cmap)
    b = glyphs._render_face(face, chars, cmap)
    for x, y in zip(a, b, strict=True):
        assert x is not None and x.shape == (64, 64)
        assert np.array_equal(x, y)
        ys, xs = np.nonzero(x)
        assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1
        assert abs((xs.min() + xs.max()) / 2 - 31.5) <= 1
