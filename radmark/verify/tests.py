"""The detection-test seam: what a test of one key against one suspect returns, and the registry.

A test is an object with a ``name``, whether its p-value is ``exact``, the part of the key its
null comes from (``randomisation``), what it ``needs`` from the user (a clean ``probe`` set, a
verification ``kit``), ``available(evidence, record)`` (``None`` when it can run,
else why not) and ``run(evidence, record, key) -> TestResult``. Everything that does not depend on
the key is computed once in :class:`~radmark.verify.evidence.Evidence` (a test caches its own such
work with ``Evidence.cached``); :func:`score` runs the selected tests of one key against it.
``radmark verify``, the benchmark's null calibrations (``bench/run.py``) and the null and
false-positive tests (``tests/unit/test_kit.py``, ``test_twins.py``,
``tests/e2e/test_false_positive_rate.py``) all call :func:`score`, so the verdict's statistics
have one implementation (unit tests of a raw statistic, such as a rank tie rule, call it directly).

p-values stay in natural log (``log_p``) until a report renders them.

Combining (:func:`combine`): tests whose nulls come from the same randomisation of the key are
dependent (they see the same carriers), so they are combined by Bonferroni on the minimum (valid
under any dependence). Tests drawn from disjoint HKDF streams of the key are independent given the
model under H0 (each is a function of the model and its own stream), so the per-stream p-values
are combined by Fisher's rule, which is exact for independent uniform p-values and valid for
super-uniform ones (its statistic is monotone in each p). docs/method.md states the argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from radmark.errors import UsageError
from radmark.verify.statistics import LN10, bonferroni_min, fisher_log_sf

if TYPE_CHECKING:
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.verify.evidence import Evidence


@dataclass(frozen=True)
class TestResult:
    """One test of one key. ``log_p`` is a natural log; exact unless ``exact`` is False.

    ``units`` are the per-unit statistics the test combined (per-class cosines, per-unit ranks),
    ``unit_log_p`` their ln p where each has one, ``slots`` the candidates per unit of a rank test.
    """

    __test__ = False  # not a pytest class

    name: str
    log_p: float
    exact: bool
    statistic: float
    description: str
    randomisation: str
    units: tuple[float, ...] = ()
    unit_log_p: tuple[float, ...] = ()
    slots: int | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def log10_p(self) -> float:
        return self.log_p / LN10


class DetectionTest(Protocol):
    """A registered test (see the module docstring)."""

    name: str
    exact: bool
    randomisation: str
    description: str
    needs: frozenset[str]  # what verification must offer: "probe" (clean images), "kit"

    def available(self, evidence: Evidence, record: MarkRecord) -> str | None: ...

    def run(self, evidence: Evidence, record: MarkRecord, key: SecretKey) -> TestResult: ...


TESTS: dict[str, DetectionTest] = {}


def register_test(test: DetectionTest) -> DetectionTest:
    """Add ``test`` to the registry (one line per test module)."""
    if test.name in TESTS:
        raise ValueError(f"test {test.name!r} is registered twice")
    TESTS[test.name] = test
    return test


def _load_builtin() -> None:
    # Importing a test module registers its tests.
    from radmark.verify import black_box, pullback, twin_rank, white_box  # noqa: F401


def get_test(name: str) -> DetectionTest:
    _load_builtin()
    try:
        return TESTS[name]
    except KeyError:
        raise UsageError(
            f"unknown test {name!r}; known tests: {', '.join(sorted(TESTS))}"
        ) from None


def score(
    evidence: Evidence, record: MarkRecord, key: SecretKey, names: Sequence[str]
) -> dict[str, TestResult]:
    """Run the tests ``names`` of one key (``record`` + its secret) against ``evidence``.

    The caller decides which tests apply (the plan); a test that cannot run here raises a
    UsageError naming why. The key's carrier commitment is *not* checked here: verification checks
    it before scoring, while null calibration scores fresh random keys against a real record.
    """
    out: dict[str, TestResult] = {}
    for name in names:
        test = get_test(name)
        why = test.available(evidence, record)
        if why is not None:
            raise UsageError(f"test {name} cannot run: {why}")
        out[name] = test.run(evidence, record, key)
    return out


def combine(results: Iterable[TestResult]) -> float:
    """ln p of the verdict from the exact tests: Bonferroni within a randomisation, Fisher across.

    Raises when no exact test ran: "could not evaluate" is never "not detected".
    """
    groups: dict[str, list[float]] = {}
    for r in results:
        if r.exact:
            groups.setdefault(r.randomisation, []).append(r.log_p)
    if not groups:
        raise UsageError("no exact test could run, so there is no verdict")
    per_group = [bonferroni_min(np.array(v)) for v in groups.values()]
    if len(per_group) == 1:
        return per_group[0]
    return fisher_log_sf(np.array(per_group))


def combination_rule(results: Iterable[TestResult]) -> str:
    """How :func:`combine` combined these results, in words (for the report)."""
    groups: dict[str, int] = {}
    for r in results:
        if r.exact:
            groups[r.randomisation] = groups.get(r.randomisation, 0) + 1
    parts = [f"Bonferroni over {n} tests" if n > 1 else "one test" for n in groups.values()]
    if len(groups) > 1:
        return f"Fisher over {len(groups)} independent randomisations ({'; '.join(parts)})"
    return "Bonferroni minimum over the exact tests" if parts and parts[0] != "one test" else ""


def log10(log_p: float) -> float:
    return log_p / LN10 if math.isfinite(log_p) else log_p
