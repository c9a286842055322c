"""``radmark mark``: stream WebDataset shards through a marking method, shard by shard.

Guarantees (issues #3, #7 and #12, docs/security.md):
- inputs are only ever opened for reading; input shard i becomes output shard i with the same name
  (an --out where that would replace an input is refused);
- each output shard is written to a temporary name and renamed when complete; every OSError while
  writing (ENOSPC, EROFS, ...) is an InputError: exit 2, one line, no partial shard; temp files
  left by a killed run are removed by the next run (under the lock; ``marking/manifest.py``);
- marking is a deterministic function of (key, marker, method, parameters, shard bytes): the
  augmentation generator of each shard is seeded from the key fingerprint and the shard's name,
  so a run killed at any point and resumed produces byte-identical output
  (tests/e2e/test_mark_kill_resume.py);
- a marker whose features are not finite on the first shard's images is refused before anything
  is written, and every marked batch is checked against the method's budget
  (``marking/pipeline.py``): a broken marker never wipes a dataset;
- which samples are marked is a keyed secret draw (``marking/selection.py``); the run state that
  lists them lives in the keystore, never in --out (``marking/manifest.py``), and the record
  holds only keyed digests of them;
- under ``torchrun`` (WORLD_SIZE > 1) rank r marks the shards with index ≡ r (mod world size)
  (``marking/distributed.py``);
- the run ends with a signed, content-addressed mark record in the keystore (``keys/records.py``)
  and, when asked, the verification kit of that record (``marking/kit.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radmark.canonical import address
from radmark.data.samples import printable
from radmark.data.sources import expand_shards, shard_name
from radmark.errors import InputError
from radmark.keys.records import MarkerRef, ShardRef, mark_record_body
from radmark.keys.store import Keystore
from radmark.marking import manifest as mf
from radmark.marking.distributed import ProcessGroup
from radmark.marking.manifest import ShardReport
from radmark.marking.methods import DEFAULT_METHOD
from radmark.marking.options import MarkOptions, check_options
from radmark.marking.pipeline import (
    ShardJob,
    fault_point,
    first_images,
    mark_shard,
    shard_seed,
)
from radmark.marking.selection import SELECTION_RULE

if TYPE_CHECKING:
    from radmark.keys.keypair import PublicKeyRecord, SecretKey
    from radmark.marking.kit import KitBuildResult


@dataclass(frozen=True)
class MarkResult:
    fingerprint: str
    record: str  # sha256:<hex> address of the mark record
    out_dir: Path
    shards: list[ShardReport]
    images: int
    marked: int
    skipped: int
    unchanged: int
    psnr_mean: float | None
    psnr_min: float | None
    linf_max: int
    images_per_s: float
    seconds: float
    marker: str
    preset: str
    method: str = DEFAULT_METHOD
    kit: KitBuildResult | None = None

    @property
    def feature_cos_mean(self) -> float | None:
        """Mean cosine of the marker's feature shift with the carrier over all marked images."""
        pairs = [
            (r.marked, r.feature_cos_mean) for r in self.shards if r.feature_cos_mean is not None
        ]
        n = sum(m for m, _ in pairs)
        return sum(m * c for m, c in pairs) / n if n else None


@dataclass(frozen=True)
class Progress:
    """Events for a progress display: one per batch and one per shard."""

    shard: str
    shards_done: int
    shards_total: int
    images_done: int
    marked_done: int
    psnr_mean: float | None


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
    """Mark a fraction of the images of ``specs`` into ``out_dir``; write the mark record.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r marks the shards whose index is r modulo the
    world size; ranks other than 0 record their shards in ``rank{r}.json`` beside the private run
    state, and rank 0 merges everything into the state and writes the one mark record (covering all
    shards, in input order). Rank 0 returns the full result, other ranks the result for their own
    shards (with the same ``record``). Augmentation seeds derive from (key, shard name), so a
    shard's bytes do not depend on which rank, or how many ranks, marked it.
    """
    check_options(options)
    group = ProcessGroup(options.device)
    done = False
    try:
        result = _mark_shards(
            specs,
            key=key,
            key_record=key_record,
            keystore=keystore,
            out_dir=Path(out_dir),
            marker_spec=marker_spec,
            marker_arch=marker_arch,
            options=replace(options, device=group.device),
            progress=progress,
            group=group,
        )
        done = True
        return result
    finally:
        group.close(synchronise=done)


