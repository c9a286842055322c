"""A many-class real-data set built offline: common CJK characters rendered from Debian's fonts.

Why this exists: the paper's white-box test draws its evidence from the C rows of the classifier,
so its power grows with the number of classes (its headline is 1,000-class ImageNet). No
many-class photo set can be downloaded on the benchmark machines, so we build one from glyphs:
class = character, sample = one typeface's rendering of it under random augmentation.

The generator is split in two so that it can run on a GPU machine that has neither the fonts nor
the internet:

``masters`` (needs the Debian font packages, see :data:`PACKAGES`)
    Every (character, typeface) glyph is rendered once, centred on its ink, as a 64 x 64 binary
    bitmap (rendered at 128 px with anti-aliasing, box-averaged to 64, thresholded), and saved
    bit-packed in a compressed ``.npz`` (5.1 MB at C = 1000 with 57 faces). Faces are deduplicated and
    characters kept only when every chosen face draws them, so every class has every face.

``build`` (numpy only: no fonts, no PIL, no scipy)
    Seeded augmentation of the masters into 32 x 32 grayscale uint8 images, white glyph on a dark
    background: stroke width (binary erosion / dilation at 64 px), a random affine map (rotation,
    scale, aspect, shear, translation) sampled bilinearly on a 2x supersampled grid and
    box-averaged (anti-aliased), a Gaussian blur, contrast / brightness jitter and additive noise.
    60,000 training and 10,000 test images whatever C, classes balanced, faces spread evenly over
    each class's images, train and test drawn independently.

Determinism: the same (masters, seed) gives byte-identical arrays on any machine. The build step
uses only numpy's ``Generator.random`` / ``permutation`` (documented stable streams) and
element-wise ``+ - * /``, ``floor`` and comparisons, which IEEE 754 makes exact everywhere;
transcendental functions (sin, cos, exp) are evaluated per image with Python's ``math`` on
scalars, never through numpy's SIMD kernels (which differ between CPUs), and Gaussian noise is
an Irwin-Hall sum of uniforms rather than numpy's ziggurat (whose tail calls libm).
:func:`dataset_sha256` hashes the result (documented there) and callers record it.

Usage::

    python -m bench.glyphs masters --classes 1000 --out glyph-masters.npz [--install]
    python -m bench.glyphs build --masters glyph-masters.npz --classes 100 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AUGMENT",
    "DEFAULT_MASTERS",
    "PACKAGES",
    "Augment",
    "FontFace",
    "GlyphData",
    "GlyphFontsMissing",
    "Masters",
    "build_dataset",
    "candidate_chars",
    "dataset_sha256",
    "find_faces",
    "install_command",
    "load_masters",
    "make_glyph_dataset",
    "missing_packages",
    "render_masters",
    "write_glyph_shards",
]

#: Debian packages whose faces make up the set. Only files installed by these packages are
#: scanned, so other fonts on the machine never change the data. Checked and left out: Takao and
#: IPA (non-ex) fonts render like IPAex (deduplicated anyway), the Big5 Arphic fonts
#: (bkai00mp, bsmi00lp) lack ~6% of the characters, Korean fonts lack the simplified forms,
#: fonts-cns11643-* are 300 MB for two faces close to Arphic's.
PACKAGES: tuple[str, ...] = (
    "fonts-noto-cjk",
    "fonts-noto-cjk-extra",
    "fonts-arphic-ukai",
    "fonts-arphic-uming",
    "fonts-arphic-gbsn00lp",
    "fonts-arphic-gkai00mp",
    "fonts-wqy-zenhei",
    "fonts-wqy-microhei",
    "fonts-ipaexfont-gothic",
    "fonts-ipaexfont-mincho",
    "fonts-lxgw-wenkai",
    "fonts-vlgothic",
    "fonts-horai-umefont",
    "fonts-motoya-l-cedar",
    "fonts-motoya-l-maruberi",
    "fonts-hanazono",
    "fonts-seto",
    "fonts-konatu",
    "fonts-kouzan-mouhitsu",
)

FONT_SUFFIXES: tuple[str, ...] = (".ttf", ".ttc", ".otf", ".otc")

#: Master bitmaps are MASTER x MASTER binary, rendered at SUPERSAMPLE x that and box-averaged.
MASTER = 64
SUPERSAMPLE = 2
#: Font size (em) as a fraction of the master side: leaves room for rotation and scale-up.
EM_FRACTION = 0.75
#: A master pixel is ink when its anti-aliased coverage is at least this: low enough that the
#: hairlines of the Thin / ExtraLight weights stay connected.
INK_THRESHOLD = 0.3
#: Output images are OUT x OUT; the affine map is sampled on a (2 OUT)^2 grid, then box-averaged.
OUT = 32
#: A face is eligible when it maps and draws at least this fraction of the candidate characters
#: (this drops fonts that only cover another encoding or ship empty outlines).
MIN_FACE_COVERAGE = 0.98
#: Two faces are the same typeface when the mean IoU of their binary masters over the probe
#: characters is at least this (Mono / proportional twins, region variants drawn alike, renamed
#: copies such as Takao = IPA); the first in (coverage, path, index) order is kept.
DEDUPE_IOU = 0.9
#: How many candidate characters (in GB2312 order) the eligibility and deduplication look at.
PROBE_CHARS = 256
#: Images are generated in chunks of this many, each from its own child seed (part of the
#: definition of the data: changing it changes the bytes).
CHUNK = 2048
N_TRAIN = 60_000
N_TEST = 10_000

MASTERS_FORMAT = "radmark-glyph-masters-v1"
DATA_FORMAT = "radmark-glyphs-v1"


class GlyphFontsMissing(RuntimeError):
    """The font packages needed to render masters are not installed (message has the command)."""


# --------------------------------------------------------------------------------------------
# Fonts


def install_command(packages: Sequence[str] = PACKAGES) -> str:
    """The exact apt command that installs ``packages`` (printed, run only with ``--install``)."""
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def _dpkg_status(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return None
    parts = out.stdout.split()
    if out.returncode != 0 or len(parts) != 2 or parts[0] != "installed":
        return None
    return parts[1]


def missing_packages(packages: Sequence[str] = PACKAGES) -> list[str]:
    """The packages of ``packages`` that dpkg does not report as installed."""
    return [p for p in packages if _dpkg_status(p) is None]


def _require_fonts(packages: Sequence[str] = PACKAGES, *, install: bool = False) -> None:
    """Raise :class:`GlyphFontsMissing` naming the apt command, or run it when ``install``.

    The benchmark never installs anything behind the user's back: installing is opt-in
    (``--install``) and needs root.
    """
    if shutil.which("dpkg-query") is None:
        raise GlyphFontsMissing(
            "rendering glyph masters needs Debian's font packages (no dpkg-query here); render "
            "them on a Debian machine with `python -m bench.glyphs masters` and copy the .npz"
        )
    missing = missing_packages(packages)
    if not missing:
        return
    cmd = install_command(missing)
    if not install:
        raise GlyphFontsMissing(
            f"{len(missing)} font package(s) missing: {' '.join(missing)}\n"
            f"install them with:\n    {cmd}\n"
            "(or run `python -m bench.glyphs masters --install` as root)"
        )
    if os.geteuid() != 0:
        raise GlyphFontsMissing(f"--install needs root; run as root:\n    {cmd}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(cmd.split(), check=True, env=env)
    still = missing_packages(packages)
    if still:
        raise GlyphFontsMissing(f"apt-get did not install: {' '.join(still)}")


@dataclass(frozen=True)
class FontFace:
    """One face: a font file and the face index inside it (``.ttc`` collections hold several)."""

    path: str
    index: int
    name: str
    package: str


def _package_font_files(package: str) -> list[str]:
    """Font files installed by ``package`` (links resolved, each real file once)."""
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    files = set()
    for line in out.stdout.splitlines():
        p = Path(line)
        if p.suffix.lower() in FONT_SUFFIXES and p.is_file():
            files.add(str(p.resolve()))
    return sorted(files)


def find_faces(packages: Sequence[str] = PACKAGES) -> list[FontFace]:
    """Every face of every font file of ``packages``, sorted by (path, index).

    Collections (``.ttc`` / ``.otc``) are opened with fontTools to count their faces; names come
    from the fonts' name tables (full name, ID 4), made unique with the file name if needed.
    """
    from fontTools.ttLib import TTCollection, TTFont

    faces: list[FontFace] = []
    for package in packages:
        for path in _package_font_files(package):
            if path.lower().endswith((".ttc", ".otc")):
                fonts = TTCollection(path, lazy=True).fonts
            else:
                fonts = [TTFont(path, lazy=True)]
            for i, font in enumerate(fonts):
                name = font["name"].getDebugName(4) or f"{Path(path).stem}#{i}"
                faces.append(FontFace(path, i, name, package))
    faces.sort(key=lambda f: (f.path, f.index))
    seen: dict[str, int] = {}
    for f in faces:
        seen[f.name] = seen.get(f.name, 0) + 1
    return [
        dataclasses.replace(f, name=f"{f.name} ({Path(f.path).name}#{f.index})")
        if seen[f.name] > 1
        else f
        for f in faces
    ]


def _cmap(face: FontFace) -> set[int]:
    from fontTools.ttLib import TTFont

    font = TTFont(face.path, fontNumber=face.index, lazy=True)
    return set(font.getBestCmap() or {})


# --------------------------------------------------------------------------------------------
# Characters


def candidate_chars() -> list[str]:
    """GB2312 level-1 hanzi that are also JIS X 0208 level-1 kanji, in GB2312 code order.

    GB2312 rows 16-55 are the 3,755 "commonly used" hanzi; JIS rows 16-47 the level-1 kanji.
    Their intersection (1,711 characters) is common in both languages, so Chinese and Japanese
    faces all draw them. GB2312 order (pinyin) makes the first C a fixed, nested choice.
    """
    jis = set()
    for row in range(16, 48):
        for col in range(1, 95):
            with contextlib.suppress(UnicodeDecodeError):
                jis.add(bytes([0xA0 + row, 0xA0 + col]).decode("euc_jp"))
    out = []
    for row in range(16, 56):
        for col in range(1, 95):
            try:
                ch = bytes([0xA0 + row, 0xA0 + col]).decode("gb2312")
            except UnicodeDecodeError:
                continue
            if ch in jis:
                out.append(ch)
    return out


# --------------------------------------------------------------------------------------------
# Rendering masters (fonts + PIL; only on the machine that has the fonts)


def _font(face: FontFace, size: int):
    from PIL import ImageFont

    # BASIC layout: one glyph needs no shaping, and it keeps libraqm out of the result.
    return ImageFont.truetype(
        face.path, size=size, index=face.index, layout_engine=ImageFont.Layout.BASIC
    )


def _render(font, ch: str) -> np.ndarray | None:
    """The binary MASTER x MASTER master of ``ch``, centred on its ink box; None if empty.

    Rendered anti-aliased at SUPERSAMPLE x MASTER (em = EM_FRACTION of the side), box-averaged
    and thresholded. A glyph too large for the canvas is rendered smaller until it fits.
    """
    from PIL import Image, ImageDraw

    side = MASTER * SUPERSAMPLE
    size = font.size
    while True:
        canvas = Image.new("L", (2 * side, 2 * side), 0)
        try:
            ImageDraw.Draw(canvas).text((side, side), ch, fill=255, font=font, anchor="mm")
        except OSError:  # broken hinting bytecode and the like: treat as not drawn
            return None
        bbox = canvas.getbbox()
        if bbox is None:
            return None
        x0, y0, x1, y1 = bbox
        w, h = x1 - x0, y1 - y0
        if w <= side and h <= side:
            break
        size = int(size * side / max(w, h))
        font = font.font_variant(size=size)
    ink = np.asarray(canvas, dtype=np.float64)[y0:y1, x0:x1] / 255.0
    big = np.zeros((side, side), np.float64)
    oy, ox = (side - h) // 2, (side - w) // 2
    big[oy : oy + h, ox : ox + w] = ink
    cov = big.reshape(MASTER, SUPERSAMPLE, MASTER, SUPERSAMPLE).mean(axis=(1, 3))
    out = cov >= INK_THRESHOLD
    return out if out.any() else None


def _render_face(face: FontFace, chars: Sequence[str], cmap: set[int]) -> list[np.ndarray | None]:
    font = _font(face, round(EM_FRACTION * MASTER * SUPERSAMPLE))
    return [_render(font, ch) if ord(ch) in cmap else None for ch in chars]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


@dataclass
class Masters:
    """Binary glyph masters: ``bits[k, f]`` is character ``chars[k]`` drawn by face ``faces[f]``.

    ``bits`` is bool [n_chars, n_faces, MASTER, MASTER]. ``info`` carries provenance (package
    versions, counts) that is saved but not hashed; :attr:`sha256` covers the content only, so
    the same bitmaps hash alike whatever file they were loaded from.
    """

    bits: np.ndarray
    chars: list[str]
    faces: list[str]
    info: dict

    @property
    def sha256(self) -> str:
        """SHA-256 of the format tag, the JSON of chars (code points) and faces, and the bits."""
        h = hashlib.sha256()
        h.update(MASTERS_FORMAT.encode() + b"\n")
        head = {"chars": [ord(c) for c in self.chars], "faces": self.faces, "size": MASTER}
        h.update(json.dumps(head, sort_keys=True, ensure_ascii=True).encode() + b"\n")
        h.update(np.packbits(self.bits, axis=-1).tobytes())
        return h.hexdigest()

    def subset(self, classes: int) -> Masters:
        """The first ``classes`` characters (the class sets are nested)."""
        if not 1 <= classes <= len(self.chars):
            raise ValueError(f"masters hold {len(self.chars)} characters; asked for {classes}")
        return Masters(self.bits[:classes], self.chars[:classes], self.faces, dict(self.info))

    def save(self, path: Path) -> None:
        """Write a compressed ``.npz`` (bit-packed masters + JSON metadata; no pickles)."""
        meta = {
            "format": MASTERS_FORMAT,
            "size": MASTER,
            "chars": [ord(c) for c in self.chars],
            "faces": self.faces,
            "info": self.info,
            "sha256": self.sha256,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two data units may save at once
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, bits=np.packbits(self.bits, axis=-1), meta=np.array(json.dumps(meta))
            )
        os.replace(tmp, path)


def load_masters(path: Path) -> Masters:
    """Read a masters ``.npz`` written by :meth:`Masters.save` and check its content hash."""
    with np.load(Path(path), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        packed = z["bits"]
    if meta.get("format") != MASTERS_FORMAT:
        raise ValueError(f"{path}: not a glyph masters file ({meta.get('format')!r})")
    size = int(meta["size"])
    bits = np.unpackbits(packed, axis=-1, count=size).astype(bool)
    m = Masters(bits, [chr(c) for c in meta["chars"]], list(meta["faces"]), meta.get("info", {}))
    if bits.shape != (len(m.chars), len(m.faces), size, size):
        raise ValueError(f"{path}: bits have shape {bits.shape}, metadata disagree")
    if meta.get("sha256") not in (None, m.sha256):
        raise ValueError(f"{path}: content hash mismatch (file damaged?)")
    return m


def render_masters(
    classes: int | None = None,
    *,
    packages: Sequence[str] = PACKAGES,
    install: bool = False,
    log=print,
) -> Masters:
    """Render the masters of the first ``classes`` passing characters (all when None).

    Steps, all deterministic given the installed package versions:
    1. faces of ``packages`` (:func:`find_faces`); a face is eligible when its cmap holds and it
       draws at least MIN_FACE_COVERAGE of the candidate characters (draw checked on the first
       PROBE_CHARS);
    2. deduplication: in order of (coverage desc, path, index) a face is dropped when its mean
       master IoU with an already kept face over the probe characters is >= DEDUPE_IOU;
    3. characters: the candidates that every kept face maps and draws (non-empty ink), in
       GB2312 order; the first ``classes`` of them.
    """
    _require_fonts(packages, install=install)
    t0 = time.perf_counter()
    cands = candidate_chars()
    probe = cands[:PROBE_CHARS]
    faces = find_faces(packages)
    log(f"{len(faces)} faces in {len(packages)} packages; {len(cands)} candidate characters")

    eligible = []
    for face in faces:
        cmap = _cmap(face)
        cover = sum(ord(c) in cmap for c in cands)
        drawn = _render_face(face, probe, cmap)
        n_drawn = sum(d is not None for d in drawn)
        if cover < MIN_FACE_COVERAGE * len(cands) or n_drawn < MIN_FACE_COVERAGE * len(probe):
            log(
                f"  not eligible: {face.name} (maps {cover}/{len(cands)}, draws {n_drawn}/{len(probe)})"
            )
            continue
        eligible.append((cover, face, cmap, drawn))
    eligible.sort(key=lambda e: (-e[0], e[1].path, e[1].index))

    kept: list[tuple[FontFace, set[int], list[np.ndarray | None]]] = []
    dropped: dict[str, str] = {}
    for _, face, cmap, drawn in eligible:
        best, best_iou = None, 0.0
        for other, _, odrawn in kept:
            ious = [
                _iou(a, b)
                for a, b in zip(drawn, odrawn, strict=True)
                if a is not None and b is not None
            ]
            iou = float(np.mean(ious)) if ious else 0.0
            if iou > best_iou:
                best, best_iou = other, iou
        if best is not None and best_iou >= DEDUPE_IOU:
            dropped[face.name] = f"{best.name} (IoU {best_iou:.3f})"
        else:
            kept.append((face, cmap, drawn))
    kept.sort(key=lambda k: (k[0].path, k[0].index))
    log(f"{len(kept)} distinct faces kept, {len(dropped)} duplicates dropped")

    per_face = [_render_face(face, cands, cmap) for face, cmap, _ in kept]
    passing = [k for k in range(len(cands)) if all(r[k] is not None for r in per_face)]
    log(f"{len(passing)} of {len(cands)} characters drawn by every kept face")
    if classes is None:
        classes = len(passing)
    if classes > len(passing):
        raise ValueError(f"only {len(passing)} characters pass; asked for {classes}")
    take = passing[:classes]
    bits = np.zeros((classes, len(kept), MASTER, MASTER), bool)
    for f, rows in enumerate(per_face):
        for j, k in enumerate(take):
            bits[j, f] = rows[k]

    from PIL import __version__ as pil_version

    info = {
        "packages": {p: _dpkg_status(p) for p in packages},
        "face_files": [[f.path, f.index, f.package] for f, _, _ in kept],
        "duplicates": dropped,
        "candidates": len(cands),
        "passing": len(passing),
        "pillow": pil_version,
        "params": {
            "master": MASTER,
            "supersample": SUPERSAMPLE,
            "em_fraction": EM_FRACTION,
            "ink_threshold": INK_THRESHOLD,
            "min_face_coverage": MIN_FACE_COVERAGE,
            "dedupe_iou": DEDUPE_IOU,
            "probe_chars": PROBE_CHARS,
        },
        "render_seconds": round(time.perf_counter() - t0, 1),
    }
    return Masters(bits, [cands[k] for k in take], [f.name for f, _, _ in kept], info)


# --------------------------------------------------------------------------------------------
# Building the data set from masters (numpy only)


@dataclass(frozen=True)
class Augment:
    """Augmentation ranges (uniform draws unless said). Part of the data's definition.

    Lengths are in output pixels (32 x 32), angles in degrees.
    """

    rotate: float = 12.0  # rotation in [-rotate, rotate]
    scale: tuple[float, float] = (0.8, 1.1)  # isotropic scale
    aspect: float = 0.08  # x and y scales multiplied by 1 +- aspect / 2
    shear: float = 0.2  # x += shear * y, shear in [-shear, shear]
    translate: float = 2.5  # shift in [-translate, translate] on each axis
    # stroke: probabilities of erosion by 1 master px, none, dilation by 1, by 2
    stroke: tuple[float, float, float, float] = (0.2, 0.4, 0.25, 0.15)
    blur: tuple[float, float] = (0.0, 1.0)  # Gaussian sigma
    background: tuple[float, float] = (0.0, 0.3)  # background level (0..1)
    contrast: tuple[float, float] = (0.35, 1.0)  # ink level minus background, capped at 1
    noise: tuple[float, float] = (0.0, 0.08)  # noise standard deviation (0..1 scale)


AUGMENT = Augment()


@dataclass
class GlyphData:
    """A generated glyph data set: uint8 images [N, 32, 32] (white glyph on dark) and labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    sha256: str
    faces: list[str]
    chars: list[str]
    seed: int
    masters_sha256: str
    train_faces: np.ndarray  # face index of each image (for analysis; not part of the hash)
    test_faces: np.ndarray
    augment: Augment = AUGMENT

    @property
    def classes(self) -> int:
        return len(self.chars)

    def meta(self) -> dict:
        """JSON-ready description (what the shard writer and the benchmark record)."""
        return {
            "format": DATA_FORMAT,
            "classes": self.classes,
            "chars": [ord(c) for c in self.chars],
            "faces": self.faces,
            "seed": self.seed,
            "train": int(len(self.train_labels)),
            "test": int(len(self.test_labels)),
            "image": [OUT, OUT, 1],
            "polarity": "white glyph on dark background",
            "sha256": self.sha256,
            "masters_sha256": self.masters_sha256,
            "augment": dataclasses.asdict(self.augment),
        }


