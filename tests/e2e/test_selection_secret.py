"""Which samples are marked is a secret (issue #12 §3): an attacker holding the published shards
and the public mark record must do no better than chance at telling marked samples from unmarked
ones by bytes and metadata alone, and cannot invert the record's per-shard digests.

The distinguisher trains on two marked shards and is scored on two others (held out), with one
rule per feature: the majority class of each feature value (continuous features binned by the
training quantiles). Features: the image member's format magic, its size relative to radmark's own
re-encoding of its decoded pixels, its PNG chunk sequence, EXIF and ICC bytes, the tar headers
(mtime, uid/gid, names, mode) and the order of the sample's members. A control shows the same
distinguisher wins outright on what radmark wrote before (marked JPEGs stored as PNG bytes).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from radmark.data.images import encode_like, read_image
from radmark.data.samples import Sample
from radmark.data.writer import write_shard
from radmark.keys.keypair import SecretKey, selection_digest
from radmark.keys.manage import load_secret_key
from radmark.keys.store import Keystore
from radmark.marking.manifest import find_state
from radmark.marking.run import MarkOptions, mark_shards
from tests.factories import fmnist, make_key, make_marker

SHARDS, PER_SHARD = 4, 64
Features = dict[str, Any]


def _original(i: int, img: np.ndarray, foreign: bool) -> tuple[str, bytes]:
    """Sample i's image as its owner stored it: PNG or JPEG (EXIF + ICC), from PIL, or from
    another encoder (other zlib level, optimised Huffman tables, an extra text chunk)."""
    rgb = Image.fromarray(np.repeat(img[:, :, None], 3, axis=2))
    exif = Image.Exif()
    exif[274] = 1 + i % 8
    buf = io.BytesIO()
    if i % 2:
        kw: dict[str, Any] = {"quality": 90, "exif": exif.tobytes(), "icc_profile": b"icc" * 40}
        rgb.save(buf, format="JPEG", **kw, **({"optimize": True} if foreign else {}))
        return "jpg", buf.getvalue()
    if foreign:
        from PIL import PngImagePlugin

        meta = PngImagePlugin.PngInfo()
        meta.add_text("Software", "another encoder")
        rgb.save(buf, format="PNG", compress_level=9, pnginfo=meta)
    else:
        rgb.save(buf, format="PNG", exif=exif.tobytes())
    return "png", buf.getvalue()


def _dataset(root: Path, foreign: bool) -> Path:
    images, labels = fmnist(SHARDS * PER_SHARD, offset=2000)
    for s in range(SHARDS):

        def samples(s: int = s) -> Iterator[Sample]:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                ext, data = _original(i, images[i], foreign)
                yield Sample(f"{i:08d}", [(ext, data), ("cls", str(labels[i]).encode())])

        root.mkdir(parents=True, exist_ok=True)
        write_shard(root / f"data-{s:06d}.tar", samples())
    return root


def _png_chunks(data: bytes) -> tuple[str, ...]:
    out, pos = [], 8
    while data.startswith(b"\x89PNG") and pos + 8 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        out.append(data[pos + 4 : pos + 8].decode("latin-1"))
        pos += 12 + n
    return tuple(out)


def _features(shard: Path) -> dict[str, Features]:
    """What the published shard says about each sample, by bytes and metadata alone."""
    feats: dict[str, Features] = {}
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
        payload = {m.name: tf.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    by_key: dict[str, list[tarfile.TarInfo]] = {}
    for m in members:
        by_key.setdefault(m.name.split(".", 1)[0], []).append(m)
    for key, ms in by_key.items():
        img = next(m for m in ms if not m.name.endswith(".cls"))
        data = payload[img.name]
        pixels, info = read_image(data, shard=str(shard), key=key)
        with Image.open(io.BytesIO(data)) as im:
            exif, icc = im.info.get("exif", b""), im.info.get("icc_profile", b"")
        feats[key] = {
            "magic": data[:4],
            "size_vs_reencoded": len(data) / len(encode_like(pixels, info)),
            "png_chunks": _png_chunks(data),
            "exif": hashlib.sha256(exif).hexdigest(),
            "icc": hashlib.sha256(icc or b"").hexdigest(),
            "tar_header": tuple((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in ms),
            "member_order": tuple(m.name.split(".", 1)[1] for m in ms),
            "extension": img.name.split(".", 1)[1],
        }
    return feats


def _rule(train: list[tuple[Any, bool]]) -> Callable[[Any], bool]:
    """Majority class per value (ties and unseen values: unmarked); numbers binned in deciles."""
    values = [v for v, _ in train]
    if all(isinstance(v, float) for v in values):
        edges = np.quantile(values, np.linspace(0, 1, 11)[1:-1])

        def key(v: Any) -> Any:
            return int(np.searchsorted(edges, v))
    else:

        def key(v: Any) -> Any:
            return v

    votes: dict[Any, Counter[bool]] = {}
    for v, y in train:
        votes.setdefault(key(v), Counter())[y] += 1
    return lambda v: votes.get(key(v), Counter())[True] > votes.get(key(v), Counter())[False]


def _best_accuracy(shards: list[Path], marked: set[str]) -> tuple[str, float, int]:
    """The distinguisher's best held-out accuracy over every feature and all of them at once."""
    feats = [_features(s) for s in shards]
    half = len(shards) // 2
    train = {k: f for fs in feats[:half] for k, f in fs.items()}
    test = {k: f for fs in feats[half:] for k, f in fs.items()}
    names = [*next(iter(train.values())), "all"]
    best = ("", 0.0)
    for name in names:

        def get(f: Features, name: str = name) -> Any:
            return tuple(sorted((k, str(v)) for k, v in f.items())) if name == "all" else f[name]

        predict = _rule([(get(f), k in marked) for k, f in train.items()])
        acc = sum(predict(get(f)) == (k in marked) for k, f in test.items()) / len(test)
        best = max(best, (name, acc), key=lambda t: t[1])
    return best[0], best[1], len(test)


