"""radmark.marking.pipeline (issue #12): the budget is checked after every batch and a broken
method never writes a shard; unchanged images are not "marked"; memory is bounded by the batch
(windows, a pixel cap); images keep their container and metadata; multi-frame images are refused
or skipped with a reason. Fake methods (registered like any method) play the broken markers."""

from __future__ import annotations

import io
import re
import tarfile
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from radmark.data.samples import Sample
from radmark.data.sources import iter_samples
from radmark.data.writer import write_shard
from radmark.errors import ModelError, ShardError
from radmark.keys.manage import load_secret_key
from radmark.keys.store import Keystore
from radmark.marking.methods import METHODS, Budget, MarkBatchResult, register_method
from radmark.marking.run import MarkOptions, MarkResult, mark_shards
from radmark.marking.selection import is_selected
from tests.factories import (
    fmnist,
    make_broken_marker,
    make_key,
    make_marker,
    make_shards,
    sha256_tree,
    temp_files,
)

CALLS: list[tuple[tuple[int, ...], list[str]]] = []  # (batch shape, sample keys) per mark()


class _FakeRun:
    """Adds ``step`` levels to every pixel; ``breaks`` says how it leaves its budget, and on
    which call (0-based), to play a broken marker without training one."""

    def __init__(self, step: int, breaks: str | None, on_call: int, psnr_floor: float | None):
        self.step, self.breaks, self.on_call = step, breaks, on_call
        self.budget = Budget(linf_levels=2, psnr_floor=psnr_floor)
        self.calls = 0

    def mark(self, images: torch.Tensor, labels: torch.Tensor, sample_ids: list[str], *,
             generator: torch.Generator) -> MarkBatchResult:  # fmt: skip
        CALLS.append((tuple(images.shape), list(sample_ids)))
        out = (images.to(torch.int16) + self.step).clamp(0, 255)
        b = images.shape[0]
        finite = torch.ones(b, dtype=torch.bool)
        if self.breaks is not None and self.calls == self.on_call:
            if self.breaks == "linf":
                out[-1] = (images[-1].to(torch.int16) + 9).clamp(0, 255)
            elif self.breaks == "nan":
                finite[-1] = False
                out[-1] = 0  # what quantising NaN gives: a black image
            elif self.breaks == "shape":
                out = out[:, :, :-1]
        self.calls += 1
        nan = torch.full((b,), float("nan"))
        return MarkBatchResult(out.to(torch.uint8), nan.double(), torch.zeros(b, dtype=torch.int64),
                               nan, finite)  # fmt: skip

    def private_data(self) -> list[bytes]:
        return []

    def record_fields(self, private: Sequence[str] = ()) -> dict[str, Any]:
        return {"carriers": None}


class _FakeMethod:
    tests: tuple[str, ...] = ()
    presets = ("default",)
    description = "a test double"

    def __init__(self, name: str, step: int = 1, breaks: str | None = None, on_call: int = 0,
                 psnr_floor: float | None = None) -> None:  # fmt: skip
        self.name, self.args = name, (step, breaks, on_call, psnr_floor)

    def params(self, preset: str, overrides: Any) -> dict[str, Any]:
        return {"name": preset}

    def params_from_record(self, data: Any) -> dict[str, Any]:
        return dict(data)

    def params_to_record(self, params: dict[str, Any]) -> dict[str, Any]:
        return dict(params)

    def start(self, key, marker, num_classes, params, *, device):  # noqa: ANN001
        return _FakeRun(*self.args)

    def check_key(self, record, key) -> None:  # noqa: ANN001
        return None


FAKES = {
    "fake-ok": _FakeMethod("fake-ok"),
    "fake-identity": _FakeMethod("fake-identity", step=0),
    "fake-linf": _FakeMethod("fake-linf", breaks="linf"),
    "fake-linf-later": _FakeMethod("fake-linf-later", breaks="linf", on_call=1),
    "fake-nan": _FakeMethod("fake-nan", breaks="nan"),
    "fake-shape": _FakeMethod("fake-shape", breaks="shape"),
    "fake-psnr": _FakeMethod("fake-psnr", step=2, psnr_floor=60.0),
}


@pytest.fixture(scope="module", autouse=True)
def fakes() -> Iterator[None]:
    for m in FAKES.values():
        register_method(m)
    yield
    for name in FAKES:
        del METHODS[name]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    make_shards(root / "in", n=24, per_shard=12)
    make_marker(root / "marker.safetensors")
    make_key(root / "ks", root / "owner.key", pinned="pipeline")  # selections fixed across runs
    return {"root": root, "in": root / "in", "marker": root / "marker.safetensors",
            "ks": root / "ks", "key": root / "owner.key"}  # fmt: skip


