"""Time of the exact rank tail (radmark.verify.ranks.rank_log_sf), old sequential vs new FFT (issue #17).

    python -m bench.rank_tail_time [--out bench/results] [--old-timeout 300] [--skip-old]

Cases: C = 10, 100, 1000 classes with slots 40 (the white-box rank test), 10,000 units with
slots 2 and 8 (the per-image twin test), 1000 units with slots 1000 (the key-image test). Each is
timed on a null draw (uniform ranks: the bulk, the old code's expensive case) and a signal draw
(half the units at rank 1: a deep tail), both with cold caches, at the default lattice
(resolution 1e-3, max_bins 200,000). The old implementation (lattice.rank_log_sf_reference) runs in a child process
with a wall-clock limit, since at 10,000 units it takes many minutes; a case past the limit is
reported as ``old_s`` = the limit with ``old_timed_out`` = true (a lower bound).

Prints one JSON line; with ``--out DIR`` also writes ``DIR/rank-tail-time-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from radmark.verify import ranks as stats
from radmark.verify.lattice import rank_log_sf_reference

CASES: list[tuple[str, int, int]] = [
    ("C=10 slots=40", 10, 40),
    ("C=100 slots=40", 100, 40),
    ("C=1000 slots=40", 1000, 40),
    ("N=10000 slots=2", 10_000, 2),
    ("N=10000 slots=8", 10_000, 8),
    ("N=1000 slots=1000", 1000, 1000),
]


def draws(units: int, slots: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The null draw (uniform ranks) and a signal draw (each unit at rank 1 with probability ½,
    else uniform), fixed by the seed so old and new see the same input."""
    rng = np.random.default_rng(seed + units + slots)
    null = rng.integers(1, slots + 1, units)
    signal = np.where(rng.random(units) < 0.5, 1, rng.integers(1, slots + 1, units))
    return {"null": null, "signal": signal}


def _clear() -> None:
    stats.clear_caches()


def time_new(ranks: np.ndarray, slots: int) -> tuple[float, float]:
    _clear()
    t0 = time.perf_counter()
    lp = stats.rank_log_sf(ranks, slots)
    return time.perf_counter() - t0, lp


def _old_child(ranks: np.ndarray, slots: int, out: Any) -> None:
    _clear()
    t0 = time.perf_counter()
    lp = rank_log_sf_reference(ranks, slots)
    out.put((time.perf_counter() - t0, lp))


def time_old(ranks: np.ndarray, slots: int, limit: float) -> tuple[float, float | None, bool]:
    """(seconds, ln p or None, timed out) of the reference, in a child process we can stop."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_old_child, args=(ranks, slots, out), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    proc.join(limit)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return time.perf_counter() - t0, None, True
    seconds, lp = out.get(timeout=10)
    return seconds, lp, False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON result file")
    ap.add_argument("--old-timeout", type=float, default=300.0, help="seconds per old call")
    ap.add_argument("--skip-old", action="store_true", help="time the new implementation only")
    args = ap.parse_args(argv)

    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    for name, units, slots in CASES:
        for kind, ranks in draws(units, slots).items():
            new_s, new_lp = time_new(ranks, slots)
            row: dict[str, Any] = {
                "case": name,
                "units": units,
                "slots": slots,
                "draw": kind,
                "new_s": round(new_s, 4),
                "log10_p": new_lp / math.log(10),
            }
            if not args.skip_old:
                old_s, old_lp, timed_out = time_old(ranks, slots, args.old_timeout)
                row["old_s"] = round(old_s, 2)
                row["old_timed_out"] = timed_out
                row["abs_diff_ln_p"] = None if old_lp is None else abs(new_lp - old_lp)
            rows.append(row)
    result = {
        "schema": "radmark-rank-tail-time-v1",
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_end": list(os.getloadavg()),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "lattice": {"resolution": 1e-3, "max_bins": 200_000},
        "tolerance_ln_p": stats.RANK_LOG_TOL,
        "old_timeout_s": None if args.skip_old else args.old_timeout,
        "cases": rows,
    }
    line = json.dumps(result, separators=(",", ":"))
    print(line, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        (args.out / f"rank-tail-time-{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
