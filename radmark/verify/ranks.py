"""The exact combination of per-unit ranks: the lattice null of S = Σ_c ⌈ln r_c / h⌉·h.

Every rank test of radmark (the black-box decoy rank, and any test whose units are uniform ranks
under H0) combines its units here. :func:`rank_log_sf` takes the C-fold lattice convolution through
the characteristic function (one FFT, a pointwise C-th power, one inverse FFT) under an
exponential tilt that puts the observed sum where the computed distribution has its mass, and it
proves its own accuracy: every call carries a rigorous a-posteriori bound on |Δ ln p|. Should the
float64 bound exceed the tolerance the computation is repeated in extended precision, and failing
that in ``lattice.rank_log_sf_reference`` (sequential), so the tolerance is a guarantee, not an
estimate; :func:`rank_tail`, :func:`tilted_log_cdf` and the public constants let tests check
that against exact answers. Pure numpy/scipy: no I/O, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import fft as sp_fft

from radmark.verify.lattice import _RANK_CDF_CACHE, _rank_cdf_at, _rank_setup

RANK_LOG_TOL = 1e-9  # guaranteed |Δ ln p| of rank_log_sf (relative error of p)
_U = 2.0**-53  # unit roundoff of float64
_LD = np.longdouble
LONG_DOUBLE_WIDER = bool(np.finfo(_LD).eps < np.finfo(np.float64).eps)  # a 2nd precision exists
_U_LD = float(np.finfo(_LD).eps) / 2
# Floating-point model of the bounds (u: unit roundoff of the working type):
# * elementary functions (exp, log, cos, sin, atan2, hypot) within _ulp(dtype) ulp;
# * an FFT of length n (pocketfft: radix-2/4 passes, accurately computed twiddles) is within
#   FFT_ERROR_C·log2(n)·u·‖x‖₁ of the exact transform in every component, and within
#   FFT_ERROR_C·log2(n)·u·‖Fx‖₂ in the 2-norm. Each butterfly level costs at most a complex addition
#   and a twiddle product, (1 + √5 + twiddle error)·u ≈ 3.3u componentwise; Higham (Accuracy and
#   Stability, Thm 24.2) gives ≈ 6.7u per level normwise; 8 covers both with a margin.
FFT_ERROR_C = 8.0
# Forward transform evaluated directly (one cos/sin per term, error ∝ #distinct values instead of
# log2 n) at the frequencies that dominate the error; costs #frequencies × #values cos/sin pairs,
# kept under this budget (else the FFT values and their larger bound are used).
_DIRECT_BUDGET = 4_000_000
_SIGNIFICANT = 1e-6  # frequencies with C·|φ|^(C−1) below this barely feel the forward error


def _ulp(dt: type) -> float:
    """Assumed accuracy (ulp) of numpy's elementary functions in dtype ``dt``."""
    return 4.0 if dt is np.float64 else 16.0


def _fft_len(size: int) -> int:
    """Power of two >= size: no wrap-around, exact 1/n scaling, and the FFT error model above."""
    return 1 << max(1, (size - 1).bit_length())


def _exact_sum(x: np.ndarray) -> tuple[np.longdouble, float]:
    """Σx accumulated in long double, with a bound on its error: (len·u_ld)·Σ|x|."""
    xl = x.astype(_LD)
    return np.sum(xl), float(x.size * _U_LD * np.sum(np.abs(xl))) * (1 + 1e-6)


