"""radmark.data.images: a re-encoded image keeps its container, encoder settings and metadata
(issue #12 §3-4), multi-frame images are refused, and encoding is deterministic."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from radmark.data.images import ImageInfo, encode_like, read_image
from radmark.errors import ShardError

ICC = b"\x00\x00\x02\x0cowner's ICC profile, kept byte for byte" + bytes(range(64))


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[274] = orientation  # Orientation: 6 = rotate 90° CW to display
    ex[305] = "owner camera"  # Software
    return ex.tobytes()


def _pixels(shape: tuple[int, ...] = (24, 40, 3), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, shape[1])[None, :, None] * np.ones(shape)
    return np.clip(base + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)


def _save(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _read(data: bytes) -> tuple[np.ndarray, ImageInfo]:
    return read_image(data, shard="s.tar", key="k")


def _nudge(arr: np.ndarray) -> np.ndarray:
    """A mark-like change of ±2 levels."""
    delta = np.where(np.indices(arr.shape).sum(axis=0) % 2 == 0, 2, -2)
    return np.clip(arr.astype(int) + delta, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_jpeg_keeps_tables_subsampling_exif_icc_and_comment(subsampling: int) -> None:
    data = _save(_pixels(), "JPEG", quality=83, subsampling=subsampling, exif=_exif(6),
                 icc_profile=ICC, comment=b"owner note", progressive=True)  # fmt: skip
    pixels, info = _read(data)
    assert info.format == "JPEG" and info.lossy and info.frames == 1
    out = encode_like(_nudge(pixels), info)
    with Image.open(io.BytesIO(out)) as im:
        orig = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and out[:3] == b"\xff\xd8\xff"
        assert im.quantization == orig.quantization  # the original's quantisation tables
        assert JpegImagePlugin.get_sampling(im) == subsampling
        assert im.info["icc_profile"] == ICC and im.info["comment"] == b"owner note"
        assert im.getexif()[274] == 6 and im.getexif()[305] == "owner camera"
        assert im.info.get("progressive") or im.info.get("progression")
        assert im.size == orig.size  # stored orientation: never rotated
    assert encode_like(_nudge(pixels), info) == out  # deterministic


def test_png_keeps_text_icc_exif_dpi_and_is_lossless() -> None:
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("Author", "owner")
    meta.add_itxt("Title", "données")
    data = _save(_pixels((20, 30, 1)), "PNG", pnginfo=meta, icc_profile=ICC, exif=_exif(8),
                 dpi=(300, 300))  # fmt: skip
    pixels, info = _read(data)
    assert info.format == "PNG" and not info.lossy and pixels.shape == (20, 30, 1)
    marked = _nudge(pixels)
    out = encode_like(marked, info)
    back, info2 = _read(out)
    np.testing.assert_array_equal(back, marked)  # lossless: the mark is stored exactly
    with Image.open(io.BytesIO(out)) as im:
        im.load()
        assert im.mode == "L" and im.text == {"Author": "owner", "Title": "données"}
        assert im.info["icc_profile"] == ICC and im.getexif()[274] == 8
        assert tuple(round(v) for v in im.info["dpi"]) == (300, 300)
    assert info2.options["text"] == info.options["text"]


def test_webp_lossless_stays_lossless_and_lossy_is_reported_lossy() -> None:
    arr = _pixels()
    lossless = _save(arr, "WEBP", lossless=True, exif=_exif(3), icc_profile=ICC)
    pixels, info = _read(lossless)
    assert info.format == "WEBP" and info.options["lossless"] and not info.lossy
    out = encode_like(_nudge(pixels), info)
    assert out[:4] == b"RIFF" and out[8:12] == b"WEBP"
    np.testing.assert_array_equal(_read(out)[0], _nudge(pixels))
    with Image.open(io.BytesIO(out)) as im:
        assert im.getexif()[274] == 3 and im.info["icc_profile"] == ICC
    lossy = _save(arr, "WEBP", quality=70)
    _, info = _read(lossy)
    assert info.lossy and _read(encode_like(arr, info))[1].format == "WEBP"


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw", "tiff_adobe_deflate", "packbits"])
def test_tiff_keeps_compression_orientation_and_pixels(compression: str) -> None:
    arr = _pixels()
    data = _save(arr, "TIFF", compression=None if compression == "raw" else compression,
                 tiffinfo={274: 6, 270: "owner description"})  # fmt: skip
    pixels, info = _read(data)
    out = encode_like(_nudge(pixels), info)
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == "TIFF" and im.info["compression"] == compression
        assert im.tag_v2[274] == 6 and im.tag_v2[270] == "owner description"
    np.testing.assert_array_equal(_read(out)[0], _nudge(pixels))


@pytest.mark.parametrize(("fmt", "magic"), [("BMP", b"BM"), ("PPM", b"P6")])
def test_bmp_and_ppm_keep_their_container(fmt: str, magic: bytes) -> None:
    pixels, info = _read(_save(_pixels(), fmt))
    out = encode_like(_nudge(pixels), info)
    assert out.startswith(magic)
    np.testing.assert_array_equal(_read(out)[0], _nudge(pixels))


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP"])
def test_multi_frame_images_are_refused_with_a_reason(fmt: str) -> None:
    frames = [Image.fromarray(_pixels(seed=i)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:],
                   **({"lossless": True} if fmt == "WEBP" else {}))  # fmt: skip
    with pytest.raises(ShardError, match=rf"multi-frame {fmt} image \(3 frames\).*skip"):
        _read(buf.getvalue())
    if fmt == "TIFF":  # other readers (training arrays, probes) still take the first frame
        pixels, info = read_image(buf.getvalue(), shard="s", key="k", frames_ok=True)
        assert pixels.shape == (24, 40, 3) and info.frames == 3


def test_declared_size_is_capped_before_decoding() -> None:
    data = _save(np.zeros((64, 64, 1), dtype=np.uint8), "PNG")
    with pytest.raises(ShardError, match="image too large"):
        read_image(data, shard="s", key="k", max_pixels=64 * 64 - 1)
    assert read_image(data, shard="s", key="k", max_pixels=64 * 64)[0].shape == (64, 64, 1)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("fmt", ["TIFF", "JPEG", "PNG"])
def test_images_are_read_and_written_in_their_stored_orientation(
    fmt: str, orientation: int
) -> None:
    """PIL rotates TIFFs by their orientation tag on load; radmark marks every format as stored
    and writes the tag back, so a viewer shows marked and unmarked images alike."""
    arr = _pixels((12, 20, 3), seed=orientation)
    kw: dict[str, object] = {"tiffinfo": {274: orientation}} if fmt == "TIFF" else {}
    if fmt != "TIFF":
        kw["exif"] = _exif(orientation)
    if fmt == "JPEG":
        kw["quality"] = 100
    data = _save(arr, fmt, **kw)
    pixels, info = _read(data)
    assert pixels.shape == (12, 20, 3)  # as stored, not as displayed
    if fmt != "JPEG":
        np.testing.assert_array_equal(pixels, arr)
    out = encode_like(pixels, info)
    with Image.open(io.BytesIO(data)) as a, Image.open(io.BytesIO(out)) as b:
        a.load()
        b.load()
        assert b.size == a.size  # both displayed the same way
        if fmt != "JPEG":
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    back = _read(out)[0]
    assert back.shape == pixels.shape
    if fmt != "JPEG":
        np.testing.assert_array_equal(back, pixels)
