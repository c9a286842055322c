"""The paper's white-box test (Sablayrolles et al. 2020, §4): aligned classifier rows vs carriers.

Features of the marker φ and of the suspect on a clean probe set; least squares
X = argmin ‖F_m X − F_s‖; the suspect's classifier mapped into φ's space, W̃ = W_s Xᵀ (rows
normalised); per class c_k = W̃_k·u_k, whose exact null (any model that never saw the secret
carriers) is the cosine of a fixed vector with a uniform random direction in R^d; classes
combined with Fisher. The randomness is in the carriers, so the test is exact for any model,
clean or not, provided the model and the probe set are independent of the key. With a labelled
probe, row k is mapped by a fit that leaves out the probe images of class k (issue #17), so
images marked with the key that reach the probe are harmless too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from radmark.keys.carriers import derive_carriers
from radmark.verify.statistics import fisher_log_sf, log_cosine_sf, log_normal_sf, zscore
from radmark.verify.tests import TestResult, register_test

if TYPE_CHECKING:
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.verify.evidence import Evidence

WHITE_BOX = "white_box_fisher"
WHITE_BOX_ZSCORE = "white_box_zscore"


def carriers_for(record: MarkRecord, key: SecretKey) -> np.ndarray:
    """The key's carriers for this record's marker and shape, float32 [C, d]."""
    return derive_carriers(key.carrier_seed(), record.dim, record.num_classes, record.marker.id)


def mapped_cosines(evidence: Evidence, record: MarkRecord, key: SecretKey) -> np.ndarray:
    """c_k = W̃_k · u_k for every class: float64 [C] (key-independent parts cached)."""
    rows = evidence.mapped_rows(record)
    return np.sum(rows * carriers_for(record, key).astype(np.float64), axis=1)


def fisher_cosine_test(
    name: str,
    cosines: np.ndarray,
    d: int,
    description: str,
    randomisation: str = "carriers",
    extra: dict[str, float] | None = None,
) -> TestResult:
    """Fisher over the per-class exact cosine tails (the white-box and pull-back statistic)."""
    lp = log_cosine_sf(cosines, d)
    return TestResult(
        name=name,
        log_p=fisher_log_sf(lp),
        exact=True,
        statistic=float(-2.0 * np.sum(lp)),
        description=description,
        randomisation=randomisation,
        units=tuple(float(c) for c in cosines),
        unit_log_p=tuple(float(v) for v in lp),
        extra={"dim": float(d), **(extra or {})},
    )


class WhiteBoxTest:
    name = WHITE_BOX
    exact = True
    randomisation = "carriers"
    needs = frozenset({"probe"})
    description = "Fisher over per-class exact cosine tails (paper, white box)"

    def available(self, evidence: Evidence, record: MarkRecord) -> str | None:
        return None if evidence.probe is not None else "it needs --probe (clean images)"

    def run(self, evidence: Evidence, record: MarkRecord, key: SecretKey) -> TestResult:
        cos = mapped_cosines(evidence, record, key)
        al = evidence.alignment(record)
        quality = {"alignment_r2": al.r2, "alignment_residual": al.relative_residual}
        return fisher_cosine_test(self.name, cos, record.dim, self.description, extra=quality)


class WhiteBoxZScore:
    """mean(c)·√(C·d) with a normal tail: an approximation, shown for information only."""

    name = WHITE_BOX_ZSCORE
    exact = False
    randomisation = "carriers"
    needs = frozenset({"probe"})
    description = "mean(c)·√(C·d), normal approximation (informative only)"

    def available(self, evidence: Evidence, record: MarkRecord) -> str | None:
        return None if evidence.probe is not None else "it needs --probe (clean images)"

    def run(self, evidence: Evidence, record: MarkRecord, key: SecretKey) -> TestResult:
        z = zscore(mapped_cosines(evidence, record, key), record.dim)
        return TestResult(
            self.name, log_normal_sf(z), False, z, self.description, self.randomisation
        )


register_test(WhiteBoxTest())
register_test(WhiteBoxZScore())
