"""Exact null distributions and their combination, in log space.

Everything returns natural-log p-values (``log_p``) so that evidence far beyond float64's
1e-308 (a thousand classes at cosine 0.5 gives log10 p ≈ −10⁵) stays finite; the official code
underflowed to −inf. Convert with :func:`to_log10` only for display.

Pure functions of numpy arrays: no I/O, no torch.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from radmark.errors import UsageError

LN10 = math.log(10.0)
# Below this, scipy's linear-space betainc loses relative accuracy (subnormals) or underflows;
# we switch to the continued fraction evaluated with a log prefactor.
_LINEAR_FLOOR = 1e-280


def to_log10(log_p: np.ndarray | float) -> np.ndarray | float:
    return np.asarray(log_p) / LN10 if isinstance(log_p, np.ndarray) else log_p / LN10


def _betacf(x: np.ndarray, a: np.ndarray, b: float, iters: int = 400) -> np.ndarray:
    """Continued fraction of I_x(a, b) (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    dd = 1.0 - qab * x / qap
    dd = np.where(np.abs(dd) < tiny, tiny, dd)
    dd = 1.0 / dd
    h = dd.copy()
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        dd = 1.0 + aa * dd
        dd = np.where(np.abs(dd) < tiny, tiny, dd)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        dd = 1.0 / dd
        h = h * dd * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        dd = 1.0 + aa * dd
        dd = np.where(np.abs(dd) < tiny, tiny, dd)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        dd = 1.0 / dd
        delta = dd * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def log_cosine_sf(cos: np.ndarray | float, d: int) -> np.ndarray:
    """ln P(⟨u, v⟩ ≥ c) for a fixed unit v and u uniform on the sphere S^{d−1} (exact).

    For c ≥ 0: P = ½·I_{1−c²}((d−1)/2, ½); for c < 0: P = 1 − ½·I_{1−c²}((d−1)/2, ½).
    Equivalent to (cos + 1)/2 ~ Beta((d−1)/2, (d−1)/2) (Sablayrolles et al. 2020, §4).
    cos: any shape, values in [−1, 1]; returns float64 of the same shape.
    """
    if d < 2:
        raise UsageError(f"the cosine null needs d >= 2 (got {d})")
    c = np.asarray(cos, dtype=np.float64)
    if np.any(~np.isfinite(c)) or np.any(np.abs(c) > 1.0 + 1e-6):
        raise UsageError("cosines must be finite and within [-1, 1]")
    # A cosine of exactly ±1 has tail probability 0 (or 1); clip to the nearest float inside so
    # the result stays finite and conservative.
    edge = np.nextafter(1.0, 0.0)
    c = np.clip(c, -edge, edge)
    a = (d - 1) / 2.0
    ac = np.abs(c)
    x = 1.0 - ac * ac
    half_i = 0.5 * special.betainc(a, 0.5, x)  # = P(cos >= |c|)
    out = np.empty_like(c)
    pos = c >= 0
    # Upper tail for c >= 0, in log space when the linear value is too small to trust.
    lin_ok = half_i > _LINEAR_FLOOR
    with np.errstate(divide="ignore"):
        out[pos & lin_ok] = np.log(half_i[pos & lin_ok])
    far = pos & ~lin_ok
    if np.any(far):
        xf, cf = x[far], ac[far]
        af = np.full_like(xf, a)
        with np.errstate(divide="ignore"):
            log_pref = (
                a * np.log1p(-cf * cf) + 0.5 * 2.0 * np.log(cf) - np.log(a) - special.betaln(a, 0.5)
            )
            out[far] = math.log(0.5) + log_pref + np.log(_betacf(xf, af, 0.5))
    # c < 0: P = 1 − P(cos ≥ |c|), never small.
    neg = ~pos
    out[neg] = np.log1p(-half_i[neg])
    return out


def fisher_log_sf(log_ps: np.ndarray) -> float:
    """Fisher's combination: ln P(χ²_{2k} ≥ −2 Σ ln p_i) for k independent p-values.

    For even degrees of freedom the chi-square survival function has the closed form
    Q(k, y) = e^{−y} Σ_{j<k} y^j / j! with y = −Σ ln p_i, evaluated here with logsumexp so it
    never underflows.
    """
    lp = np.asarray(log_ps, dtype=np.float64).ravel()
    if lp.size == 0:
        raise UsageError("Fisher's combination needs at least one p-value")
    if np.any(lp > 1e-12) or np.any(np.isnan(lp)):
        raise UsageError("log p-values must be <= 0")
    y = float(-np.sum(np.minimum(lp, 0.0)))
    if math.isinf(y):
        return -math.inf
    if y == 0.0:
        return 0.0
    j = np.arange(lp.size, dtype=np.float64)
    terms = j * math.log(y) - special.gammaln(j + 1.0)
    return float(min(0.0, -y + special.logsumexp(terms)))


def zscore(cosines: np.ndarray, d: int) -> float:
    """mean(c)·√(C·d): approximately N(0, 1) under the null (each c has variance 1/d)."""
    c = np.asarray(cosines, dtype=np.float64).ravel()
    return float(np.mean(c) * math.sqrt(c.size * d))


def log_normal_sf(z: float) -> float:
    """ln P(N(0,1) ≥ z), finite far into the tail."""
    return float(special.log_ndtr(-z))


def holm_adjust(log_ps: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted ln p-values for m simultaneous tests (valid under any dependence).

    Sorted ascending p_(i) gets min(1, max_{j<=i} (m−j+1)·p_(j)); computed in log space.
    """
    lp = np.asarray(log_ps, dtype=np.float64).ravel()
    m = lp.size
    order = np.argsort(lp, kind="stable")
    adj_sorted = np.minimum(0.0, np.log(m - np.arange(m)) + lp[order])
    adj_sorted = np.maximum.accumulate(adj_sorted)
    out = np.empty(m)
    out[order] = adj_sorted
    return out


def bonferroni_min(log_ps: np.ndarray) -> float:
    """ln of min(1, k·min p): combines k dependent tests validly (Bonferroni on the minimum)."""
    lp = np.asarray(log_ps, dtype=np.float64).ravel()
    return float(min(0.0, math.log(lp.size) + float(np.min(lp))))


# (slots, classes, h, side) -> ln CDF of the lattice null over bins 0..len-1 (a prefix; see
# _rank_null_log_cdf). Values depend only on the key and the bin, never on how far it was grown.
_RANK_CDF_CACHE: dict[tuple[int, int, float, str], np.ndarray] = {}
_RANK_CDF_CACHE_MAX = 16


def _rank_lattice(slots: int, classes: int, resolution: float, max_bins: int):
    """Step h, the bin k(r) = ⌈ln r / h⌉ of every rank r = 1..slots, and the top bin m."""
    per_class = (max_bins - 1) // classes  # bins a class may span so that C·m + 1 <= max_bins
    h = max(float(resolution), math.log(slots) / per_class)
    k = np.ceil(np.log(np.arange(1, slots + 1, dtype=np.float64)) / h).astype(np.int64)
    # ln(slots)/h can round to one past per_class; clipping keeps k monotone and deterministic.
    k = np.minimum(np.maximum.accumulate(k), per_class)
    return h, k, int(k[-1])


def _rank_null_log_cdf(bins: np.ndarray, slots: int, classes: int, upto: int) -> np.ndarray:
    """ln P(Σ_c k(r_c) <= j) for j = 0..upto, ranks i.i.d. uniform on 1..slots (exact, log space).

    Sequential convolution of the per-class pmf, one np.logaddexp per shifted copy, truncated at
    ``upto`` (bins above it never feed bins at or below it).
    """
    vals, counts = np.unique(bins, return_counts=True)
    log_w = np.log(counts.astype(np.float64)) - math.log(slots)
    top = int(vals[-1])
    a = np.full(upto + 1, -np.inf)
    a[0] = 0.0
    shifts = list(zip(vals.tolist(), log_w.tolist(), strict=True))
    for t in range(1, classes + 1):
        hi = min(upto, t * top)  # support of the partial sum after t classes
        # logsumexp over the shifted copies, referenced to their elementwise max so the largest
        # term is exactly 1 (nothing relevant underflows) and only one log per bin is needed.
        ref = np.full(hi + 1, -np.inf)
        for v, w in shifts:
            if v > hi:
                break
            np.maximum(ref[v:], a[: hi + 1 - v] + w, out=ref[v:])
        ref[~np.isfinite(ref)] = 0.0  # bins no copy reaches: every term below is exp(-inf) = 0
        acc = np.zeros(hi + 1)
        for v, w in shifts:
            if v > hi:
                break
            acc[v:] += np.exp(a[: hi + 1 - v] + (w - ref[v:]))
        b = np.full(upto + 1, -np.inf)
        with np.errstate(divide="ignore"):
            b[: hi + 1] = ref + np.log(acc)
        a = b
    return np.logaddexp.accumulate(a)


def _rank_cdf_at(bins: np.ndarray, slots: int, classes: int, h: float, side: str, j: int) -> float:
    key = (slots, classes, h, side)
    cdf = _RANK_CDF_CACHE.get(key)
    if cdf is None or cdf.size <= j:
        full = classes * int(bins.max())
        size = j if cdf is None else max(j, 2 * cdf.size)
        if len(_RANK_CDF_CACHE) >= _RANK_CDF_CACHE_MAX:
            _RANK_CDF_CACHE.clear()
        cdf = _rank_null_log_cdf(bins, slots, classes, min(full, size))
        _RANK_CDF_CACHE[key] = cdf
    return float(cdf[j])


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
    (ties) only make S larger and the test stays valid. The convolution is done in log space
    (np.logaddexp over shifted copies) so tails such as 40^−1000 (log10 ≈ −1602) stay finite.

    Lattice step: h = max(resolution, ln(slots)/⌊(max_bins−1)/C⌋) ≈ max(resolution,
    C·ln(slots)/max_bins), so the lattice never exceeds ``max_bins`` bins; for very large C the step
    therefore grows (coarser statistic, still exact for the h used). Cost is
    O(C·#distinct g·min(s_obs, s_max − s_obs)/h); null tables are cached per (slots, C, h), and
    the result is deterministic (does not depend on the cache).

    ranks: integer-valued, 1 <= r <= slots, one per class (any shape, flattened).
    Returns the natural-log p-value (<= 0).
    """
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 2:
        raise UsageError(f"slots must be an integer >= 2 (got {slots!r})")
    slots = int(slots)
    if isinstance(max_bins, bool) or not isinstance(max_bins, (int, np.integer)):
        raise UsageError(f"max_bins must be an integer (got {max_bins!r})")
    if not (isinstance(resolution, (int, float)) and math.isfinite(resolution) and resolution > 0):
        raise UsageError(f"resolution must be a finite number > 0 (got {resolution!r})")
    r = np.asarray(ranks)
    if r.dtype == np.bool_ or not (
        np.issubdtype(r.dtype, np.integer) or np.issubdtype(r.dtype, np.floating)
    ):
        raise UsageError(f"ranks must be numeric integers (got dtype {r.dtype})")
    r = r.ravel()
    classes = r.size
    if classes == 0:
        raise UsageError("rank combination needs at least one class")
    rf = r.astype(np.float64)
    if not np.all(np.isfinite(rf)) or np.any(rf != np.round(rf)):
        raise UsageError("ranks must be integer-valued")
    if np.any(rf < 1) or np.any(rf > slots):
        raise UsageError(f"ranks must lie in 1..{slots} (slots)")
    if max_bins < classes + 1:
        raise UsageError(f"max_bins must be > the number of classes ({classes}); got {max_bins}")
    h, bins, top = _rank_lattice(slots, classes, resolution, int(max_bins))
    s_obs = int(np.sum(bins[rf.astype(np.int64) - 1]))  # S / h, an exact integer
    s_max = classes * top
    if s_obs >= s_max:
        return 0.0
    mean = classes * float(np.mean(bins))
    if s_obs < mean or s_obs < s_max - s_obs - 1:
        return min(0.0, _rank_cdf_at(bins, slots, classes, h, "low", s_obs))
    # Upper half: P(S <= s) = 1 − P(S' <= s_max − s − 1) with S' = Σ (top − k(r)); there P(S <= s)
    # is at least about P(S <= mean), so the subtraction loses no meaningful precision.
    log_q = _rank_cdf_at(top - bins, slots, classes, h, "high", s_max - s_obs - 1)
    return float(min(0.0, math.log1p(-math.exp(log_q))))