def _mark(world: dict[str, Path], out: Path, specs: list[str] | None = None,
          ks: Path | None = None, **opts: Any) -> MarkResult:  # fmt: skip
    secret, record = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    options = MarkOptions(**{"fraction": 0.5, "overrides": {"steps": 1}, **opts})
    return mark_shards(
        specs or [str(world["in"])], key=secret, key_record=record, keystore=ks or world["ks"],
        out_dir=out, marker_spec=str(world["marker"]), options=options,
    )  # fmt: skip


def _fresh_keystore(world: dict[str, Path], tmp_path: Path) -> Path:
    """A keystore holding only the world's key, so 'no record was signed' can be checked."""
    ks = tmp_path / "ks"
    secret, record = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    Keystore.open(ks, create=True).add_key(secret, record, None, scrypt_n=2**10)
    return ks


# ------------------------------------------------------------------------------------------
# §2: a broken marker must never wipe a dataset


@pytest.mark.parametrize(
    ("method", "needle"),
    [
        ("fake-linf", "L-inf 9 levels > the budget's 2"),
        ("fake-linf-later", "L-inf 9 levels > the budget's 2"),  # the second batch breaks
        ("fake-nan", "not finite (inf or NaN) before rounding"),
        ("fake-psnr", "dB < the budget's 60.0 dB"),
        ("fake-shape", "returned torch.uint8"),
    ],
)
def test_an_image_outside_the_budget_fails_the_run_before_anything_is_written(
    world: dict[str, Path], tmp_path: Path, method: str, needle: str
) -> None:
    ks = _fresh_keystore(world, tmp_path)
    before = sha256_tree(world["in"])
    # 12 samples, all selected: 6 batches, so the "later" fake's second call always comes (at
    # fraction 0.5 a key selected under 3 about one run in 50)
    shard = [str(world["in"] / "data-000000.tar")]
    with pytest.raises(ModelError, match=re.escape(needle)) as err:
        _mark(world, tmp_path / "out", shard, ks=ks, method=method, batch_size=2, fraction=1.0)
    assert "nothing of this shard was written" in str(err.value) or method == "fake-shape"
    assert not list((tmp_path / "out").glob("*.tar")) and not temp_files(tmp_path / "out")
    assert Keystore.open(ks).mark_records() == []  # no record signed
    assert sha256_tree(world["in"]) == before


def test_selected_images_the_method_leaves_unchanged_are_not_marked(
    world: dict[str, Path], tmp_path: Path
) -> None:
    res = _mark(world, tmp_path / "out", method="fake-identity")
    assert res.marked == 0 and res.unchanged > 0 and res.psnr_mean is None
    for src in sorted(world["in"].glob("*.tar")):  # copied byte for byte
        assert (tmp_path / "out" / src.name).read_bytes() == src.read_bytes()
    rec = Keystore.open(world["ks"]).mark_record(res.record)
    assert rec.marked == 0 and rec.signed["counts"]["unchanged"] == res.unchanged


def test_a_marker_whose_features_overflow_is_refused_on_a_pipe_too(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """A pipe: is not read twice, so the load-time check skips it; the marking step's own check
    (reference features finite) stops the run at the first batch."""
    marker = make_broken_marker(tmp_path / "overflow.safetensors", "overflow")
    ks = _fresh_keystore(world, tmp_path)
    secret, record = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    with pytest.raises(ModelError, match="features are not finite"):
        mark_shards(
            [f"pipe:cat {world['in'] / 'data-000000.tar'}"], key=secret, key_record=record,
            keystore=ks, out_dir=tmp_path / "out", marker_spec=str(marker),
            options=MarkOptions(fraction=0.5, overrides={"steps": 1}),
        )  # fmt: skip
    assert not list((tmp_path / "out").glob("*.tar")) and Keystore.open(ks).mark_records() == []


# ------------------------------------------------------------------------------------------
# §5: memory bounded by the batch


def _noise_shard(path: Path, shapes: list[tuple[int, int, int]], fmt: str = "png") -> Path:
    rng = np.random.default_rng(0)

    def samples() -> Iterator[Sample]:
        for i, shape in enumerate(shapes):
            buf = io.BytesIO()
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr[:, :, 0] if shape[2] == 1 else arr).save(buf, format="PNG")
            yield Sample(f"{i:06d}", [(fmt, buf.getvalue()), ("cls", str(i % 10).encode())])

    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, samples())
    return path


