"""Is the pull-back test's null exact for fixed directions? (issue #14 item 5: the KS flags.)

The pull-back test's p-value, for a fixed suspect, is a function of the fresh key's carriers
only: v_k and v_ref_k (the suspect's and the marker's pull-back directions) are computed from
the models and clean probe images. So its null can be checked without any model: fix v, v_ref
(random, and correlated as a suspect's are with its marker's), draw many keys through the real
carrier derivation (``derive_carriers``), and compute the statistic. The statistic is computed
vectorised over keys (the residual cosines, ``log_cosine_sf`` with d − 1, Fisher); on the first
``--check`` keys it is compared with the library's own ``residual_cosines`` +
``fisher_cosine_test``, which must agree to 1e-9 in ln p. If the formula or the code were off, a
KS test on this many keys would see it.

    python -m bench.experiments.pullback_null_synthetic [--keys 100000] [--trials 3] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from scipy import stats

from radmark.keys.carriers import derive_carriers
from radmark.verify.pullback import residual_cosines
from radmark.verify.statistics import log_cosine_sf
from radmark.verify.white_box import fisher_cosine_test


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--check", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    c, d = args.classes, args.dim
    out: dict = {"keys": args.keys, "classes": c, "dim": d, "trials": []}
    for _ in range(args.trials):
        t0 = time.perf_counter()
        v = rng.normal(size=(c, d))
        v_ref = v + 0.3 * rng.normal(size=(c, d))  # correlated, as a suspect's with its marker's
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v_ref /= np.linalg.norm(v_ref, axis=1, keepdims=True)
        u = np.stack(
            [derive_carriers(os.urandom(32), d, c, "smallcnn@sha256:synthetic")
             for _ in range(args.keys)]
        ).astype(np.float64)  # fmt: skip
        a = v - np.sum(v * v_ref, 1, keepdims=True) * v_ref
        b = u - np.sum(u * v_ref, 2, keepdims=True) * v_ref
        cos = np.sum(b * a, 2) / (np.linalg.norm(b, axis=2) * np.linalg.norm(a, axis=1))
        lp = log_cosine_sf(np.clip(cos, -1.0, 1.0), d - 1)
        ln_p = stats.chi2.logsf(-2.0 * lp.sum(1), 2 * c)
        for k in range(min(args.check, args.keys)):
            ref = fisher_cosine_test("pb", residual_cosines(v, v_ref, u[k]), d - 1, "").log_p
            assert abs(ref - ln_p[k]) < 1e-9, (k, ref, ln_p[k])
        ps = np.exp(ln_p)
        row = {
            "ks_p": float(stats.kstest(ps, "uniform").pvalue),
            "frac_below_0.01": float(np.mean(ps < 0.01)),
            "frac_below_0.05": float(np.mean(ps < 0.05)),
            "checked_against_library": min(args.check, args.keys),
            "seconds": time.perf_counter() - t0,
        }
        out["trials"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
