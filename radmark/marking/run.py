"""``radmark mark``: stream WebDataset shards through the marking step, shard by shard.

Guarantees (issues #3 and #7, docs/security.md):
- inputs are only ever opened for reading; input shard i becomes output shard i with the same name
  (an --out where that would replace an input is refused);
- each output shard is written to a temporary name and renamed when complete (shards.write_shard);
  every OSError while writing (ENOSPC, EROFS, ...) is an InputError: exit 2, one line, no partial
  shard; temp files left by a killed run are removed by the next run (under the lock);
- ``.radmark.lock`` (fcntl.flock, released even on SIGKILL) keeps two runs out of one directory;
- the manifest (``radmark-manifest.json`` in the output directory) is written atomically before
  the first shard (pinning the settings) and after every shard; ``resume=True`` skips shards
  whose output exists with the hash recorded there, and refuses other settings. An earlier run
  that finished no shard needs no --resume;
- marking is a deterministic function of (key, marker, parameters, shard bytes): the augmentation
  generator of each shard is seeded from the key fingerprint and the shard's name, so a run killed
  at any point and resumed produces byte-identical output (tests/e2e/test_mark_kill_resume.py);
- every sample is validated (label, one decodable image) whether selected or not; with
  ``on_error="skip"`` an image that is missing or does not decode is copied unmarked and counted;
- which samples are marked is HMAC-SHA256(selection seed, __key__) < q·2⁶⁴: deterministic, secret,
  independent of the class (so uniform across classes in expectation);
- under ``torchrun`` (WORLD_SIZE > 1) rank r marks the shards with index ≡ r (mod world size);
  see :func:`mark_shards`;
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
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from radmark import __version__
from radmark.canonical import address, sha256_hex, utc_timestamp
from radmark.data.shards import (
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
from radmark.errors import InputError, ShardError, UsageError
from radmark.fsutil import atomic_write_bytes
from radmark.keys.carriers import CARRIER_FORMAT, carriers_digest, derive_carriers
from radmark.keys.keypair import PublicKeyRecord, SecretKey
from radmark.keys.store import MARK_RECORD_TYPE, Keystore
from radmark.models.markers import marker_identity

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
def _lock(out_dir: Path, name: str = LOCK) -> Iterator[None]:
    """Hold an exclusive flock on ``out_dir/name`` (released when the process dies, even SIGKILL)."""
    path = out_dir / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise InputError(f"cannot write to {out_dir}: {exc.strerror or exc} ({path})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{out_dir} is being written by another radmark mark run (lock {path} is held); "
                "wait for it to finish or use another --out"
            ) from None
        except OSError as exc:
            raise InputError(f"cannot lock {path}: {exc.strerror or exc}") from None
        yield
    finally:
        os.close(fd)


# Test-only hook (tests/e2e/test_mark_kill_resume.py): RADMARK_TEST_KILL_AT="EVENT:N" makes this
# process SIGKILL itself at the N-th EVENT, to place a crash exactly. Events: "batch" (a batch was
# marked, nothing of the shard written yet), "write" (half-way through writing a shard's temp
# file) and "shard" (the shard was renamed into place, the manifest not yet updated).
_KILL_ENV = "RADMARK_TEST_KILL_AT"
_kill_counts: dict[str, int] = {}


def _test_kill_point(event: str) -> None:
    spec = os.environ.get(_KILL_ENV)
    if not spec or spec.partition(":")[0] != event:
        return
    _kill_counts[event] = _kill_counts.get(event, 0) + 1
    if _kill_counts[event] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class _Group:
    """The torchrun process group, or a stand-in for one process (rank 0 of 1).

    ``WORLD_SIZE`` > 1 in the environment (set by ``torchrun``) makes every rank join the default
    process group (gloo on CPU, NCCL on CUDA) unless the caller already initialised one. The
    only collectives are tiny: an error flag after each phase, so that one rank's refusal stops
    every rank with exit 2 instead of leaving the others waiting, and the record's address.
    """

    def __init__(self, device: str) -> None:
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.created = False
        self.device = device
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or "1")
            local_rank = int(os.environ.get("LOCAL_RANK", "0") or "0")
        except ValueError:
            raise UsageError(
                "WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)"
            ) from None
        if world <= 1:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        cuda = device.startswith("cuda")
        if cuda and ":" not in device:
            self.device = f"cuda:{local_rank}"  # one GPU per local rank
        index = torch.device(self.device).index if cuda else None
        if index is not None and index >= torch.cuda.device_count():
            raise UsageError(
                f"rank with LOCAL_RANK={local_rank} wants {self.device} but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; use --nproc-per-node "
                "at most the number of GPUs"
            )
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(torch.device(self.device))
            # Ranks finish their shares at different times and wait for each other; a crashed
            # rank makes torchrun stop the others, so the wait itself need not time out early.
            try:
                dist.init_process_group(
                    backend="nccl" if cuda else "gloo", timeout=_dt.timedelta(hours=24)
                )
            except (ValueError, RuntimeError) as exc:
                raise UsageError(
                    f"WORLD_SIZE={world} but the torch.distributed process group could not "
                    f"start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                    "launch with torchrun, or unset WORLD_SIZE for one process"
                ) from None
            self.created = True
        self.rank, self.world, self.local_rank = dist.get_rank(), dist.get_world_size(), local_rank

    def _comm_device(self) -> Any:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, error: Exception | None) -> None:
        """Raise on every rank if any rank failed in the phase just finished (a collective)."""
        if self.world > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([0 if error is None else 1], device=self._comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if error is None and int(flag.item()):
                raise InputError(
                    "another rank of this torchrun job failed (its error is printed above); "
                    "fix it and rerun with --resume"
                )
        if error is not None:
            raise error

    def broadcast(self, value: str | None) -> str | None:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


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
    """Mark a fraction of the images of ``specs`` into ``out_dir``; write the mark record.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r marks the shards whose index is r modulo the
    world size; ranks other than 0 record their shards in ``.radmark-manifest.rank{r}.json`` and
    rank 0 merges everything into the one manifest and writes the one mark record (covering all
    shards, in input order). Rank 0 returns the full result, other ranks the result for their own
    shards (with the same ``record``). Augmentation seeds derive from (key, shard name), so a
    shard's bytes do not depend on which rank, or how many ranks, marked it.
    """
    if not 0.0 < options.fraction <= 1.0:
        raise UsageError(f"--fraction must be in (0, 1], got {options.fraction}")
    if options.on_error not in ("fail", "skip"):
        raise UsageError("--on-error must be 'fail' or 'skip'")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    group = _Group(options.device)
    try:
        return _mark_shards(
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
    finally:
        group.close()


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
    group: _Group,
) -> MarkResult:
    import torch

    from radmark.marking.radioactive import get_preset, mark_batch
    from radmark.models import load_model

    t0 = time.perf_counter()
    rank, world = group.rank, group.world
    err: Exception | None = None
    try:
        urls = expand_shards(specs)
        names = [shard_name(u) for u in urls]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[0]
            raise InputError(f"two input shards would both be written as {dup}: rename one")
        _check_not_inputs(out_dir, urls, names)
        store = Keystore.open(keystore)
        if rank == 0 and key_record.fingerprint not in store.objects:
            try:  # a key file's public record joins the keystore
                store.put(key_record.signed)
            except OSError as exc:
                raise InputError(f"cannot write into the keystore {keystore}: {exc}") from None
        params = get_preset(options.preset, **options.overrides)
        marker = load_model(marker_spec, arch=marker_arch, device=options.device)
        marker_id = marker_identity(marker.name, marker.sha256)
        num_classes = options.num_classes or marker.num_classes
    except Exception as exc:
        err = exc
    group.agree(err)
    carriers_np = derive_carriers(key.carrier_seed(), marker.dim, num_classes, marker_id)
    carriers = torch.from_numpy(carriers_np).to(options.device)
    selection_seed = key.selection_seed()
    fp = key_record.fingerprint
    cfg = _config(fp, marker_id, params.to_dict(), options, num_classes, names)

    def features(x: torch.Tensor) -> torch.Tensor:
        return marker.features(x[:, :1] if marker.in_chans == 1 else x)

    with contextlib.ExitStack() as stack:
        # Phase 1: every rank locks the directory (its own lock file) and reads what is done.
        err = None
        try:
            _make_dir(out_dir)
            stack.enter_context(_lock(out_dir, LOCK if rank == 0 else _rank_lock(rank)))
            done = _load_state(out_dir, cfg, options.resume)
        except Exception as exc:
            err = exc
        group.agree(err)
        # Phase 2: rank 0 clears what killed runs left and pins the settings in the manifest.
        err = None
        if rank == 0:
            try:
                _remove_stale_temps(out_dir, names)
                _write_manifest(out_dir, cfg, done)
                _remove_partials(out_dir)
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
                if prev is not None and _still_valid(out_dir / name, url, prev):
                    rep = _report_from_entry(prev, resumed=True)
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
                        on_batch,
                    )
                    _test_kill_point("shard")
                    entry = {f: v for f, v in asdict(rep).items() if f != "resumed"}
                    mine[name] = {**entry, "marked_keys": marked_keys}
                    if rank == 0:
                        _write_manifest(out_dir, cfg, {**done, **mine})
                    else:
                        _write_partial(out_dir, rank, cfg, mine)
                counters["images"] += rep.samples
                reports.append(rep)
                report_progress(name, k + 1)
        except Exception as exc:
            err = exc
        group.agree(err)
        # Phase 4: rank 0 merges every rank's shards, writes the record and the final manifest.
        err = None
        record_addr: str | None = None
        all_reports = reports
        if rank == 0:
            try:
                merged = {**done, **mine}
                fresh = set(mine)
                for entries in _read_partials(out_dir, cfg).values():
                    merged.update(entries)
                    fresh.update(entries)
                missing = [n for n in names if n not in merged]
                if missing:
                    raise InputError(f"{out_dir}: no manifest entry for {missing[0]} after marking")
                mine_reports = {r.name: r for r in reports}
                all_reports = [
                    mine_reports.get(n) or _report_from_entry(merged[n], resumed=n not in fresh)
                    for n in names
                ]
                record = _mark_record(
                    key,
                    key_record,
                    marker,
                    marker_id,
                    num_classes,
                    carriers_np,
                    params.to_dict(),
                    options,
                    all_reports,
                    _marker_source(marker_spec),
                )
                try:
                    record_addr = address(store.put(record))
                except OSError as exc:
                    raise InputError(
                        f"cannot write the mark record into the keystore {keystore}: "
                        f"{exc.strerror or exc}"
                    ) from None
                _write_manifest(out_dir, cfg, merged, record=record_addr)
                _remove_partials(out_dir)
            except Exception as exc:
                err = exc
        group.agree(err)
        record_addr = group.broadcast(record_addr)
    assert record_addr is not None
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
        psnr_mean=(sum(p * m for p, m in psnr_pairs) / psnr_n) if psnr_n else None,
        psnr_min=min(psnrs) if psnrs else None,
        linf_max=max((r.linf_max for r in all_reports), default=0),
        images_per_s=sum(r.samples for r in fresh_reports) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        marker=marker_id,
        preset=params.name,
    )


def _report_from_entry(entry: dict[str, Any], *, resumed: bool) -> ShardReport:
    try:
        return ShardReport(
            **{**{f: entry[f] for f in _REPORT_FIELDS - {"resumed"}}, "resumed": resumed}
        )
    except KeyError as exc:
        raise InputError(f"manifest entry {entry.get('name')!r} lacks {exc}") from None


def _make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the output directory {out_dir}: {exc.strerror or exc}"
        ) from None
    if not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is not a directory")


def _check_not_inputs(out_dir: Path, urls: list[str], names: list[str]) -> None:
    """Refuse an --out where an output shard would replace its own input."""
    if not out_dir.is_dir():
        return
    for url, name in zip(urls, names, strict=True):
        if url.startswith("pipe:"):
            continue
        target = out_dir / name
        try:
            same = target.exists() and os.path.samefile(target, url)
        except OSError:
            same = False  # the input's own problem is reported when it is read
        if same:
            raise InputError(
                f"--out {out_dir} would overwrite the input shard {url}; inputs are never "
                "modified, so choose another --out"
            )


def _rank_lock(rank: int) -> str:
    return f".radmark.rank{rank}.lock"


_PARTIAL_RE = re.compile(r"\.radmark-manifest\.rank(\d+)\.json")


def _partial_name(rank: int) -> str:
    return f".radmark-manifest.rank{rank}.json"


def _load_state(out_dir: Path, cfg: dict[str, Any], resume: bool) -> dict[str, dict[str, Any]]:
    """Shards finished by earlier runs: the manifest plus any torchrun ranks' partial files.

    An earlier run that finished no shard leaves nothing to protect, so it does not need
    --resume (and its settings need not match): a run that failed on its first shard can simply
    be started again with fixed inputs.
    """
    path = out_dir / MANIFEST
    if not path.exists():
        existing = [n for n in _listdir(out_dir) if n in cfg["shards"]]
        if existing and not resume:
            raise InputError(f"{out_dir} already holds {existing[0]}; use another --out")
        return {}
    try:
        man = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(man, dict) or not isinstance(man.get("config"), dict):
        raise InputError(f"{path}: not a radmark manifest; use another --out")
    shards = man.get("shards")
    done: dict[str, dict[str, Any]] = dict(shards) if isinstance(shards, dict) else {}
    for entries in _read_partials(out_dir, man["config"]).values():
        done.update(entries)
    if not done:
        return {}
    if not resume:
        raise InputError(
            f"{out_dir} holds an earlier run's manifest; pass --resume to continue "
            "it, or use another --out"
        )
    if man["config"] != cfg:
        raise InputError(
            f"{path}: the earlier run used other settings (key, marker, parameters, "
            "fraction or shards); use another --out"
        )
    return done


def _read_partials(out_dir: Path, cfg: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for fname in _listdir(out_dir):
        m = _PARTIAL_RE.fullmatch(fname)
        if m is None:
            continue
        try:
            doc = json.loads((out_dir / fname).read_bytes())
        except (OSError, ValueError) as exc:
            raise InputError(f"{out_dir / fname}: unreadable partial manifest ({exc})") from None
        if isinstance(doc, dict) and doc.get("config") == cfg:
            shards = doc.get("shards")
            if isinstance(shards, dict):
                names = set(cfg.get("shards") or [])
                found[int(m.group(1))] = {k: v for k, v in shards.items() if k in names}
    return found


def _write_partial(
    out_dir: Path, rank: int, cfg: dict[str, Any], mine: dict[str, dict[str, Any]]
) -> None:
    doc = {"type": "radmark.manifest.partial", "rank": rank, "config": cfg, "shards": mine}
    atomic_write_bytes(
        out_dir / _partial_name(rank), json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    )


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InputError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _listdir(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as exc:
        raise InputError(f"cannot list {directory}: {exc.strerror or exc}") from None


def _remove_partials(out_dir: Path) -> None:
    for fname in _listdir(out_dir):
        if _PARTIAL_RE.fullmatch(fname):
            _unlink(out_dir / fname)


# shards.write_shard: .NAME.PID.HEX8.tmp; fsutil.atomic_write_bytes: .NAME.PID.tmp
_TEMP_RE = re.compile(r"\.(?P<base>.+?)\.\d+(?:\.[0-9a-f]{8})?\.tmp")


def _remove_stale_temps(out_dir: Path, names: list[str]) -> None:
    """Delete temp files a killed run left (we hold the lock, so none is being written)."""
    ours = set(names) | {MANIFEST}
    for fname in _listdir(out_dir):
        m = _TEMP_RE.fullmatch(fname)
        if m is not None and (m.group("base") in ours or _PARTIAL_RE.fullmatch(m.group("base"))):
            _unlink(out_dir / fname)


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
    try:
        if not path.is_file() or sha256_file(path) != prev.get("output_sha256"):
            return False
        if url.startswith("pipe:"):
            return True  # cannot re-read a pipe cheaply; the output hash is the check
        return sha256_file(Path(url)) == prev.get("input_sha256")
    except OSError:
        return False


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
    on_batch: Callable[[list[float]], None] | None = None,
) -> tuple[ShardReport, list[str]]:
    """Mark one shard into ``out_dir/name`` (atomically); its report and the marked keys.

    Every sample is checked (label, one decodable image) whether or not it is selected, so that
    whether a malformed shard is refused does not depend on the secret selection. With
    ``on_error="skip"`` a sample whose image is missing or does not decode is copied unmarked and
    counted; a bad label is always an error (it usually means a wrong --num-classes or
    --label-field, which skipping would hide).
    """
    import torch

    samples: list[Sample] = []
    todo: dict[tuple[int, ...], list[tuple[int, np.ndarray, int]]] = {}
    marked_keys: list[str] = []
    skipped = 0
    for sample in iter_samples(url):
        label = _label(sample, url, options, num_classes)
        idx = len(samples)
        samples.append(sample)
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
        if is_selected(selection_seed, sample.key, options.fraction):
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
            batch_psnr = [float(p) for p in res.psnr.cpu()]
            psnrs.extend(batch_psnr)
            coss.extend(float(c) for c in res.feature_cos.cpu())
            linf_max = max(linf_max, int(res.linf.max()))
            _test_kill_point("batch")
            if on_batch is not None:
                on_batch(batch_psnr)
    for idx in sorted(replaced):
        marked_keys.append(samples[idx].key)

    def output() -> Iterator[Sample]:
        for idx, s in enumerate(samples):
            if idx in replaced:
                ext = s.image_ext()
                s = Sample(s.key, [(e, replaced[idx] if e == ext else d) for e, d in s.members])
            if idx == len(samples) // 2:
                _test_kill_point("write")
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


def _marker_source(spec: str) -> str:
    """A marker file as an absolute path; ``torchvision:``/``timm:`` specs as given."""
    if ":" in spec.split("/", 1)[0] and not Path(spec).exists():
        return spec
    return str(Path(spec).resolve())


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
    marker_source: str,
) -> dict[str, Any]:
    body = {
        "type": MARK_RECORD_TYPE,
        "format_version": 1,
        "key": key_record.fingerprint,
        "created": utc_timestamp(),
        "radmark_version": __version__,
        "marker": {
            "id": marker_id,
            "name": marker.name,
            "arch": marker.arch,
            "sha256": marker.sha256,
            "dim": marker.dim,
            # where verify finds it by default; its hash is checked, so a moved file only
            # needs --marker, and a different file is refused
            "source": marker_source,
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
