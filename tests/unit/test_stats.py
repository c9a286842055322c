from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from scipy import stats as st

from radmark.keys.carriers import derive_carriers
from radmark.verify.statistics import (
    bonferroni_min,
    fisher_log_sf,
    holm_adjust,
    log_cosine_sf,
    to_log10,
    zscore,
)


def _random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("d", [2, 16, 512, 2048])
def test_matches_scipy_where_linear_space_works(d: int) -> None:
    c = np.linspace(-0.95, 0.95, 39)
    ref = st.beta.logsf((c + 1) / 2, (d - 1) / 2, (d - 1) / 2)
    got = log_cosine_sf(c, d)
    ok = ref > -600  # scipy's own values are trustworthy there
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("d,c", [(2048, 0.3), (2048, 0.5), (512, 0.9), (512, 0.999), (64, 0.99)])
def test_matches_high_precision_in_the_far_tail(d: int, c: float) -> None:
    mp.mp.dps = 60
    a = mp.mpf(d - 1) / 2
    exact = float(mp.log(mp.betainc(a, mp.mpf(1) / 2, 0, 1 - mp.mpf(c) ** 2, regularized=True) / 2))
    assert log_cosine_sf(c, d) == pytest.approx(exact, rel=1e-9)


def test_far_below_float64_is_finite() -> None:
    lp = log_cosine_sf(np.full(1000, 0.5), 2048)
    combined = to_log10(fisher_log_sf(lp))
    assert math.isfinite(combined)
    assert combined < -100_000  # linear-space code returns -inf here
    assert st.chi2.sf(-2 * np.sum(lp), 2 * lp.size) == 0.0  # linear space underflows: log10 = -inf


@pytest.mark.parametrize("d", [16, pytest.param(512, marks=pytest.mark.slow)])
def test_matches_monte_carlo(d: int) -> None:
    rng = np.random.default_rng(d)
    u = _random_unit(rng, 200_000, d)[:, 0]  # cosine with e_1
    for c in (0.0, 0.5 / math.sqrt(d), 2.0 / math.sqrt(d)):
        emp = np.mean(u >= c)
        se = math.sqrt(emp * (1 - emp) / u.size)
        assert abs(math.exp(log_cosine_sf(c, d)) - emp) < 5 * se + 1e-4


def test_monotone_decreasing_in_c() -> None:
    c = np.linspace(-1, 1, 2001)
    lp = log_cosine_sf(c, 512)
    assert np.all(np.diff(lp) <= 1e-15)
    assert lp[0] == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(lp[-1])


def test_null_uniform_random_directions_vs_carriers() -> None:
    """Under H0 (a direction independent of the key) the per-class p-values are uniform."""
    rng = np.random.default_rng(0)
    d, n = 64, 4000
    carriers = np.concatenate(
        [derive_carriers(i.to_bytes(32, "big"), d, 10, "m") for i in range(n // 10)]
    )
    w = _random_unit(rng, n, d)
    cos = np.sum(w * carriers.astype(np.float64), axis=1)
    p = np.exp(log_cosine_sf(cos, d))
    assert st.kstest(p, "uniform").pvalue > 0.01
    comb = np.array(
        [math.exp(fisher_log_sf(log_cosine_sf(cos[i : i + 10], d))) for i in range(0, n, 10)]
    )
    assert st.kstest(comb, "uniform").pvalue > 0.01


def test_fisher_matches_scipy_chi2() -> None:
    rng = np.random.default_rng(1)
    for k in (1, 2, 10, 100):
        p = rng.uniform(1e-6, 1, k)
        ref = st.chi2.logsf(-2 * np.sum(np.log(p)), 2 * k)
        assert fisher_log_sf(np.log(p)) == pytest.approx(ref, rel=1e-9)
    assert fisher_log_sf(np.zeros(5)) == 0.0


def test_zscore_and_holm_and_bonferroni() -> None:
    assert zscore(np.full(10, 0.1), 100) == pytest.approx(0.1 * math.sqrt(1000))
    lp = np.log([0.01, 0.04, 0.03, 0.5])
    adj = np.exp(holm_adjust(lp))
    np.testing.assert_allclose(adj, [0.04, 0.09, 0.09, 0.5])
    assert math.exp(bonferroni_min(np.log([0.01, 0.2]))) == pytest.approx(0.02)
    assert bonferroni_min(np.log([0.9, 0.8])) == 0.0


def test_rejects_out_of_range() -> None:
    from radmark.errors import UsageError

    with pytest.raises(UsageError):
        log_cosine_sf(1.5, 10)
    with pytest.raises(UsageError):
        log_cosine_sf(float("nan"), 10)
    with pytest.raises(UsageError):
        fisher_log_sf(np.array([0.5]))
