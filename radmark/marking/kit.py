"""Verification kits: held-out images marked once per decoy slot, for the exact black-box test.

Per class c the true carrier u_c and K decoys drawn the same way are i.i.d. under H0 (a model
that never saw the key). A kit is a set of clean held-out images of every class, each marked once
per slot s = 0..K with the procedure of the mark record, class c's images pushed along slot s's
carrier for c. One slot per class, π_c, holds the true carrier; the others hold decoys; π_c is
drawn from the key, uniform and independent of everything else, and is never written anywhere.
The test itself (ranks of the true slots, and why it is exact) is ``verify/black_box.py``.

Marking every slot costs (K+1) × (images) markings, so it is done once, after marking, and
stored in the keystore (``kits/``, 0600: the kit holds images marked with the true carrier) with
a signed, content-addressed kit record; ``verify --black-box`` is then inference only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from radmark.canonical import address
from radmark.errors import InputError, IntegrityError, KeystoreError, UsageError, check_count
from radmark.keys.carriers import carriers_digest, derive_carriers
from radmark.keys.draws import uniform_index
from radmark.keys.keypair import SecretKey
from radmark.keys.records import KitRecord, MarkRecord, kit_record_body
from radmark.keys.store import Keystore

if TYPE_CHECKING:
    from radmark.marking.methods import CarrierMark
    from radmark.models.network import LoadedModel

KIT_FORMAT = "radmark-kit-v1"
STATISTIC = (
    "mean centred logit of the class over its kit images, residual of a per-class least-squares "
    "fit on the marker's over the slots"
)
DEFAULT_DECOYS = 39
DEFAULT_PER_CLASS = 10
MAX_KIT_IMAGES = 5_000_000  # slots × images; beyond this a kit would be gigabytes


@dataclass(frozen=True)
class KitBuildResult:
    """What ``radmark kit build`` did (no secret: never the slots or carriers)."""

    fingerprint: str
    mark_record: str
    kit_record: str
    kit_sha256: str
    decoys: int
    per_class: int
    images: int
    markings: int
    psnr_mean: float
    psnr_min: float
    kit_bytes: int
    seconds: float


@dataclass(frozen=True)
class Kit:
    """A loaded, hash-checked kit: ``marked`` uint8 [S, N, ch, H, W], ``labels`` int64 [N]."""

    address: str
    clean: np.ndarray
    labels: np.ndarray
    marked: np.ndarray

    @property
    def slots(self) -> int:
        return int(self.marked.shape[0])


# ---------------------------------------------------------------- secret derivations


def decoy_carriers(key: SecretKey, j: int, d: int, num_classes: int, marker_id: str) -> np.ndarray:
    """Decoy carrier set j (float32 [C, d]): the carrier procedure with a per-decoy seed."""
    seed = hmac.new(key.decoy_seed(), f"decoy/{j}".encode(), hashlib.sha256).digest()
    return derive_carriers(seed, d, num_classes, marker_id)


def true_slots(key: SecretKey, record_address: str, num_classes: int, slots: int) -> np.ndarray:
    """π_c ∈ [0, slots) per class, uniform (rejection sampling on HMAC-SHA256 output)."""
    seed = key.kit_slot_seed()
    draws = [
        uniform_index(seed, f"{record_address}/{slots}/{c}/", slots) for c in range(num_classes)
    ]
    return np.array(draws, dtype=np.int64)


def slot_carriers(key: SecretKey, record: MarkRecord, decoys: int) -> tuple[np.ndarray, np.ndarray]:
    """Carriers per slot, float32 [S, C, d], and the true slots π [C]; checks the commitment."""
    d, c, marker_id = record.dim, record.num_classes, record.marker.id
    true = derive_carriers(key.carrier_seed(), d, c, marker_id)
    record.check_carriers(carriers_digest(true))
    s = decoys + 1
    pi = true_slots(key, record.address, c, s)
    out = np.empty((s, c, d), dtype=np.float32)
    nxt = np.zeros(c, dtype=np.int64)  # next decoy set to use per class
    sets = [decoy_carriers(key, j, d, c, marker_id) for j in range(decoys)]
    for slot in range(s):
        for k in range(c):
            if slot == pi[k]:
                out[slot, k] = true[k]
            else:
                out[slot, k] = sets[nxt[k]][k]
                nxt[k] += 1
    return out, pi


# ---------------------------------------------------------------- building


def _select_per_class(
    labels: np.ndarray, num_classes: int, per_class: int, where: str
) -> np.ndarray:
    idx = []
    for k in range(num_classes):
        hits = np.flatnonzero(labels == k)[:per_class]
        if hits.size < per_class:
            raise InputError(
                f"{where}: class {k} has {hits.size} probe images, the kit needs {per_class} "
                "(lower --per-class or give more clean held-out images)"
            )
        idx.append(hits)
    return np.sort(np.concatenate(idx))


def _kit_bytes(
    clean: np.ndarray, labels: np.ndarray, marked: np.ndarray, meta: dict[str, str]
) -> bytes:
    import torch
    from safetensors.torch import save

    from radmark.models import canonical_safetensors

    tensors = {
        "clean": torch.from_numpy(np.ascontiguousarray(clean)),
        "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        "marked": torch.from_numpy(np.ascontiguousarray(marked)),
    }
    return canonical_safetensors(save(tensors, metadata=meta))


def mark_kit_images(
    clean: np.ndarray,
    labels: np.ndarray,
    carriers: np.ndarray,
    features: Callable[[Any], Any],
    params: Any,
    *,
    mark: CarrierMark,
    device: str = "cpu",
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every slot's marked copy of the kit images: uint8 [S, N, ch, H, W] and PSNRs [S·N].

    clean: uint8 [N, ch, H, W]; labels: int64 [N]; carriers: float32 [S, C, d] (slot_carriers);
    mark: the record's method's decoy-kit step (``decoy_kit_step``), params its parameters.
    One fixed augmentation stream for every slot, so each slot is the same function of its
    carriers (exactness needs only π uniform and independent, but this keeps the slots alike).
    """
    import torch

    s, n = int(carriers.shape[0]), int(clean.shape[0])
    marked = np.empty((s, *clean.shape), dtype=np.uint8)
    psnrs: list[np.ndarray] = []
    done = 0
    for slot in range(s):
        u = torch.from_numpy(np.ascontiguousarray(carriers[slot])).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        for i in range(0, n, batch_size):
            x = torch.from_numpy(clean[i : i + batch_size]).to(device)
            y = torch.from_numpy(labels[i : i + batch_size]).to(device)
            res = mark(x, y, u, features, params, generator=gen)
            marked[slot, i : i + batch_size] = res.images.cpu().numpy()
            psnrs.append(res.psnr.cpu().numpy())
            done += int(x.shape[0])
            if progress is not None:
                progress(done, n * s)
    return marked, np.concatenate(psnrs)


