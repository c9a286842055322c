"""Aligning a suspect model's feature space with the marker's (white-box test, steps 3-4).

The carriers live in the marking network's feature space; a suspect trained from scratch has its
own, unrelated basis (and possibly another dimension). On clean probe images we fit a linear map
``X`` with ``F_m X ≈ F_s`` and use it to bring the suspect's classifier over:
suspect logits ``W_s f_s ≈ W_s Xᵀ f_m``, so ``W̃ = W_s Xᵀ`` are the suspect's class directions as
seen from the marker's space, where they can be compared with the carriers.

All arithmetic is float64: features arrive as float32 and the normal equations square their
condition number. Alignment quality is reported (R², relative residual) because a poor fit makes
the white-box test meaningless, and that must be visible rather than silently reported as
"not detected".

Only numpy is needed; importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radmark.errors import InputError, UsageError

__all__ = ["Alignment", "crossfit_rows", "fit_alignment", "map_classifier"]


@dataclass(frozen=True)
class Alignment:
    """A fitted linear map from marker features to suspect features, with its quality.

    ``matrix`` is ``X`` [d_m, d_s] minimising ``‖F_m X − F_s‖`` (after removing both column means
    when ``center`` is true; the intercept is then ``intercept`` [d_s], and it plays no part in
    mapping the classifier, since a constant offset only shifts logit biases). ``r2`` pools all
    output dimensions: ``1 − SS_res / SS_tot`` with ``SS_tot`` around each column's mean, so it is
    comparable between centred and uncentred fits.
    """

    matrix: np.ndarray
    r2: float
    relative_residual: float
    num_probe: int
    dim_marker: int
    dim_suspect: int
    center: bool
    ridge: float
    warning: str | None
    intercept: np.ndarray | None = None


def _as_features(a: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise UsageError(
            f"{what} must be a 2-D array [N images, d features], got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UsageError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise InputError(
            f"{what} contain NaN or inf (first at probe image {bad}); the model produced "
            "non-finite features, so it cannot be aligned"
        )
    return arr


def fit_alignment(
    f_marker: np.ndarray,
    f_suspect: np.ndarray,
    *,
    center: bool = False,
    ridge: float = 0.0,
) -> Alignment:
    """Least-squares map ``X`` [d_m, d_s] with ``f_marker @ X ≈ f_suspect``.

    ``center=False`` is the paper's fit (no intercept). ``ridge > 0`` solves
    ``(F_mᵀF_m + ridge·I) X = F_mᵀF_s`` (``ridge`` is absolute, in squared feature units), which
    stays defined when the probe set is small or the marker has dead (all-zero) features. Without
    ridge we refuse ``N ≤ d_m``: the system is then underdetermined, any ``F_s`` is fitted exactly,
    and R² = 1 would say nothing about the suspect.
    """
    fm = _as_features(f_marker, "marker features")
    fs = _as_features(f_suspect, "suspect features")
    if fm.shape[0] != fs.shape[0]:
        raise UsageError(
            f"marker features have {fm.shape[0]} probe images but suspect features have "
            f"{fs.shape[0]}; extract both from the same probe set"
        )
    ridge = float(ridge)
    if not np.isfinite(ridge) or ridge < 0:
        raise UsageError(f"ridge must be a finite number >= 0, got {ridge}")
    n, d_m = fm.shape
    d_s = fs.shape[1]
    if n == 0 or d_m == 0 or d_s == 0:
        raise InputError(f"empty features ({n} probe images, d_m={d_m}, d_s={d_s})")

    # Centring spends one degree of freedom on the intercept.
    n_eff = n - 1 if center else n
    if ridge == 0.0 and n_eff <= d_m:
        raise InputError(
            f"probe has {n} images but the marker's features have d={d_m}; need well above d "
            f"(say {10 * d_m}), or pass a ridge penalty"
        )
    warning: str | None = None
    if n < 2 * d_m:
        warning = (
            f"only {n} probe images for d={d_m} features: alignment is underdetermined / weak; "
            f"use N >= {10 * d_m}"
        )

    fs_mean = fs.mean(axis=0)
    ss_tot = float(((fs - fs_mean) ** 2).sum())
    if ss_tot <= 0.0:
        raise InputError(
            "the suspect's features are identical on every probe image; the model (or the "
            "probe set) is degenerate and cannot be aligned"
        )

    if center:
        fm_mean = fm.mean(axis=0)
        a, b = fm - fm_mean, fs - fs_mean
    else:
        a, b = fm, fs
    if ridge > 0.0:
        gram = a.T @ a
        gram[np.diag_indices_from(gram)] += ridge
        matrix = np.linalg.solve(gram, a.T @ b)
    else:
        matrix, *_ = np.linalg.lstsq(a, b, rcond=None)
    matrix = np.ascontiguousarray(matrix, dtype=np.float64)

    intercept: np.ndarray | None = None
    if center:
        intercept = fs_mean - fm_mean @ matrix
        pred = fm @ matrix + intercept
    else:
        pred = fm @ matrix
    resid = fs - pred
    ss_res = float((resid**2).sum())
    norm_s = float(np.linalg.norm(fs))
    return Alignment(
        matrix=matrix,
        r2=1.0 - ss_res / ss_tot,
        relative_residual=float(np.sqrt(ss_res)) / norm_s,
        num_probe=n,
        dim_marker=d_m,
        dim_suspect=d_s,
        center=bool(center),
        ridge=ridge,
        warning=warning,
        intercept=intercept,
    )


def map_classifier(weight: np.ndarray, alignment: Alignment) -> np.ndarray:
    """The suspect's classifier rows in the marker's space, ``W_s Xᵀ``, each of unit norm.

    Rows are normalised because the test statistic is a cosine with the carrier. A row that maps
    to zero has no direction to test, so it is an error rather than a silent NaN.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != alignment.dim_suspect:
        raise UsageError(
            f"classifier weight has shape {w.shape} but the alignment expects "
            f"[C, {alignment.dim_suspect}]; use the weight of the model the suspect features "
            "came from"
        )
    if not np.isfinite(w).all():
        raise InputError("the suspect's classifier weight contains NaN or inf")
    mapped = w @ alignment.matrix.T
    norms = np.linalg.norm(mapped, axis=1)
    scale = float(np.abs(mapped).max()) if mapped.size else 0.0
    tiny = np.finfo(np.float64).tiny
    zero = np.flatnonzero(~(norms > max(tiny, 1e-12 * scale)))
    if zero.size:
        raise InputError(
            f"class {int(zero[0])}'s classifier row maps to zero in the marker's feature space; "
            "the alignment carries no information for it (check the probe set and R²)"
        )
    return mapped / norms[:, None]


