"""The exact rank combination (radmark.verify.ranks.rank_log_sf) against independent exact answers.

Exact references, none sharing code with the FFT implementation: enumeration of every tuple
(tiny C), exact integer counting by truncated polynomial powers (deep tails at C = 1000 and
10,000), the binomial (slots = 2) and trinomial (slots = 3) closed forms, and the old sequential
log-space convolution kept as radmark.verify.lattice.rank_log_sf_reference.
"""

from __future__ import annotations

import itertools
import math
import time
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest
from scipy import special
from scipy.stats import binom

from radmark.errors import UsageError
from radmark.verify import ranks as stats
from radmark.verify.lattice import rank_lattice, rank_log_sf_reference
from radmark.verify.ranks import rank_log_sf, rank_tail
from radmark.verify.statistics import fisher_log_sf, to_log10

TOL = stats.RANK_LOG_TOL  # the documented guarantee, |Δ ln p| <= 1e-9
U = 2.0**-53

SMALL = [(slots, c) for slots in (2, 3, 5, 8) for c in (1, 2, 3, 4)]


def _all_tuples(slots: int, c: int) -> np.ndarray:
    return np.array(list(itertools.product(range(1, slots + 1), repeat=c)), dtype=np.int64)


def _observed(slots: int, c: int) -> list[tuple[int, ...]]:
    """Every multiset of ranks (the p-value is symmetric), capped to keep the test quick."""
    obs = list(itertools.combinations_with_replacement(range(1, slots + 1), c))
    return obs[:: max(1, len(obs) // 60)] + [obs[-1]]


@pytest.mark.parametrize("impl", [rank_log_sf, rank_log_sf_reference])
@pytest.mark.parametrize("slots,c", SMALL)
@pytest.mark.parametrize("h", [0.1, 0.25])
def test_exact_on_the_coarse_lattice_by_enumeration(slots: int, c: int, h: float, impl) -> None:
    """Count (in integers) the tuples whose rounded-up lattice sum is <= the observed one."""
    k = {r: math.ceil(math.log(r) / h) for r in range(1, slots + 1)}  # ln r rounded UP, in steps
    tuples = _all_tuples(slots, c)
    sums = np.array([sum(k[int(r)] for r in t) for t in tuples])
    for obs in _observed(slots, c):
        s_obs = sum(k[r] for r in obs)
        exact = Fraction(int(np.sum(sums <= s_obs)), slots**c)
        got = impl(np.array(obs), slots, resolution=h, max_bins=10**6)
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
    r_mid = np.array([20, 1, 17, 40, 8, 26])
    stats.clear_caches()
    a = (rank_log_sf(r_lo, 40), rank_log_sf(r_hi, 40), rank_log_sf(r_mid, 40))
    stats.clear_caches()
    rank_log_sf(np.full(6, 20), 40)  # builds the tables in a different order
    b = (rank_log_sf(r_mid, 40), rank_log_sf(r_hi, 40), rank_log_sf(r_lo, 40))
    assert a == (b[2], b[1], b[0])
    for r in (r_lo, r_hi, r_mid):  # a fresh table gives the cached table's value, bit for bit
        cached = rank_log_sf(r, 40)
        stats.clear_caches()
        assert rank_log_sf(r, 40) == cached


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


# --- the FFT implementation against independent exact answers ---------------------------------


def _ref_slack(c: int, ref: float) -> float:
    """The sequential reference rounds ln values of size up to |ln p| once per class: its own
    error reaches about C·u·|ln p| (9e-11 at C = 1000, log10 p = −1600)."""
    return 4 * U * c * (1.0 + abs(ref))


def _lattice_bins(slots: int, c: int, resolution: float = 1e-3, max_bins: int = 200_000):
    """The per-rank bins k(r) of the statistic's definition (shared by both implementations)."""
    h, k, top = rank_lattice(slots, c, resolution, max_bins)
    return h, [int(x) for x in k], top


def _exact_log_cdf(k: list[int], slots: int, c: int, s: int) -> mp.mpf:
    """ln P(Σ_c k(r_c) <= s) from the exact integer count of tuples (truncated polynomial power
    by squaring in Python integers), divided by slots^C. Cheap when s is a few hundred bins."""
    base = [0] * (s + 1)
    for x in k:
        if x <= s:
            base[x] += 1

    def mul(a: list[int], b: list[int]) -> list[int]:
        out = [0] * (s + 1)
        nz = [(j, y) for j, y in enumerate(b) if y]
        for i, x in enumerate(a):
            if x:
                for j, y in nz:
                    if i + j > s:
                        break
                    out[i + j] += x * y
        return out

    res, power, e = [1] + [0] * s, base, c
    while e:
        if e & 1:
            res = mul(res, power)
        e >>= 1
        if e:
            power = mul(power, power)
    with mp.workdps(40):
        return mp.log(sum(res)) - c * mp.log(slots)


def _observed_sum(k: list[int], ranks: np.ndarray) -> int:
    return int(sum(k[int(r) - 1] for r in ranks))


DEEP = [
    # (slots, C, ranks other than 1 as {rank: count}): s of at most a few hundred bins
    (40, 1000, {}),
    (40, 1000, {2: 1}),
    (40, 1000, {3: 5}),
    (40, 1000, {40: 1}),
    (40, 1000, {2: 3, 4: 2}),
    (8, 10_000, {2: 4}),
    (8, 10_000, {2: 20, 3: 5}),
    (2, 10_000, {2: 7}),
    (4, 10_000, {2: 9, 4: 1}),
    (1000, 1000, {2: 1, 900: 1}),
    (100, 300, {2: 2, 3: 3}),
]


@pytest.mark.parametrize("slots,c,others", DEEP)
def test_deep_tail_against_exact_integer_counts(slots: int, c: int, others: dict) -> None:
    """log10 p down to −1602 (C = 1000, slots 40, all ranks 1) and −9000 (C = 10,000, slots 8):
    the value agrees with the exact count to the documented 1e-9, and the bound each working
    precision reports covers its actual error."""
    _, k, _ = _lattice_bins(slots, c)
    r = np.ones(c, dtype=np.int64)
    at = 0
    for rank, n in others.items():
        r[at : at + n] = rank
        at += n
    s = _observed_sum(k, r)
    exact = _exact_log_cdf(k, slots, c, s)
    got = rank_log_sf(r, slots)
    assert abs(got - float(exact)) <= TOL, (got, exact)
    assert got < -100
    # Each working precision on its own: its reported bound must cover its actual error.
    vals, counts = np.unique(np.array(k), return_counts=True)
    g = int(np.gcd.reduce(vals))
    if s // g >= int(vals[1] // g):
        dtypes = [np.float64] + ([np.longdouble] if stats.LONG_DOUBLE_WIDER else [])
        for dt in dtypes:
            lp, err = stats.tilted_log_cdf(vals // g, counts, slots, c, s // g, dt)
            assert math.isfinite(err)
            # (+ half an ulp: the bound excludes the final rounding of ln p to float64)
            assert abs(lp - float(exact)) <= err + math.ulp(lp), (dt, lp, err, exact)
            if dt is np.longdouble:
                assert err <= TOL / 10


@pytest.mark.parametrize("c", [1, 7, 600, 2000, 10_000])
def test_slots_two_is_a_binomial_tail(c: int) -> None:
    """With slots = 2 the statistic counts rank-2 classes: P(S <= s) = P(Bin(C, ½) <= m)."""
    ms = sorted({0, 1, 2, 5, c // 4, c // 2 - 3, c // 2, c // 2 + 3, 3 * c // 4, c - 2, c - 1, c})
    for m in (m for m in ms if 0 <= m <= c):
        r = np.ones(c, dtype=np.int64)
        r[:m] = 2
        got = rank_log_sf(r, 2)
        if m == c:
            assert got == 0.0
            continue
        want = float(binom.logcdf(m, c, 0.5))
        if want < -700:  # scipy's logcdf is log(cdf): sum the log pmf where the cdf underflows
            want = float(special.logsumexp(binom.logpmf(np.arange(m + 1), c, 0.5)))
        assert abs(got - want) <= TOL + 1e-13 * abs(want), (c, m, got, want)


@pytest.mark.parametrize("c", [300, 2000])
def test_slots_three_is_a_trinomial_tail(c: int) -> None:
    """slots = 3 at large C: P(S <= s) = Σ_{n2·k2 + n3·k3 <= s} C!/(n1! n2! n3!) / 3^C, summed in
    log space over every (n2, n3); covers the bulk and upper half where the reference is slow."""
    _, k, top = _lattice_bins(3, c)
    n2, n3 = np.meshgrid(np.arange(c + 1), np.arange(c + 1), indexing="ij")
    ok = n2 + n3 <= c
    n2, n3 = n2[ok].astype(np.float64), n3[ok].astype(np.float64)
    log_mult = (
        special.gammaln(c + 1.0)
        - special.gammaln(c - n2 - n3 + 1.0)
        - special.gammaln(n2 + 1.0)
        - special.gammaln(n3 + 1.0)
        - c * math.log(3)
    )
    sums = n2 * k[1] + n3 * k[2]
    rng = np.random.default_rng(c)
    cases = [rng.integers(1, 4, c) for _ in range(4)]  # the bulk
    cases += [np.minimum(rng.integers(1, 4, c), 2) for _ in range(2)]  # the tail
    cases += [np.maximum(rng.integers(1, 4, c), 2) for _ in range(2)]  # the upper half
    cases += [np.where(rng.random(c) < 0.02, 3, 1)]  # far tail
    for r in cases:
        s = _observed_sum(k, r)
        if s >= c * top:
            continue
        want = float(special.logsumexp(log_mult[sums <= s]))
        got = rank_log_sf(r, 3)
        # gammaln of ~C log C carries ~1e-16 relative: allow that on top of the guarantee
        assert abs(got - want) <= TOL + 1e-14 * c, (c, s, got, want)


def _rank_draws(rng: np.random.Generator, slots: int, c: int) -> list[np.ndarray]:
    """Null draws, signal (low ranks), the upper half, and mostly-ones with a few strays."""
    out = [rng.integers(1, slots + 1, c)]
    out.append(rng.integers(1, max(2, slots // 4) + 1, c))
    out.append(rng.integers(max(1, (3 * slots) // 4), slots + 1, c))
    ones = np.ones(c, dtype=np.int64)
    m = int(rng.integers(0, max(1, c // 20) + 1))
    ones[:m] = rng.integers(1, slots + 1, m)
    out.append(rng.permutation(ones))
    out.append(np.where(rng.random(c) < 0.5, 1, rng.integers(1, slots + 1, c)))
    return out


def test_matches_the_reference_at_random_inputs() -> None:
    """Hundreds of random inputs (lattices kept small so the sequential reference stays quick):
    lower tail, bulk and upper half, on both sides of the reflection."""
    rng = np.random.default_rng(17)
    n = 0
    for _ in range(36):
        slots = int(rng.choice([2, 3, 5, 8, 10, 40, 100, 1000]))
        c = int(rng.choice([1, 2, 3, 7, 20, 60, 150, 400]))
        max_bins = int(rng.choice([2_000, 6_000, 20_000]))
        max_bins = max(max_bins, c + 1)
        if c * max_bins > 2_000_000:
            max_bins = max(c + 1, 2_000_000 // c)
        resolution = float(rng.choice([1e-3, 0.01, 0.1]))
        for r in _rank_draws(rng, slots, c):
            kw = {"resolution": resolution, "max_bins": max_bins}
            got = rank_log_sf(r, slots, **kw)
            ref = rank_log_sf_reference(r, slots, **kw)
            assert abs(got - ref) <= TOL + _ref_slack(c, ref), (slots, c, kw, r, got, ref)
            n += 1
    assert n == 36 * 5


def test_matches_the_reference_at_default_lattice_deep_tails() -> None:
    """C = 1000, slots = 40 at the default lattice, where the reference is cheap (small s)."""
    rng = np.random.default_rng(5)
    for _ in range(12):
        r = np.ones(1000, dtype=np.int64)
        m = int(rng.integers(0, 12))
        r[:m] = rng.integers(1, 41, m)
        got, ref = rank_log_sf(r, 40), rank_log_sf_reference(r, 40)
        assert to_log10(got) < -1400
        assert abs(got - ref) <= TOL + _ref_slack(1000, ref), (m, got, ref)


@pytest.mark.parametrize(
    "units,slot_choices",
    [((600, 2000, 10_000), (2, 3, 4, 5, 8)), ((30, 100, 1000), (10, 100, 1000))],
)
def test_guarantee_holds_without_the_slow_fallback(
    units: tuple[int, ...], slot_choices: tuple[int, ...]
) -> None:
    """The twin-test (N = 600..10,000 units, slots 2..8) and key-image (K = 30..1000, slots
    10..1000) regimes: every call proves its 1e-9 bound with the FFT paths, never reaching the
    sequential reference (which would take minutes at these sizes)."""
    rng = np.random.default_rng(sum(units))
    for c in units:
        for slots in slot_choices:
            for r in _rank_draws(rng, slots, c):
                tail = rank_tail(r, slots)
                assert not tail.sequential, (c, slots)
                assert tail.bound <= TOL and tail.log_p == rank_log_sf(r, slots)
                lp = tail.log_p
                assert math.isfinite(lp) and lp <= 0.0
    # and monotone along a path of improving ranks (one class at a time)
    r = rng.integers(1, 9, 2000)
    last = rank_log_sf(r, 8)
    for i in rng.permutation(2000)[:8]:
        if r[i] > 1:
            r[i] = 1
            now = rank_log_sf(r, 8)
            assert now <= last + TOL
            last = now


def test_fast_at_scale() -> None:
    """The issue's targets: "well under a second" at C = 1000 and at 10,000 units, asserted at
    < 1 s per call (recorded: 0.02-0.3 s). Each call starts from cold rank tables; the best of
    three is timed so that a moment of the shared CI machine's load does not count. Measured
    times are printed (pytest -s)."""
    rng = np.random.default_rng(11)
    cases = {
        "C=1000 slots=40 null": (rng.integers(1, 41, 1000), 40),
        "C=1000 slots=40 signal": (rng.integers(1, 9, 1000), 40),
        "C=1000 slots=40 deep": (np.r_[np.ones(995, dtype=np.int64), [3, 3, 5, 2, 40]], 40),
        "N=10000 slots=8 null": (rng.integers(1, 9, 10_000), 8),
        "N=10000 slots=8 signal": (rng.integers(1, 8, 10_000), 8),
        "N=10000 slots=2 null": (rng.integers(1, 3, 10_000), 2),
        "N=1000 slots=1000 signal": (rng.integers(1, 500, 1000), 1000),
    }
    for name, (r, slots) in cases.items():
        times = []
        for _ in range(3):
            stats.clear_caches()
            t0 = time.perf_counter()
            lp = rank_log_sf(r, slots)
            times.append(time.perf_counter() - t0)
        dt = min(times)
        print(f"{name}: {dt:.3f} s (log10 p = {to_log10(lp):.2f})")
        assert math.isfinite(lp)
        assert dt < 1.0, (name, times)


@pytest.mark.skipif(not stats.LONG_DOUBLE_WIDER, reason="needs a long double wider than float64")
@pytest.mark.parametrize("log2n", [6, 12, 18])
def test_fft_error_model_of_the_bound(log2n: int) -> None:
    """The bound assumes |fl(Fx) − Fx| <= 8·log2(n)·u·‖x‖₁ in every component (and the same
    constant normwise): check pocketfft's float64 transforms against long-double ones (2^11 times
    more precise) on pmf-like and signed inputs, with room to spare."""
    from scipy import fft as sp_fft

    n = 1 << log2n
    gamma = stats.FFT_ERROR_C * log2n * U
    rng = np.random.default_rng(log2n)
    worst = 0.0
    for x in (rng.random(n), rng.random(n) ** 8, rng.standard_normal(n)):
        x = x / np.sum(np.abs(x))
        exact = sp_fft.rfft(x.astype(np.longdouble))
        got = sp_fft.rfft(x)
        worst = max(worst, float(np.max(np.abs(got - exact))) / (gamma * float(np.sum(np.abs(x)))))
        spec = exact.astype(np.complex128)
        back_exact = sp_fft.irfft(spec.astype(np.clongdouble), n=n)
        back = sp_fft.irfft(spec, n=n)
        full_l1 = 2 * float(np.sum(np.abs(spec))) - abs(spec[0]) - abs(spec[-1])
        err = float(np.max(np.abs(back - back_exact)))
        worst = max(worst, err / (gamma * full_l1 / n))
        full_l2 = math.sqrt(
            (2 * float(np.sum(np.abs(spec) ** 2)) - abs(spec[0]) ** 2 - abs(spec[-1]) ** 2) / n
        )
        err2 = float(np.sqrt(np.sum((back - back_exact) ** 2)))
        worst = max(worst, err2 / (gamma * full_l2))
    print(f"n = 2^{log2n}: worst error / modelled bound = {worst:.3f}")
    assert worst < 0.25, worst  # observed errors stay far inside the assumed model