def dataset_sha256(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> str:
    """SHA-256 of the four arrays, in this order, as C-order bytes: images uint8 [N, 32, 32],
    labels little-endian int64. Shapes are fixed by the format, so the bytes say everything."""
    h = hashlib.sha256()
    for arr, dt in (
        (train_images, np.uint8),
        (train_labels, "<i8"),
        (test_images, np.uint8),
        (test_labels, "<i8"),
    ):
        h.update(np.ascontiguousarray(arr, dtype=dt).tobytes())
    return h.hexdigest()


def _assign(rng: np.random.Generator, n: int, classes: int, faces: int):
    """Labels and face indices for ``n`` images, in a random order.

    Classes are balanced (counts differ by at most one); within a class, faces come from
    concatenated random permutations, so each face's count differs by at most one too.
    """
    counts = [n // classes + (c < n % classes) for c in range(classes)]
    labels = np.repeat(np.arange(classes, dtype=np.int64), counts)
    face = np.empty(n, np.int64)
    start = 0
    for cnt in counts:
        if cnt == 0:
            continue
        reps = -(-cnt // faces)
        face[start : start + cnt] = np.concatenate([rng.permutation(faces) for _ in range(reps)])[
            :cnt
        ]
        start += cnt
    order = rng.permutation(n)
    return labels[order], face[order]


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``x`` [B, H, W] shifted by (dy, dx) with zero fill."""
    out = np.zeros_like(x)
    h, w = x.shape[1:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = x[:, ys, xs]
    return out


def _dilate(b: np.ndarray) -> np.ndarray:
    """Binary dilation by a 3 x 3 cross."""
    return b | _shift(b, 1, 0) | _shift(b, -1, 0) | _shift(b, 0, 1) | _shift(b, 0, -1)


def _erode(b: np.ndarray) -> np.ndarray:
    """Binary erosion by a 3 x 3 cross."""
    return b & _shift(b, 1, 0) & _shift(b, -1, 0) & _shift(b, 0, 1) & _shift(b, 0, -1)


def _stroke(b: np.ndarray, u: np.ndarray, probs: Sequence[float]) -> np.ndarray:
    """Per image: erode once, leave, dilate once or twice, chosen by uniforms ``u``.

    Erosion is skipped where it would remove more than half the ink (hairline faces).
    """
    cum = np.cumsum(np.asarray(probs, np.float64))
    k = np.searchsorted(cum / cum[-1], u, side="right")  # 0..3
    d1 = _dilate(b)
    d2 = _dilate(d1)
    e1 = _erode(b)
    keep_e = np.count_nonzero(e1, axis=(1, 2)) * 2 >= np.count_nonzero(b, axis=(1, 2))
    out = b.copy()
    sel = (k == 0) & keep_e
    out[sel] = e1[sel]
    out[k == 2] = d1[k == 2]
    out[k == 3] = d2[k == 3]
    return out


def _warp(master: np.ndarray, mats: np.ndarray) -> np.ndarray:
    """Bilinear sampling of binary ``master`` [B, M, M] on the 2 OUT x 2 OUT grid, then a 2 x 2
    box average: float32 [B, OUT, OUT] in [0, 1] (anti-aliased).

    ``mats[i] = (a, b, c, d, e, f)``: grid point (x, y) (pixel-centre coordinates, origin at the
    grid centre) samples master point (a x + b y + c, d x + e y + f) (origin at the master
    centre). Outside the master is background (0). Because masters are binary, each pixel's
    2 x 2 neighbourhood is packed into a 4-bit code first, so sampling is one gather, not four.
    """
    bsz, m = master.shape[0], master.shape[1]
    g = 2 * OUT
    pad = 2
    side = m + 2 * pad
    src = np.zeros((bsz, side, side), np.uint8)
    src[:, pad : pad + m, pad : pad + m] = master
    code = src.copy()  # bit 0: (y, x), bit 1: (y, x+1), bit 2: (y+1, x), bit 3: (y+1, x+1)
    code[:, :, :-1] |= src[:, :, 1:] << 1
    code[:, :-1, :] |= src[:, 1:, :] << 2
    code[:, :-1, :-1] |= src[:, 1:, 1:] << 3
    grid = np.arange(g, dtype=np.float32) - np.float32((g - 1) / 2.0)
    gx = grid[None, None, :]
    gy = grid[None, :, None]
    mt = mats.astype(np.float32)
    centre = np.float32((m - 1) / 2.0 + pad)

    def col(j: int) -> np.ndarray:
        return mt[:, j][:, None, None]

    sx = col(0) * gx + col(1) * gy + (col(2) + centre)
    sy = col(3) * gx + col(4) * gy + (col(5) + centre)
    # points beyond the border land in the zero padding
    np.clip(sx, np.float32(pad - 1), np.float32(m + pad), out=sx)
    np.clip(sy, np.float32(pad - 1), np.float32(m + pad), out=sy)
    x0 = np.floor(sx)
    y0 = np.floor(sy)
    fx = sx - x0
    fy = sy - y0
    base = (np.arange(bsz, dtype=np.int64) * (side * side))[:, None, None]
    c = code.reshape(-1)[base + y0.astype(np.int64) * side + x0.astype(np.int64)]
    v00, v01, v10, v11 = (((c >> k) & 1).astype(np.float32) for k in range(4))
    top = v00 + fx * (v01 - v00)
    bot = v10 + fx * (v11 - v10)
    val = top + fy * (bot - top)
    quad = val[:, 0::2, 0::2] + val[:, 0::2, 1::2] + val[:, 1::2, 0::2] + val[:, 1::2, 1::2]
    return quad * np.float32(0.25)


def _blur(x: np.ndarray, sigmas: Sequence[float], radius: int = 3) -> np.ndarray:
    """Separable Gaussian blur, one sigma per image, zero padding (the background is 0 here).

    Kernel weights are computed with ``math.exp`` on scalars (portable), then applied as a fixed
    sequence of multiply-adds.
    """
    w = np.zeros((len(sigmas), 2 * radius + 1), np.float32)
    for i, s in enumerate(sigmas):
        if s < 0.05:
            w[i, radius] = 1.0
            continue
        row = [math.exp(-(t * t) / (2.0 * s * s)) for t in range(-radius, radius + 1)]
        total = math.fsum(row)
        w[i] = [r / total for r in row]
    out = np.zeros_like(x)
    for t in range(-radius, radius + 1):
        out += w[:, t + radius][:, None, None] * _shift(x, t, 0)
    res = np.zeros_like(x)
    for t in range(-radius, radius + 1):
        res += w[:, t + radius][:, None, None] * _shift(out, 0, t)
    return res


def _affine_params(u: np.ndarray, aug: Augment) -> np.ndarray:
    """Inverse affine maps (output grid -> master, in master pixels) from uniforms u [B, 6]."""
    ratio = MASTER / (2.0 * OUT)  # master pixels per grid pixel at scale 1
    mats = np.zeros((u.shape[0], 6), np.float64)
    for i in range(u.shape[0]):
        theta = math.radians(aug.rotate * (2.0 * float(u[i, 0]) - 1.0))
        s = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * float(u[i, 1])
        a = aug.aspect * (float(u[i, 2]) - 0.5)
        sx, sy = s * (1.0 + a), s * (1.0 - a)
        h = aug.shear * (2.0 * float(u[i, 3]) - 1.0)
        tx = aug.translate * (2.0 * float(u[i, 4]) - 1.0) * 2.0  # in grid pixels
        ty = aug.translate * (2.0 * float(u[i, 5]) - 1.0) * 2.0
        c, sn = math.cos(theta), math.sin(theta)
        # forward (master -> grid, centred): R @ [[1, h], [0, 1]] @ diag(sx, sy)
        f00, f01 = c * sx, (c * h - sn) * sy
        f10, f11 = sn * sx, (sn * h + c) * sy
        det = f00 * f11 - f01 * f10
        i00, i01, i10, i11 = f11 / det, -f01 / det, -f10 / det, f00 / det
        # grid point p -> master point ratio * F^-1 (p - t)
        mats[i] = (
            ratio * i00,
            ratio * i01,
            -ratio * (i00 * tx + i01 * ty),
            ratio * i10,
            ratio * i11,
            -ratio * (i10 * tx + i11 * ty),
        )
    return mats


def _render_chunk(
    rng: np.random.Generator,
    bits: np.ndarray,
    labels: np.ndarray,
    faces: np.ndarray,
    aug: Augment,
) -> np.ndarray:
    """uint8 [B, OUT, OUT] images of (labels[i], faces[i]) from ``bits`` [C, F, M, M]."""
    bsz = len(labels)
    u = rng.random((bsz, 11))
    master = _stroke(bits[labels, faces], u[:, 0], aug.stroke)
    img = _warp(master, _affine_params(u[:, 1:7], aug))
    sig = [aug.blur[0] + (aug.blur[1] - aug.blur[0]) * float(v) for v in u[:, 7]]
    img = _blur(img, sig)
    bg = aug.background[0] + (aug.background[1] - aug.background[0]) * u[:, 8]
    amp = aug.contrast[0] + (aug.contrast[1] - aug.contrast[0]) * u[:, 9]
    amp = np.minimum(amp, 1.0 - bg)
    img = bg.astype(np.float32)[:, None, None] + amp.astype(np.float32)[:, None, None] * img
    nsd = aug.noise[0] + (aug.noise[1] - aug.noise[0]) * u[:, 10]
    # Irwin-Hall: the sum of 3 uniforms minus 1.5 has variance 1/4; times 2 -> unit variance.
    nz = rng.random((3, bsz, OUT, OUT), dtype=np.float32)
    img += (2.0 * nsd).astype(np.float32)[:, None, None] * (nz[0] + nz[1] + nz[2] - np.float32(1.5))
    np.clip(img, np.float32(0.0), np.float32(1.0), out=img)
    return np.floor(img * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def _make_split(
    seq: np.random.SeedSequence, bits: np.ndarray, n: int, aug: Augment
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    classes, nfaces = bits.shape[:2]
    assign_seq, render_seq = seq.spawn(2)
    labels, faces = _assign(np.random.default_rng(assign_seq), n, classes, nfaces)
    chunks = range(0, n, CHUNK)
    children = render_seq.spawn(len(chunks))
    images = np.empty((n, OUT, OUT), np.uint8)
    for child, start in zip(children, chunks, strict=True):
        stop = min(n, start + CHUNK)
        images[start:stop] = _render_chunk(
            np.random.default_rng(child), bits, labels[start:stop], faces[start:stop], aug
        )
    return images, labels, faces


def build_dataset(
    masters: Masters,
    classes: int,
    seed: int,
    *,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    augment: Augment = AUGMENT,
) -> GlyphData:
    """The seeded data set of the first ``classes`` characters of ``masters`` (numpy only).

    Train and test come from independent child seeds of ``SeedSequence([seed, classes])``.
    """
    m = masters.subset(classes)
    train_seq, test_seq = np.random.SeedSequence([seed, classes]).spawn(2)
    tri, trl, trf = _make_split(train_seq, m.bits, n_train, augment)
    tei, tel, tef = _make_split(test_seq, m.bits, n_test, augment)
    return GlyphData(
        train_images=tri,
        train_labels=trl,
        test_images=tei,
        test_labels=tel,
        sha256=dataset_sha256(tri, trl, tei, tel),
        faces=list(m.faces),
        chars=list(m.chars),
        seed=seed,
        masters_sha256=masters.sha256,
        train_faces=trf,
        test_faces=tef,
        augment=augment,
    )


#: Where :func:`make_glyph_dataset` caches masters it had to render (``bench/work`` is ignored).
DEFAULT_MASTERS = Path(__file__).resolve().parent / "work" / "glyph-masters.npz"


def synthetic_masters(chars: int = 8, faces: int = 5) -> Masters:
    """Deterministic blocky 'glyphs' (random bars on the master grid), for tests and smoke runs
    on machines without the fonts."""
    rng = np.random.default_rng(1234)
    m = MASTER
    bits = np.zeros((chars, faces, m, m), bool)
    for k in range(chars):
        for f in range(faces):
            for _ in range(3 + k % 4):
                y, x = rng.integers(12, 52, size=2)
                if rng.random() < 0.5:
                    bits[k, f, y : y + 3 + f % 3, x - 12 : x + 12] = True
                else:
                    bits[k, f, y - 12 : y + 12, x : x + 3 + f % 3] = True
    return Masters(
        bits,
        [chr(0x4E00 + k) for k in range(chars)],
        [f"face{f}" for f in range(faces)],
        {"synthetic": True},
    )


def make_glyph_dataset(
    classes: int,
    seed: int,
    masters: Masters | str | Path | None = None,
    **kwargs,
) -> GlyphData:
    """The glyph data set for the benchmark (``kwargs`` go to :func:`build_dataset`).

    ``masters``: a :class:`Masters`, a ``.npz`` path, or None: then :data:`DEFAULT_MASTERS` when
    it holds at least ``classes`` characters, else every passing character is rendered from the
    installed fonts (a couple of minutes; :class:`GlyphFontsMissing` with the apt command when
    they are missing) and cached there, so later calls on this machine load it in a second.
    """
    if masters is None:
        cached = load_masters(DEFAULT_MASTERS) if DEFAULT_MASTERS.exists() else None
        if cached is None or len(cached.chars) < classes:
            cached = render_masters(None, log=lambda *_: None)
            cached.save(DEFAULT_MASTERS)
        masters = cached
    elif not isinstance(masters, Masters):
        masters = load_masters(Path(masters))
    return build_dataset(masters, classes, seed, **kwargs)


def write_glyph_shards(data: GlyphData, outdir: Path, *, samples_per_shard: int = 5000) -> dict:
    """``outdir/train``, ``outdir/test`` (WebDataset shards, PNG + cls) and ``outdir/glyphs.json``."""
    from radmark.data.writer import write_dataset

    outdir = Path(outdir)
    meta = data.meta()
    meta["shards"] = {}
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        paths = write_dataset(
            images, labels, outdir / split, samples_per_shard=samples_per_shard, prefix=split
        )
        meta["shards"][split] = [p.name for p in paths]
    meta["train_face_counts"] = np.bincount(data.train_faces, minlength=len(data.faces)).tolist()
    tmp = outdir / "glyphs.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, outdir / "glyphs.json")
    return meta


# --------------------------------------------------------------------------------------------
# CLI


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def main(argv: Sequence[str] | None = None) -> int:
    """``masters`` (fonts -> .npz) and ``build`` (.npz -> shards); see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m bench.glyphs", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("masters", help="render glyph masters from the installed fonts")
    pm.add_argument("--classes", type=int, default=1000)
    pm.add_argument("--out", type=Path, default=Path("glyph-masters.npz"))
    pm.add_argument("--install", action="store_true", help="apt-get install missing fonts (root)")
    pb = sub.add_parser("build", help="build the data set from masters and write shards")
    pb.add_argument("--masters", type=Path, required=True)
    pb.add_argument("--classes", type=int, required=True)
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--out", type=Path, required=True)
    pb.add_argument("--samples-per-shard", type=int, default=5000)
    pb.add_argument("--train", type=int, default=N_TRAIN, help="training images (all classes)")
    pb.add_argument("--test", type=int, default=N_TEST, help="test images (all classes)")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "masters":
            t0 = time.perf_counter()
            m = render_masters(args.classes, install=args.install)
            m.save(args.out)
            print(
                f"{args.out}: {len(m.chars)} characters x {len(m.faces)} faces, "
                f"{_size(args.out)}, {time.perf_counter() - t0:.0f} s, sha256 {m.sha256}"
            )
        else:
            t0 = time.perf_counter()
            data = build_dataset(
                load_masters(args.masters),
                args.classes,
                args.seed,
                n_train=args.train,
                n_test=args.test,
            )
            t1 = time.perf_counter()
            write_glyph_shards(data, args.out, samples_per_shard=args.samples_per_shard)
            print(
                f"{args.out}: C={data.classes}, {len(data.train_labels)} train + "
                f"{len(data.test_labels)} test, {len(data.faces)} faces, generated in "
                f"{t1 - t0:.1f} s, shards in {time.perf_counter() - t1:.1f} s, "
                f"sha256 {data.sha256}"
            )
    except (GlyphFontsMissing, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
