"""Statistical safety (issue #7): the false-positive rate of the verdict-bearing white-box test,
measured over 1000 fresh random keys for one clean model on real probe images.

Features and the alignment are computed once (they do not depend on the key); for each key the
carriers are derived exactly as verify derives them and scored by ``radmark.verify.white_box``,
the function verify itself uses.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from scipy import stats as st

from radmark.keys.carriers import derive_carriers
from radmark.keys.keypair import SecretKey
from radmark.models import load_model
from radmark.verify.alignment import fit_alignment, map_classifier
from radmark.verify.pullback import residual_cosines
from radmark.verify.run import (
    PULLBACK_TEST,
    VERDICT_TEST,
    _features,
    _gray_adapter,
    _load_probe,
    _pullback,
    combine_exact,
    pullback_test,
    white_box,
)
from tests.factories import make_marker, make_shards

KEYS = 1000


def test_white_box_false_positive_rate(tmp_path: Path) -> None:
    marker = load_model(str(make_marker(tmp_path / "m.safetensors", seed=0)))
    suspect = load_model(str(make_marker(tmp_path / "s.safetensors", seed=1)))  # never saw a mark
    make_shards(tmp_path / "probe", n=600, per_shard=300, offset=2000)
    images, labels = _load_probe([str(tmp_path / "probe")], None)
    assert labels is not None
    f_m = _features(_gray_adapter(marker), images, 200, "cpu")
    f_s = _features(_gray_adapter(suspect), images, 200, "cpu")
    w = map_classifier(suspect.weight().numpy(), fit_alignment(f_m, f_s))
    marker_id = f"{marker.name}@sha256:{marker.sha256}"
    v = _pullback(suspect, marker, images, labels, 10, 2000, "cpu")  # as verify computes it
    v_ref = _pullback(marker, marker, images, labels, 10, 2000, "cpu")
    log10_p, pull, verdict = [], [], []
    for i in range(KEYS):
        # fixed, distinct keys: the test is deterministic (no flaky CI), still 1000 keys
        key = SecretKey(hashlib.sha256(b"fpr-key-%d" % i).digest())
        u = derive_carriers(key.carrier_seed(), marker.dim, 10, marker_id)
        _, tests, _ = white_box(np.sum(w * u.astype(np.float64), axis=1), marker.dim)
        tests[PULLBACK_TEST] = pullback_test(
            residual_cosines(v, v_ref, u), marker.dim - 1, labelled=True
        )
        log10_p.append(tests[VERDICT_TEST].log10_p)
        pull.append(tests[PULLBACK_TEST].log10_p)
        verdict.append(combine_exact(tests) / math.log(10))
    p = 10.0 ** np.array(log10_p)
    for alpha in (0.05, 0.01):
        hi = st.binom.ppf(0.995, KEYS, alpha)  # binomial 99% band, upper side
        assert np.sum(p < alpha) <= hi, (alpha, np.sum(p < alpha))
    assert np.sum(p < 1e-3) <= st.binom.ppf(0.995, KEYS, 1e-3)
    assert st.kstest(p, "uniform").pvalue > 0.01
    assert math.isfinite(min(log10_p))
    # the pull-back test: uniform too
    pp = 10.0 ** np.array(pull)
    assert np.sum(pp < 0.01) <= st.binom.ppf(0.995, KEYS, 0.01)
    assert st.kstest(pp, "uniform").pvalue > 0.01
    # the verdict (Bonferroni minimum over both exact tests): valid, i.e. never too many small
    # p-values (it is conservative by design, so only the one-sided KS applies)
    pv = 10.0 ** np.array(verdict)
    for alpha in (0.05, 0.01, 1e-3):
        assert np.sum(pv < alpha) <= st.binom.ppf(0.995, KEYS, alpha), alpha
    assert st.kstest(pv, "uniform", alternative="greater").pvalue > 0.01
    for name, q in (("white_box_fisher", p), ("pullback_fisher", pp), ("verdict", pv)):
        print(
            f"FPR {name} over {KEYS} keys: <0.05 {np.mean(q < 0.05):.3f}, "
            f"<0.01 {np.mean(q < 0.01):.3f}, <1e-3 {np.mean(q < 1e-3):.4f}, "
            f"KS p {st.kstest(q, 'uniform').pvalue:.3f}"
        )
