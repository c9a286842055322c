"""Verification kits and the exact black-box test: evidence from a suspect's outputs alone.

Per class c the true carrier u_c and K decoys drawn the same way are i.i.d. under H0 (a model
that never saw the key). A kit is a set of clean held-out images of every class, each marked once
per slot s = 0..K with the procedure of the mark record, class c's images pushed along slot s's
carrier for c. One slot per class, π_c, holds the true carrier; the others hold decoys; π_c is
drawn from the key, uniform and independent of everything else, and is never written anywhere.

At verification, for every slot and class, a model's response is its mean centred logit of
class c (z_c − mean_j z_j) over the kit's class-c images marked with that slot:

    T_c(s) = mean_{i: y_i = c} [z_c(x̃_{s,i}) − mean_j z_j(x̃_{s,i})]

Most of T's variation across slots is common to every model trained on the same kind of data (a
given carrier's perturbation happens to look more or less like class c), so it is removed with a
reference that is independent of the key: the marking network itself (trained on clean data before
the key existed). Per class, the suspect's T is regressed on the marker's over the slots and the
residual R_c(s) = (T_c(s) − mean) − b_c (T^ref_c(s) − mean) is the score (b_c by least squares over
all slots, a symmetric function of them). The class's rank is r_c = 1 + #{s ≠ π_c : R_c(s) ≥
R_c(π_c)} (ties count against us).
Why it is exact: under H0 the slot carriers are i.i.d. whatever π is (true and decoy carriers
are drawn alike), so the suspect's and the reference's responses (T, T^ref) are independent of π,
and so is any score computed from them; π_c is uniform, so the rank of the score at π_c is uniform
on {1..K+1} (or stochastically larger with ties) whatever the model is;
the paired test across images with one decoy set (method.md, "Trap, measured") is invalid
because the images share the carrier draw — here the carrier draw is the unit. Classes use
disjoint, independent draws, so ranks are independent across classes and are combined with their
exact discrete null (:func:`radmark.stats.rank_log_sf`), far less conservative than Fisher on
discrete p-values. The floor is (K+1)^−C: K = 39 with 10 classes reaches log10 p = −16.

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
from typing import Any

import numpy as np

from radmark import __version__
from radmark.canonical import address, utc_timestamp
from radmark.errors import InputError, IntegrityError, KeystoreError, ModelError, UsageError
from radmark.keys.carriers import carriers_digest, derive_carriers
from radmark.keys.keypair import SecretKey
from radmark.keys.store import KIT_RECORD_TYPE, Keystore, MarkRecord
from radmark.verify.statistics import LN10, rank_log_sf

KIT_FORMAT = "radmark-kit-v1"
STATISTIC = (
    "mean centred logit of the class over its kit images, residual of a per-class least-squares "
    "fit on the marker's over the slots"
)
BLACK_BOX_TEST = "black_box_rank"
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

    record: dict[str, Any]
    address: str
    clean: np.ndarray
    labels: np.ndarray
    marked: np.ndarray

    @property
    def slots(self) -> int:
        return int(self.marked.shape[0])


@dataclass(frozen=True)
class BlackBoxResult:
    """Per-class ranks of the true slot (1 = the suspect prefers the true carrier most)."""

    ranks: list[int]
    slots: int
    log10_p: float


# ---------------------------------------------------------------- secret derivations


def decoy_carriers(key: SecretKey, j: int, d: int, num_classes: int, marker_id: str) -> np.ndarray:
    """Decoy carrier set j (float32 [C, d]): the carrier procedure with a per-decoy seed."""
    seed = hmac.new(key.decoy_seed(), f"decoy/{j}".encode(), hashlib.sha256).digest()
    return derive_carriers(seed, d, num_classes, marker_id)


def true_slots(key: SecretKey, record_address: str, num_classes: int, slots: int) -> np.ndarray:
    """π_c ∈ [0, slots) per class, uniform (rejection sampling on HMAC-SHA256 output)."""
    out = np.empty(num_classes, dtype=np.int64)
    limit = (1 << 64) - ((1 << 64) % slots)
    seed = key.kit_slot_seed()
    for c in range(num_classes):
        counter = 0
        while True:
            msg = f"{record_address}/{slots}/{c}/{counter}".encode()
            v = int.from_bytes(hmac.new(seed, msg, hashlib.sha256).digest()[:8], "big")
            if v < limit:
                out[c] = v % slots
                break
            counter += 1
    return out


def slot_carriers(
    key: SecretKey, record: MarkRecord, decoys: int, marker_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """Carriers per slot, float32 [S, C, d], and the true slots π [C]; checks the commitment."""
    d, c = int(record.signed["dim"]), int(record.signed["num_classes"])
    true = derive_carriers(key.carrier_seed(), d, c, marker_id)
    if carriers_digest(true) != record.signed["carriers"]["sha256"]:
        raise IntegrityError(
            f"the key does not derive the carriers committed in record {address(record.address)}"
        )
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
    device: str = "cpu",
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every slot's marked copy of the kit images: uint8 [S, N, ch, H, W] and PSNRs [S·N].

    clean: uint8 [N, ch, H, W]; labels: int64 [N]; carriers: float32 [S, C, d] (slot_carriers).
    One fixed augmentation stream for every slot, so each slot is the same function of its
    carriers (exactness needs only π uniform and independent, but this keeps the slots alike).
    """
    import torch

    from radmark.marking.radioactive import mark_batch

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
            res = mark_batch(x, y, u, features, params, generator=gen)
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
    decoys: int = DEFAULT_DECOYS,
    per_class: int = DEFAULT_PER_CLASS,
    device: str = "cpu",
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> KitBuildResult:
    """Mark the kit images once per slot and store kit + signed kit record in ``store``.

    ``probe``: clean, labelled held-out shards (never the training data: a suspect's response to
    images it memorised says less). The first ``per_class`` images of each class are used.
    """
    from radmark.data.arrays import load_labelled_images
    from radmark.marking.radioactive import MarkingParams
    from radmark.models import load_model
    from radmark.models.markers import marker_identity

    t0 = time.perf_counter()
    if decoys < 1:
        raise UsageError("--decoys must be at least 1")
    if per_class < 1:
        raise UsageError("--per-class must be at least 1")
    if not probe:
        raise UsageError("pass --probe SHARDS: clean labelled held-out images, never marked")
    if not key.matches(record.key):
        raise KeystoreError(
            f"the key given is not the key of mark record {address(record.address)[:19]}"
        )
    m = record.signed["marker"]
    spec = marker_spec or m.get("source")
    if not spec:
        raise UsageError("the mark record does not say where its marker is: pass --marker FILE")
    marker = load_model(spec, device=device)
    if marker_identity(marker.name, marker.sha256) != m["id"]:
        raise ModelError(
            f"marker {spec} is {marker_identity(marker.name, marker.sha256)}, "
            f"but the mark was made with {m['id']}"
        )
    c = int(record.signed["num_classes"])
    data = load_labelled_images(probe, num_classes=c)
    idx = _select_per_class(data.labels, c, per_class, ", ".join(probe))
    clean, labels = data.images[idx], data.labels[idx]
    n, s = int(clean.shape[0]), decoys + 1
    if n * s > MAX_KIT_IMAGES or n * s * int(np.prod(clean.shape[1:])) > 4 << 30:
        raise UsageError(
            f"a kit of {s} slots × {n} images is too large: lower --decoys or --per-class"
        )
    carriers, _pi = slot_carriers(key, record, decoys, m["id"])
    params = MarkingParams.from_dict(record.signed["params"])

    def features(x: Any) -> Any:
        return marker.features(x[:, :1] if marker.in_chans == 1 else x)

    marked, ps = mark_kit_images(
        clean, labels, carriers, features, params, device=device, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    meta = {"format": KIT_FORMAT, "mark_record": record.address}
    blob = _kit_bytes(clean, labels, marked, meta)
    kit_hex = store.put_kit(blob)
    finite = ps[np.isfinite(ps)]
    body = {
        "type": KIT_RECORD_TYPE,
        "format_version": 1,
        "key": record.fingerprint,
        "created": utc_timestamp(),
        "radmark_version": __version__,
        "mark_record": record.address,
        "marker": m["id"],
        "kit": {"format": KIT_FORMAT, "sha256": kit_hex, "bytes": len(blob)},
        "decoys": decoys,
        "per_class": per_class,
        "images": n,
        "image_shape": [int(v) for v in clean.shape[1:]],
        "statistic": STATISTIC,
        "augmentation_seed": 0,
        "probe": [str(p) for p in probe],
    }
    kit_record = store.put(key.sign(body))
    return KitBuildResult(
        fingerprint=address(record.fingerprint),
        mark_record=address(record.address),
        kit_record=address(kit_record),
        kit_sha256=address(kit_hex),
        decoys=decoys,
        per_class=per_class,
        images=n,
        markings=n * s,
        psnr_mean=float(finite.mean()) if finite.size else float("inf"),
        psnr_min=float(finite.min()) if finite.size else float("inf"),
        kit_bytes=len(blob),
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------- loading


def load_kit(store: Keystore, kit_address: str) -> Kit:
    """The kit of a kit record, its hash and shapes checked against the signed record."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    rec = store.objects[kit_address]
    blob = store.read_kit(rec["kit"]["sha256"])
    where = f"kit {address(rec['kit']['sha256'])[:19]}"
    try:
        tensors = load(blob)
        n_head = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n_head]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where}: not a valid kit ({exc})") from None
    if meta.get("mark_record") != rec["mark_record"] or meta.get("format") != KIT_FORMAT:
        raise IntegrityError(f"{where}: does not belong to kit record {address(kit_address)[:19]}")
    try:
        clean, labels, marked = tensors["clean"], tensors["labels"], tensors["marked"]
    except KeyError:
        raise IntegrityError(f"{where}: missing tensors") from None
    s, n = int(rec["decoys"]) + 1, int(rec["images"])
    shape = tuple(int(v) for v in rec["image_shape"])
    if (
        clean.dtype != np.uint8
        or marked.dtype != np.uint8
        or labels.dtype != np.int64
        or clean.shape != (n, *shape)
        or marked.shape != (s, n, *shape)
        or labels.shape != (n,)
    ):
        raise IntegrityError(f"{where}: tensor shapes do not match its record")
    return Kit(record=rec, address=kit_address, clean=clean, labels=labels, marked=marked)


def kit_for(store: Keystore, record: MarkRecord) -> str:
    """Address of the newest kit record of ``record`` (same key), or a one-line error."""
    hits = [
        (str(o.get("created")), h)
        for h, o in store.objects.items()
        if o.get("type") == KIT_RECORD_TYPE
        and o.get("mark_record") == record.address
        and o.get("key") == record.fingerprint
    ]
    if not hits:
        raise KeystoreError(
            f"no verification kit for mark record {address(record.address)[:19]} in keystore "
            f"{store.root}: run `radmark kit build {address(record.address)[:19]} --probe SHARDS`"
        )
    return max(hits)[1]


# ---------------------------------------------------------------- the test


def slot_statistics(
    logits_fn: Callable[[Any], Any],
    kit: Kit,
    num_classes: int,
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """T [S, C]: mean centred logit of class c over the kit's class-c images marked with slot s."""
    import torch

    s, n = kit.marked.shape[:2]
    out = np.zeros((s, num_classes), dtype=np.float64)
    onehot = np.eye(num_classes, dtype=np.float64)[kit.labels]  # [N, C]
    counts = onehot.sum(axis=0)
    if np.any(counts == 0):
        raise IntegrityError("the kit has no image of some class")
    with torch.no_grad():
        for slot in range(s):
            chunks = []
            for i in range(0, n, batch_size):
                x = torch.from_numpy(kit.marked[slot, i : i + batch_size]).to(device)
                z = logits_fn(x.float().div_(255.0)).double()
                chunks.append((z - z.mean(dim=1, keepdim=True)).cpu().numpy())
            z = np.concatenate(chunks)
            if z.shape != (n, num_classes):
                raise ModelError(
                    f"the model gave outputs of shape {z.shape} on the kit, expected [{n}, {num_classes}]"
                )
            if not np.all(np.isfinite(z)):
                raise ModelError("the model produced non-finite logits on the kit images")
            out[slot] = (onehot * z).sum(axis=0) / counts
    return out


def residualise(stats: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per class (column): the slots' T minus its least-squares fit on the reference's T.

    Symmetric in the slots, and the reference never sees the key, so the residual is independent
    of the true slot under H0 (module docstring): the test stays exact for any reference.
    """
    y = stats - stats.mean(axis=0, keepdims=True)
    x = reference - reference.mean(axis=0, keepdims=True)
    xx = np.sum(x * x, axis=0)
    b = np.where(xx > 0, np.sum(x * y, axis=0) / np.where(xx > 0, xx, 1.0), 0.0)
    return y - b * x


def black_box_test(stats: np.ndarray, pi: np.ndarray) -> BlackBoxResult:
    """Ranks of the true slots and their exact combined p (see the module docstring)."""
    s, c = stats.shape
    true = stats[pi, np.arange(c)]  # [C]
    # all slots at or above the true one, minus the true slot itself: ties count against us
    ranks = [int(r) for r in np.sum(stats >= true, axis=0)]
    log_p = rank_log_sf(np.array(ranks), s)
    return BlackBoxResult(ranks=ranks, slots=s, log10_p=log_p / LN10)


def run_black_box(
    logits_fn: Callable[[Any], Any],
    reference_fn: Callable[[Any], Any] | None,
    store: Keystore,
    record: MarkRecord,
    key: SecretKey,
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> BlackBoxResult:
    """Load the record's kit, evaluate the suspect's outputs on it, rank the true slots.

    ``reference_fn``: logits of a model independent of the key (the marker); None for the raw T.
    """
    kit = load_kit(store, kit_for(store, record))
    c = int(record.signed["num_classes"])
    if int(kit.labels.min()) < 0 or int(kit.labels.max()) >= c:
        raise IntegrityError("the kit's labels do not match its mark record's classes")
    pi = true_slots(key, record.address, c, kit.slots)
    stats = slot_statistics(logits_fn, kit, c, device=device, batch_size=batch_size)
    if reference_fn is not None:
        ref = slot_statistics(reference_fn, kit, c, device=device, batch_size=batch_size)
        stats = residualise(stats, ref)
    return black_box_test(stats, pi)