def build_kit(
    *,
    store: Keystore,
    record: MarkRecord,
    key: SecretKey,
    probe: Sequence[str],
    marker_spec: str | None = None,
    marker: LoadedModel | None = None,
    decoys: int = DEFAULT_DECOYS,
    per_class: int = DEFAULT_PER_CLASS,
    device: str = "cpu",
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> KitBuildResult:
    """Mark the kit images once per slot and store kit + signed kit record in ``store``.

    ``probe``: clean, labelled held-out shards (never the training data: a suspect's response to
    images it memorised says less). The first ``per_class`` images of each class are used.
    ``marker``: the record's marker when the caller has it loaded already (identity checked).
    """
    from radmark.data.arrays import load_labelled_images
    from radmark.keys.plan import Plan
    from radmark.marking.methods import decoy_kit_step, get_method
    from radmark.models.identity import load_marker

    t0 = time.perf_counter()
    if decoys < 1:
        raise UsageError("--decoys must be at least 1")
    if per_class < 1:
        raise UsageError("--per-class must be at least 1")
    check_count("--batch-size", batch_size)
    if not probe:
        raise UsageError("pass --probe SHARDS: clean labelled held-out images, never marked")
    if not key.matches(record.key):
        raise KeystoreError(f"the key given is not the key of mark record {record.short}")
    if kit_records(store, record) and not force:
        raise UsageError(
            f"mark record {record.short} has a verification kit already; kits are built once per "
            "record (verification uses the first one), pass --force to build another anyway"
        )
    planned = Plan.from_record(record.plan).kit if record.plan is not None else None
    if planned and (planned["decoys"], planned["per_class"]) != (decoys, per_class):
        raise UsageError(
            f"mark record {record.short} planned a kit of {planned['decoys']} decoys and "
            f"{planned['per_class']} images per class; build that one (--decoys, --per-class)"
        )
    mark = decoy_kit_step(record.method, f"mark record {record.short}")
    if marker is None or marker.identity != record.marker.id:
        marker = load_marker(record.marker, marker_spec, device, record=record.short)
    c = record.num_classes
    data = load_labelled_images(probe, num_classes=c)
    idx = _select_per_class(data.labels, c, per_class, ", ".join(probe))
    clean, labels = data.images[idx], data.labels[idx]
    n, s = int(clean.shape[0]), decoys + 1
    if n * s > MAX_KIT_IMAGES or n * s * int(np.prod(clean.shape[1:])) > 4 << 30:
        raise UsageError(
            f"a kit of {s} slots × {n} images is too large: lower --decoys or --per-class"
        )
    carriers, _pi = slot_carriers(key, record, decoys)
    params = get_method(record.method).params_from_record(record.params)
    marked, ps = mark_kit_images(
        clean, labels, carriers, marker.features, params, mark=mark, device=device,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    kit_record = store_kit(store, key, record, clean, labels, marked, per_class=per_class,
                           probe=probe)  # fmt: skip
    finite = ps[np.isfinite(ps)]
    return KitBuildResult(
        fingerprint=address(record.fingerprint),
        mark_record=address(record.address),
        kit_record=address(kit_record.address),
        kit_sha256=address(kit_record.kit_sha256),
        decoys=decoys,
        per_class=per_class,
        images=n,
        markings=n * s,
        psnr_mean=float(finite.mean()) if finite.size else float("inf"),
        psnr_min=float(finite.min()) if finite.size else float("inf"),
        kit_bytes=kit_record.kit_bytes,
        seconds=time.perf_counter() - t0,
    )


def store_kit(
    store: Keystore,
    key: SecretKey,
    record: MarkRecord,
    clean: np.ndarray,
    labels: np.ndarray,
    marked: np.ndarray,
    *,
    per_class: int,
    probe: Sequence[str],
) -> KitRecord:
    """Store a marked kit (0600, content-addressed) and its signed kit record; return the record.

    clean: uint8 [N, ch, H, W]; labels: int64 [N]; marked: uint8 [S, N, ch, H, W] from
    :func:`mark_kit_images` (S = decoys + 1). :func:`build_kit` ends here; a test that marks a
    fresh kit per key stores it the same way, so verification reads it as it reads any kit.
    """
    meta = {"format": KIT_FORMAT, "mark_record": record.address}
    blob = _kit_bytes(clean, labels, marked, meta)
    kit_hex = store.put_kit(blob)
    body = kit_record_body(
        record=record,
        kit_format=KIT_FORMAT,
        kit_sha256=kit_hex,
        kit_bytes=len(blob),
        decoys=int(marked.shape[0]) - 1,
        per_class=per_class,
        images=int(clean.shape[0]),
        image_shape=clean.shape[1:],
        statistic=STATISTIC,
        probe=probe,
    )
    signed = key.sign(body)
    return KitRecord.from_signed(signed, store.put(signed))


# ---------------------------------------------------------------- loading


def load_kit(store: Keystore, rec: KitRecord) -> tuple[KitRecord, Kit]:
    """The kit of a kit record, its hash and shapes checked against the signed record."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    blob = store.read_kit(rec.kit_sha256)
    where = f"kit {address(rec.kit_sha256)[:19]}"
    try:
        tensors = load(blob)
        n_head = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n_head]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where}: not a valid kit ({exc})") from None
    if meta.get("mark_record") != rec.mark_record or meta.get("format") != KIT_FORMAT:
        raise IntegrityError(f"{where}: does not belong to kit record {address(rec.address)[:19]}")
    try:
        clean, labels, marked = tensors["clean"], tensors["labels"], tensors["marked"]
    except KeyError:
        raise IntegrityError(f"{where}: missing tensors") from None
    s, n = rec.slots, rec.images
    if (
        clean.dtype != np.uint8
        or marked.dtype != np.uint8
        or labels.dtype != np.int64
        or clean.shape != (n, *rec.image_shape)
        or marked.shape != (s, n, *rec.image_shape)
        or labels.shape != (n,)
    ):
        raise IntegrityError(f"{where}: tensor shapes do not match its record")
    return rec, Kit(address=rec.address, clean=clean, labels=labels, marked=marked)


def kit_records(store: Keystore, record: MarkRecord) -> list[KitRecord]:
    """The kit records of ``record`` (same key), oldest first."""
    return [k for k in store.kit_records() if k.mark_record == record.address
            and k.key_fingerprint == record.fingerprint]  # fmt: skip


def first_kit(store: Keystore, record: MarkRecord) -> KitRecord:
    """The record's first kit (the one verification uses), or a one-line error saying how to
    build one. Kits are built once per record (issue #17): a kit rebuilt with other decoys
    redraws nothing the verdict depends on, because verification never looks past the first."""
    kits = kit_records(store, record)
    if not kits:
        raise KeystoreError(
            f"no verification kit for mark record {record.short} in keystore {store.root}: "
            f"run `radmark kit build {record.short} --probe SHARDS`"
        )
    return min(kits, key=lambda k: (k.created, k.address))