def _mark(tmp: Path, foreign: bool, **opts: Any) -> tuple[list[Path], set[str], Path]:
    ks, key_file = tmp / "ks", tmp / "owner.key"
    make_key(ks, key_file, pinned="selection-secret")  # the distinguisher's bounds, one key
    marker = make_marker(tmp / "marker.safetensors")
    src = _dataset(tmp / "in", foreign)
    key, pub = load_secret_key(ks, str(key_file), lambda: None)
    out = tmp / "out"
    mark_shards(
        [str(src)], key=key, key_record=pub, keystore=ks, out_dir=out, marker_spec=str(marker),
        options=MarkOptions(fraction=0.5, overrides={"steps": 2}, **opts),
    )  # fmt: skip
    state = find_state(ks, out)
    assert state is not None
    marked = {k for e in state["shards"].values() for k in e["marked_keys"]}
    return sorted(out.glob("*.tar")), marked, ks


def _chance_bound(n: int) -> float:
    return 0.5 + 3.5 * math.sqrt(0.25 / n)  # P(accuracy above it | chance) < 3e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("foreign", "reencode_all", "hidden"),
    [(False, False, True), (True, False, False), (True, True, True)],
    ids=["same-encoder", "foreign-encoder", "foreign-encoder-reencode-all"],
)
def test_marked_samples_are_indistinguishable_by_bytes_and_metadata(
    tmp_path: Path, foreign: bool, reencode_all: bool, hidden: bool
) -> None:
    shards, marked, _ = _mark(tmp_path, foreign, reencode_all=reencode_all)
    assert 0.3 < len(marked) / (SHARDS * PER_SHARD) < 0.6
    name, acc, n = _best_accuracy(shards, marked)
    if hidden:
        assert acc < _chance_bound(n), (name, acc)
    else:  # documented: without --reencode-all another encoder's files betray re-encoded ones
        assert acc > 0.9 and name in ("size_vs_reencoded", "png_chunks", "all"), (name, acc)


@pytest.mark.slow
def test_the_distinguisher_wins_on_what_radmark_wrote_before(tmp_path: Path) -> None:
    """Control: marked JPEGs rewritten as PNG bytes under .jpg (radmark before issue #12)."""
    shards, marked, _ = _mark(tmp_path, False)
    leaky = []
    (tmp_path / "leaky").mkdir()
    for shard in shards:

        def samples(shard: Path = shard) -> Iterator[Sample]:
            from radmark.data.sources import iter_samples

            for s in iter_samples(str(shard)):
                if s.key in marked and s.get("jpg") is not None:
                    pixels, _ = read_image(s.get("jpg") or b"", shard="s", key=s.key)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="PNG")
                    s = Sample(s.key, [("jpg", buf.getvalue()), *s.members[1:]])
                yield s

        leaky.append(write_shard(tmp_path / "leaky" / shard.name, samples()).path)
    name, acc, n = _best_accuracy(leaky, marked)
    assert acc > 0.7 and acc > _chance_bound(n), (name, acc)


@pytest.mark.slow
def test_record_digests_cannot_be_inverted_but_the_owner_can_open_them(tmp_path: Path) -> None:
    """Before: sha256 of the marked keys, found by trying every subset (0.1 s). After: an HMAC
    under a key derived from the secret, per output shard; the owner's private run state opens it."""
    shards, marked, ks = _mark(tmp_path, False)
    store = Keystore.open(ks)
    (rec,) = store.mark_records()
    assert rec.selection_digest == "hmac-sha256"
    key, _ = store.secret(rec.fingerprint, lambda: None)
    state = find_state(ks, tmp_path / "out")
    assert state is not None
    other = SecretKey.generate().selection_digest_key()
    for ref in rec.shards:
        keys = state["shards"][ref.name]["marked_keys"]
        assert ref.marked_keys_digest == selection_digest(
            key.selection_digest_key(), ref.output_sha256, ref.name, keys
        )  # the owner opens the commitment with the private state
        assert ref.marked_keys_digest != selection_digest(other, ref.output_sha256, ref.name, keys)
    # the old attack: every subset of the first 16 samples of a shard, hashed without a key
    ref = rec.shards[0]
    first = [f"{i:08d}" for i in range(16)]
    for r in range(len(first) + 1):
        for subset in itertools.combinations(first, r):
            assert hashlib.sha256("\n".join(subset).encode()).hexdigest() != ref.marked_keys_digest
