"""The rank lattice and its sequential exact convolution: the definition rank tests rest on.

A rank test's statistic is S = Σ_c ⌈ln r_c / h⌉·h with ranks i.i.d. uniform on 1..slots under H0;
:func:`rank_lattice` fixes the lattice step h and every rank's bin, and
:func:`rank_log_sf_reference` computes P(S <= s_obs) by convolving unit by unit in log space.
That is exact but slow at thousands of units; ``verify/ranks.py`` computes the same tail by FFT
with a proven error bound and falls back to this one when it cannot certify its answer. Both
names are public: tests and ``bench/rank_tail_time.py`` check the FFT against this reference.
"""

from __future__ import annotations

import math

import numpy as np

from radmark.errors import UsageError

_RANK_CDF_CACHE: dict[tuple[int, int, float, str], np.ndarray] = {}
_RANK_CDF_CACHE_MAX = 16


def rank_lattice(
    slots: int, classes: int, resolution: float, max_bins: int
) -> tuple[float, np.ndarray, int]:
    """Step h, the bin k(r) = ⌈ln r / h⌉ of every rank r = 1..slots (int64 [slots]), top bin m.

    The statistic's definition, shared by :func:`rank_log_sf_reference` and ``ranks.rank_log_sf``.
    """
    per_class = (max_bins - 1) // classes  # bins a class may span so that C·m + 1 <= max_bins
    h = max(float(resolution), math.log(slots) / per_class)
    k = np.ceil(np.log(np.arange(1, slots + 1, dtype=np.float64)) / h).astype(np.int64)
    # ln(slots)/h can round to one past per_class; clipping keeps k monotone and deterministic.
    k = np.minimum(np.maximum.accumulate(k), per_class)
    return h, k, int(k[-1])


def _rank_null_log_cdf(bins: np.ndarray, slots: int, classes: int, upto: int) -> np.ndarray:
    """ln P(Σ_c k(r_c) <= j) for j = 0..upto, ranks i.i.d. uniform on 1..slots (exact, log space).

    Sequential convolution of the per-class pmf, one np.logaddexp per shifted copy, truncated at
    ``upto`` (bins above it never feed bins at or below it). Reference implementation: every
    operation combines non-negative terms, so its relative error is a few u per class, but it
    costs O(C·#distinct bins·upto) (about 35 s at C = 1000, slots = 40).
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


def _rank_setup(
    ranks: np.ndarray, slots: int, resolution: float, max_bins: int
) -> tuple[int, int, float, np.ndarray, int, int, int, bool]:
    """Validate the input; the lattice, the observed sum s (in bins) and which tail to compute.

    Returns (slots, classes, h, bins, top, s_obs, s_max, lower) where ``lower`` says whether
    P(S <= s) is computed directly (False: as 1 − P(S' <= s_max − s − 1) with S' = Σ top − k).
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
    h, bins, top = rank_lattice(slots, classes, resolution, int(max_bins))
    s_obs = int(np.sum(bins[rf.astype(np.int64) - 1]))  # S / h, an exact integer
    s_max = classes * top
    mean = classes * float(np.mean(bins))
    # Upper half: P(S <= s) = 1 − P(S' <= s_max − s − 1); there P(S <= s) is at least about
    # P(S <= mean), so the subtraction loses no meaningful precision.
    lower = s_obs < mean or s_obs < s_max - s_obs - 1
    return slots, classes, h, bins, top, s_obs, s_max, lower


def rank_log_sf_reference(
    ranks: np.ndarray, slots: int, *, resolution: float = 1e-3, max_bins: int = 200_000
) -> float:
    """``ranks.rank_log_sf`` by sequential log-space convolution: slow, obviously exact.

    Same statistic, lattice and validation as ``rank_log_sf``, whose fallback it is; the
    reference tests and benchmarks compare that function against.
    """
    slots, classes, h, bins, top, s_obs, s_max, lower = _rank_setup(
        ranks, slots, resolution, max_bins
    )
    if s_obs >= s_max:
        return 0.0
    if lower:
        return min(0.0, _rank_cdf_at(bins, slots, classes, h, "low", s_obs))
    log_q = _rank_cdf_at(top - bins, slots, classes, h, "high", s_max - s_obs - 1)
    return float(min(0.0, math.log1p(-math.exp(log_q))))