def _dft_direct(v: np.ndarray, q: np.ndarray, ks: np.ndarray, n: int) -> np.ndarray:
    """φ_k = Σ_v q_v e^{−2πi·v·k/n} for the frequencies ``ks``, one cos/sin per term.

    The angle is reduced exactly in integers ((v·k) mod n, into [−n/2, n/2]) so |a| <= π, and
    carries relative error 2u (τ rounded once; n a power of two divides exactly; one product):
    |â − a| <= 2πu. With cos/sin within F ulp, one product and a D-term sum in any order, each of
    the real and imaginary parts is within (D + 2π + F)·u·Σq, so |Δφ_k| <= 1.42·(D + 2π + F)·u·Σq.
    """
    out = np.empty(ks.size, dtype=np.complex128)
    step = max(1, (1 << 20) // v.size)
    scale = math.tau / n
    for a in range(0, ks.size, step):
        r = np.outer(ks[a : a + step], v) % n
        r = np.where(r > n // 2, r - n, r)
        ang = r * scale
        out[a : a + step] = np.cos(ang) @ q - 1j * (np.sin(ang) @ q)
    return out


@dataclass(frozen=True)
class _PmfError:
    """Bounds on Q̂ − Q = E + R (E: the propagated forward-transform and power errors, R: the
    inverse transform's own rounding): ``sup`` >= max|E_j|, ``l2`` >= ‖E‖₂, ``rounding`` >=
    max|R_j|, ``rounding_l2`` >= ‖R‖₂.

    A tail sum Σ_i w_i·(Q̂_i − Q_i) with w_i >= 0 is then within tail(Σw, ‖w‖₂) (Hölder, twice).
    The ℓ2 forms win when Q lives on a sparse set of reachable sums or when w has many small
    entries, where sup·Σw charges every bin the worst error.
    """

    sup: float
    l2: float
    rounding: float
    rounding_l2: float

    def tail(self, w_sum: float, w_l2: float) -> float:
        return min(self.sup * w_sum, self.l2 * w_l2) + min(
            self.rounding * w_sum, self.rounding_l2 * w_l2
        )


def _lattice_pmf(
    v: np.ndarray,
    counts: np.ndarray,
    slots: int,
    classes: int,
    theta: float,
    n: int,
    dt: type = np.float64,
) -> tuple[np.ndarray, _PmfError, Any, float]:
    """The θ-tilted pmf of T = Σ_c v(r_c), by FFT in dtype ``dt``, with rigorous error bounds.

    v: distinct per-class values (integers, v[0] = 0), counts: how many ranks give each. Under
    H0 a class takes v with probability p_v = n_v/slots. With M(θ) = Σ p_v e^{θv} and the tilted
    per-class pmf q_v = p_v e^{θv}/M(θ), the exact identity
        P(T = j) = M(θ)^C · e^{−θj} · Q(j),   Q = q^{*C}
    holds for every θ; θ only decides where Q has its mass, i.e. where the FFT's absolute error
    is small relative to the values that matter. n >= C·v_max + 1: no wrap-around.

    Returns (Q̂[0..n−1], its error bounds, ln M(θ) as a ``dt`` scalar, bound on |Δ ln M|).

    Error budget (u, F: unit roundoff and elementary-function ulp of ``dt``; first order, each
    term computed here from the actual data, sums over all n frequencies of the Hermitian
    spectrum):
    * q̂: weight v carries relative error ρ_v from its exponent ln n_v + θv − max;
      normalising adds rel_z = Σ q̂ρ + D·u, so ε_q = ‖q̂ − q‖₁ <= 2·rel_z + u.
    * φ̂ = F q̂: |φ̂_k − φ_k| <= e_k = ε_q + (FFT: FFT_ERROR_C·log2(n)·u, or, at the frequencies
      with C·b_k^(C−1) >= _SIGNIFICANT and where it at least halves that, direct evaluation:
      1.42·(D + 2π + F)·u).
    * P̂_k = φ̂_k^C in polar form: |P̂_k − φ_k^C| <= d_k = C·b_k^(C−1)·e_k + η_k·|P̂_k|, where
      b_k = min(1, |φ̂_k| + e_k) + e_k >= max(|φ_k|, |φ̂_k|) (mean value theorem for z^C;
      |φ| <= 1) and η_k = u·(C·(F + (F+1)·(|ln|φ̂_k|| + |arg φ̂_k|)) + 2F + 2) covers the
      rounding of |·|, ln, arg, the two products by C, exp, cos and sin.
    * Q̂ = fl(F⁻¹P̂) = Q + E + R with E = F⁻¹(P̂ − P): |E_j| <= Σ d_k / n,
      ‖E‖₂ = ‖P̂ − P‖₂/√n <= ‖d‖₂/√n (Parseval), and the FFT model for R.
    """
    u = float(np.finfo(dt).eps) / 2
    f = _ulp(dt)
    lnn = np.log(counts.astype(dt))
    tv = dt(theta) * v.astype(dt)
    lw = lnn + tv
    lw_max = np.max(lw)
    w = np.exp(lw - lw_max)
    z = np.sum(w)
    q = w / z
    rho = u * (f * np.abs(lnn) + np.abs(tv) + np.abs(lw) + np.abs(lw - lw_max) + f)
    rel_z = (float(np.sum(q * rho)) + v.size * u) * (1 + 1e-6)
    eps_q = 2 * rel_z + u
    ln_slots = np.log(dt(slots))
    ln_z = np.log(z)
    log_m = lw_max + ln_z - ln_slots
    err_log_m = rel_z + u * (f + 2) * float(abs(lw_max) + abs(ln_z) + ln_slots)

    gamma_fft = FFT_ERROR_C * math.log2(n) * u
    x: np.ndarray = np.zeros(n, dtype=dt)
    x[v] = q
    phi = sp_fft.rfft(x, workers=1)
    e = np.full(phi.size, (eps_q + gamma_fft) * (1 + 1e-6))
    cm1 = float(classes - 1)

    # The bounds are evaluated in float64 whatever dt is (a bound needs a few digits, not 18):
    # |φ̂| is rounded up to float64 and b^(C−1) = exp((C−1)·(ln b' + ln(1 + e/b'))).
    def amplified(mag_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # C·b^(C−1), ln b
        b1 = np.minimum(1.0, mag_up + e)
        log_b = np.log(b1) + np.log1p(e / b1)
        with np.errstate(under="ignore"):
            return classes * np.exp(cm1 * log_b) * (1 + 1e-6), log_b

    def mag_up() -> np.ndarray:
        return np.abs(phi).astype(np.float64) * (1 + 4 * _U)

    amp, log_b = amplified(mag_up())
    gamma_direct = 1.42 * (v.size + 2 * math.pi + f) * u
    # Direct evaluation pays off when C·γ matters at all and it at least halves γ (few values).
    if dt is np.float64 and classes * gamma_fft > 1e-12 and 2 * gamma_direct <= gamma_fft:
        ks = np.flatnonzero(amp >= _SIGNIFICANT)
        if 0 < ks.size * v.size <= _DIRECT_BUDGET:
            phi[ks] = _dft_direct(v, q, ks, n)
            e[ks] = (eps_q + gamma_direct) * (1 + 1e-6)
            amp, log_b = amplified(mag_up())

    mag = np.abs(phi)
    ang = np.angle(phi)
    live = mag > 0
    lmag = np.where(live, np.log(np.where(live, mag, 1)), 0)
    pmag = np.where(live, np.exp(classes * lmag), 0)
    pang = classes * ang
    p_hat = pmag * np.cos(pang) + 1j * (pmag * np.sin(pang))
    lmag_f = np.abs(lmag.astype(np.float64))
    ang_f = np.abs(ang.astype(np.float64))
    pm = pmag.astype(np.float64) * (1 + 4 * _U)
    eta = u * (classes * (f + (f + 1) * (lmag_f + ang_f)) + 2 * f + 2) * (1 + 1e-6)
    with np.errstate(under="ignore"):
        b_c = np.where(live, 0.0, np.exp(classes * log_b))  # |φ|^C where |φ̂| is 0
    tiny = 4 * float(np.finfo(np.float64).smallest_normal)  # underflow, in dt or in these bounds
    d = amp * e + eta * pm + b_c + tiny
    wt = np.full(phi.size, 2.0)
    wt[0] = 1.0
    wt[-1] = 1.0  # n is even: the Nyquist bin appears once
    margin = 1 + 1e-6  # the float64 sums below, rounded
    err = _PmfError(
        sup=float(np.sum(wt * d)) / n * margin,
        l2=math.sqrt(float(np.sum(wt * d * d)) / n) * margin,
        rounding=gamma_fft * float(np.sum(wt * pm)) / n * margin,
        rounding_l2=gamma_fft * math.sqrt(float(np.sum(wt * pm * pm)) / n) * margin,
    )
    q_hat = sp_fft.irfft(p_hat, n=n, workers=1)
    return q_hat, err, log_m, err_log_m


# (slots, classes, values, counts) -> (ln CDF, bound on |Δ ln CDF|) of the untilted null, every
# bin. A table is a fixed function of its key (it is never grown), so a result read from it is
# the one a fresh computation gives: the cache changes speed, never a value.
_RANK_TABLE_CACHE: dict[tuple[int, int, bytes, bytes], tuple[np.ndarray, np.ndarray]] = {}
_RANK_TABLE_CACHE_MAX = 8


def _null_table(
    v: np.ndarray, counts: np.ndarray, slots: int, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """ln P(T <= j) for every j with no tilt (float64), and a per-bin bound on its error.

    Accurate wherever P is not small, the bulk where most calls land (a calibration study makes
    thousands of calls with the same C and slots; they then cost a table lookup). Per bin,
    |ΔCDF(j)| <= _PmfError.tail with j + 1 unit weights + the running sum's rounding (done in
    long double) + the final rounding to float64. Bins whose bound exceeds the tolerance are left
    to the tilted computation (bound +inf here).
    """
    key = (slots, classes, v.tobytes(), counts.tobytes())
    hit = _RANK_TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    size = classes * int(v[-1]) + 1
    q_hat, pe, _, _ = _lattice_pmf(v, counts, slots, classes, 0.0, _fft_len(size))
    ql = q_hat[:size].astype(_LD)
    cdf_ld = np.cumsum(ql)
    cdf = cdf_ld.astype(np.float64)
    idx = np.arange(1, size + 1, dtype=np.float64)
    run = (idx * _U_LD * np.cumsum(np.abs(ql))).astype(np.float64)
    prop = np.minimum(idx * pe.sup, np.sqrt(idx) * pe.l2)
    rnd = np.minimum(idx * pe.rounding, np.sqrt(idx) * pe.rounding_l2)
    err = (prop + rnd + run + _U * np.abs(cdf)) * (1 + 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = cdf > 4 * err
        rel = np.where(ok, err / np.where(ok, cdf - err, 1.0), np.inf)
        log_cdf = np.where(cdf > 0, np.log(np.where(cdf > 0, cdf, 1.0)), -np.inf)
        bound = np.where(ok, rel + 2 * _ulp(np.float64) * _U * np.abs(log_cdf), np.inf)
    if len(_RANK_TABLE_CACHE) >= _RANK_TABLE_CACHE_MAX:
        _RANK_TABLE_CACHE.clear()
    _RANK_TABLE_CACHE[key] = (log_cdf, bound)
    return log_cdf, bound


def _tilt_for(v: np.ndarray, counts: np.ndarray, classes: int, j: int) -> float:
    """θ < 0 whose tilted mean of T is j (the observed sum), but at most −1/σ(T).

    Any θ gives the exact identity of _lattice_pmf; this one makes Q peak at j so the FFT's
    absolute error is small relative to Q(j). Near or above the mean θ = −1/σ instead, so the
    weights e^{θ(j−i)} of the tail sum decay over about one σ and the error does not pile up over
    all j + 1 bins. Bisection: deterministic, and θ needs no more than a few digits.
    """
    vf = v.astype(np.float64)
    lnn = np.log(counts.astype(np.float64))
    p = counts / counts.sum()
    mean0 = float(np.sum(p * vf))
    sigma = math.sqrt(classes * max(float(np.sum(p * vf * vf)) - mean0 * mean0, 0.0))
    cap = -1.0 / max(sigma, 1.0)
    target = j / classes
    if target >= mean0:
        return cap

    def tilted_mean(theta: float) -> float:
        lw = lnn + theta * vf
        w = np.exp(lw - lw.max())
        return float(np.sum(w * vf) / np.sum(w))

    lo, hi = -1.0, 0.0
    while tilted_mean(lo) > target and lo > -1e6:
        hi, lo = lo, 2 * lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if tilted_mean(mid) > target:
            hi = mid
        else:
            lo = mid
    return min(0.5 * (lo + hi), cap)


def tilted_log_cdf(
    v: np.ndarray, counts: np.ndarray, slots: int, classes: int, j: int, dt: type = np.float64
) -> tuple[float, float]:
    """ln P(T <= j) through the tilted pmf (working dtype ``dt``), and a rigorous error bound.

    P(T <= j) = M^C · e^{−θj} · W with W = Σ_{i<=j} e^{θ(j−i)}·Q(i) (θ < 0: weights <= 1), so
    |ΔW| <= _PmfError.tail(Σw, ‖w‖₂) + Σ_i |w_i Q̂_i|·(|θ(j−i)| + F + 1)·u (weights and
    products) + the long-double sum's rounding; then, as |ln Ŵ − ln W| <= ΔW/(Ŵ − ΔW),
    |Δ ln p| <= C·|Δ ln M| + ΔW/(Ŵ − ΔW) + rounding of the three-term sum.
    """
    u = float(np.finfo(dt).eps) / 2
    f = _ulp(dt)
    theta = _tilt_for(v, counts, classes, j)
    n = _fft_len(classes * int(v[-1]) + 1)
    q_hat, pe, log_m, err_log_m = _lattice_pmf(v, counts, slots, classes, theta, n, dt)
    expo = dt(theta) * np.arange(j, -1, -1).astype(dt)  # θ(j − i), i = 0..j
    wts = np.exp(expo)
    terms = wts * q_hat[: j + 1]
    big_w, err_sum = _exact_sum(terms)
    w_sum, w_sum_err = _exact_sum(wts)
    w_sq, w_sq_err = _exact_sum(wts * wts)
    err_w = (
        pe.tail(float(w_sum) + w_sum_err, math.sqrt(float(w_sq) + w_sq_err))
        + u * float(np.sum(np.abs(terms) * (np.abs(expo) + f + 1)))
        + err_sum
    ) * (1 + 1e-6)
    if not big_w > 2 * err_w:
        return -math.inf, math.inf
    # In dt (long double on the second try), so that only the final rounding of ln p to float64
    # (half an ulp, not part of the bound: see rank_log_sf) is left at float64 precision.
    cm = classes * log_m
    tj = dt(theta) * dt(j)
    log_w = np.log(big_w).astype(dt)
    log_p = cm - tj + log_w
    err = (
        classes * err_log_m
        + err_w / float(big_w - err_w)
        + 4 * u * float(abs(cm) + abs(tj) + abs(log_w) + abs(log_p))
    )
    return float(log_p), err


def _lattice_log_cdf(bins: np.ndarray, slots: int, classes: int, j: int) -> tuple[float, float]:
    """ln P(Σ_c bins[r_c − 1] <= j), ranks i.i.d. uniform on 1..slots, and a bound on its error.

    The per-class values are first divided by their gcd g (T = S/g is integer-valued, and
    P(S <= j) = P(T <= ⌊j/g⌋) exactly): for slots = 2 this turns 19 bins per class into one.
    Then: the cached untilted table where its bound allows, else the tilted FFT in float64, else
    in long double.
    """
    vals, counts = np.unique(bins, return_counts=True)
    g = int(np.gcd.reduce(vals))
    v = vals // g
    jj = j // g
    if jj >= classes * int(v[-1]):
        return 0.0, 0.0
    if jj < int(v[1]):  # only T = 0 (every class at value 0) is <= jj: (n_0/slots)^C
        lp = classes * (np.log(_LD(int(counts[0]))) - np.log(_LD(slots)))
        u, f = _U_LD, _ulp(_LD)
        return float(lp), 4 * f * u * float(abs(lp) + classes * np.log(_LD(slots)))
    log_cdf, bound = _null_table(v, counts, slots, classes)
    if bound[jj] <= RANK_LOG_TOL:
        return float(log_cdf[jj]), float(bound[jj])
    log_p, err = tilted_log_cdf(v, counts, slots, classes, jj)
    if err > RANK_LOG_TOL and LONG_DOUBLE_WIDER:
        log_p, err = tilted_log_cdf(v, counts, slots, classes, jj, _LD)
    return log_p, err


def clear_caches() -> None:
    """Forget the cached null tables (a benchmark's cold start); values never depend on them."""
    _RANK_TABLE_CACHE.clear()
    _RANK_CDF_CACHE.clear()


@dataclass(frozen=True)
class RankTail:
    """ln p of :func:`rank_log_sf`; ``bound`` >= |Δ ln p| (FFT), NaN if ``sequential`` made it."""

    log_p: float
    bound: float
    sequential: bool = False


def rank_log_sf(
    ranks: np.ndarray, slots: int, *, resolution: float = 1e-3, max_bins: int = 200_000
) -> float:
    """Exact ln P_H0(S <= s_obs) for per-class decoy ranks, S = Σ_c ⌈ln r_c / h⌉·h.

    For each of C independent classes the true carrier and K decoys (``slots`` = K + 1) are
    exchangeable under H0, so the rank r_c = 1 + #{decoys scoring >= the carrier} is uniform on
    1..slots, or stochastically larger when ties occur (ties count against us).

    Why not Fisher: p_c = r_c/slots is a discrete p-value (P(p_c <= x) < x between the atoms), and
    Fisher's χ² assumes continuous uniform p-values, so it is valid but very conservative (all
    ranks 1 with C = 10, slots = 40 gives log10 p ≈ −7.36 where the exact answer is −16.02).

    Here the statistic is S = Σ_c g(r_c) with g(r) = ⌈ln r / h⌉·h, i.e. ln r rounded UP to the lattice
    hZ (capped so one class spans at most ⌊(max_bins−1)/C⌋ bins). Rounding is part of the
    statistic's definition, so the null pmf of S is an exact C-fold lattice convolution of the
    per-class pmf {g(r): r uniform on 1..slots}: the returned p-value is exact for this S, not an
    approximation to the Π r_c statistic. g is non-decreasing in r, so stochastically larger ranks
    (ties) only make S larger and the test stays valid.

    Lattice step: h = max(resolution, ln(slots)/⌊(max_bins−1)/C⌋) ≈ max(resolution,
    C·ln(slots)/max_bins), so the lattice never exceeds ``max_bins`` bins; for very large C the step
    therefore grows (coarser statistic, still exact for the h used).

    How, and how exact: the C-fold convolution is taken through the characteristic function
    (rfft of the per-class pmf, C-th power, inverse rfft: O(n log n) with n < 2·max_bins, instead
    of the O(C·slots·n) sequential convolution that took 35 s at C = 1000, slots = 40; values
    are first divided by their gcd, so slots = 2 is a binomial on C + 1 bins). An FFT has absolute
    error, so the pmf is exponentially tilted first (q_v ∝ p_v e^{θv}, θ chosen so the tilted mean
    sits at s_obs) and untilted in log space: deep tails such as 40^−1000 (log10 ≈ −1602) keep
    their relative precision. Every call computes a rigorous a-posteriori bound on its own error
    (floating-point model: u = 2^−53, elementary functions within 4 ulp, FFT error
    8·log2(n)·u·‖x‖ componentwise and normwise; derivation in _lattice_pmf) and the result
    satisfies

        |Δ ln p| <= 1e-9, i.e. p within a relative 1e-9 of the exact lattice tail,

    plus the unavoidable rounding of ln p itself to float64 (half an ulp: below 1e-11 while
    log10 p > −40,000; C = 10,000 units at slots 1000 reach at most −30,000).

    That is a guarantee, not an estimate: a float64 result whose bound exceeds 1e-9 (sparse
    lattices deep in the tail; under 1% of random inputs) is recomputed in long double (bound
    about 1e-12, ~0.3 s), and, where long double is no wider than float64 and that fails too,
    by the exact sequential convolution (lattice.rank_log_sf_reference). Typical bounds are 1e-11..1e-10;
    observed errors against exact integer counts are about 1e-13. Bulk values come from a per-(slots, C, h) table of the
    untilted CDF (a calibration study's thousands of calls then cost a lookup); the result is a
    fixed function of the arguments, since a cached table is exactly what a fresh call rebuilds.

    ranks: integer-valued, 1 <= r <= slots, one per class (any shape, flattened).
    Returns the natural-log p-value (<= 0); :func:`rank_tail` gives it with its certificate.
    """
    return rank_tail(ranks, slots, resolution=resolution, max_bins=max_bins).log_p


def rank_tail(
    ranks: np.ndarray, slots: int, *, resolution: float = 1e-3, max_bins: int = 200_000
) -> RankTail:
    """:func:`rank_log_sf` with how its value was certified (:class:`RankTail`)."""
    slots, classes, h, bins, top, s_obs, s_max, lower = _rank_setup(
        ranks, slots, resolution, max_bins
    )
    if s_obs >= s_max:
        return RankTail(0.0, 0.0)
    if lower:
        log_p, err = _lattice_log_cdf(bins, slots, classes, s_obs)
        if err <= RANK_LOG_TOL:
            return RankTail(float(min(0.0, log_p)), err)
        seq = _rank_cdf_at(bins, slots, classes, h, "low", s_obs)
        return RankTail(min(0.0, seq), math.nan, sequential=True)
    log_q, err_q = _lattice_log_cdf(top - bins, slots, classes, s_max - s_obs - 1)
    q = math.exp(log_q)
    # p = 1 − q: |Δ ln p| <= |Δq|/p, with |Δq| <= q·(e^err − 1).
    err = q * math.expm1(err_q) / (1.0 - q) * 1.01 + 4 * _U if q < 1.0 else math.inf
    sequential = not err <= RANK_LOG_TOL
    if sequential:
        log_q = _rank_cdf_at(top - bins, slots, classes, h, "high", s_max - s_obs - 1)
        q = math.exp(log_q)
    return RankTail(float(min(0.0, math.log1p(-q))), math.nan if sequential else err, sequential)
