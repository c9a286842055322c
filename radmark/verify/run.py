"""``radmark verify``: is this model radioactive for my keys?

The flow: choose the mark records to test (:func:`select_records`), load the suspect and the probe
once (:func:`~radmark.verify.evidence.prepare`), check each key's carrier commitment, score each
record with the tests its method names and the evidence allows (:func:`~radmark.verify.tests.score`),
combine each record's exact tests into one p-value (:func:`~radmark.verify.tests.combine`), and
correct for the number of records tested with Holm (valid under any dependence). p-values stay in
natural log until the report renders them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from radmark.canonical import address
from radmark.errors import KeystoreError, ModelError, UsageError, check_count, check_positive
from radmark.keys.keypair import SecretKey
from radmark.keys.manage import is_key_file
from radmark.keys.records import MarkRecord
from radmark.keys.sealing import PassphraseFn, load_keyfile
from radmark.keys.store import Keystore
from radmark.verify.black_box import BLACK_BOX
from radmark.verify.evidence import Evidence, EvidenceSettings, prepare
from radmark.verify.pullback import PULLBACK
from radmark.verify.statistics import LN10, holm_adjust
from radmark.verify.tests import TestResult, combination_rule, combine, score
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
    log_p_adjusted: float  # after Holm over every record tested
    detected: bool
    combination: str

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


def select_records(
    store: Keystore, key_ref: str | None, passphrase: PassphraseFn, *, want_kit: bool = False
) -> list[tuple[MarkRecord, SecretKey]]:
    """The records to test with their secrets: one per set of carriers.

    Records with the same key, marker and (d, C) share their carriers, so they are one test, not
    several (testing twice would only cost power through the multiple-testing correction). Of
    such a group the newest record is tested, or with ``want_kit`` the newest that has a
    verification kit (a later ``mark`` without ``--kit-probe`` must not hide an earlier kit).
    """
    from radmark.marking.kit import kit_records

    secrets: dict[str, SecretKey] = {}
    if key_ref is not None and is_key_file(key_ref):
        key, pub = load_keyfile(Path(key_ref), passphrase)
        secrets[pub.fingerprint] = key
        records = store.mark_records(pub.fingerprint)
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
    groups: dict[tuple[str, str, int, int], list[MarkRecord]] = {}
    for rec in records:  # oldest first
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


def planned_tests(record: MarkRecord, *, offered: set[str], excluded: set[str]) -> list[str]:
    """The tests to run for ``record``: those its method names whose needs are offered.

    ``offered``: ``probe`` with --probe, ``kit`` with --black-box; ``excluded``: tests switched
    off by an option (--no-pullback).
    """
    from radmark.marking.methods import get_method
    from radmark.verify.tests import get_test

    return [
        name
        for name in get_method(record.method).tests
        if name not in excluded and get_test(name).needs <= offered
    ]


def score_record(evidence: Evidence, record: MarkRecord, key: SecretKey, names: Sequence[str]
                 ) -> dict[str, TestResult]:  # fmt: skip
    """Score one record after checking that ``key`` derives what the record committed to."""
    from radmark.marking.methods import get_method

    get_method(record.method).check_key(record, key)
    return score(evidence, record, key, names)


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
    check_positive("--alpha", alpha, below=1.0)
    check_count("--probe-limit", probe_limit)
    check_count("--pullback-limit", pullback_limit)
    check_count("--batch-size", batch_size)
    t0 = time.perf_counter()
    store = Keystore.open(keystore)
    selected = select_records(store, key_ref, passphrase, want_kit=black_box)
    offered = ({"probe"} if probe else set()) | ({"kit"} if black_box else set())
    excluded = set() if pullback else {PULLBACK}
    plans = {
        rec.address: planned_tests(rec, offered=offered, excluded=excluded)
        for rec, _key in selected
    }
    if black_box:  # a missing kit fails before any model is loaded
        from radmark.marking.kit import newest_kit

        for rec, _key in selected:
            newest_kit(store, rec)
    for rec, _key in selected:
        if not plans[rec.address]:
            raise UsageError(
                f"no test of mark record {rec.short} ({rec.method} method) can run: pass --probe "
                "SHARDS (clean images from the same distribution, never marked) or --black-box "
                "(outputs only, with the record's verification kit)"
            )
    settings = EvidenceSettings(
        device=device,
        batch_size=batch_size,
        center=center,
        pullback_limit=pullback_limit,
        marker_spec=marker_spec,
    )
    evidence = prepare(
        model_spec,
        store=store,
        probe=probe,
        probe_limit=probe_limit,
        arch=arch,
        head=head,
        settings=settings,
    )
    suspect = evidence.suspect
    for rec, _key in selected:  # cheap check before any feature extraction
        if suspect.num_classes != rec.num_classes:
            raise ModelError(
                f"{suspect.source} ({suspect.arch}) has {suspect.num_classes} classes but mark "
                f"record {rec.short} has {rec.num_classes}: the model's classes do not match "
                "the key's mark (pass --head NAME if another Linear layer is the classifier)"
            )
    scored = [(rec, score_record(evidence, rec, key, plans[rec.address])) for rec, key in selected]
    combined = [combine(tests.values()) for _rec, tests in scored]
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
        )
        for (rec, tests), comb, adj in zip(scored, combined, adjusted, strict=True)
    ]
    warnings = list(evidence.notes)
    if any(r.num_classes < LOW_POWER_CLASSES for r in results):
        warnings.append(
            f"only {min(r.num_classes for r in results)} classes: the white-box test has little "
            "power with few classes, so 'not detected' is weak evidence of absence"
        )
    return VerifyResult(
        model=suspect.source,
        model_sha256=suspect.sha256,
        arch=suspect.arch,
        alpha=alpha,
        detected=any(r.detected for r in results),
        results=results,
        probe_size=int(evidence.probe.images.shape[0]) if evidence.probe is not None else 0,
        correction="holm" if len(results) > 1 else None,
        warnings=warnings,
        seconds=time.perf_counter() - t0,
    )
