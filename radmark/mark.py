"""``radmark mark``: stream WebDataset shards through the marking step, shard by shard.

Guarantees (issue #3, docs/security.md):
- inputs are only ever opened for reading; input shard i becomes output shard i with the same name;
- each output shard is written to a temporary name and renamed when complete (shards.write_shard);
- the manifest (``radmark-manifest.json`` in the output directory) is rewritten atomically after
  every shard; ``resume=True`` skips shards whose output exists with the hash recorded there;
- marking is a deterministic function of (key, marker, parameters, shard bytes): the augmentation
  generator of each shard is seeded from the key fingerprint and the shard's name, so a run killed
  at any point and resumed produces byte-identical output;
- which samples are marked is HMAC-SHA256(selection seed, __key__) < q·2⁶⁴: deterministic, secret,
  independent of the class (so uniform across classes in expectation);
- the run ends with a signed, content-addressed mark record in the keystore.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .canonical import address, sha256_hex
from .carriers import CARRIER_FORMAT, carriers_digest, derive_carriers
from .errors import InputError, ShardError, UsageError
from .fsutil import atomic_write_bytes
from .keys import PublicKeyRecord, SecretKey
from .keystore import MARK_RECORD_TYPE, Keystore
from .marker import marker_identity
from .shards import (
    Sample,
    decode_image,
    encode_png,
    expand_shards,
    iter_samples,
    parse_label,
    sha256_file,
    shard_name,
    write_shard,
)

MANIFEST = "radmark-manifest.json"
LOCK = ".radmark.lock"


@dataclass(frozen=True)
class MarkOptions:
    fraction: float = 0.1
    preset: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # default: the marker's number of classes
    label_field: str = "cls"
    batch_size: int = 64
    device: str = "cpu"
    resume: bool = False
    on_error: str = "fail"  # "fail" | "skip" (copy the sample unmarked, count it)


@dataclass(frozen=True)
class ShardReport:
    name: str
    input_sha256: str
    output_sha256: str
    samples: int
    marked: int
    skipped: int
    psnr_mean: float | None
    psnr_min: float | None
    linf_max: int
    feature_cos_mean: float | None
    marked_keys_sha256: str
    resumed: bool = False


_REPORT_FIELDS = set(ShardReport.__dataclass_fields__)


@dataclass(frozen=True)
class MarkResult:
    fingerprint: str
    record: str  # sha256:<hex> address of the mark record
    out_dir: Path
    shards: list[ShardReport]
    images: int
    marked: int
    skipped: int
    psnr_mean: float | None
    psnr_min: float | None
    linf_max: int
    images_per_s: float
    seconds: float
    marker: str
    preset: str


@dataclass(frozen=True)
class Progress:
    """Events for a progress display: one per batch and one per shard."""

    shard: str
    shards_done: int
    shards_total: int
    images_done: int
    marked_done: int
    psnr_mean: float | None


def is_selected(selection_seed: bytes, key: str, fraction: float) -> bool:
    """Whether sample ``key`` is marked: HMAC-SHA256(seed, key) read as a fraction < q."""
    if fraction >= 1.0:
        return True
    digest = hmac.new(selection_seed, key.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < int(fraction * 2**64)


@contextlib.contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{out_dir} is being written by another radmark mark run; wait for it or use "
                "another --out"
            ) from None
        yield
    finally:
        os.close(fd)


def _config(
    fp: str,
    marker_id: str,
    params: dict[str, Any],
    options: MarkOptions,
    num_classes: int,
    names: list[str],
) -> dict[str, Any]:
    """What must match for a resume to continue an earlier run."""
    return {
        "key": fp,
        "marker": marker_id,
        "params": params,
        "fraction": options.fraction,
        "num_classes": num_classes,
        "label_field": options.label_field,
        "shards": names,
        "on_error": options.on_error,
    }


def _shard_seed(fp: str, name: str) -> int:
    return (
        int.from_bytes(
            hashlib.sha256(f"radmark/v1/augment|{fp}|{name}".encode()).digest()[:8], "big"
        )
        >> 1
    )


def mark_shards(
    specs: Sequence[str],
    *,
    key: SecretKey,
    key_record: PublicKeyRecord,
    keystore: Path,
    out_dir: Path,
    marker_spec: str,
    marker_arch: str | None = None,
    options: MarkOptions = MarkOptions(),
    progress: Callable[[Progress], None] | None = None,
) -> MarkResult:
    """Mark a fraction of the images of ``specs`` into ``out_dir``; write the mark record."""
    import torch

    from .marking import get_preset, mark_batch
    from .models import load_model

    if not 0.0 < options.fraction <= 1.0:
        raise UsageError(f"--fraction must be in (0, 1], got {options.fraction}")
    if options.on_error not in ("fail", "skip"):
        raise UsageError("--on-error must be 'fail' or 'skip'")
    t0 = time.perf_counter()
    urls = expand_shards(specs)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise InputError(f"two input shards would both be written as {dup}: rename one")
    store = Keystore.open(keystore)
    if key_record.fingerprint not in store.objects:
        store.put(key_record.signed)  # a key file's public record joins the keystore
    params = get_preset(options.preset, **options.overrides)
    marker = load_model(marker_spec, arch=marker_arch, device=options.device)
    marker_id = marker_identity(marker.name, marker.sha256)
    num_classes = options.num_classes or marker.num_classes
    carriers_np = derive_carriers(key.carrier_seed(), marker.dim, num_classes, marker_id)
    carriers = torch.from_numpy(carriers_np).to(options.device)
    selection_seed = key.selection_seed()
    fp = key_record.fingerprint
    cfg = _config(fp, marker_id, params.to_dict(), options, num_classes, names)

    def features(x: torch.Tensor) -> torch.Tensor:
        return marker.features(x[:, :1] if marker.in_chans == 1 else x)

    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock(out_dir):
        done = _load_manifest(out_dir, cfg, options.resume)
        reports: list[ShardReport] = []
        images_done = marked_done = 0
        psnr_sum, psnr_n = 0.0, 0
        for i, (url, name) in enumerate(zip(urls, names, strict=False)):
            prev = done.get(name)
            if prev is not None and _still_valid(out_dir / name, url, prev):
                kept = {k: v for k, v in prev.items() if k in _REPORT_FIELDS}
                rep = ShardReport(**{**kept, "resumed": True})
            else:
                rep, marked_keys = _mark_one(
                    url,
                    name,
                    out_dir,
                    params,
                    carriers,
                    features,
                    selection_seed,
                    _shard_seed(fp, name),
                    options,
                    num_classes,
                    mark_batch,
                )
                entry = {k: v for k, v in asdict(rep).items() if k != "resumed"}
                done[name] = {**entry, "marked_keys": marked_keys}
                _write_manifest(out_dir, cfg, done)
            reports.append(rep)
            images_done += rep.samples
            marked_done += rep.marked
            if rep.psnr_mean is not None:
                psnr_sum += rep.psnr_mean * rep.marked
                psnr_n += rep.marked
            if progress is not None:
                progress(
                    Progress(
                        name,
                        i + 1,
                        len(urls),
                        images_done,
                        marked_done,
                        psnr_sum / psnr_n if psnr_n else None,
                    )
                )
        record = _mark_record(
            key,
            key_record,
            marker,
            marker_id,
            num_classes,
            carriers_np,
            params.to_dict(),
            options,
            reports,
        )
        hexd = store.put(record)
        _write_manifest(out_dir, cfg, done, record=address(hexd))
    seconds = time.perf_counter() - t0
    fresh = [r for r in reports if not r.resumed]
    psnrs = [r.psnr_min for r in reports if r.psnr_min is not None]
    return MarkResult(
        fingerprint=address(fp),
        record=address(hexd),
        out_dir=out_dir,
        shards=reports,
        images=sum(r.samples for r in reports),
        marked=sum(r.marked for r in reports),
        skipped=sum(r.skipped for r in reports),
        psnr_mean=(psnr_sum / psnr_n) if psnr_n else None,
        psnr_min=min(psnrs) if psnrs else None,
        linf_max=max((r.linf_max for r in reports), default=0),
        images_per_s=sum(r.samples for r in fresh) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        marker=marker_id,
        preset=params.name,
    )


def _load_manifest(out_dir: Path, cfg: dict[str, Any], resume: bool) -> dict[str, dict[str, Any]]:
    path = out_dir / MANIFEST
    if not path.exists():
        existing = [p.name for p in out_dir.iterdir() if p.name in cfg["shards"]]
        if existing and not resume:
            raise InputError(f"{out_dir} already holds {existing[0]}; use another --out")
        return {}
    try:
        man = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})") from exc
    if not resume:
        raise InputError(
            f"{out_dir} holds an earlier run's manifest; pass --resume to continue "
            "it, or use another --out"
        )
    if man.get("config") != cfg:
        raise InputError(
            f"{path}: the earlier run used other settings (key, marker, parameters, "
            "fraction or shards); use another --out"
        )
    return dict(man.get("shards", {}))


def _write_manifest(
    out_dir: Path, cfg: dict[str, Any], done: dict[str, dict[str, Any]], record: str | None = None
) -> None:
    man = {
        "type": "radmark.manifest",
        "format_version": 1,
        "config": cfg,
        "shards": {k: done[k] for k in sorted(done)},
        "record": record,
    }
    atomic_write_bytes(
        out_dir / MANIFEST, json.dumps(man, indent=1, sort_keys=True).encode() + b"\n"
    )


def _still_valid(path: Path, url: str, prev: dict[str, Any]) -> bool:
    if not path.is_file() or sha256_file(path) != prev.get("output_sha256"):
        return False
    if url.startswith("pipe:"):
        return True  # cannot re-read a pipe cheaply; the output hash is the check
    return sha256_file(Path(url)) == prev.get("input_sha256")


def _mark_one(
    url: str,
    name: str,
    out_dir: Path,
    params: Any,
    carriers: Any,
    features: Callable[[Any], Any],
    selection_seed: bytes,
    seed: int,
    options: MarkOptions,
    num_classes: int,
    mark_batch: Callable[..., Any],
) -> tuple[ShardReport, list[str]]:
    import torch

    samples: list[Sample] = []
    todo: dict[tuple[int, ...], list[tuple[int, np.ndarray, int]]] = {}
    marked_keys: list[str] = []
    skipped = 0
    for sample in iter_samples(url):
        label = _label(sample, url, options, num_classes)
        idx = len(samples)
        samples.append(sample)
        if not is_selected(selection_seed, sample.key, options.fraction):
            continue
        try:
            ext = sample.image_ext()
            if ext is None:
                raise ShardError(url, "sample has no image member", sample=sample.key)
            img = decode_image(sample.get(ext) or b"", shard=url, key=sample.key)
        except ShardError:
            if options.on_error == "skip":
                skipped += 1
                continue
            raise
        todo.setdefault(img.shape, []).append((idx, img, label))
    gen = torch.Generator(device=torch.device(options.device).type).manual_seed(seed)
    replaced: dict[int, bytes] = {}
    psnrs: list[float] = []
    coss: list[float] = []
    linf_max = 0
    for shape in sorted(todo):
        items = todo[shape]
        for b in range(0, len(items), options.batch_size):
            chunk = items[b : b + options.batch_size]
            x = torch.from_numpy(np.stack([c[1] for c in chunk])).permute(0, 3, 1, 2).contiguous()
            y = torch.tensor([c[2] for c in chunk], dtype=torch.int64)
            res = mark_batch(
                x.to(options.device),
                y.to(options.device),
                carriers,
                features,
                params,
                generator=gen,
                autocast_dtype=torch.bfloat16 if options.device.startswith("cuda") else None,
            )
            out = res.images.permute(0, 2, 3, 1).cpu().numpy()
            for j, (idx, _, _) in enumerate(chunk):
                replaced[idx] = encode_png(out[j])
            psnrs.extend(float(p) for p in res.psnr.cpu())
            coss.extend(float(c) for c in res.feature_cos.cpu())
            linf_max = max(linf_max, int(res.linf.max()))
    for idx in sorted(replaced):
        marked_keys.append(samples[idx].key)

    def output() -> Iterator[Sample]:
        for idx, s in enumerate(samples):
            if idx in replaced:
                ext = s.image_ext()
                s = Sample(s.key, [(e, replaced[idx] if e == ext else d) for e, d in s.members])
            yield s

    written = write_shard(out_dir / name, output())
    in_sha = "" if url.startswith("pipe:") else sha256_file(Path(url))
    finite = [p for p in psnrs if np.isfinite(p)]
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
        feature_cos_mean=float(np.mean(coss)) if coss else None,
        marked_keys_sha256=sha256_hex("\n".join(marked_keys).encode()),
    ), marked_keys


def _label(sample: Sample, url: str, options: MarkOptions, num_classes: int) -> int:
    return parse_label(sample, shard=url, field=options.label_field, num_classes=num_classes)


def _mark_record(
    key: SecretKey,
    key_record: PublicKeyRecord,
    marker: Any,
    marker_id: str,
    num_classes: int,
    carriers: np.ndarray,
    params: dict[str, Any],
    options: MarkOptions,
    reports: list[ShardReport],
) -> dict[str, Any]:
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    body = {
        "type": MARK_RECORD_TYPE,
        "format_version": 1,
        "key": key_record.fingerprint,
        "created": created.replace("+00:00", "Z"),
        "radmark_version": __version__,
        "marker": {
            "id": marker_id,
            "name": marker.name,
            "arch": marker.arch,
            "sha256": marker.sha256,
            "dim": marker.dim,
        },
        "dim": marker.dim,
        "num_classes": num_classes,
        "carriers": {"format": CARRIER_FORMAT, "sha256": carriers_digest(carriers)},
        "params": params,
        "selection": {
            "rule": "hmac-sha256(selection-seed, __key__)[:8] < fraction * 2^64",
            "fraction": options.fraction,
        },
        "label_field": options.label_field,
        "counts": {
            "images": sum(r.samples for r in reports),
            "marked": sum(r.marked for r in reports),
            "skipped": sum(r.skipped for r in reports),
        },
        "shards": [
            {
                "name": r.name,
                "input_sha256": r.input_sha256,
                "output_sha256": r.output_sha256,
                "samples": r.samples,
                "marked": r.marked,
                "marked_keys_sha256": r.marked_keys_sha256,
            }
            for r in reports
        ],
    }
    return key.sign(body)