def crossfit_rows(
    weight: np.ndarray,
    f_marker: np.ndarray,
    f_suspect: np.ndarray,
    labels: np.ndarray,
    *,
    center: bool = False,
) -> np.ndarray:
    """Row c of ``W_s Xᵀ`` with ``X`` fitted on every probe image but those labelled c; unit rows.

    Why: a probe holding images marked with the key under test makes a fit on all of it depend on
    the carriers (issue #17, measured in docs/method.md). Each image is marked along its own
    label's carrier only and carriers are independent across classes, so the map that row c goes
    through never saw an image moved along u_c, and cos(row c, u_c) keeps its exact null whatever
    the probe holds, as long as the labels are the ones the images were marked with. One d×d solve
    per class from the downdated normal equations (no ridge: each fit must stay overdetermined;
    features dead on the whole probe are left out, as the full fit's minimum-norm solution does).
    """
    w = np.asarray(weight, dtype=np.float64)
    fm = _as_features(f_marker, "marker features")
    fs = _as_features(f_suspect, "suspect features")
    y = np.asarray(labels)
    n, d_m = fm.shape
    if fs.shape[0] != n or y.shape != (n,):
        raise UsageError(f"{n} marker rows, {fs.shape[0]} suspect rows, {y.shape} labels")
    if w.ndim != 2 or w.shape[1] != fs.shape[1]:
        raise UsageError(f"classifier weight has shape {w.shape}, features d={fs.shape[1]}")
    if not np.isfinite(w).all():
        raise InputError("the suspect's classifier weight contains NaN or inf")
    live = np.flatnonzero(np.any(fm != 0.0, axis=0))  # dead features: 0 in the min-norm fit
    fm = fm[:, live]
    gram, cross = fm.T @ fm, fm.T @ fs
    sum_m, sum_s = fm.sum(axis=0), fs.sum(axis=0)
    rows = np.zeros((w.shape[0], d_m))
    for c in range(w.shape[0]):
        own = y == c
        keep = n - int(own.sum())
        if keep - (1 if center else 0) <= d_m:
            raise InputError(
                f"without the {n - keep} probe images of class {c}, {keep} are left for d={d_m}: "
                "the leave-class-out alignment needs well above d images outside every class"
            )
        a, b = fm[own], fs[own]
        g, x = gram - a.T @ a, cross - a.T @ b
        if center:
            m_m, m_s = sum_m - a.sum(axis=0), sum_s - b.sum(axis=0)
            g, x = g - np.outer(m_m, m_m) / keep, x - np.outer(m_m, m_s) / keep
        rhs = x @ w[c]
        try:  # = X_c w_c, row c of W_s X_cᵀ; the minimum-norm one, as lstsq gives the full fit
            rows[c, live] = np.linalg.solve(g, rhs)
        except np.linalg.LinAlgError:  # rank-deficient without class c
            rows[c, live] = np.linalg.lstsq(g, rhs, rcond=None)[0]
    norms = np.linalg.norm(rows, axis=1)
    zero = np.flatnonzero(~(norms > 1e-300))
    if zero.size:
        raise InputError(
            f"class {int(zero[0])}'s classifier row maps to zero in the marker's space"
        )
    return rows / norms[:, None]