def test_batches_stream_in_windows_in_order_within_the_caps(
    world: dict[str, Path], tmp_path: Path
) -> None:
    sizes = [(28, 28, 1), (20, 24, 1), (28, 28, 1), (12, 12, 1)] * 10
    shard = _noise_shard(tmp_path / "in" / "mixed-000000.tar", sizes)
    secret, _ = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    cap = 3 * 28 * 28
    CALLS.clear()
    first = _mark(world, tmp_path / "a", [str(shard)], method="fake-ok", batch_size=4,
                  max_batch_pixels=cap)  # fmt: skip
    calls = list(CALLS)
    second = _mark(world, tmp_path / "b", [str(shard)], method="fake-ok", batch_size=4,
                   max_batch_pixels=cap)  # fmt: skip
    assert first.shards[0].output_sha256 == second.shards[0].output_sha256  # deterministic
    assert first.marked == sum(len(k) for _, k in calls) > 0
    for shape, _ in calls:
        assert shape[0] <= 4 and shape[0] * shape[2] * shape[3] <= cap  # one size, within caps
    selected = [f"mixed-000000.tar/{i:06d}" for i in range(len(sizes))
                if is_selected(secret.selection_seed(), f"{i:06d}", 0.5)]  # fmt: skip
    assert sorted(k for _, ks in calls for k in ks) == selected  # ids: shard/__key__, unique
    # one image size: consecutive selected images in groups of the batch size (as before)
    CALLS.clear()
    _mark(world, tmp_path / "c", method="fake-ok", batch_size=4)
    expected = []
    for src in sorted(world["in"].glob("*.tar")):
        sel = [s.key for s in iter_samples(str(src)) if is_selected(secret.selection_seed(),
               s.key, 0.5)]  # fmt: skip
        expected += [[f"{src.name}/{k}" for k in sel[i : i + 4]] for i in range(0, len(sel), 4)]
    assert [ks for _, ks in CALLS] == expected


def test_decoded_memory_is_bounded_by_the_batch_not_the_shard(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """Python-heap peak (tracemalloc: sample bytes, decoded arrays) while marking a shard of 60
    and one of 480 incompressible 64×64 PNGs: it must not grow with the shard (it grew by the
    whole shard, ~6 MB here, when a shard was held in memory)."""
    peaks, sizes = [], []
    for n in (60, 480):
        shard = _noise_shard(tmp_path / f"in{n}" / "big-000000.tar", [(64, 64, 3)] * n)
        sizes.append(shard.stat().st_size)
        tracemalloc.start()
        try:
            res = _mark(world, tmp_path / f"out{n}", [str(shard)], method="fake-ok",
                        fraction=1.0, batch_size=4)  # fmt: skip
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert res.marked == n
    assert peaks[1] - peaks[0] < (sizes[1] - sizes[0]) / 10, (peaks, sizes)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_images_above_the_pixel_cap_are_refused_whether_selected_or_not(
    world: dict[str, Path], tmp_path: Path, on_error: str
) -> None:
    secret, _ = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    # the key is random: search far enough that an unselected id exists (all of 8 were once)
    big = next(i for i in range(64) if not is_selected(secret.selection_seed(), f"{i:06d}", 0.5))
    shapes = [(28, 28, 1)] * max(8, big + 1)
    shapes[big] = (40, 40, 1)
    shard = _noise_shard(tmp_path / "in" / "cap-000000.tar", shapes)
    if on_error == "fail":
        with pytest.raises(ShardError, match=rf"{big:06d}.*too large.*--max-batch-pixels"):
            _mark(world, tmp_path / "out", [str(shard)], method="fake-ok", max_batch_pixels=1000)
        return
    res = _mark(world, tmp_path / "out", [str(shard)], method="fake-ok", max_batch_pixels=1000,
                on_error="skip")  # fmt: skip
    assert res.skipped == 1 and "too large" in res.shards[0].skip_reasons[f"{big:06d}"]


# ------------------------------------------------------------------------------------------
# §3-4: containers and metadata are kept


def _photo_shard(path: Path, fmt: str, n: int = 8) -> Path:
    """Fashion-MNIST images as RGB JPEG/PNG/TIFF/WEBP with EXIF orientation 6 and an ICC profile."""
    images, labels = fmnist(n)
    exif = Image.Exif()
    exif[274] = 6
    icc = b"owner ICC" * 8

    def samples() -> Iterator[Sample]:
        for i in range(n):
            im = Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2))
            buf = io.BytesIO()
            kw: dict[str, Any] = {"icc_profile": icc}
            if fmt == "jpg":
                kw.update(format="JPEG", quality=90, subsampling=2, exif=exif.tobytes())
            elif fmt == "tif":
                kw.update(format="TIFF", tiffinfo={274: 6}, compression="tiff_lzw")
            elif fmt == "webp":
                kw.update(format="WEBP", lossless=True, exif=exif.tobytes())
            else:
                kw.update(format="PNG", exif=exif.tobytes())
            im.save(buf, **kw)
            yield Sample(f"{i:06d}", [(fmt, buf.getvalue()), ("cls", str(labels[i]).encode())])

    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, samples())
    return path


