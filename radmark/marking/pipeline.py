"""Marking one shard: decode, select, mark in batches, re-encode, write atomically.

Every sample is checked (label, one decodable image) whether or not it is selected, so that
whether a malformed shard is refused does not depend on the secret selection. With
``on_error="skip"`` a sample whose image is missing or does not decode is copied unmarked and
counted; a bad label is always an error (it usually means a wrong --num-classes or --label-field,
which skipping would hide). Keys, labels, other members and unmarked images are copied
byte-identical; the output is written to a temp name and renamed (``data/shards.write_shard``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radmark.canonical import sha256_hex
from radmark.data.images import decode_image, encode_png, parse_label
from radmark.data.samples import Sample, name_bytes
from radmark.data.sources import iter_samples
from radmark.data.writer import sha256_file, write_shard
from radmark.errors import InputError, ShardError
from radmark.marking.manifest import ShardReport
from radmark.marking.selection import is_selected
from radmark.marking.views import MIN_MARK_SIDE

if TYPE_CHECKING:
    from radmark.marking.methods import MethodRun

#: Test-only fault injection: tests/kill_hook.py sets this to SIGKILL the process at an exact point
#: ("batch": a batch was marked, nothing of the shard written; "write": half-way through writing a
#: shard's temp file; "shard": the shard was renamed into place, the manifest not yet updated).
#: Nothing in the installed package sets it, and no environment variable reaches it.
FAULT_HOOK: Callable[[str], None] | None = None


def fault_point(event: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(event)


@dataclass(frozen=True)
class ShardJob:
    """Everything that is the same for every shard of a run."""

    method_run: MethodRun
    selection_seed: bytes
    fraction: float
    num_classes: int
    label_field: str
    batch_size: int
    device: str
    on_error: str


def mark_shard(
    url: str,
    name: str,
    out_dir: Path,
    job: ShardJob,
    seed: int,
    on_batch: Callable[[list[float]], None] | None = None,
) -> tuple[ShardReport, list[str]]:
    """Mark one shard into ``out_dir/name`` (atomically); its report and the marked keys."""
    import torch

    samples: list[Sample] = []
    todo: dict[tuple[int, ...], list[tuple[int, np.ndarray, int]]] = {}
    skipped = 0
    for sample in iter_samples(url):
        label = parse_label(sample, shard=url, field=job.label_field, num_classes=job.num_classes)
        idx = len(samples)
        samples.append(sample)
        try:
            ext = sample.image_ext()
            if ext is None:
                raise ShardError(url, "sample has no image member", sample=sample.key)
            img = decode_image(sample.get(ext) or b"", shard=url, key=sample.key)
        except ShardError:
            if job.on_error == "skip":
                skipped += 1
                continue
            raise
        if min(img.shape[:2]) < MIN_MARK_SIDE:  # too small to mark: copied as it is, counted
            skipped += 1
            continue
        if is_selected(job.selection_seed, sample.key, job.fraction):
            todo.setdefault(img.shape, []).append((idx, img, label))
    gen = torch.Generator(device=torch.device(job.device).type).manual_seed(seed)
    replaced: dict[int, bytes] = {}
    psnrs: list[float] = []
    coss: list[float] = []
    linf_max = 0
    for shape in sorted(todo):
        items = todo[shape]
        for b in range(0, len(items), job.batch_size):
            chunk = items[b : b + job.batch_size]
            x = torch.from_numpy(np.stack([c[1] for c in chunk])).permute(0, 3, 1, 2).contiguous()
            y = torch.tensor([c[2] for c in chunk], dtype=torch.int64)
            res = job.method_run.mark(
                x.to(job.device),
                y.to(job.device),
                [samples[c[0]].key for c in chunk],
                generator=gen,
            )
            out = res.images.permute(0, 2, 3, 1).cpu().numpy()
            for j, (idx, _, _) in enumerate(chunk):
                replaced[idx] = encode_png(out[j])
            batch_psnr = [float(p) for p in res.psnr.cpu()]
            psnrs.extend(batch_psnr)
            coss.extend(float(c) for c in res.feature_cos.cpu())
            linf_max = max(linf_max, int(res.linf.max()))
            fault_point("batch")
            if on_batch is not None:
                on_batch(batch_psnr)
    marked_keys = [samples[idx].key for idx in sorted(replaced)]

    def output() -> Iterator[Sample]:
        for idx, s in enumerate(samples):
            if idx in replaced:
                ext = s.image_ext()
                s = Sample(s.key, [(e, replaced[idx] if e == ext else d) for e, d in s.members])
            if idx == len(samples) // 2:
                fault_point("write")
            yield s

    try:
        in_sha = "" if url.startswith("pipe:") else sha256_file(Path(url))
    except OSError as exc:
        raise ShardError(url, f"cannot read ({exc.strerror or exc})") from None
    path = out_dir / name
    try:
        written = write_shard(path, output())
    except OSError as exc:
        # ENOSPC, EROFS, EACCES...: write_shard has removed its temp file; the input is untouched.
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ShardError(url, f"cannot be written back as a WebDataset shard ({exc})") from None
    finite = [p for p in psnrs if np.isfinite(p)]
    cos_finite = [c for c in coss if np.isfinite(c)]
    return ShardReport(
        name=name,
        input_sha256=in_sha,
        output_sha256=written.sha256,
        samples=len(samples),
        marked=len(replaced),
        skipped=skipped,
        psnr_mean=float(np.mean(finite)) if finite else None,
        psnr_min=float(np.min(finite)) if finite else None,
        linf_max=linf_max,
        feature_cos_mean=float(np.mean(cos_finite)) if cos_finite else None,
        marked_keys_sha256=sha256_hex(name_bytes("\n".join(marked_keys))),
    ), marked_keys
