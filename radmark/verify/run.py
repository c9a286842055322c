"""``radmark verify``: is this model radioactive for my keys?

The flow: choose the mark records to test (:func:`select_records`), load the suspect and the probe
once (:func:`~radmark.verify.evidence.prepare`), check each key's carrier commitment, score each
record with the tests its verification plan names, or the options chose
(:func:`~radmark.verify.choice.choose_tests`, :func:`~radmark.verify.tests.score`),
combine each record's exact tests into one p-value (:func:`~radmark.verify.tests.combine`), and
correct over every (model, record) pair tested with Holm (valid under any dependence). p-values stay in
natural log until the report renders them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from radmark.canonical import address
from radmark.errors import KeystoreError, ModelError, UsageError, check_count, check_positive
from radmark.keys.keypair import SecretKey
from radmark.keys.manage import is_key_file
from radmark.keys.plan import Conduct, Plan, PlanStatus, compare, probe_digest
from radmark.keys.records import MarkRecord
from radmark.keys.sealing import PassphraseFn, load_keyfile
from radmark.keys.store import Keystore
from radmark.verify.black_box import BLACK_BOX
from radmark.verify.choice import NO_KIT, choose_tests
from radmark.verify.evidence import Evidence, EvidenceSettings, prepare
from radmark.verify.statistics import LN10, holm_adjust
from radmark.verify.tests import TestResult, combination_rule, combine, get_test, score
from radmark.verify.white_box import WHITE_BOX

LOW_POWER_CLASSES = 30


@dataclass(frozen=True)
class KeyResult:
    """One mark record tested against the suspect. ``log_p`` values are natural logs."""

    fingerprint: str
    record: str
    marker: str
    method: str
    num_classes: int
    dim: int
    tests: dict[str, TestResult]
    log_p: float  # the verdict-bearing combination of the exact tests
    log_p_adjusted: float  # after Holm over every (model, record) pair tested
    detected: bool
    combination: str
    plan: PlanStatus = field(default_factory=lambda: PlanStatus(registered=False))
    model: str = ""
    model_sha256: str = ""

    @property
    def exploratory(self) -> bool:
        """True unless the result followed the plan its record signed at marking."""
        return not self.plan.followed

    @property
    def log10_p(self) -> float:
        return self.log_p / LN10

    @property
    def log10_p_adjusted(self) -> float:
        return self.log_p_adjusted / LN10

    @property
    def cosines(self) -> list[float]:
        t = self.tests.get(WHITE_BOX)
        return list(t.units) if t is not None else []

    @property
    def class_log10_p(self) -> list[float]:
        t = self.tests.get(WHITE_BOX)
        return [v / LN10 for v in t.unit_log_p] if t is not None else []

    @property
    def black_box_ranks(self) -> list[int] | None:
        t = self.tests.get(BLACK_BOX)
        return [int(r) for r in t.units] if t is not None else None

    @property
    def black_box_slots(self) -> int | None:
        t = self.tests.get(BLACK_BOX)
        return t.slots if t is not None else None

    @property
    def alignment_r2(self) -> float | None:
        t = self.tests.get(WHITE_BOX)
        return t.extra.get("alignment_r2") if t is not None else None

    @property
    def alignment_residual(self) -> float | None:
        t = self.tests.get(WHITE_BOX)
        return t.extra.get("alignment_residual") if t is not None else None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    sha256: str
    arch: str


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
    models: list[ModelInfo] = field(default_factory=list)

    @property
    def preregistered(self) -> bool:
        """True when every result followed the plan its record signed at marking."""
        return all(not r.exploratory for r in self.results)


def select_records(
    store: Keystore,
    key_ref: str | Sequence[str] | None,
    passphrase: PassphraseFn,
    *,
    want_kit: bool = False,
) -> list[tuple[MarkRecord, SecretKey]]:
    """The records to test with their secrets: one per set of carriers, over every key named
    (``key_ref``: one reference or several; None: every record in the keystore).

    Records with the same key, marker and (d, C) share their carriers, so they are one test, not
    several (testing twice would only cost power through the multiple-testing correction), even
    when two references name the same key. Of such a group the newest record is tested, or with
    ``want_kit`` the newest that has a verification kit (a later ``mark`` without
    ``--kit-probe`` must not hide an earlier kit).
    """
    from radmark.marking.kit import kit_records

    refs = [key_ref] if key_ref is None or isinstance(key_ref, str) else list(key_ref)
    secrets: dict[str, SecretKey] = {}
    found: dict[str, MarkRecord] = {}
    for ref in refs:
        if ref is not None and is_key_file(ref):
            key, pub = load_keyfile(Path(ref), passphrase)
            secrets[pub.fingerprint] = key
            records = store.mark_records(pub.fingerprint)
        elif ref is not None:
            try:
                records = [store.mark_record(ref)]
            except KeystoreError:
                records = store.mark_records(store.key_record(ref).fingerprint)
        else:
            records = store.mark_records()
        if not records:
            raise KeystoreError(
                f"no mark records in keystore {store.root}"
                + (f" for {ref}" if ref else "")
                + ": mark data with `radmark mark` first, or pass --keystore"
            )
        found.update((rec.address, rec) for rec in records)
    groups: dict[tuple[str, str, int, int], list[MarkRecord]] = {}
    for rec in sorted(found.values(), key=lambda r: (r.created, r.address)):  # oldest first
        groups.setdefault(rec.carrier_group, []).append(rec)
    chosen = []
    for recs in groups.values():
        with_kit = [r for r in recs if kit_records(store, r)] if want_kit else []
        chosen.append((with_kit or recs)[-1])
    out = []
    for rec in chosen:
        if rec.fingerprint not in secrets:
            secrets[rec.fingerprint] = store.secret(rec.fingerprint, passphrase)[0]
        out.append((rec, secrets[rec.fingerprint]))
    return out


def score_record(evidence: Evidence, record: MarkRecord, key: SecretKey, names: Sequence[str]
                 ) -> dict[str, TestResult]:  # fmt: skip
    """Score one record after checking that ``key`` derives what the record committed to."""
    from radmark.marking.methods import get_method

    get_method(record.method).check_key(record, key)
    return score(evidence, record, key, names)


def _plan_of(rec: MarkRecord) -> Plan | None:
    return Plan.from_record(rec.plan) if rec.plan is not None else None


def verify_model(model_spec: str, **kwargs: Any) -> VerifyResult:
    """One model against every selected mark record (see :func:`verify_models`)."""
    return verify_models([model_spec], **kwargs)


def verify_models(
    model_specs: Sequence[str],
    *,
    keystore: Path,
    probe: Sequence[str],
    key_ref: str | Sequence[str] | None = None,
    marker_spec: str | None = None,
    arch: str | None = None,
    head: str | None = None,
    alpha: float | None = None,
    device: str = "cpu",
    probe_limit: int | None = None,
    center: bool | None = None,
    batch_size: int = 256,
    passphrase: PassphraseFn = lambda: None,
    pullback: bool | None = None,
    pullback_limit: int | None = None,
    black_box: bool | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> VerifyResult:
    """Test every model against every selected mark record; see the module docstring.

    Options left at None follow the verification plan the record signed at marking (the tests,
    α, centring, probe and pull-back limits, head); anything that differs from the plan is
    reported as a deviation and the result as exploratory (``keys/plan.py``); which tests run is
    ``verify/choice.py``. A planned kit test runs on the record's first verification kit, or is
    reported as not run when the keystore has none. ``black_box`` True asks for the kit test (a
    missing kit is then an error), False turns it off; with ``black_box`` and no ``probe`` it
    runs alone. Records without a plan run what the options offer (``pullback`` on and
    ``black_box`` off when unset). Holm corrects over every (model, record) pair tested.
    """
    if not model_specs:
        raise UsageError("name at least one model to verify")
    check_count("--probe-limit", probe_limit)
    check_count("--pullback-limit", pullback_limit)
    check_count("--batch-size", batch_size)
    t0 = time.perf_counter()
    store = Keystore.open(keystore)
    # every key named (or every record): one Holm family over all of them
    selected = select_records(store, key_ref or None, passphrase, want_kit=black_box is True)
    first = _plan_of(selected[0][0]) or Plan(tests=("none",))
    alpha = first.alpha if alpha is None else alpha
    check_positive("--alpha", alpha, below=1.0)
    center = first.center if center is None else center
    probe_limit = first.probe_limit if probe_limit is None else probe_limit
    pullback_limit = first.pullback_limit if pullback_limit is None else pullback_limit
    head = first.head if head is None else head
    from radmark.marking.kit import first_kit, kit_records

    has_kit = {rec.address: bool(kit_records(store, rec)) for rec, _key in selected}
    if black_box and not any(has_kit.values()):  # asked for a kit no record has: fail early
        first_kit(store, selected[0][0])
    plans = {rec.address: choose_tests(rec, _plan_of(rec), probe=bool(probe), black_box=black_box,
                                       pullback=pullback, has_kit=has_kit[rec.address])
             for rec, _key in selected}  # fmt: skip
    # each record is tested with what it has (issue #12 §7): a record without a kit is reported
    warnings: list[str] = []
    runnable = []
    for rec, key in selected:
        if any(get_test(n).exact for n in plans[rec.address].names):
            runnable.append((rec, key))
            if plans[rec.address].not_run:
                warnings.append(f"mark record {rec.short}: {', '.join(plans[rec.address].not_run)}"
                                f" did not run ({NO_KIT})")  # fmt: skip
        elif len(selected) > 1:
            warnings.append(f"mark record {rec.short} was not tested: none of its tests can run "
                            f"with these options ({NO_KIT}; pass --probe)")  # fmt: skip
    if not runnable:
        rec = selected[0][0]
        raise UsageError(
            f"no test of mark record {rec.short} ({rec.method} method) can run: pass --probe "
            "SHARDS (clean images from the same distribution, never marked) or --black-box "
            "(outputs only, with the record's verification kit)"
        )
    selected = runnable
    if probe:  # before any work: a marked probe biases the white-box test (verify/guard.py)
        from radmark.verify.guard import check_probe_shards

        check_probe_shards(probe, store.mark_records(None))
    settings = EvidenceSettings(device=device, batch_size=batch_size, center=center,
                                pullback_limit=pullback_limit, marker_spec=marker_spec)  # fmt: skip
    pairs: list[tuple[Evidence, MarkRecord, dict[str, TestResult], PlanStatus]] = []
    models: list[ModelInfo] = []
    for spec in model_specs:
        evidence = prepare(spec, store=store, probe=probe, probe_limit=probe_limit, arch=arch,
                           head=head, settings=settings)  # fmt: skip
        if progress is not None:  # the bar moves within a pair too: features batch by batch
            evidence.on_step = partial(_step, progress, pairs, len(model_specs) * len(selected))
        s = evidence.suspect
        models.append(ModelInfo(s.source, s.sha256, s.arch))
        _check_suspect(evidence, selected, store)
        digest = (probe_digest(evidence.probe.images, evidence.probe.labels)
                  if evidence.probe is not None else None)  # fmt: skip
        for rec, key in selected:
            if progress is not None:
                progress(len(pairs), len(model_specs) * len(selected), f"{spec} vs {rec.short}")
            tests = score_record(evidence, rec, key, plans[rec.address].names)
            ran = tuple(n for n, t in tests.items() if t.exact)
            conduct = Conduct(
                tests=ran, alpha=alpha, center=center, probe_limit=probe_limit,
                probe_sha256=digest if any("probe" in get_test(n).needs for n in ran) else None,
                pullback_limit=pullback_limit, head=head,
                kit=_kit_used(evidence, rec) if BLACK_BOX in tests else None,
                not_run=plans[rec.address].not_run,
            )  # fmt: skip
            pairs.append((evidence, rec, tests, compare(_plan_of(rec), conduct)))
        warnings += [n for n in evidence.notes if n not in warnings]
    combined = [combine(tests.values()) for _e, _rec, tests, _s in pairs]
    adjusted = holm_adjust(np.array(combined))
    log_alpha = math.log(alpha)
    results = [
        KeyResult(
            fingerprint=address(rec.fingerprint),
            record=address(rec.address),
            marker=rec.marker.id,
            method=rec.method,
            num_classes=rec.num_classes,
            dim=rec.dim,
            tests=tests,
            log_p=comb,
            log_p_adjusted=float(adj),
            detected=bool(adj <= log_alpha),
            combination=combination_rule(tests.values()),
            plan=status,
            model=ev.suspect.source,
            model_sha256=ev.suspect.sha256,
        )  # fmt: skip
        for (ev, rec, tests, status), comb, adj in zip(pairs, combined, adjusted, strict=True)
    ]
    # the class-row tests' power grows with C; twin ranks draw theirs from the marked images
    few = [
        r.num_classes for r in results if r.num_classes < LOW_POWER_CLASSES and WHITE_BOX in r.tests
    ]
    if few:
        warnings.append(
            f"only {min(few)} classes: the white-box test has little "
            "power with few classes, so 'not detected' is weak evidence of absence"
        )
    n_models, n_keys = len(models), len(selected)
    return VerifyResult(
        model=models[0].model, model_sha256=models[0].sha256, arch=models[0].arch,
        alpha=alpha, detected=any(r.detected for r in results), results=results,
        probe_size=int(pairs[0][0].probe.images.shape[0]) if pairs[0][0].probe is not None else 0,
        correction=(f"holm over {n_models} models x {n_keys} keys" if n_models > 1 else "holm")
        if len(results) > 1 else None,
        warnings=warnings, seconds=time.perf_counter() - t0, models=models,
    )  # fmt: skip


def _step(progress: Callable[[int, int, str], None], pairs: list[Any], total: int, what: str
          ) -> None:  # fmt: skip
    progress(len(pairs), total, what)


def _check_suspect(evidence: Evidence, selected: list[tuple[MarkRecord, SecretKey]],
                   store: Keystore) -> None:  # fmt: skip
    """Cheap checks before any feature extraction: classes match, no marked image in the probe."""
    suspect = evidence.suspect
    for rec, key in selected:
        if suspect.num_classes != rec.num_classes:
            raise ModelError(
                f"{suspect.source} ({suspect.arch}) has {suspect.num_classes} classes but mark "
                f"record {rec.short} has {rec.num_classes}: the model's classes do not match "
                "the key's mark (pass --head NAME if another Linear layer is the classifier)"
            )
        if evidence.probe is not None:  # the pixel half of the probe guard (verify/guard.py)
            from radmark.marking.manifest import pixel_index
            from radmark.verify.guard import check_probe_pixels

            check_probe_pixels(evidence.probe, key, pixel_index(store.root, rec.address),
                               rec.short)  # fmt: skip


def _kit_used(evidence: Evidence, rec: MarkRecord) -> dict[str, int]:
    kit_rec, _kit = evidence.kit(rec)
    return {"decoys": kit_rec.decoys, "per_class": kit_rec.per_class}