@pytest.mark.parametrize("fmt", ["jpg", "png", "tif", "webp"])
def test_marked_images_keep_container_orientation_and_metadata(
    world: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    shard = _photo_shard(tmp_path / "in" / f"{fmt}-000000.tar", fmt)
    steps = 8 if fmt == "jpg" else 2  # 2 steps move too few levels for JPEG to keep any
    res = _mark(world, tmp_path / "out", [str(shard)], fraction=1.0, overrides={"steps": steps})
    assert res.marked > 0
    ins = {s.key: s for s in iter_samples(str(shard))}
    for s in iter_samples(str(tmp_path / "out" / shard.name)):
        assert [e for e, _ in s.members] == [fmt, "cls"]  # member names keep their extension
        a, b = Image.open(io.BytesIO(ins[s.key].get(fmt))), Image.open(io.BytesIO(s.get(fmt)))
        assert b.format == a.format and b.size == a.size and b.mode == a.mode
        assert b.info.get("icc_profile") == a.info.get("icc_profile")
        if fmt == "tif":
            assert b.info["compression"] == "tiff_lzw"
            assert Image.open(io.BytesIO(s.get(fmt))).tag_v2.get(274) == 6
        else:
            assert b.getexif().get(274) == 6  # orientation kept: displayed like the original
        if fmt == "jpg":
            assert b.quantization == a.quantization
            assert JpegImagePlugin.get_sampling(b) == JpegImagePlugin.get_sampling(a) == 2
    rep = res.shards[0]
    if fmt == "jpg":  # the mark's survival through the JPEG re-encoding is measured
        assert rep.reencoded == res.marked and rep.lossy_mark_kept is not None
        assert 0.08 < rep.lossy_mark_kept < 1.2  # 0.18-0.28 over 4 keys (8 steps, q90 4:2:0)
    else:
        assert rep.reencoded == 0 and rep.lossy_mark_kept is None


def test_reencode_all_writes_every_image_through_the_same_encoder(
    world: dict[str, Path], tmp_path: Path
) -> None:
    shard = _photo_shard(tmp_path / "in" / "jpg-000000.tar", "jpg", n=12)
    res = _mark(world, tmp_path / "out", [str(shard)], reencode_all=True, method="fake-identity")
    ins = {s.key: s.get("jpg") for s in iter_samples(str(shard))}
    outs = {s.key: s.get("jpg") for s in iter_samples(str(tmp_path / "out" / shard.name))}
    assert res.marked == 0 and all(outs[k] != ins[k] for k in ins)  # every image re-encoded
    secret, _ = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    from radmark.data.images import encode_like, read_image

    for k, data in ins.items():  # ...the way a marked one is: same encoder, same settings
        pixels, info = read_image(data, shard="s", key=k)
        assert outs[k] == encode_like(pixels, info)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_multi_frame_images_are_refused_or_skipped_with_a_reason(
    world: dict[str, Path], tmp_path: Path, on_error: str
) -> None:
    frames = [Image.fromarray(fmnist(3)[0][i]) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    shard = tmp_path / "in" / "frames-000000.tar"
    good = next(iter_samples(str(world["in"] / "data-000000.tar")))
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in [*((f"{good.key}.{e}", d) for e, d in good.members),
                           ("00000777.tif", buf.getvalue()), ("00000777.cls", b"3")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    if on_error == "fail":
        with pytest.raises(ShardError, match=r"00000777.*multi-frame TIFF image \(3 frames\)"):
            _mark(world, tmp_path / "out", [str(shard)], fraction=1.0)
        assert not list((tmp_path / "out").glob("*.tar"))
        return
    res = _mark(world, tmp_path / "out", [str(shard)], fraction=1.0, on_error="skip")
    assert res.skipped == 1 and "multi-frame" in res.shards[0].skip_reasons["00000777"]
    copied = {s.key: s for s in iter_samples(str(tmp_path / "out" / shard.name))}
    assert copied["00000777"].get("tif") == buf.getvalue()  # every frame kept, byte for byte
