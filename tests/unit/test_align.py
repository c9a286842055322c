"""Feature alignment: exact recovery, quality measures, and the refusals that keep it honest."""

from __future__ import annotations

import numpy as np
import pytest

from radmark.errors import InputError, UsageError
from radmark.verify.alignment import Alignment, fit_alignment, map_classifier


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_exact_recovery_and_classifier_direction() -> None:
    rng = np.random.default_rng(0)
    n, d_m, d_s, c = 200, 8, 6, 4
    fm = rng.standard_normal((n, d_m))
    a = rng.standard_normal((d_m, d_s))
    fs = fm @ a
    al = fit_alignment(fm, fs)
    assert isinstance(al, Alignment)
    assert al.matrix.shape == (d_m, d_s) and al.matrix.dtype == np.float64
    np.testing.assert_allclose(al.matrix, a, atol=1e-10)
    assert al.r2 == pytest.approx(1.0, abs=1e-12)
    assert al.relative_residual < 1e-10
    assert (al.num_probe, al.dim_marker, al.dim_suspect) == (n, d_m, d_s)
    assert al.warning is None and al.center is False and al.ridge == 0.0

    w = rng.standard_normal((c, d_s))
    mapped = map_classifier(w, al)
    assert mapped.shape == (c, d_m)
    np.testing.assert_allclose(np.linalg.norm(mapped, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(mapped, _unit_rows(w @ a.T), atol=1e-10)


def test_noise_lowers_r2() -> None:
    rng = np.random.default_rng(1)
    fm = rng.standard_normal((300, 5))
    a = rng.standard_normal((5, 5))
    clean = fit_alignment(fm, fm @ a).r2
    noisy = fit_alignment(fm, fm @ a + 0.5 * rng.standard_normal((300, 5)))
    pure = fit_alignment(fm, rng.standard_normal((300, 5)))
    assert clean > noisy.r2 > pure.r2
    assert 0.3 < noisy.r2 < 0.99
    assert abs(pure.r2) < 0.1
    assert noisy.relative_residual > 0.1


def test_too_few_probe_images_refused_and_warned() -> None:
    rng = np.random.default_rng(2)
    d = 10
    with pytest.raises(InputError, match="need well above d"):
        fit_alignment(rng.standard_normal((d, d)), rng.standard_normal((d, 3)))
    with pytest.raises(InputError):
        fit_alignment(rng.standard_normal((d + 1, d)), rng.standard_normal((d + 1, 3)), center=True)
    weak = fit_alignment(rng.standard_normal((d + 5, d)), rng.standard_normal((d + 5, 3)))
    assert weak.warning is not None and "10" in weak.warning
    # ridge makes a small probe set legal (but still warned about)
    ridged = fit_alignment(rng.standard_normal((d, d)), rng.standard_normal((d, 3)), ridge=1.0)
    assert ridged.warning is not None


def test_center_handles_offset() -> None:
    rng = np.random.default_rng(3)
    fm = rng.standard_normal((150, 6)) + 3.0
    a = rng.standard_normal((6, 4))
    offset = np.array([5.0, -2.0, 7.0, 1.0])
    fs = fm @ a + offset
    centred = fit_alignment(fm, fs, center=True)
    np.testing.assert_allclose(centred.matrix, a, atol=1e-9)
    assert centred.intercept is not None
    np.testing.assert_allclose(centred.intercept, offset, atol=1e-9)
    assert centred.r2 == pytest.approx(1.0, abs=1e-10)
    plain = fit_alignment(fm, fs, center=False)
    assert plain.r2 < centred.r2 - 1e-3


def test_ridge_matches_normal_equations_and_shrinks() -> None:
    rng = np.random.default_rng(4)
    fm = rng.standard_normal((60, 5))
    fs = fm @ rng.standard_normal((5, 3)) + 0.1 * rng.standard_normal((60, 3))
    lam = 10.0
    al = fit_alignment(fm, fs, ridge=lam)
    expected = np.linalg.solve(fm.T @ fm + lam * np.eye(5), fm.T @ fs)
    np.testing.assert_allclose(al.matrix, expected, atol=1e-12)
    assert al.ridge == lam
    assert np.linalg.norm(al.matrix) < np.linalg.norm(fit_alignment(fm, fs).matrix)
    with pytest.raises(UsageError):
        fit_alignment(fm, fs, ridge=-1.0)


def test_rows_normalised_and_bad_inputs() -> None:
    rng = np.random.default_rng(5)
    fm = rng.standard_normal((50, 4))
    fs = fm @ rng.standard_normal((4, 3))
    al = fit_alignment(fm.astype(np.float32), fs.astype(np.float32))
    w = rng.standard_normal((7, 3)) * 100.0
    np.testing.assert_allclose(np.linalg.norm(map_classifier(w, al), axis=1), 1.0, atol=1e-12)
    w[2] = 0.0
    with pytest.raises(InputError, match="class 2"):
        map_classifier(w, al)
    with pytest.raises(UsageError):
        map_classifier(rng.standard_normal((7, 4)), al)
    with pytest.raises(UsageError):
        fit_alignment(fm, fs[:-1])
    bad = fm.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit_alignment(bad, fs)
    with pytest.raises(InputError):
        fit_alignment(fm, np.ones_like(fs))