def _mark_shards(
    specs: Sequence[str],
    *,
    key: SecretKey,
    key_record: PublicKeyRecord,
    keystore: Path,
    out_dir: Path,
    marker_spec: str,
    marker_arch: str | None,
    options: MarkOptions,
    progress: Callable[[Progress], None] | None,
    group: ProcessGroup,
) -> MarkResult:
    from radmark.marking.methods import get_method
    from radmark.models import load_model
    from radmark.models.identity import check_features_finite

    t0 = time.perf_counter()
    rank, world = group.rank, group.world
    err: Exception | None = None
    try:
        urls = expand_shards(specs)
        names = [shard_name(u) for u in urls]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[0]
            raise InputError(f"two input shards would both be written as {dup}: rename one")
        mf.check_not_inputs(out_dir, urls, names)
        store = Keystore.open(keystore)
        if rank == 0 and key_record.fingerprint not in store.objects:
            try:  # a key file's public record joins the keystore
                store.put(key_record.signed)
            except OSError as exc:
                raise InputError(f"cannot write into the keystore {keystore}: {exc}") from None
        method = get_method(options.method)
        params = method.params(options.preset, options.overrides)
        marker = load_model(marker_spec, arch=marker_arch, device=options.device)
        own_urls = [u for i, u in enumerate(urls) if i % world == rank]
        if own_urls and not own_urls[0].startswith("pipe:"):  # a pipe is read once, by the run
            check_features_finite(
                marker, first_images(own_urls[0], max_pixels=options.max_batch_pixels), own_urls[0]
            )
        num_classes = options.num_classes or marker.num_classes
        run = method.start(key, marker, num_classes, params, device=options.device)
    except Exception as exc:
        err = exc
    group.agree(err)
    fp = key_record.fingerprint
    params_doc = method.params_to_record(params)
    cfg = mf.config(fp, marker.identity, method.name, params_doc, options, num_classes, names)
    state = mf.RunDir.of(keystore, fp, out_dir)
    job = ShardJob(
        method_run=run,
        selection_seed=key.selection_seed(),
        digest_key=key.selection_digest_key(),
        reencode_all=options.reencode_all,
        max_batch_pixels=options.max_batch_pixels,
        fraction=options.fraction,
        num_classes=num_classes,
        label_field=options.label_field,
        batch_size=options.batch_size,
        device=options.device,
        on_error=options.on_error,
    )

    with contextlib.ExitStack() as stack:
        # Phase 1: every rank locks the directory (its own lock file) and reads what is done.
        err = None
        try:
            mf.make_dir(out_dir)
            stack.enter_context(mf.lock(out_dir, mf.LOCK if rank == 0 else mf.rank_lock(rank)))
            state.make()
            done = mf.load_state(state, out_dir, cfg, options.resume, options.force)
            earlier_record = mf.recorded_record(state) if done else None
        except Exception as exc:
            err = exc
        group.agree(err)
        # Phase 2: rank 0 clears what killed runs left and pins the settings in the run state.
        err = None
        if rank == 0:
            try:
                mf.remove_stale_temps(out_dir, names, state)
                mf.write_state(state, cfg, done)
                mf.remove_partials(state)
            except Exception as exc:
                err = exc
        group.agree(err)
        # Phase 3: each rank marks its share.
        err = None
        mine: dict[str, dict[str, Any]] = {}
        reports: list[ShardReport] = []
        counters = {"images": 0, "marked": 0, "psnr_sum": 0.0, "psnr_n": 0}
        own = [i for i in range(len(urls)) if i % world == rank]

        def report_progress(name: str, shards_done: int) -> None:
            if progress is not None:
                n = counters["psnr_n"]
                progress(
                    Progress(
                        name,
                        shards_done,
                        len(own),
                        int(counters["images"]),
                        int(counters["marked"]),
                        counters["psnr_sum"] / n if n else None,
                    )
                )

        try:
            for k, i in enumerate(own):
                url, name = urls[i], names[i]
                prev = done.get(name)
                if prev is not None and mf.still_valid(out_dir / name, url, prev):
                    rep = mf.report_from_entry(prev, resumed=True)
                    if rep.psnr_mean is not None:
                        counters["psnr_sum"] += rep.psnr_mean * rep.marked
                        counters["psnr_n"] += rep.marked
                    counters["marked"] += rep.marked
                else:

                    def on_batch(psnrs: list[float], name: str = name, k: int = k) -> None:
                        finite = [p for p in psnrs if np.isfinite(p)]
                        counters["marked"] += len(psnrs)
                        counters["psnr_sum"] += float(sum(finite))
                        counters["psnr_n"] += len(finite)
                        report_progress(name, k)

                    rep, secrets = mark_shard(
                        url, name, out_dir, job, shard_seed(fp, name), on_batch
                    )
                    private = [store.put_kit(blob) for blob in secrets.method_private]
                    fault_point("shard")
                    entry = {f: v for f, v in asdict(rep).items() if f != "resumed"}
                    mine[name] = {**entry, "marked_keys": secrets.marked_keys,
                                  "pixel_digests": secrets.pixel_digests,
                                  "private": private}  # fmt: skip
                    if rank == 0:
                        mf.write_state(state, cfg, {**done, **mine})
                    else:
                        mf.write_partial(state, rank, cfg, mine)
                counters["images"] += rep.samples
                reports.append(rep)
                report_progress(name, k + 1)
        except Exception as exc:
            err = exc
            if rank == 0 and world == 1 and not done and not mine:
                mf.discard_empty(state)  # a run that finished nothing leaves nothing behind
        group.agree(err)
        # Phase 4: rank 0 merges every rank's shards, writes the record and the final state.
        err = None
        record_addr: str | None = None
        all_reports = reports
        if rank == 0:
            try:
                merged = {**done, **mine}
                fresh = set(mine)
                for entries in mf.read_partials(state, cfg).values():
                    merged.update(entries)
                    fresh.update(entries)
                missing = [n for n in names if n not in merged]
                if missing:
                    raise InputError(
                        f"{out_dir}: no run state entry for {missing[0]} after marking"
                    )
                mine_reports = {r.name: r for r in reports}
                all_reports = [
                    mine_reports.get(n) or mf.report_from_entry(merged[n], resumed=n not in fresh)
                    for n in names
                ]
                # A finished run resumed is a no-op: the record it signed stands (issue #12).
                record_addr = (
                    None if fresh else mf.finished_record(earlier_record, store, fp, all_reports)
                )
                fields = run.record_fields([a for n in names for a in merged[n].get("private", [])])
                body = mark_record_body(
                    key_fingerprint=fp,
                    method=method.name,
                    marker=MarkerRef(
                        id=marker.identity,
                        name=marker.name,
                        arch=marker.arch,
                        sha256=marker.sha256,
                        dim=marker.dim,
                        source=_marker_source(marker_spec),
                    ),
                    num_classes=num_classes,
                    params=params_doc,
                    fraction=options.fraction,
                    selection_rule=SELECTION_RULE,
                    label_field=options.label_field,
                    counts={
                        "images": sum(r.samples for r in all_reports),
                        "marked": sum(r.marked for r in all_reports),
                        "skipped": sum(r.skipped for r in all_reports),
                        "unchanged": sum(r.unchanged for r in all_reports),
                    },
                    shards=[
                        ShardRef(
                            printable(r.name),
                            r.input_sha256,
                            r.output_sha256,
                            r.samples,
                            r.marked,
                            r.marked_keys_sha256,
                        )
                        for r in all_reports
                    ],
                    carriers=fields.get("carriers"),
                    method_data=fields.get("method_data"),
                    plan=options.plan,
                )
                try:
                    if record_addr is None:
                        record_addr = address(store.put(key.sign(body)))
                except OSError as exc:
                    raise InputError(
                        f"cannot write the mark record into the keystore {keystore}: "
                        f"{exc.strerror or exc}"
                    ) from None
                mf.write_state(state, cfg, merged, record=record_addr)
                mf.remove_partials(state)
            except Exception as exc:
                err = exc
        group.agree(err)
        record_addr = group.broadcast(record_addr)
    assert record_addr is not None
    kit = None
    if rank == 0 and options.kit is not None:
        from radmark.marking.kit import build_kit

        kit = build_kit(
            store=store,
            record=store.mark_record(record_addr),
            key=key,
            probe=options.kit.probe,
            marker=marker,
            decoys=options.kit.decoys,
            per_class=options.kit.per_class,
            device=options.device,
        )
    seconds = time.perf_counter() - t0
    fresh_reports = [r for r in all_reports if not r.resumed]
    psnr_pairs = [(r.psnr_mean, r.marked) for r in all_reports if r.psnr_mean is not None]
    psnr_n = sum(m for _, m in psnr_pairs)
    psnrs = [r.psnr_min for r in all_reports if r.psnr_min is not None]
    return MarkResult(
        fingerprint=address(fp),
        record=record_addr,
        out_dir=out_dir,
        shards=all_reports,
        images=sum(r.samples for r in all_reports),
        marked=sum(r.marked for r in all_reports),
        skipped=sum(r.skipped for r in all_reports),
        unchanged=sum(r.unchanged for r in all_reports),
        psnr_mean=(sum(p * m for p, m in psnr_pairs) / psnr_n) if psnr_n else None,
        psnr_min=min(psnrs) if psnrs else None,
        linf_max=max((r.linf_max for r in all_reports), default=0),
        images_per_s=sum(r.samples for r in fresh_reports) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        marker=marker.identity,
        preset=getattr(params, "name", options.preset),
        method=method.name,
        kit=kit,
    )


def _marker_source(spec: str) -> str:
    """A marker file as an absolute path; ``torchvision:``/``timm:`` specs as given."""
    if ":" in spec.split("/", 1)[0] and not Path(spec).exists():
        return spec
    return str(Path(spec).resolve())
