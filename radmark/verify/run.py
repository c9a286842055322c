"""``radmark verify``: is this model radioactive for my keys?

The white-box test of Sablayrolles et al. (2020): features of the marker φ and of the suspect on a
clean probe set; least squares X = argmin ‖F_m X − F_s‖; the suspect's classifier mapped into φ's
space, W̃ = W_s Xᵀ (rows normalised); per class c_k = W̃_k·u_k, whose exact null (any model that
never saw the secret carriers) is the cosine of a fixed vector with a uniform random direction
in R^d; classes combined with Fisher. The randomness is in the carriers, so the test is exact for
any model, clean or not, provided the model is independent of the key.

A second exact test needs no alignment: the suspect's input gradients pushed forward through the
marker (radmark/pullback.py). A third needs only the suspect's outputs: the decoy-rank test on a
verification kit (radmark/kit.py, ``--black-box``); without a probe set it runs alone. The verdict
combines the exact tests by Bonferroni on the minimum (valid under any dependence). Several keys tested against one model are corrected with Holm
(valid under any dependence).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radmark.canonical import address
from radmark.errors import InputError, IntegrityError, KeystoreError, ModelError, UsageError
from radmark.keys.carriers import carriers_digest, derive_carriers
from radmark.keys.keypair import SecretKey
from radmark.keys.manage import is_key_file
from radmark.keys.store import Keystore, MarkRecord, PassphraseFn, load_keyfile
from radmark.marking.kit import BLACK_BOX_TEST
from radmark.verify.alignment import fit_alignment, map_classifier
from radmark.verify.pullback import residual_cosines
from radmark.verify.statistics import (
    LN10,
    bonferroni_min,
    fisher_log_sf,
    holm_adjust,
    log_cosine_sf,
    log_normal_sf,
    zscore,
)

LOW_POWER_CLASSES = 30
VERDICT_TEST = "white_box_fisher"
PULLBACK_TEST = "pullback_fisher"
POOR_ALIGNMENT_R2 = 0.5


@dataclass(frozen=True)
class TestResult:
    """One test of one key: ``log10_p`` is exact unless ``exact`` is False (then informative only)."""

    name: str
    log10_p: float
    exact: bool
    statistic: float
    description: str


@dataclass(frozen=True)
class KeyResult:
    fingerprint: str
    record: str
    marker: str
    num_classes: int
    dim: int
    cosines: list[float]  # empty when only the black-box test ran
    class_log10_p: list[float]
    tests: dict[str, TestResult]
    log10_p: float  # the verdict-bearing combined p (before multiple-testing correction)
    log10_p_adjusted: float  # after Holm over all keys tested
    detected: bool
    alignment_r2: float | None  # None: no alignment (black box only)
    alignment_residual: float | None
    alignment_warning: str | None
    black_box_ranks: list[int] | None = None  # per class, 1 = the true carrier ranked first
    black_box_slots: int | None = None


@dataclass(frozen=True)
class VerifyResult:
    model: str
    model_sha256: str
    arch: str
    alpha: float
    detected: bool
    results: list[KeyResult]
    probe_size: int
    correction: str | None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _features(fn: Callable[[Any], Any], images: np.ndarray, batch: int, device: str) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = torch.from_numpy(images[i : i + batch]).to(device).float().div_(255.0)
            out.append(fn(x).double().cpu().numpy())
    feats = np.concatenate(out)
    if not np.all(np.isfinite(feats)):
        raise ModelError("the model produced non-finite features on the probe set")
    return feats


def _gray_adapter(model: Any) -> Callable[[Any], Any]:
    """Feed a 1-channel model the single channel of grayscale input (replicated or not)."""

    def fn(x: Any) -> Any:
        if model.in_chans == 1 and x.shape[1] == 3:
            x = x[:, :1]
        return model.features(x)

    return fn


def white_box(cosines: np.ndarray, d: int) -> tuple[np.ndarray, dict[str, TestResult], float]:
    """Per-class ln p, the tests, and the verdict-bearing combined ln p."""
    lp = log_cosine_sf(cosines, d)
    fisher = fisher_log_sf(lp)
    z = zscore(cosines, d)
    tests = {
        VERDICT_TEST: TestResult(
            VERDICT_TEST,
            fisher / LN10,
            True,
            float(-2.0 * np.sum(lp)),
            "Fisher over per-class exact cosine tails (paper, white box)",
        ),
        "white_box_zscore": TestResult(
            "white_box_zscore",
            log_normal_sf(z) / LN10,
            False,
            z,
            "mean(c)·√(C·d), normal approximation (informative only)",
        ),
    }
    return lp, tests, fisher


def pullback_test(cosines: np.ndarray, d: int, *, labelled: bool) -> TestResult:
    """Fisher over the per-class exact tails of the pull-back cosines (radmark.verify.pullback).

    ``d``: the dimension of the null (d − 1 for residual cosines, see ``residual_cosines``).
    """
    lp = log_cosine_sf(cosines, d)
    how = "class-conditional margin" if labelled else "all-image logit"
    return TestResult(
        PULLBACK_TEST,
        fisher_log_sf(lp) / LN10,
        True,
        float(-2.0 * np.sum(lp)),
        f"Fisher over cos(J_φ·∇logit, u_k), {how} gradients, the marker's own direction "
        "removed (white box, no alignment)",
    )


def combine_exact(tests: dict[str, TestResult]) -> float:
    """ln p of the verdict: Bonferroni on the minimum over the exact tests.

    The tests share the model and the carriers, so they are dependent; min·k is valid under any
    dependence (a union bound) and costs at most log10 k against the best single test.
    """
    exact = [t.log10_p * LN10 for t in tests.values() if t.exact]
    return bonferroni_min(np.array(exact))


def black_box_result(ranks: Sequence[int], slots: int, log10_p: float) -> TestResult:
    return TestResult(
        BLACK_BOX_TEST,
        log10_p,
        True,
        float(np.sum(np.log(np.asarray(ranks, dtype=np.float64)))),
        f"decoy rank among {slots} carriers per class, exact discrete combination "
        "(black box: outputs only)",
    )


def _load_probe(probe: Sequence[str], limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probe images and, when every sample has a label, the labels (the pull-back test uses them)."""
    from radmark.data.arrays import load_images, load_labelled_images
    from radmark.errors import ShardError

    try:
        data = load_labelled_images(probe, limit=limit)
        return data.images, data.labels
    except ShardError as exc:
        if "label" not in exc.reason and "cls" not in exc.reason:
            raise
    images, _ = load_images(probe, limit=limit)
    return images, None


