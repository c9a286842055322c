"""Decoding and encoding the images inside samples, and reading their labels.

The declared size of an image is checked before any pixel is decoded, and only the decoders behind
the image extensions radmark accepts are enabled, so untrusted bytes never reach exotic plugins."""

from __future__ import annotations

import io
import re
import struct
import warnings

import numpy as np
from PIL import Image

from radmark.data.samples import Sample, one_line
from radmark.errors import ShardError

# PIL decoders we allow. Restricting Image.open to the formats behind IMAGE_EXTS keeps exotic
# plugins (EPS shells out to Ghostscript, for instance) away from untrusted bytes.
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "PPM", "BMP", "WEBP", "TIFF")


def decode_image(data: bytes, *, shard: str, key: str, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode image bytes to uint8 ``[H, W, C]`` with C = 1 (mode L) or 3 (mode RGB).

    The declared size is checked before any pixel is decoded, so a tiny file claiming enormous
    dimensions costs nothing. Only L and RGB are accepted: silently converting other modes would
    make the marked image differ from the source in ways the user did not ask for.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(_PIL_FORMATS))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ShardError(shard, f"image has an empty size {width}x{height}", key)
            if width * height > max_pixels:
                raise ShardError(
                    shard,
                    f"image too large ({width}x{height} pixels; at most {max_pixels} allowed)",
                    key,
                )
            _check_mode(img.mode, shard, key)
            img.load()
            _check_mode(img.mode, shard, key)
            if img.size != (width, height):
                raise ShardError(shard, "image does not decode (size changed while loading)", key)
            arr = np.array(img, dtype=np.uint8)
    except ShardError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ShardError(shard, f"image too large ({one_line(str(exc), 120)})", key) from None
    except MemoryError:
        raise ShardError(shard, "image too large (out of memory while decoding)", key) from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error,
            EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:  # fmt: skip
        detail = one_line(str(exc), 120) or type(exc).__name__
        raise ShardError(shard, f"image does not decode ({detail})", key) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


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
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"encode_png needs shape [H, W, 1] or [H, W, 3], got {image.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"encode_png needs a non-empty image, got {image.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr))
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
