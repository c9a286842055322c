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