def _pullback(
    suspect: Any,
    marker: Any,
    images: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    limit: int,
    device: str,
) -> np.ndarray:
    from radmark.verify.pullback import loaded_logits, pullback_directions

    if images.shape[0] > limit:  # a class-balanced, deterministic subset: the first per class
        if labels is not None:
            per = max(1, limit // num_classes)
            idx = np.concatenate([np.flatnonzero(labels == k)[:per] for k in range(num_classes)])
            images, labels = images[np.sort(idx)], labels[np.sort(idx)]
        else:
            images = images[:limit]
    if labels is not None and any(not np.any(labels == k) for k in range(num_classes)):
        labels = None  # some class has no probe image: fall back to all-image gradients
    return pullback_directions(
        loaded_logits(suspect),
        _gray_adapter(marker),
        images,
        num_classes,
        labels=labels,
        device=device,
    )


def _records_for(
    store: Keystore, key_ref: str | None, passphrase: PassphraseFn
) -> list[tuple[MarkRecord, SecretKey]]:
    secrets: dict[str, SecretKey] = {}
    if key_ref is not None and is_key_file(key_ref):
        key, rec = load_keyfile(Path(key_ref), passphrase)
        secrets[rec.fingerprint] = key
        records = store.mark_records(rec.fingerprint)
    elif key_ref is not None:
        try:
            records = [store.mark_record(key_ref)]
        except KeystoreError:
            records = store.mark_records(store.key_record(key_ref).fingerprint)
    else:
        records = store.mark_records()
    if not records:
        raise KeystoreError(
            f"no mark records in keystore {store.root}"
            + (f" for {key_ref}" if key_ref else "")
            + ": mark data with `radmark mark` first, or pass --keystore"
        )
    # Records with the same key, marker and (d, C) share their carriers: one test, not several
    # (testing it twice would only cost power through the multiple-testing correction).
    unique: dict[tuple[str, str, int, int], MarkRecord] = {}
    for rec in records:
        s = rec.signed
        unique[(rec.fingerprint, s["marker"]["id"], int(s["dim"]), int(s["num_classes"]))] = rec
    out = []
    for rec in unique.values():
        if rec.fingerprint not in secrets:
            secrets[rec.fingerprint] = store.secret(rec.fingerprint, passphrase)[0]
        out.append((rec, secrets[rec.fingerprint]))
    return out


def verify_model(
    model_spec: str,
    *,
    keystore: Path,
    probe: Sequence[str],
    key_ref: str | None = None,
    marker_spec: str | None = None,
    arch: str | None = None,
    head: str | None = None,
    alpha: float = 1e-3,
    device: str = "cpu",
    probe_limit: int | None = None,
    center: bool = False,
    batch_size: int = 256,
    passphrase: PassphraseFn = lambda: None,
    pullback: bool = True,
    pullback_limit: int = 2000,
    black_box: bool = False,
) -> VerifyResult:
    """Test ``model_spec`` against every selected mark record; see the module docstring.

    With ``black_box`` the decoy-rank test runs on each record's verification kit; with
    ``black_box`` and no ``probe`` it runs alone (the model's outputs are all it uses).
    """
    from radmark.models import load_model

    if not 0.0 < alpha < 1.0:
        raise UsageError("--alpha must be in (0, 1)")
    if not probe and not black_box:
        raise UsageError(
            "pass --probe SHARDS: clean images from the same distribution, never marked "
            "(or --black-box to use only the verification kits)"
        )
    white = bool(probe)
    t0 = time.perf_counter()
    store = Keystore.open(keystore)
    selected = _records_for(store, key_ref, passphrase)
    if black_box:  # a missing kit fails before any model is loaded
        from radmark.marking.kit import kit_for

        for rec, _key in selected:
            kit_for(store, rec)
    suspect = load_model(model_spec, arch=arch, head=head, device=device)
    # Cheap checks first: a model that cannot fit a record fails before any feature extraction.
    for rec, _key in selected:
        c = int(rec.signed["num_classes"])
        if suspect.num_classes != c:
            raise ModelError(
                f"{suspect.source} ({suspect.arch}) has {suspect.num_classes} classes but mark "
                f"record {address(rec.address)[:19]} has {c}: the model's classes do not match "
                "the key's mark (pass --head NAME if another Linear layer is the classifier)"
            )
    warnings: list[str] = []
    white_results: dict[str, tuple[np.ndarray, dict[str, TestResult], Any]] = {}
    marker_models: dict[str, Any] = {}
    n_probe = 0
    if white:
        white_results, n_probe = _white_box_tests(
            suspect,
            selected,
            probe,
            warnings,
            marker_models,
            marker_spec=marker_spec,
            device=device,
            probe_limit=probe_limit,
            center=center,
            batch_size=batch_size,
            pullback=pullback,
            pullback_limit=pullback_limit,
        )
    results: list[tuple[MarkRecord, np.ndarray, dict[str, TestResult], Any, Any]] = []
    for rec, key in selected:
        cos, tests, al = white_results.get(rec.address, (np.zeros(0), {}, None))
        tests = dict(tests)
        bb = None
        if black_box:
            from radmark.marking.kit import run_black_box
            from radmark.verify.pullback import loaded_logits

            marker = _marker_for(rec, marker_spec, device, marker_models)
            bb = run_black_box(
                loaded_logits(suspect),
                loaded_logits(marker),
                store,
                rec,
                key,
                device=device,
                batch_size=batch_size,
            )
            tests[BLACK_BOX_TEST] = black_box_result(bb.ranks, bb.slots, bb.log10_p)
        results.append((rec, cos, tests, al, bb))
    combined = [combine_exact(r[2]) for r in results]
    adjusted = holm_adjust(np.array(combined))
    log_alpha = math.log(alpha)
    out: list[KeyResult] = []
    for (rec, cos, tests, al, bb), comb, adj in zip(results, combined, adjusted, strict=True):
        d = int(rec.signed["dim"])
        out.append(
            KeyResult(
                fingerprint=address(rec.fingerprint),
                record=address(rec.address),
                marker=rec.signed["marker"]["id"],
                num_classes=int(rec.signed["num_classes"]),
                dim=d,
                cosines=[float(x) for x in cos],
                class_log10_p=[float(x) / LN10 for x in log_cosine_sf(cos, d)] if cos.size else [],
                tests=tests,
                log10_p=comb / LN10,
                log10_p_adjusted=float(adj) / LN10,
                detected=bool(adj <= log_alpha),
                alignment_r2=al.r2 if al is not None else None,
                alignment_residual=al.relative_residual if al is not None else None,
                alignment_warning=al.warning if al is not None else None,
                black_box_ranks=bb.ranks if bb is not None else None,
                black_box_slots=bb.slots if bb is not None else None,
            )
        )
        if al is not None and al.warning and al.warning not in warnings:
            warnings.append(al.warning)
    if any(r.num_classes < LOW_POWER_CLASSES for r in out):
        warnings.append(
            f"only {min(r.num_classes for r in out)} classes: the white-box test has little power "
            "with few classes, so 'not detected' is weak evidence of absence"
        )
    return VerifyResult(
        model=suspect.source,
        model_sha256=suspect.sha256,
        arch=suspect.arch,
        alpha=alpha,
        detected=any(r.detected for r in out),
        results=out,
        probe_size=n_probe,
        correction="holm" if len(out) > 1 else None,
        warnings=warnings,
        seconds=time.perf_counter() - t0,
    )


def _marker_for(
    rec: MarkRecord, marker_spec: str | None, device: str, cache: dict[str, Any]
) -> Any:
    """The record's marking network (from --marker or the record), its identity checked."""
    from radmark.models import load_model
    from radmark.models.markers import marker_identity

    m = rec.signed["marker"]
    if m["id"] in cache:
        return cache[m["id"]]
    spec = marker_spec or m.get("source")
    if not spec:
        raise UsageError(
            f"mark record {address(rec.address)} does not say where its marker "
            "is: pass --marker FILE.safetensors"
        )
    try:
        marker = load_model(spec, device=device)
    except ModelError as exc:
        if marker_spec is not None:
            raise
        raise ModelError(
            f"the marker recorded in mark record {address(rec.address)[:19]}: "
            f"{exc.message}; pass --marker FILE if it moved"
        ) from None
    if marker_identity(marker.name, marker.sha256) != m["id"]:
        raise ModelError(
            f"marker {spec} is {marker_identity(marker.name, marker.sha256)}, "
            f"but the mark was made with {m['id']}"
        )
    cache[m["id"]] = marker
    return marker


def _white_box_tests(
    suspect: Any,
    selected: list[tuple[MarkRecord, SecretKey]],
    probe: Sequence[str],
    warnings: list[str],
    marker_models: dict[str, Any],
    *,
    marker_spec: str | None,
    device: str,
    probe_limit: int | None,
    center: bool,
    batch_size: int,
    pullback: bool,
    pullback_limit: int,
) -> tuple[dict[str, tuple[np.ndarray, dict[str, TestResult], Any]], int]:
    """Per record address: cosines, the white-box (and pull-back) tests, the alignment."""
    images, labels = _load_probe(probe, probe_limit)
    n_probe = int(images.shape[0])
    d_max = max(int(rec.signed["dim"]) for rec, _key in selected)
    if n_probe - (1 if center else 0) <= d_max:
        raise InputError(
            f"probe {', '.join(probe)} has {n_probe} images but the marker's features have "
            f"d={d_max}: the alignment needs well above d clean images (say {10 * d_max})"
        )
    f_s = _features(_gray_adapter(suspect), images, batch_size, device)
    w_s = suspect.weight().numpy()
    markers: dict[str, tuple[np.ndarray, Any]] = {}
    directions: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    out: dict[str, tuple[np.ndarray, dict[str, TestResult], Any]] = {}
    for rec, key in selected:
        m = rec.signed["marker"]
        if m["id"] not in markers:
            marker = _marker_for(rec, marker_spec, device, marker_models)
            f_m = _features(_gray_adapter(marker), images, batch_size, device)
            markers[m["id"]] = (f_m, fit_alignment(f_m, f_s, center=center))
        f_m, al = markers[m["id"]]
        d, c = int(rec.signed["dim"]), int(rec.signed["num_classes"])
        carriers = derive_carriers(key.carrier_seed(), d, c, m["id"])
        if carriers_digest(carriers) != rec.signed["carriers"]["sha256"]:
            raise IntegrityError(
                f"the key does not derive the carriers committed in record {address(rec.address)}"
            )
        w_tilde = map_classifier(w_s, al)
        cos = np.sum(w_tilde * carriers.astype(np.float64), axis=1)
        _lp, tests, _combined = white_box(cos, d)
        if pullback:
            if (m["id"], c) not in directions:
                mk = marker_models[m["id"]]
                directions[(m["id"], c)] = (
                    _pullback(suspect, mk, images, labels, c, pullback_limit, device),
                    _pullback(mk, mk, images, labels, c, pullback_limit, device),
                )
            v, v_ref = directions[(m["id"], c)]
            tests[PULLBACK_TEST] = pullback_test(
                residual_cosines(v, v_ref, carriers), d - 1, labelled=labels is not None
            )
        if al.r2 < POOR_ALIGNMENT_R2:
            warning = (
                f"alignment R² = {al.r2:.3g} is poor: the white-box test stays exact but has "
                "little power for this model"
                + (" (the pull-back test needs no alignment)" if pullback else "")
            )
            if warning not in warnings:
                warnings.append(warning)
        out[rec.address] = (cos, tests, al)
    return out, n_probe


def result_to_json(res: VerifyResult) -> dict[str, Any]:
    """The spec's JSON (cli.md): field names are a contract."""
    return {
        "model": res.model,
        "model_sha256": res.model_sha256,
        "arch": res.arch,
        "alpha": res.alpha,
        "detected": res.detected,
        "probe_size": res.probe_size,
        "correction": res.correction,
        "warnings": res.warnings,
        "seconds": res.seconds,
        "results": [
            {
                "fingerprint": r.fingerprint,
                "record": r.record,
                "marker": r.marker,
                "num_classes": r.num_classes,
                "dim": r.dim,
                "tests": {
                    k: {
                        "log10_p": t.log10_p,
                        "exact": t.exact,
                        "statistic": t.statistic,
                        "description": t.description,
                    }
                    for k, t in r.tests.items()
                },
                "log10_p": r.log10_p,
                "log10_p_adjusted": r.log10_p_adjusted,
                "detected": r.detected,
                "cosines": r.cosines,
                "class_log10_p": r.class_log10_p,
                "black_box": (
                    None
                    if r.black_box_ranks is None
                    else {"ranks": r.black_box_ranks, "slots": r.black_box_slots}
                ),
                "alignment": {
                    "r2": r.alignment_r2,
                    "relative_residual": r.alignment_residual,
                    "warning": r.alignment_warning,
                },
            }
            for r in res.results
        ],
    }


def plot(res: VerifyResult, path: Path) -> None:
    """Per-class cosines against the null density of the cosine in R^d (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'radmark[plot]'") from exc
    from scipy import special

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in res.results:
        d = r.dim
        lim = max(0.3, 1.2 * max(abs(c) for c in r.cosines), 6 / math.sqrt(d))
        xs = np.linspace(-lim, lim, 400)
        logf = ((d - 3) / 2) * np.log1p(-(xs**2)) - special.betaln(0.5, (d - 1) / 2)
        ax.plot(xs, np.exp(logf), color="grey", lw=1)
        ax.scatter(
            r.cosines,
            np.zeros(len(r.cosines)),
            marker="|",
            s=400,
            label=f"{r.fingerprint[:15]}… log10 p = {r.log10_p:.1f}",
        )
    ax.set_xlabel("cosine between mapped classifier row and carrier")
    ax.set_ylabel("null density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
