"""The white-box statistic (``radmark.verify.white_box``) and the verify JSON without models: the
exact null, the statistic against independent references, and the JSON contract.

Null calibration (method.md: no statistic enters a verdict without one): classifier rows that
are independent of the key, tested against carriers derived from many keys, must give uniform
combined p-values, for C = 10 up to C = 1000.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from radmark.keys.carriers import derive_carriers
from radmark.keys.keypair import SecretKey
from radmark.report.jsonout import verify_json as result_to_json
from radmark.verify.run import KeyResult, VerifyResult
from radmark.verify.statistics import LN10, log_normal_sf, zscore
from radmark.verify.tests import TestResult, combine
from radmark.verify.white_box import WHITE_BOX, fisher_cosine_test

VERDICT_TEST = WHITE_BOX

MARKER_ID = "smallcnn@sha256:" + "ab" * 32


def white_box(cos: np.ndarray, d: int) -> tuple[np.ndarray, dict[str, TestResult], float]:
    """Per-class ln p, the tests and the combined ln p, as verify computes them."""
    t = fisher_cosine_test(WHITE_BOX, np.asarray(cos), d, "white box")
    return np.array(t.unit_log_p), {WHITE_BOX: t}, combine([t])


def _key(tag: str, i: int) -> SecretKey:
    return SecretKey(hashlib.sha256(f"{tag}-{i}".encode()).digest())


def _unit_rows(rng: np.random.Generator, c: int, d: int) -> np.ndarray:
    w = rng.standard_normal((c, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


@pytest.mark.parametrize(("c", "d", "trials"), [(10, 128, 400), (100, 256, 300), (1000, 64, 100)])
def test_null_random_classifier_rows_against_derived_carriers(c: int, d: int, trials: int) -> None:
    """Fixed (deterministic) draws: rows from a seeded generator, carriers from hashed keys."""
    rng = np.random.default_rng(c * 7919 + d)
    log_p = np.empty(trials)
    for i in range(trials):
        w = _unit_rows(rng, c, d)
        # Something a real head has: rows far from isotropic (a shared mean direction).
        w = w + 0.5 * w[0]
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        u = derive_carriers(_key(f"unit-null-{c}-{d}", i).carrier_seed(), d, c, MARKER_ID)
        _, tests, combined = white_box(np.sum(w * u.astype(np.float64), axis=1), d)
        log_p[i] = combined
        assert tests[VERDICT_TEST].log10_p == pytest.approx(combined / LN10)
    p = np.exp(log_p)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    # About 1% below 0.01: binomial upper bound at ~1e-3 false-alarm rate.
    assert int(np.sum(p < 0.01)) <= stats.binom.ppf(0.999, trials, 0.01)
    assert int(np.sum(p < 0.1)) <= stats.binom.ppf(0.999, trials, 0.1)


def test_white_box_matches_independent_references() -> None:
    """Per-class p from the Beta form of the null, combined with scipy's Fisher."""
    rng = np.random.default_rng(3)
    d = 128
    cos = rng.uniform(-0.2, 0.3, size=10)
    lp, tests, combined = white_box(cos, d)
    a = (d - 1) / 2
    ref = stats.beta.sf((cos + 1) / 2, a, a)
    np.testing.assert_allclose(np.exp(lp), ref, rtol=1e-9)
    _, fisher_p = stats.combine_pvalues(ref, method="fisher")
    assert math.exp(combined) == pytest.approx(fisher_p, rel=1e-8)
    assert tests[VERDICT_TEST].exact
    z = float(np.mean(cos) * math.sqrt(cos.size * d))
    assert zscore(cos, d) == pytest.approx(z)
    assert log_normal_sf(z) == pytest.approx(stats.norm.logsf(z))


def test_white_box_planted_signal_is_strong_and_finite() -> None:
    """A head aligned with its carriers: p far below float64's range, still finite."""
    d, c = 512, 1000
    u = derive_carriers(_key("planted", 0).carrier_seed(), d, c, MARKER_ID).astype(np.float64)
    rng = np.random.default_rng(0)
    w = 0.5 * u + _unit_rows(rng, c, d)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    _, tests, combined = white_box(np.sum(w * u, axis=1), d)
    assert math.isfinite(combined) and combined / LN10 < -1000
    # A weak signal with few classes is weak evidence: the power problem of method.md.
    _, _, weak = white_box(np.full(10, 0.03), 512)
    assert -1.5 < weak / LN10 < -0.5


def test_white_box_sign_matters() -> None:
    d = 128
    _, _, pos = white_box(np.full(10, 0.2), d)
    _, _, neg = white_box(np.full(10, -0.2), d)
    assert pos / LN10 < -10
    assert neg / LN10 > -1e-6  # anti-aligned rows are no evidence


