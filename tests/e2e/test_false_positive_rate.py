"""Statistical safety (issue #7): the false-positive rate of the exact tests and of the verdict,
measured over 1000 fresh random keys for one clean model on real probe images.

Everything key-independent is computed once in the verification seam's Evidence; each key is then
scored with :func:`radmark.verify.tests.score` and combined with :func:`combine`, the functions
``radmark verify`` itself calls.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from scipy import stats as st

from radmark.keys.keypair import SecretKey
from radmark.keys.store import Keystore
from radmark.verify.evidence import prepare
from radmark.verify.pullback import PULLBACK
from radmark.verify.statistics import LN10
from radmark.verify.tests import combine, score
from radmark.verify.white_box import WHITE_BOX
from tests.factories import make_marker, make_record, make_shards

KEYS = 1000


def test_white_box_false_positive_rate(tmp_path: Path) -> None:
    marker = make_marker(tmp_path / "m.safetensors", seed=0)
    suspect = make_marker(tmp_path / "s.safetensors", seed=1)  # never saw a mark
    make_shards(tmp_path / "probe", n=600, per_shard=300, offset=2000)
    record = make_record(tmp_path / "ks", marker)
    evidence = prepare(
        str(suspect), store=Keystore.open(tmp_path / "ks"), probe=[str(tmp_path / "probe")]
    )
    assert evidence.probe is not None and evidence.probe.labels is not None
    log10_p, pull, verdict = [], [], []
    for i in range(KEYS):
        # fixed, distinct keys: the test is deterministic (no flaky CI), still 1000 keys
        key = SecretKey(hashlib.sha256(b"fpr-key-%d" % i).digest())
        tests = score(evidence, record, key, [WHITE_BOX, PULLBACK])
        log10_p.append(tests[WHITE_BOX].log10_p)
        pull.append(tests[PULLBACK].log10_p)
        verdict.append(combine(tests.values()) / LN10)
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
