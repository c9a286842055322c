from __future__ import annotations

import itertools
import math
import time
from fractions import Fraction

import numpy as np
import pytest

from radmark.errors import UsageError
from radmark.verify import statistics as stats
from radmark.verify.statistics import fisher_log_sf, rank_log_sf, to_log10

SMALL = [(slots, c) for slots in (2, 3, 5, 8) for c in (1, 2, 3, 4)]


def _all_tuples(slots: int, c: int) -> np.ndarray:
    return np.array(list(itertools.product(range(1, slots + 1), repeat=c)), dtype=np.int64)


def _observed(slots: int, c: int) -> list[tuple[int, ...]]:
    """Every multiset of ranks (the p-value is symmetric), capped to keep the test quick."""
    obs = list(itertools.combinations_with_replacement(range(1, slots + 1), c))
    return obs[:: max(1, len(obs) // 60)] + [obs[-1]]


@pytest.mark.parametrize("slots,c", SMALL)
@pytest.mark.parametrize("h", [0.1, 0.25])
def test_exact_on_the_coarse_lattice_by_enumeration(slots: int, c: int, h: float) -> None:
    """Count (in integers) the tuples whose rounded-up lattice sum is <= the observed one."""
    k = {r: math.ceil(math.log(r) / h) for r in range(1, slots + 1)}  # ln r rounded UP, in steps
    tuples = _all_tuples(slots, c)
    sums = np.array([sum(k[int(r)] for r in t) for t in tuples])
    for obs in _observed(slots, c):
        s_obs = sum(k[r] for r in obs)
        exact = Fraction(int(np.sum(sums <= s_obs)), slots**c)
        got = rank_log_sf(np.array(obs), slots, resolution=h, max_bins=10**6)
        assert math.exp(got) == pytest.approx(float(exact), rel=1e-10), obs


@pytest.mark.parametrize("slots,c", SMALL)
def test_fine_lattice_matches_the_product_of_ranks(slots: int, c: int) -> None:
    """With C·h below the smallest gap ln(P'/P) between distinct products P, P' <= slots^C, the
    statistic orders tuples exactly as Π r does (ties only among equal products), so
    #{Π r < Π obs} <= p·slots^C <= #{Π r <= Π obs}, with equality on the right whenever every
    tuple with the observed product is a permutation of the observed one."""
    h = 1e-5
    assert c * h < math.log1p(1 / slots**c)
    tuples = _all_tuples(slots, c)
    prods = np.prod(tuples, axis=1)
    for obs in _observed(slots, c):
        p_obs = math.prod(obs)
        below, at_most = int(np.sum(prods < p_obs)), int(np.sum(prods <= p_obs))
        got = math.exp(rank_log_sf(np.array(obs), slots, resolution=h, max_bins=4 * 10**6))
        n = slots**c
        assert below / n * (1 - 1e-10) <= got <= at_most / n * (1 + 1e-10), obs
        same = {tuple(sorted(t)) for t in tuples[prods == p_obs].tolist()}
        if len(same) == 1:
            assert got == pytest.approx(at_most / n, rel=1e-10), obs


def test_known_values_and_fisher_is_conservative() -> None:
    assert rank_log_sf(np.full(10, 40), 40) == 0.0
    assert rank_log_sf(np.full(3, 7), 7, resolution=0.01) == 0.0
    ones = np.ones(10, dtype=np.int64)
    exact = to_log10(rank_log_sf(ones, 40))
    assert exact == pytest.approx(-10 * math.log10(40), rel=1e-12)
    fisher = to_log10(fisher_log_sf(np.log(ones / 40)))
    assert fisher > exact + 8  # Fisher on discrete p-values: ≈ −7.36 versus −16.02
    assert to_log10(rank_log_sf(np.ones(10, dtype=np.int64), 20)) == pytest.approx(
        -10 * math.log10(20), rel=1e-12
    )
    # One decoy tie on a single class among 10: P(S <= g(2)) = (1 + 10)/40^10 exactly.
    r = ones.copy()
    r[3] = 2
    assert rank_log_sf(r, 40) == pytest.approx(math.log(11) - 10 * math.log(40), rel=1e-12)


def _rejection_rates(log_p: np.ndarray, alphas: tuple[float, ...]) -> list[float]:
    return [float(np.mean(log_p <= math.log(a))) for a in alphas]


def test_calibrated_under_uniform_ranks() -> None:
    rng = np.random.default_rng(2024)
    n, c, slots = 20_000, 10, 40
    draws = rng.integers(1, slots + 1, size=(n, c))
    log_p = np.array([rank_log_sf(r, slots) for r in draws])
    fisher = np.array([fisher_log_sf(np.log(r / slots)) for r in draws])
    alphas = (0.001, 0.01, 0.05, 0.2)
    for a, rate, f_rate in zip(
        alphas, _rejection_rates(log_p, alphas), _rejection_rates(fisher, alphas), strict=True
    ):
        slack = 3.5 * math.sqrt(a * (1 - a) / n) + 1 / n
        assert rate <= a + slack, (a, rate)
        if a >= 0.01:
            assert rate >= 0.7 * a, (a, rate)  # exact up to discreteness: not conservative
        assert f_rate <= rate + slack  # Fisher never rejects more (it is the conservative one)
    assert _rejection_rates(log_p, (0.05,))[0] >= 0.035


def test_valid_under_super_uniform_ranks_from_ties() -> None:
    """Scores on a coarse grid: ties count against us, so ranks are stochastically larger."""
    rng = np.random.default_rng(7)
    n, c, decoys = 10_000, 8, 19
    scores = rng.integers(0, 6, size=(n, c, decoys + 1))
    ranks = 1 + np.sum(scores[..., 1:] >= scores[..., :1], axis=-1)
    assert ranks.min() >= 1 and ranks.max() <= decoys + 1
    log_p = np.array([rank_log_sf(r, decoys + 1) for r in ranks])
    for a in (0.01, 0.05, 0.2):
        rate = float(np.mean(log_p <= math.log(a)))
        assert rate <= a + 3.5 * math.sqrt(a * (1 - a) / n), (a, rate)


def test_extreme_tail_stays_finite_and_fast() -> None:
    t0 = time.perf_counter()
    ones = np.ones(1000, dtype=np.int64)
    lp = rank_log_sf(ones, 40)
    assert math.isfinite(lp)
    assert to_log10(lp) == pytest.approx(-1000 * math.log10(40), rel=1e-6)
    # A few weaker classes: still finite, weaker than all-ones, far stronger than Fisher's.
    r = ones.copy()
    r[:10] = 40
    lp2 = rank_log_sf(r, 40)
    assert math.isfinite(lp2) and lp < lp2 < fisher_log_sf(np.log(r / 40))
    assert to_log10(lp2) < -1500
    assert time.perf_counter() - t0 < 10.0


def test_monotone_in_each_rank() -> None:
    rng = np.random.default_rng(3)
    for _ in range(60):
        slots = int(rng.integers(2, 41))
        c = int(rng.integers(1, 13))
        r = rng.integers(1, slots + 1, size=c)
        base = rank_log_sf(r, slots)
        assert base <= 0.0
        i = int(rng.integers(c))
        if r[i] > 1:
            lower = r.copy()
            lower[i] = int(rng.integers(1, r[i]))
            assert rank_log_sf(lower, slots) <= base + 1e-12


def test_deterministic_regardless_of_cache() -> None:
    r_lo = np.array([1, 2, 3, 1, 5, 2])
    r_hi = np.array([30, 38, 40, 25, 33, 39])
    stats._RANK_CDF_CACHE.clear()
    a = (rank_log_sf(r_lo, 40), rank_log_sf(r_hi, 40))
    stats._RANK_CDF_CACHE.clear()
    rank_log_sf(np.full(6, 20), 40)  # grows the table in a different order
    b = (rank_log_sf(r_hi, 40), rank_log_sf(r_lo, 40))
    assert a == (b[1], b[0])


@pytest.mark.parametrize(
    "ranks,slots,kwargs",
    [
        (np.array([1, 2]), 1, {}),
        (np.array([1, 2]), 2.5, {}),
        (np.array([1, 2]), True, {}),
        (np.array([], dtype=np.int64), 5, {}),
        (np.array([0, 2]), 5, {}),
        (np.array([1, 6]), 5, {}),
        (np.array([1.5, 2.0]), 5, {}),
        (np.array([1.0, np.nan]), 5, {}),
        (np.array([True, False]), 5, {}),
        (np.array(["1", "2"]), 5, {}),
        (np.array([1, 2]), 5, {"resolution": 0.0}),
        (np.array([1, 2]), 5, {"resolution": float("inf")}),
        (np.array([1, 2, 3]), 5, {"max_bins": 3}),
    ],
)
def test_rejects_bad_input(ranks: np.ndarray, slots: object, kwargs: dict) -> None:
    with pytest.raises(UsageError) as err:
        rank_log_sf(ranks, slots, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in err.value.message
