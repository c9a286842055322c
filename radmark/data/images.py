"""Decoding and encoding the images inside samples, and reading their labels.

The declared size of an image is checked before any pixel is decoded, and only the decoders behind
the image extensions radmark accepts are enabled, so untrusted bytes never reach exotic plugins.

A marked image is written back in its own container (issue #12): :func:`read_image` returns the
pixels as stored (no EXIF rotation applied) with an :class:`ImageInfo` of the format, the encoder
settings that can be read back (JPEG quantisation tables and chroma subsampling, WebP lossless or
not, TIFF compression) and the owner's metadata (EXIF, ICC profile, PNG text, resolution), and
:func:`encode_like` writes new pixels with all of them."""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin

from radmark.data.samples import Sample, one_line
from radmark.errors import ImageTooLarge, ShardError

# PIL decoders we allow. Restricting Image.open to the formats behind IMAGE_EXTS keeps exotic
# plugins (EPS shells out to Ghostscript, for instance) away from untrusted bytes.
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "PPM", "BMP", "WEBP", "TIFF")


#: TIFF tags written back to a re-encoded TIFF: orientation, resolution and descriptive text.
_TIFF_KEEP_TAGS: tuple[int, ...] = (270, 271, 272, 274, 282, 283, 296, 305, 306, 315, 33432)
#: The transpose that undoes PIL's ``exif_transpose`` for each EXIF/TIFF orientation.
_UNDO_ORIENTATION: dict[object, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class ImageInfo:
    """What re-encoding an image must keep, read from its original bytes.

    format: PIL's name of the container (PNG, JPEG, PPM, BMP, WEBP, TIFF).
    frames: number of frames (TIFF pages, WebP animation frames); radmark marks single frames.
    exif, icc_profile: the raw EXIF block and ICC profile, None when absent.
    options: encoder settings for :func:`encode_like` (qtables, subsampling, lossless, ...).
    """

    format: str
    frames: int = 1
    exif: bytes | None = None
    icc_profile: bytes | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def lossy(self) -> bool:
        """Whether re-encoding loses information (JPEG, lossy WebP, JPEG-in-TIFF)."""
        if self.format == "JPEG":
            return True
        if self.format == "WEBP":
            return not self.options.get("lossless", False)
        return self.format == "TIFF" and self.options.get("compression") == "jpeg"


def decode_image(data: bytes, *, shard: str, key: str, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode image bytes to uint8 ``[H, W, C]`` with C = 1 (mode L) or 3 (mode RGB).

    The declared size is checked before any pixel is decoded, so a tiny file claiming enormous
    dimensions costs nothing. Only L and RGB are accepted: silently converting other modes would
    make the marked image differ from the source in ways the user did not ask for.
    """
    return read_image(data, shard=shard, key=key, max_pixels=max_pixels, frames_ok=True)[0]


def read_image(
    data: bytes, *, shard: str, key: str, max_pixels: int = 50_000_000, frames_ok: bool = False
) -> tuple[np.ndarray, ImageInfo]:
    """:func:`decode_image` plus the :class:`ImageInfo` that :func:`encode_like` needs.

    The pixels are the stored ones: an EXIF orientation is kept as metadata, not applied, so a
    marked image is marked in the stored orientation and written back with the same EXIF (a
    viewer rotates marked and unmarked images alike). Multi-frame images are refused unless
    ``frames_ok`` (then the first frame is returned): marking one frame and dropping the others
    would silently destroy the owner's data.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(_PIL_FORMATS))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ShardError(shard, f"image has an empty size {width}x{height}", key)
            if width * height > max_pixels:
                raise ImageTooLarge(
                    shard,
                    f"image too large ({width}x{height} pixels; at most {max_pixels} allowed)",
                    key,
                )
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1 and not frames_ok:
                raise ShardError(
                    shard,
                    f"multi-frame {img.format} image ({frames} frames); radmark marks single "
                    "images and would drop frames 2..n, so split it or skip it (--on-error skip)",
                    key,
                )
            _check_mode(img.mode, shard, key)
            # PIL rotates TIFFs by their Orientation tag while loading (and drops the tag); undo
            # it so that every format is marked, and written back, in its stored orientation.
            tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
            orientation = tags.get(274) if tags is not None else None
            img.load()
            _check_mode(img.mode, shard, key)
            if img.size != (width, height):
                raise ShardError(shard, "image does not decode (size changed while loading)", key)
            info = _info(img, data, frames)
            stored: Image.Image = img
            if orientation in _UNDO_ORIENTATION:
                stored = img.transpose(_UNDO_ORIENTATION[orientation])
                info.options.setdefault("tiffinfo", {})[274] = orientation
            arr = np.array(stored, dtype=np.uint8)
    except ShardError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(shard, f"image too large ({one_line(str(exc), 120)})", key) from None
    except MemoryError:
        raise ImageTooLarge(shard, "image too large (out of memory while decoding)", key) from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error,
            EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:  # fmt: skip
        detail = one_line(str(exc), 120) or type(exc).__name__
        raise ShardError(shard, f"image does not decode ({detail})", key) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr), info


def _webp_lossless(data: bytes) -> bool:
    """Whether a WebP file holds a lossless (VP8L) bitstream: walk its RIFF chunks."""
    pos = 12
    while pos + 8 <= len(data):
        fourcc, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if fourcc == b"VP8L":
            return True
        if fourcc == b"VP8 ":
            return False
        pos += 8 + size + (size & 1)
    return False


def _info(img: Image.Image, data: bytes, frames: int) -> ImageInfo:
    """The container, encoder settings and metadata of an opened (and loaded) image."""
    fmt = str(img.format)
    raw = img.info
    opts: dict[str, Any] = {}
    if "dpi" in raw:
        opts["dpi"] = tuple(raw["dpi"])
    if fmt == "JPEG":
        opts["qtables"] = {k: list(v) for k, v in getattr(img, "quantization", {}).items()}
        sampling = JpegImagePlugin.get_sampling(img)
        if sampling >= 0:
            opts["subsampling"] = sampling
        opts["progressive"] = bool(raw.get("progressive") or raw.get("progression"))
        if isinstance(raw.get("comment"), bytes):
            opts["comment"] = raw["comment"]
    elif fmt == "PNG":
        text = getattr(img, "text", {}) or {}
        opts["text"] = [(str(k), str(v)) for k, v in text.items()]
        if "transparency" in raw:
            opts["transparency"] = raw["transparency"]
    elif fmt == "WEBP":
        opts["lossless"] = _webp_lossless(data)
    elif fmt == "TIFF":
        opts["compression"] = raw.get("compression", "raw")
        tags = getattr(img, "tag_v2", {})
        opts["tiffinfo"] = {t: tags[t] for t in _TIFF_KEEP_TAGS if t in tags}
    exif, icc = raw.get("exif"), raw.get("icc_profile")
    return ImageInfo(
        format=fmt,
        frames=frames,
        exif=bytes(exif) if isinstance(exif, (bytes, bytearray)) and exif else None,
        icc_profile=bytes(icc) if isinstance(icc, (bytes, bytearray)) and icc else None,
        options=opts,
    )


def encode_like(image: np.ndarray, info: ImageInfo) -> bytes:
    """Encode uint8 ``[H, W, 1|3]`` pixels in the container and with the metadata of ``info``.

    Deterministic (equal pixels and info give equal bytes), so shard hashes stay reproducible.
    JPEG keeps the original's quantisation tables and chroma subsampling; WebP stays lossless if
    it was (lossy WebP is written at quality 90); TIFF keeps its compression; EXIF (orientation
    included), ICC profile, PNG text chunks and resolution are written back.
    """
    img = _to_pil(image)
    fmt = info.format
    opts = info.options
    kw: dict[str, Any] = {}
    if info.icc_profile:
        kw["icc_profile"] = info.icc_profile
    if info.exif and fmt in ("PNG", "JPEG", "WEBP"):
        kw["exif"] = info.exif
    if "dpi" in opts and fmt in ("PNG", "JPEG", "BMP", "TIFF"):
        kw["dpi"] = opts["dpi"]
    if fmt == "PNG":
        kw.update(compress_level=6, optimize=False)
        if opts.get("text"):
            chunks = PngImagePlugin.PngInfo()
            for k, v in opts["text"]:
                if v.isascii():
                    chunks.add_text(k, v)
                else:
                    chunks.add_itxt(k, v)
            kw["pnginfo"] = chunks
        if "transparency" in opts:
            kw["transparency"] = opts["transparency"]
    elif fmt == "JPEG":
        if opts.get("qtables"):
            kw["qtables"] = {int(k): list(v) for k, v in opts["qtables"].items()}
        else:
            kw["quality"] = 90
        if "subsampling" in opts and img.mode == "RGB":
            kw["subsampling"] = opts["subsampling"]
        if opts.get("progressive"):
            kw["progressive"] = True
        if opts.get("comment"):
            kw["comment"] = opts["comment"]
    elif fmt == "WEBP":
        kw.update(lossless=True, quality=100, method=4, exact=True)
        if not opts.get("lossless", False):
            kw.update(lossless=False, quality=90)
    elif fmt == "TIFF":
        comp = opts.get("compression", "raw")
        kw["compression"] = None if comp == "raw" else comp
        if opts.get("tiffinfo"):
            kw["tiffinfo"] = dict(opts["tiffinfo"])
    elif fmt not in ("BMP", "PPM"):
        raise ValueError(f"encode_like cannot write {fmt} images")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _to_pil(image: np.ndarray) -> Image.Image:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"images are encoded from uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"images are encoded from shape [H, W, 1] or [H, W, 3], got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"images are encoded from non-empty pixels, got {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _check_mode(mode: str, shard: str, key: str) -> None:
    if mode not in ("L", "RGB"):
        raise ShardError(
            shard, f"unsupported image mode {mode!r}; convert the images to RGB or L (8-bit)", key
        )


def encode_png(image: np.ndarray) -> bytes:
    """Encode uint8 ``[H, W, 1]`` (or ``[H, W]``) as an L PNG and ``[H, W, 3]`` as an RGB PNG.

    Settings are pinned and no metadata is written, so equal pixels always give equal bytes and
    shard hashes stay reproducible.
    """
    img = _to_pil(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


_LABEL_RE = re.compile(r"[+-]?[0-9]{1,18}")


def parse_label(
    sample: Sample, *, shard: str, field: str = "cls", num_classes: int | None = None
) -> int:
    """The sample's class label, from ASCII integer text in member ``field``.

    Labels decide which class direction an image is marked towards, so anything doubtful is an
    error rather than a guess.
    """
    data = sample.get(field)
    if data is None:
        raise ShardError(shard, f"no label member {field!r}", sample.key)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not _LABEL_RE.fullmatch(text):
        shown = one_line(data[:40].decode("utf-8", "replace"), 40)
        raise ShardError(shard, f"label {field!r} is not an integer ({shown!r})", sample.key)
    label = int(text)
    if label < 0:
        raise ShardError(shard, f"label {label} is negative", sample.key)
    if num_classes is not None and label >= num_classes:
        raise ShardError(
            shard,
            f"label {label} is out of range for {num_classes} classes (0..{num_classes - 1})",
            sample.key,
        )
    return label