def _result(n_keys: int) -> VerifyResult:
    rs = []
    for i in range(n_keys):
        cos = np.linspace(-0.1, 0.2, 10) + 0.01 * i
        _lp, tests, combined = white_box(cos, 128)
        rs.append(
            KeyResult(
                fingerprint=f"sha256:{i:064x}",
                record=f"sha256:{i + 100:064x}",
                marker=MARKER_ID,
                method="radioactive",
                num_classes=10,
                dim=128,
                tests=tests,
                log_p=combined,
                log_p_adjusted=min(0.0, combined + math.log(n_keys)),
                detected=False,
                combination="",
            )
        )
    return VerifyResult(
        model="m.safetensors",
        model_sha256="cd" * 32,
        arch="smallcnn",
        alpha=1e-3,
        detected=False,
        results=rs,
        probe_size=1000,
        correction="holm" if n_keys > 1 else None,
    )


def test_result_to_json_has_the_contract_fields() -> None:
    doc = result_to_json(_result(2))
    json.dumps(doc, allow_nan=False)  # plain JSON types, no NaN
    for f in ("model_sha256", "alpha", "detected", "results"):
        assert f in doc
    assert doc["correction"] == "holm"
    for r in doc["results"]:
        for f in ("fingerprint", "record", "num_classes", "dim", "tests", "log10_p", "detected"):
            assert f in r
        assert set(r["tests"]) == {VERDICT_TEST}
        assert r["cosines"] and len(r["class_log10_p"]) == 10
        assert all("log10_p" in t for t in r["tests"].values())
        assert r["log10_p"] == r["tests"][VERDICT_TEST]["log10_p"]
        assert r["log10_p_adjusted"] >= r["log10_p"]


def test_result_to_json_never_contains_carriers() -> None:
    """The report holds cosines (public), never the carriers they were computed against."""
    res = _result(1)
    text = json.dumps(result_to_json(res))
    u = derive_carriers(_key("json", 0).carrier_seed(), 128, 10, MARKER_ID)
    for v in u[0, :5]:
        assert repr(float(v)) not in text


def test_test_result_is_frozen() -> None:
    t = TestResult("x", -1.0, True, 2.0, "d", "carriers")
    assert t.log10_p == pytest.approx(-1.0 / LN10)
    with pytest.raises(AttributeError):
        t.log_p = 0.0  # type: ignore[misc]


def test_holm_runs_over_models_times_keys(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Issue #17 item 3 through the real ``verify_models`` path, 2 models × 2 keys, with designed
    per-pair p-values (the scoring is replaced; records, evidence, combination, Holm and the
    verdict are the library's): Holm runs over all four pairs, which neither Holm within each key
    nor within each model reproduces, and the verdict at α = 0.003 follows the four-pair Holm."""
    from radmark.report import console
    from radmark.verify import run
    from radmark.verify.statistics import holm_adjust
    from tests.factories import make_marker, make_record, make_shards

    marker = str(make_marker(tmp_path / "m.safetensors"))
    other = str(make_marker(tmp_path / "o.safetensors", seed=3))
    make_shards(tmp_path / "probe", n=40, per_shard=40, offset=1000, with_json=False)
    k1, k2 = (make_record(tmp_path / "ks", Path(marker)).address for _ in range(2))
    p = {(marker, k1): 0.001, (marker, k2): 0.02, (other, k1): 0.03, (other, k2): 0.04}

    def designed(evidence, record, key, names):  # noqa: ANN001, ANN202
        lp = math.log(p[(evidence.suspect.source, record.address)])
        return {WHITE_BOX: TestResult(WHITE_BOX, lp, True, 0.0, "designed", "carriers")}

    monkeypatch.setattr(run, "score_record", designed)
    res = run.verify_models([marker, other], keystore=tmp_path / "ks", alpha=0.003,
                            probe=[str(tmp_path / "probe")])  # fmt: skip
    got = {(r.model, r.record.removeprefix("sha256:")): math.exp(r.log_p_adjusted)
           for r in res.results}  # fmt: skip
    assert got == pytest.approx(  # Holm over 4: 4·0.001, then max(3·0.02, 2·0.03, 0.04)
        {(marker, k1): 0.004, (marker, k2): 0.06, (other, k1): 0.06, (other, k2): 0.06}
    )

    def holm_within(group: int) -> dict:
        out = {}
        for g in {pair[group] for pair in p}:
            pairs = [pair for pair in p if pair[group] == g]
            adj = holm_adjust(np.log([p[pair] for pair in pairs]))
            out.update({pair: math.exp(a) for pair, a in zip(pairs, adj, strict=True)})
        return out

    for group in (0, 1):  # per model, per key: each differs from what verify reported
        assert holm_within(group) != pytest.approx(got)
    assert not res.detected  # per key, (marker, k1) would be 0.002 <= 0.003: detected
    assert res.correction == "holm over 2 models x 2 keys"
    console.verify(res)
    assert "4 tests: 2 models × 2 keys" in capsys.readouterr().out
