"""Marking one shard: stream, decode, select, mark in batches, check, re-encode, write atomically.

Every sample is checked (label, one decodable single-frame image within the pixel cap) whether or
not it is selected, so that whether a malformed shard is refused does not depend on the secret
selection. With ``on_error="skip"`` a sample whose image is missing, does not decode, has several
frames or too many pixels is copied unmarked, counted and its reason kept; a bad label is always an
error (it usually means a wrong --num-classes or --label-field, which skipping would hide). Keys,
labels, other members and unmarked images are copied byte-identical.

Memory is bounded by the batch, not the shard (issue #12): samples stream through a *window* that
closes when it holds ``batch_size`` selected images, when the next selected image would take its
decoded pixels past ``max_batch_pixels``, or when it holds ``MAX_WINDOW_BYTES`` of raw sample
bytes; the window's selected images are marked (one batch per image size, in order of first
appearance) and its samples written in input order before the next window is read. For shards of
one image size this gives the batches earlier versions made (consecutive selected images in
groups of ``batch_size``), so their output bytes are unchanged; shards of mixed sizes are now
batched by window, which changes their augmentation stream (still a deterministic function of the
shard, so a resume gives the same bytes).

After every batch each returned image is checked against the method's budget
(``MethodRun.budget``): finite before quantisation, within ``linf_levels`` of its input, PSNR at
least ``psnr_floor``. One image outside it fails the shard with a ModelError (exit 2): the temp
file is removed, nothing appears under the shard's name, no record is signed. A selected image the
method left unchanged is not marked: it is copied byte-identical and counted as ``unchanged``.

A marked image keeps its container (``data/images.py``: ``encode_like``): JPEG with the original's
quantisation tables and chroma subsampling, lossless WebP/PNG/BMP/TIFF/PPM exactly, with its EXIF
and ICC profile; for lossy containers the fraction of the mark that survives re-encoding is
measured and reported. ``reencode_all`` writes every decodable image through the same encoder, so
that marked and unmarked samples cannot be told apart by their encoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radmark.data.images import ImageInfo, encode_like, parse_label, read_image
from radmark.data.samples import Sample, name_bytes, printable
from radmark.data.sources import iter_samples
from radmark.data.writer import sha256_file, write_shard
from radmark.errors import ImageTooLarge, InputError, ModelError, ShardError
from radmark.keys.keypair import pixel_digest, selection_digest
from radmark.marking.manifest import ShardReport
from radmark.marking.selection import is_selected
from radmark.marking.views import MIN_MARK_SIDE

if TYPE_CHECKING:
    import torch

    from radmark.marking.methods import MarkBatchResult, MethodRun

#: Default cap on the decoded pixels (H × W) of the images marked together, and so of any one
#: image: marking memory grows with it (about 1 KB per pixel for the small CNN marker on CPU,
#: activations kept for the backward pass). 2^22 holds a batch of 64 ImageNet-size (224²) images.
MAX_BATCH_PIXELS: int = 1 << 22
#: A window also closes once it holds this many bytes of raw samples (unselected ones included).
MAX_WINDOW_BYTES: int = 256 << 20
#: Skipped samples whose reason is kept per shard (all are counted).
MAX_SKIP_REASONS: int = 100

#: Test-only fault injection: tests/kill_hook.py sets this to SIGKILL the process at an exact point
#: ("batch": a batch was marked; the first one comes before anything of the shard is written;
#: "write": the shard's temp file holds its first sample; "shard": the shard was renamed into
#: place, the run state not yet updated). Nothing in the installed package sets it, and no
#: environment variable reaches it.
FAULT_HOOK: Callable[[str], None] | None = None


def fault_point(event: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(event)


@dataclass(frozen=True)
class ShardSecrets:
    """What one shard's marking leaves that must stay private (the keystore's run state).

    marked_keys: the marked samples' ``__key__``; pixel_digests: keyed digests of their published
    pixels (hex; ``verify/guard.py`` refuses them in a probe); method_private: the method's own
    private data (e.g. twin candidates), stored content-addressed in the keystore.
    """

    marked_keys: list[str]
    pixel_digests: list[str]
    method_private: list[bytes]


@dataclass(frozen=True)
class ShardJob:
    """Everything that is the same for every shard of a run."""

    method_run: MethodRun
    selection_seed: bytes
    digest_key: bytes  # SecretKey.selection_digest_key(): keys the record's selection digests
    fraction: float
    num_classes: int
    label_field: str
    batch_size: int
    device: str
    on_error: str
    reencode_all: bool = False
    max_batch_pixels: int = MAX_BATCH_PIXELS


def shard_seed(fp: str, name: str) -> int:
    """The augmentation seed of one shard: from the key and the shard's name only."""
    digest = hashlib.sha256(name_bytes(f"radmark/v1/augment|{fp}|{name}")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class _Item:
    """One sample in the current window; pixels are kept only while they may be needed."""

    sample: Sample
    label: int
    ext: str | None = None  # the image member, None for a skipped sample
    pixels: np.ndarray | None = None  # uint8 [H, W, C]
    info: ImageInfo | None = None
    selected: bool = False
    marked: bool = False
    out: bytes | None = None  # the new bytes of the image member


class _Upstream(BaseException):
    """Carries an error raised while producing samples through ``write_shard``'s handlers, so a
    marking error is never reported as a write error (write_shard removes its temp file)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


class _ShardMarker:
    def __init__(
        self,
        url: str,
        name: str,
        job: ShardJob,
        seed: int,
        on_batch: Callable[[list[float]], None] | None,
    ) -> None:
        import torch

        self.url, self.name, self.job, self.on_batch = url, name, job, on_batch
        self.gen = torch.Generator(device=torch.device(job.device).type).manual_seed(seed)
        self.samples = self.skipped = self.unchanged = self.linf_max = 0
        self.psnrs: list[float] = []
        self.coss: list[float] = []
        self.kept: list[float] = []
        self.marked_keys: list[str] = []
        self.pixel_digests: list[str] = []  # keyed digests of marked pixels (the probe guard)
        self.skip_reasons: dict[str, str] = {}

    # ---------------------------------------------------------------- reading
    def _read(self, sample: Sample) -> _Item:
        job = self.job
        label = parse_label(
            sample, shard=self.url, field=job.label_field, num_classes=job.num_classes
        )
        item = _Item(sample, label)
        try:
            ext = sample.image_ext()
            if ext is None:
                raise ShardError(self.url, "sample has no image member", sample=sample.key)
            pixels, info = read_image(
                sample.get(ext) or b"",
                shard=self.url,
                key=sample.key,
                max_pixels=job.max_batch_pixels,
            )
        except ShardError as exc:
            if job.on_error != "skip":
                if isinstance(exc, ImageTooLarge):
                    raise ShardError(
                        self.url, f"{exc.reason}; raise --max-batch-pixels", sample.key
                    ) from None
                raise
            self.skipped += 1
            if len(self.skip_reasons) < MAX_SKIP_REASONS:
                self.skip_reasons[sample.key] = exc.reason
            return item
        item.ext, item.info = ext, info
        if min(pixels.shape[:2]) < MIN_MARK_SIDE:  # too small to mark: copied as it is, counted
            self.skipped += 1
            if len(self.skip_reasons) < MAX_SKIP_REASONS:
                self.skip_reasons[sample.key] = f"smaller than {MIN_MARK_SIDE} px on a side"
            return item
        item.selected = is_selected(job.selection_seed, sample.key, job.fraction)
        if item.selected or job.reencode_all:
            item.pixels = pixels
        return item

    def windows(self) -> Iterator[list[_Item]]:
        """The shard's samples in order, in windows bounded by the batch (see the module doc)."""
        job = self.job
        window: list[_Item] = []
        count = pixels = raw = 0
        for sample in iter_samples(self.url):
            self.samples += 1
            item = self._read(sample)
            px = item.pixels.shape[0] * item.pixels.shape[1] if item.pixels is not None else 0
            if item.selected and window and pixels + px > job.max_batch_pixels:
                yield window
                window, count, pixels, raw = [], 0, 0, 0
            window.append(item)
            raw += sum(len(d) for _, d in sample.members)
            if item.pixels is not None:
                raw += item.pixels.nbytes
            if item.selected:
                count, pixels = count + 1, pixels + px
            if count >= job.batch_size or raw >= MAX_WINDOW_BYTES:
                yield window
                window, count, pixels, raw = [], 0, 0, 0
        if window:
            yield window

    # ---------------------------------------------------------------- marking
    def _mark_window(self, window: list[_Item]) -> None:
        groups: dict[tuple[int, ...], list[_Item]] = {}
        for item in window:
            if item.selected and item.pixels is not None:
                groups.setdefault(item.pixels.shape, []).append(item)
        for items in groups.values():
            for b in range(0, len(items), self.job.batch_size):
                self._mark_batch(items[b : b + self.job.batch_size])
        if self.job.reencode_all:
            for item in window:
                if item.out is None and item.pixels is not None and item.info is not None:
                    item.out = self._encode(item, item.pixels)
        for item in window:
            item.pixels = None  # the window is written next; keep nothing decoded

    def _mark_batch(self, chunk: list[_Item]) -> None:
        import torch

        job = self.job
        arrays = [c.pixels for c in chunk if c.pixels is not None]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([c.label for c in chunk], dtype=torch.int64)
        # ids unique within a record (shard/__key__): methods with per-image secrets need it
        ids = [f"{self.name}/{c.sample.key}" for c in chunk]
        res = job.method_run.mark(x.to(job.device), y.to(job.device), ids, generator=self.gen)
        out = self._check_budget(res, x, chunk)
        changed = (out.to(torch.int16) - x.to(torch.int16)).abs().flatten(1).amax(dim=1)
        psnr = _psnr(x, out)
        cos = res.feature_cos.detach().cpu()
        out_np = out.permute(0, 2, 3, 1).numpy()
        batch_psnr: list[float] = []
        for j, item in enumerate(chunk):
            if int(changed[j]) == 0:
                self.unchanged += 1  # the method could not mark it: copied, not counted as marked
                continue
            item.marked = True
            item.out = self._encode(item, out_np[j])
            batch_psnr.append(float(psnr[j]))
            self.coss.append(float(cos[j]))
            self.linf_max = max(self.linf_max, int(changed[j]))
        self.psnrs.extend(batch_psnr)
        fault_point("batch")
        if self.on_batch is not None:
            self.on_batch(batch_psnr)

    def _check_budget(
        self, res: MarkBatchResult, x: torch.Tensor, chunk: list[_Item]
    ) -> torch.Tensor:
        """The batch's images if every one keeps the run's budget; a ModelError otherwise."""
        import torch

        budget = self.job.method_run.budget
        out = res.images.detach().cpu()
        if out.dtype != torch.uint8 or out.shape != x.shape:
            raise ModelError(
                f"shard {self.url}: the marking method returned {out.dtype} "
                f"{tuple(out.shape)} images for a {tuple(x.shape)} uint8 batch"
            )
        finite = res.finite.detach().cpu() if res.finite is not None else None
        linf = (out.to(torch.int16) - x.to(torch.int16)).abs().flatten(1).amax(dim=1)
        psnr = _psnr(x, out)
        for j, item in enumerate(chunk):
            problem = None
            if finite is not None and not bool(finite[j]):
                problem = "its pixels were not finite (inf or NaN) before rounding"
            elif int(linf[j]) > budget.linf_levels:
                problem = f"L-inf {int(linf[j])} levels > the budget's {budget.linf_levels}"
            elif budget.psnr_floor is not None and float(psnr[j]) < budget.psnr_floor - 1e-9:
                problem = f"PSNR {float(psnr[j]):.2f} dB < the budget's {budget.psnr_floor} dB"
            if problem is not None:
                raise ModelError(
                    f"shard {self.url}, sample {item.sample.key!r}: the marked image is outside "
                    f"the marking budget ({problem}); the marker is broken (its features "
                    "overflow?), so nothing of this shard was written and no record was signed"
                )
        return out

    def _encode(self, item: _Item, pixels: np.ndarray) -> bytes:
        assert item.info is not None
        try:
            data = encode_like(pixels, item.info)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardError(
                self.url,
                f"cannot re-encode the image as {item.info.format} ({exc})",
                item.sample.key,
            ) from None
        stored = pixels
        if item.marked and item.info.lossy and item.pixels is not None:
            stored, _ = read_image(data, shard=self.url, key=item.sample.key, max_pixels=1 << 62)
            orig = item.pixels.astype(np.float64)
            want = pixels.astype(np.float64) - orig
            got = stored.astype(np.float64) - orig
            self.kept.append(float((want * got).sum() / max((want * want).sum(), 1e-12)))
        if item.marked:  # what a reader decodes from the published bytes, [C, H, W]
            digest = pixel_digest(self.job.selection_seed, stored.transpose(2, 0, 1))
            self.pixel_digests.append(digest.hex())
        return data

    # ---------------------------------------------------------------- output
    def output(self) -> Iterator[Sample]:
        """Output samples in input order; errors travel as :class:`_Upstream`."""
        try:
            written = 0
            for window in self.windows():
                self._mark_window(window)
                for item in window:
                    if written == 1:
                        fault_point("write")
                    written += 1
                    s = item.sample
                    if item.marked:
                        self.marked_keys.append(s.key)
                    if item.out is not None:
                        s = Sample(
                            s.key, [(e, item.out if e == item.ext else d) for e, d in s.members]
                        )
                    yield s
        except Exception as exc:
            raise _Upstream(exc) from None


def _psnr(orig: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    from radmark.marking.budget import psnr

    return psnr(orig, marked)


def mark_shard(
    url: str,
    name: str,
    out_dir: Path,
    job: ShardJob,
    seed: int,
    on_batch: Callable[[list[float]], None] | None = None,
) -> tuple[ShardReport, ShardSecrets]:
    """Mark one shard into ``out_dir/name`` (atomically); its report and what stays private."""
    sm = _ShardMarker(url, name, job, seed, on_batch)
    path = out_dir / name
    stream = sm.output()
    try:
        # The first window is marked (and budget-checked) before write_shard creates its temp file.
        first = list(islice(stream, 1))
        written = write_shard(path, chain(first, stream))
    except _Upstream as up:
        raise up.error from None
    except OSError as exc:
        # ENOSPC, EROFS, EACCES...: write_shard has removed its temp file; the input is untouched.
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ShardError(url, f"cannot be written back as a WebDataset shard ({exc})") from None
    try:
        in_sha = "" if url.startswith("pipe:") else sha256_file(Path(url))
    except OSError as exc:
        raise ShardError(url, f"cannot read ({exc.strerror or exc})") from None
    finite = [p for p in sm.psnrs if np.isfinite(p)]
    cos_finite = [c for c in sm.coss if np.isfinite(c)]
    return ShardReport(
        name=name,
        input_sha256=in_sha,
        output_sha256=written.sha256,
        samples=sm.samples,
        marked=len(sm.marked_keys),
        skipped=sm.skipped,
        psnr_mean=float(np.mean(finite)) if finite else None,
        psnr_min=float(np.min(finite)) if finite else None,
        linf_max=sm.linf_max,
        feature_cos_mean=float(np.mean(cos_finite)) if cos_finite else None,
        marked_keys_sha256=selection_digest(
            job.digest_key, written.sha256, printable(name), [printable(k) for k in sm.marked_keys]
        ),
        unchanged=sm.unchanged,
        reencoded=len(sm.kept),
        lossy_mark_kept=float(np.mean(sm.kept)) if sm.kept else None,
        skip_reasons=dict(sm.skip_reasons),
    ), ShardSecrets(sm.marked_keys, sm.pixel_digests, job.method_run.private_data())


def first_images(
    url: str, *, limit: int = 8, scan: int = 64, max_pixels: int = MAX_BATCH_PIXELS
) -> np.ndarray:
    """Up to ``limit`` decodable images of one size among the first ``scan`` samples of a shard,
    uint8 [B, H, W, C].

    For checking a marker on real images before a run starts (``models/identity.py``); samples that
    do not decode are passed over here (the run itself reports them), and so are images under
    ``MIN_MARK_SIDE`` px on a side, which the run copies unmarked and never gives the marker: one
    tiny image first must not decide the size checked (issue #12). Empty when none qualifies.
    """
    found: list[np.ndarray] = []
    try:
        for sample in islice(iter_samples(url), scan):
            try:
                ext = sample.image_ext()
                if ext is None:
                    continue
                img, _ = read_image(sample.get(ext) or b"", shard=url, key=sample.key,
                                    max_pixels=max_pixels)  # fmt: skip
            except ShardError:
                continue
            if min(img.shape[:2]) < MIN_MARK_SIDE:
                continue
            if found and img.shape != found[0].shape:
                continue
            found.append(img)
            if len(found) >= limit:
                break
    except ShardError:
        pass  # a malformed shard is reported, with its sample, when the run reads it
    return np.stack(found) if found else np.zeros((0, 1, 1, 1), dtype=np.uint8)
