"""Leave-class-out alignment (``verify/alignment.crossfit_rows``, issue #17): correct, immune to a
marked probe, calibrated.

The synthetic world is the mechanism docs/method.md measured on glyphs: the suspect's features
carry class structure that the marker's clean features cannot predict, so when the probe's
marker features are moved along each image's own class carrier, a fit on the whole probe learns
"u_c predicts class c" and row c leans toward u_c. The marking here is far stronger than any real
mark (α = 1 against unit-variance features), so that the full fit's bias is unmistakable.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from radmark.errors import InputError
from radmark.verify.alignment import crossfit_rows, fit_alignment, map_classifier
from radmark.verify.statistics import fisher_log_sf, log_cosine_sf

C, D, DS, PER = 8, 16, 12, 200


def world(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), PER)
    z = rng.standard_normal((C * PER, D))  # the marker's features of the clean probe
    means = 2.0 * rng.standard_normal((C, DS))  # class structure only the suspect sees
    f_s = z @ rng.standard_normal((D, DS)) + means[y] + 0.1 * rng.standard_normal((C * PER, DS))
    return z, f_s, means, y, rng  # the suspect's classifier rows are its class means


def carriers(rng: np.random.Generator) -> np.ndarray:
    u = rng.standard_normal((C, D))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


@pytest.mark.parametrize("center", [False, True])
def test_each_row_is_the_fit_without_its_class(center: bool) -> None:
    z, f_s, w, y, rng = world(0)
    f_m = z + 0.3 * carriers(rng)[y]
    f_m[:, 3] = 0.0  # a dead feature (ReLU), as untrained markers have: the minimum-norm fit
    rows = crossfit_rows(w, f_m, f_s, y, center=center)
    for c in range(C):
        keep = y != c
        al = fit_alignment(f_m[keep], f_s[keep], center=center)
        np.testing.assert_allclose(rows[c], map_classifier(w, al)[c], atol=1e-9)


def test_clean_probe_rows_agree_with_the_full_fit() -> None:
    z, f_s, w, y, _ = world(1)
    full = map_classifier(w, fit_alignment(z, f_s))
    assert np.min(np.sum(full * crossfit_rows(w, z, f_s, y), axis=1)) > 0.99


def test_a_marked_probe_biases_the_full_fit_and_not_the_crossfit() -> None:
    z, f_s, w, y, rng = world(2)
    full, cross = [], []
    for _ in range(300):  # 300 keys, each marking the probe with its own carriers
        u = carriers(rng)
        f_m = z + 1.0 * u[y]
        full.append(np.sum(map_classifier(w, fit_alignment(f_m, f_s)) * u, axis=1))
        cross.append(np.sum(crossfit_rows(w, f_m, f_s, y) * u, axis=1))
    full_a, cross_a = np.array(full).ravel(), np.array(cross).ravel()
    se = 1.0 / np.sqrt(D) / np.sqrt(cross_a.size)  # null sd of a cosine is about 1/√d
    assert full_a.mean() > 10 * se  # the setting is sensitive: the full fit is biased
    assert abs(cross_a.mean()) < 4 * se
    assert stats.kstest(np.exp(log_cosine_sf(full_a, D)), "uniform").pvalue < 1e-6
    assert stats.kstest(np.exp(log_cosine_sf(cross_a, D)), "uniform").pvalue > 0.01


def test_fisher_stays_calibrated_over_keys_with_a_marked_probe() -> None:
    """Each class's cosine is exact; across classes the rows share other classes' carriers, a
    second-order dependence. Fisher over the classes, checked on 1,000 marking keys."""
    z, f_s, w, y, rng = world(3)
    p = []
    for _ in range(1000):
        u = carriers(rng)
        cos = np.sum(crossfit_rows(w, z + 1.0 * u[y], f_s, y) * u, axis=1)
        p.append(np.exp(fisher_log_sf(log_cosine_sf(cos, D))))
    p_a = np.array(p)
    assert stats.kstest(p_a, "uniform").pvalue > 0.01
    lo, hi = stats.binom.ppf([0.005, 0.995], p_a.size, 0.05) / p_a.size
    assert lo <= np.mean(p_a < 0.05) <= hi


def test_a_class_that_leaves_too_few_images_is_refused() -> None:
    z, f_s, w, y, _ = world(4)
    y = y.copy()
    y[: C * PER - D] = 0  # class 0 holds all but d images
    with pytest.raises(InputError, match="leave-class-out"):
        crossfit_rows(w, z, f_s, y)
