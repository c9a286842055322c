"""The benchmark (bench/README.md): real data, suspects from scratch, the null checked.

    python -m bench.run --quick   # CPU smoke test of the chain (make bench-quick): 2,000 images
    python -m bench.run --full    # GPU: the single-run protocol (ResNet-18 marker, six fractions)

The quick mode is a few-minute smoke test: it checks that every step runs and that the null is
calibrated, and says nothing about detection power. The benchmark that answers "will radmark
detect a model trained on my data?" is the power map, ``make bench`` (``bench/map.py``).

Everything goes through the project's own shard writer and then only through the ``radmark`` CLI
(keygen, marker train, mark, verify) and the bench's suspect trainer, each run as a subprocess whose
exact command line is recorded. The null calibration is done in-process with the library (features
and alignment of a clean suspect computed once, then many fresh random keys).

One JSON file per run is written to ``--out`` (default ``bench/results/``); ``bench/report.py``
turns all of them into ``docs/benchmarks.md`` and its plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import fmnist

REPO = Path(__file__).resolve().parent.parent

# A marking run: name, fraction q, preset and overrides, and the seed of its suspects. q = 0 is
# the control (no marking: the clean shards); it is verified against every run's key.
QUICK: dict[str, Any] = {
    "train_per_class": 200,  # 2,000 training images: marking on 2 shared cores is ~100-200
    "test_per_class": 200,  # image-steps/s, so the marked fraction dominates the budget
    "samples_per_shard": 1000,
    "marker": {"arch": "smallcnn", "epochs": 10},
    "suspects": [
        {"name": "smallcnn", "arch": "smallcnn", "epochs": 10},
        {"name": "linear_probe", "linear_probe": True, "epochs": 30},
    ],
    "runs": [
        {"name": "q10", "fraction": 0.10, "preset": "default"},
        # Every image marked at the default, imperceptible strength (PSNR >= 42 dB guaranteed).
        {"name": "q100", "fraction": 1.0, "preset": "default"},
        # The ceiling: every image marked, with a larger radius (8 levels, so PSNR >= 30 dB is all
        # that is guaranteed) and only 10 steps to fit the CPU budget. Shows what the tests can see
        # when the whole training set carries the mark.
        {"name": "q100_r8", "fraction": 1.0, "preset": "default", "radius": 8, "steps": 10},
        # The same image energy budget (PSNR >= 42 dB per image) as an L2 ball with an L-inf cap
        # of 8 levels: compared with the default at equal fractions.
        {"name": "q10_psnr42", "fraction": 0.10, "preset": "psnr42"},
        {"name": "q100_psnr42", "fraction": 1.0, "preset": "psnr42"},
    ],
    "null_keys": 1000,
    # verification kits for the black-box test: K decoys per class, kit images per class
    "kit": {"decoys": 19, "per_class": 5},
    "mark_batch_size": None,  # radmark mark's default (64)
    "throughput_224": False,
    "deviations": [
        "2,000 train / 2,000 test images (class-balanced subset), not 60k / 10k",
        "marker: smallcnn (128-d features), not ResNet-18",
        "q in {10%, 100%, 100% with radius 8 and 10 steps, 10% and 100% with the psnr42 "
        "preset}, not {1, 2, 5, 10, 20}%",
        "suspects: smallcnn and the linear probe only; no cross-architecture suspect "
        "(MobileNetV2 / ResNet-18 train at tens of images/s on 2 CPU cores)",
        "no 224x224 throughput against the roofline (needs a GPU)",
    ],
}

FULL: dict[str, Any] = {
    "train_per_class": None,  # the whole split: 60k train / 10k test
    "test_per_class": None,
    "samples_per_shard": 2000,
    "marker": {"arch": "resnet18", "epochs": 10},
    "suspects": [
        {"name": "resnet18", "arch": "resnet18", "epochs": 15},
        # Cross-architecture transfer: MobileNetV2 (inverted residuals, depthwise convolutions,
        # 1280-d features) shares nothing with the ResNet-18 marker but the data.
        {"name": "mobilenet_v2", "arch": "mobilenet_v2", "epochs": 15},
        {"name": "linear_probe", "linear_probe": True, "epochs": 30},
    ],
    "runs": [
        {"name": "q1", "fraction": 0.01, "preset": "default"},
        {"name": "q1_s2", "fraction": 0.01, "preset": "default", "seed_offset": 10},
        {"name": "q2", "fraction": 0.02, "preset": "default"},
        {"name": "q5", "fraction": 0.05, "preset": "default"},
        {"name": "q10", "fraction": 0.10, "preset": "default"},
        {"name": "q10_s2", "fraction": 0.10, "preset": "default", "seed_offset": 10},
        {"name": "q20", "fraction": 0.20, "preset": "default"},
        {"name": "q1_psnr42", "fraction": 0.01, "preset": "psnr42"},
        {"name": "q10_psnr42", "fraction": 0.10, "preset": "psnr42"},
    ],
    "null_keys": 1000,
    "kit": {"decoys": 39, "per_class": 10},
    "mark_batch_size": 256,
    "throughput_224": True,
    "deviations": [],
}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log(msg: str) -> None:
    print(
        f"[bench {dt.datetime.now(dt.UTC).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True
    )


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()} / {os.cpu_count()} cpus"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("radmark", "torch", "torchvision", "numpy", "scipy", "safetensors", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def git_commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


class Runner:
    """Runs subprocesses, records each exact command, its exit code and wall time."""

    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []
        self.radmark = [str(Path(sys.executable).with_name("radmark"))]
        if not Path(self.radmark[0]).exists():
            self.radmark = [sys.executable, "-c", "from radmark.cli import main; main()"]

    def run(self, cmd: list[str], *, ok: tuple[int, ...] = (0,)) -> tuple[int, str, float]:
        _log(" ".join(cmd))
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        self.commands.append({"cmd": cmd, "rc": r.returncode, "wall_s": round(wall, 3)})
        if r.returncode not in ok:
            raise RuntimeError(
                f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-4000:]}"
            )
        return r.returncode, r.stdout, wall

    def json(
        self, cmd: list[str], *, ok: tuple[int, ...] = (0,)
    ) -> tuple[int, dict[str, Any], float]:
        rc, out, wall = self.run(cmd, ok=ok)
        try:
            return rc, json.loads(out), wall
        except json.JSONDecodeError:  # a tool that prints lines before its JSON
            return rc, json.loads(out.strip().splitlines()[-1]), wall


def balanced_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def prepare_data(
    cfg: dict[str, Any], data_dir: Path, work: Path, seed: int, *, install: bool = False
) -> dict[str, Any]:
    from radmark.data.writer import write_dataset

    fmnist.ensure_installed(data_dir, install=install)
    out: dict[str, Any] = {"source": str(data_dir)}
    for split, per_class in (("train", cfg["train_per_class"]), ("test", cfg["test_per_class"])):
        images, labels = fmnist.load(split, data_dir)
        idx = balanced_subset(labels, per_class, seed)
        write_dataset(
            images[idx],
            labels[idx].tolist(),
            work / "clean" / split,
            prefix=f"fmnist-{split}",
            samples_per_shard=cfg["samples_per_shard"],
        )
        out[split] = {
            "images": int(idx.size),
            "of": int(labels.size),
            "per_class": per_class,
            "dir": str(work / "clean" / split),
        }
    return out


def marker_accuracy(marker_path: Path, test_dir: Path, device: str) -> float:
    import torch

    from radmark.data.arrays import load_labelled_images
    from radmark.models import load_model

    m = load_model(str(marker_path), device=device)
    test = load_labelled_images([str(test_dir)])
    mean = torch.tensor(m.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(m.std, device=device).view(1, -1, 1, 1)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 512):
            x = torch.from_numpy(test.images[i : i + 512]).to(device).float().div_(255.0)
            correct += int(
                (
                    m.model((x - mean) / std).argmax(1).cpu().numpy() == test.labels[i : i + 512]
                ).sum()
            )
    return correct / len(test)


def null_calibration(
    suspect_path: Path,
    ks: Path,
    record_ref: str,
    probe_dir: Path,
    num_keys: int,
    device: str,
) -> dict[str, Any]:
    """A clean suspect against ``num_keys`` fresh random keys: the p-values must be uniform.

    Through the verification seam: the key-independent evidence (features, alignment, pull-back
    directions) is prepared once exactly as ``radmark verify`` prepares it, and every fresh key is
    scored against a real mark record (its marker, d and C) with the tests verify runs.
    """
    from radmark.keys.keypair import SecretKey
    from radmark.keys.store import Keystore
    from radmark.verify.evidence import EvidenceSettings, prepare
    from radmark.verify.pullback import PULLBACK
    from radmark.verify.tests import combine, score
    from radmark.verify.white_box import WHITE_BOX, WHITE_BOX_ZSCORE

    t0 = time.perf_counter()
    store = Keystore.open(ks)
    record = store.mark_record(record_ref)
    evidence = prepare(
        str(suspect_path),
        store=store,
        probe=[str(probe_dir)],
        settings=EvidenceSettings(device=device),
    )
    names = [WHITE_BOX, WHITE_BOX_ZSCORE, PULLBACK]
    score(evidence, record, SecretKey.generate(), names)  # computes everything key-independent
    setup_s = time.perf_counter() - t0
    logs: dict[str, list[float]] = {}
    t1 = time.perf_counter()
    t100 = None
    for k in range(num_keys):
        tests = score(evidence, record, SecretKey.generate(), names)
        for name, t in tests.items():
            logs.setdefault(name, []).append(float(t.log10_p))
        # the verdict itself, combined as verify combines the exact tests
        logs.setdefault("combined", []).append(combine(tests.values()) / math.log(10))
        if k + 1 == 100:
            t100 = time.perf_counter() - t1
    keys_s = time.perf_counter() - t1
    # The verdict's Bonferroni minimum is conservative by design (super-uniform: mass piles up at
    # 1), so a two-sided KS would reject it for being *too careful*: it is judged for validity.
    tests_out = {
        name: _calibration(lp, num_keys, conservative=name == "combined")
        for name, lp in logs.items()
    }
    assert evidence.probe is not None
    return {
        "suspect": str(suspect_path),
        "keys": num_keys,
        "dim": record.dim,
        "num_classes": record.num_classes,
        "probe_images": int(evidence.probe.images.shape[0]),
        "alignment_r2": evidence.alignment(record).r2,
        "binomial_99_bounds": {str(a): list(_binomial_99(num_keys, a)) for a in (0.01, 0.05)},
        "setup_seconds": setup_s,
        "keys_seconds": keys_s,
        "verify_100_keys_seconds": (setup_s + t100) if t100 is not None else None,
        "tests": tests_out,
    }


def _binomial_99(n: int, a: float) -> tuple[float, float]:
    """The binomial 99% band for the fraction of n uniform p-values below a."""
    from scipy import stats

    lo, hi = (float(stats.binom.ppf(q, n, a)) / n for q in (0.005, 0.995))
    return lo, hi


def _calibration(lp: list[float], num_keys: int, *, conservative: bool) -> dict[str, Any]:
    """Fractions below 0.01 / 0.05 against binomial 99% bounds, and a KS test against uniform.

    ``conservative``: a super-uniform test (Bonferroni minimum, discrete ranks) is judged for
    validity only: P(p <= a) <= a (one-sided KS, binomial upper bound).
    """
    from scipy import stats

    p = np.power(10.0, np.asarray(lp))
    lo01, hi01 = _binomial_99(num_keys, 0.01)
    lo05, hi05 = _binomial_99(num_keys, 0.05)
    ks = stats.kstest(p, "uniform", alternative="greater" if conservative else "two-sided")
    f01, f05 = float(np.mean(p < 0.01)), float(np.mean(p < 0.05))
    ok01 = f01 <= hi01 if conservative else lo01 <= f01 <= hi01
    ok05 = f05 <= hi05 if conservative else lo05 <= f05 <= hi05
    return {
        "frac_below_0.05": f05,
        "frac_below_0.01": f01,
        "ks_stat": float(ks.statistic),
        "ks_p": float(ks.pvalue),
        "min_log10_p": float(np.min(lp)),
        "ks_alternative": "greater (validity only)" if conservative else "two-sided",
        "within_binomial_99_0.01": bool(ok01),
        "within_binomial_99_0.05": bool(ok05),
        "calibrated": bool(ok01 and ks.pvalue > 0.01),
        "log10_p": list(lp),
    }


def black_box_null(
    suspect_path: Path,
    ks: Path,
    runs: list[dict[str, Any]],
    num_keys: int,
    device: str,
) -> dict[str, Any]:
    """The black-box test's null, conditional on the clean suspect's outputs on each kit.

    Marking a fresh kit per random key costs (K+1) × kit images markings per key, too much for
    1000 keys here; the full pipeline's calibration over 200 real keys is a CI test
    (tests/unit/test_kit.py). What this measures is the exactness argument itself: with the
    clean suspect's slot statistics T fixed, the true slots of ``num_keys`` fresh keys are drawn
    and the test run as verify runs it; P(p <= a | T) <= a must hold for every T.
    """
    from radmark.keys.keypair import SecretKey
    from radmark.keys.store import Keystore
    from radmark.marking.kit import true_slots
    from radmark.verify.black_box import rank_result, residualise, true_slot_ranks
    from radmark.verify.evidence import EvidenceSettings, prepare

    store = Keystore.open(ks)
    evidence = prepare(str(suspect_path), store=store, settings=EvidenceSettings(device=device))
    out: dict[str, Any] = {}
    for run in runs:
        rec = store.mark_record(run["mark"]["record"])
        t, ref = evidence.kit_statistics(rec)
        r = residualise(t, ref)  # as verify scores the slots: residual on the marker's responses
        s, c = r.shape
        lp = [
            rank_result(
                true_slot_ranks(r, true_slots(SecretKey.generate(), rec.address, c, s)),
                s, "", "carriers", "black_box_rank",
            ).log10_p
            for _ in range(num_keys)
        ]  # fmt: skip
        out[f"black_box_rank[{run['name']} kit, T fixed]"] = _calibration(
            lp, num_keys, conservative=True
        )
    return out


def summarise_verify(rc: int, js: dict[str, Any], wall: float) -> dict[str, Any]:
    r = js["results"][0]
    return {
        "exit_code": rc,
        "detected": bool(js["detected"]),
        "log10_p": r["log10_p"],
        "tests": {k: v["log10_p"] for k, v in r["tests"].items()},
        "black_box": r.get("black_box"),
        "cosines": r.get("cosines"),
        "alignment_r2": (r.get("alignment") or {}).get("r2"),
        "fingerprint": r.get("fingerprint"),
        "marker": r.get("marker"),
        "dim": r.get("dim"),
        "num_classes": r.get("num_classes"),
        "verify_seconds": js.get("seconds"),
        "wall_seconds": wall,
        "warnings": js.get("warnings"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="radmark benchmark (bench/README.md)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="reduced CPU protocol (< 20 min)")
    mode.add_argument("--full", action="store_true", help="the whole protocol (GPU)")
    ap.add_argument("--data", type=Path, default=fmnist.DEFAULT_DIR, help="Fashion-MNIST IDX dir")
    ap.add_argument(
        "--install",
        action="store_true",
        help=f"run `{fmnist.INSTALL_COMMAND}` (root) when the default --data dir is missing",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default bench/work/<id>)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--null-keys", type=int, default=None)
    ap.add_argument(
        "--roofline", default=str(REPO.parent / "shared" / "tools" / "mark_roofline.py")
    )
    ap.add_argument("--no-report", action="store_true", help="do not rebuild docs/benchmarks.md")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch dir")
    args = ap.parse_args(argv)

    import torch

    mode_name = "quick" if args.quick else "full"
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.null_keys:
        cfg["null_keys"] = args.null_keys
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = _now()
    run_id = f"{mode_name}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    work = (args.work or REPO / "bench" / "work" / run_id).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ks = work / "keystore"
    R = Runner()
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "schema": "radmark-bench-v1",
        "mode": mode_name,
        "run_id": run_id,
        "started": started,
        "device": device_name(device),
        "device_arg": device,
        "versions": versions(),
        "git": git_commit(),
        "seed": args.seed,
        "config": cfg,
        "host": platform.node(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "argv": [sys.executable, "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)],
    }
    dev = ["--device", device]

    _log(f"{mode_name} run {run_id} on {res['device']}, work dir {work}")
    if args.quick:
        _log(
            "quick mode: a few-minute smoke test of the whole chain (2,000 images); it says "
            "nothing about detection power. The power map is `make bench` (python -m bench.map)."
        )
    t = time.perf_counter()
    res["data"] = prepare_data(cfg, args.data, work, args.seed, install=args.install)
    res["data"]["seconds"] = time.perf_counter() - t
    train_dir, test_dir = work / "clean" / "train", work / "clean" / "test"

    # 1. the marking network, trained on the clean train split
    marker = work / "marker.safetensors"
    _, mj, wall = R.json(
        [
            *R.radmark,
            "marker",
            "train",
            str(train_dir),
            "--arch",
            cfg["marker"]["arch"],
            "--epochs",
            str(cfg["marker"]["epochs"]),
            "--seed",
            str(args.seed),
            "--out",
            str(marker),
            *dev,
            "--json",
        ]
    )
    mj["test_accuracy"] = marker_accuracy(marker, test_dir, device)
    mj["wall_seconds"] = wall
    res["marker"] = mj
    _log(f"marker: test accuracy {mj['test_accuracy']:.4f}")

    # 2. a fresh key per marking run, and the marking itself
    res["runs"] = []
    for run in cfg["runs"]:
        keyfile = work / "keys" / f"{run['name']}.key"
        keyfile.parent.mkdir(parents=True, exist_ok=True)
        _, kj, _ = R.json(
            [
                *R.radmark,
                "keygen",
                "--keystore",
                str(ks),
                "--no-passphrase",
                "--out",
                str(keyfile),
                "--json",
            ]
        )
        cmd = [
            *R.radmark,
            "mark",
            str(train_dir),
            "--key",
            str(keyfile),
            "--keystore",
            str(ks),
            "--out",
            str(work / "marked" / run["name"]),
            "--marker",
            str(marker),
            "--fraction",
            str(run["fraction"]),
            "--preset",
            run["preset"],
            *dev,
            "--json",
        ]
        if "radius" in run:
            cmd += ["--radius", str(run["radius"])]
        if "steps" in run:
            cmd += ["--steps", str(run["steps"])]
        if cfg.get("mark_batch_size"):
            cmd += ["--batch-size", str(cfg["mark_batch_size"])]
        _, mk, wall = R.json(cmd)
        mk.pop("shard_reports", None)
        mk["wall_seconds"] = wall
        mk["marked_per_s"] = mk["marked"] / max(mk.get("seconds") or wall, 1e-9)
        res["runs"].append(
            {**run, "key_fingerprint": kj["fingerprint"], "keyfile": str(keyfile), "mark": mk}
        )
        _log(
            f"{run['name']}: {mk['marked']}/{mk['images']} marked, PSNR {mk['psnr_mean']}, "
            f"{mk['images_per_s']:.1f} img/s"
        )
        # the verification kit of the black-box test, built from clean held-out images
        _, kt, wall = R.json(
            [
                *R.radmark,
                "kit",
                "build",
                mk["record"],
                "--probe",
                str(test_dir),
                "--key",
                str(keyfile),
                "--keystore",
                str(ks),
                "--marker",
                str(marker),
                "--decoys",
                str(cfg["kit"]["decoys"]),
                "--per-class",
                str(cfg["kit"]["per_class"]),
                *dev,
                "--json",
            ]
        )
        kt["wall_seconds"] = wall
        res["runs"][-1]["kit"] = kt
        _log(f"{run['name']}: kit {kt['markings']} markings in {kt['seconds']:.1f} s")

    # 3. suspects from scratch (and the linear probe) on the clean and on every marked set;
    # 4. verify each against the key(s): the control against every run's key.
    datasets = [("control", 0.0, str(train_dir), 0)] + [
        (r["name"], r["fraction"], str(work / "marked" / r["name"]), r.get("seed_offset", 0))
        for r in res["runs"]
    ]
    res["suspects"] = []
    for ds_name, q, ds_dir, seed_off in datasets:
        for sp in cfg["suspects"]:
            out = work / "suspects" / f"{ds_name}-{sp['name']}.safetensors"
            out.parent.mkdir(parents=True, exist_ok=True)
            seed = args.seed + 1 + seed_off
            cmd = [
                sys.executable,
                "-m",
                "bench.train_suspect",
                ds_dir,
                "--test",
                str(test_dir),
                "--out",
                str(out),
                "--epochs",
                str(sp["epochs"]),
                "--seed",
                str(seed),
                *dev,
            ]
            cmd += (
                ["--linear-probe", str(marker)]
                if sp.get("linear_probe")
                else ["--arch", sp["arch"]]
            )
            _, tj, _ = R.json(cmd)
            tj.pop("command", None)
            entry: dict[str, Any] = {
                "dataset": ds_name,
                "fraction": q,
                "suspect": sp["name"],
                "train": tj,
                "verify": {},
            }
            keys = (
                res["runs"]
                if ds_name == "control"
                else [r for r in res["runs"] if r["name"] == ds_name]
            )
            for r in keys:
                try:
                    rc, vj, wall = R.json(
                        [
                            *R.radmark,
                            "verify",
                            str(out),
                            "--probe",
                            str(test_dir),
                            "--keystore",
                            str(ks),
                            "--key",
                            r["keyfile"],
                            "--marker",
                            str(marker),
                            "--black-box",
                            *dev,
                            "--json",
                        ],
                        ok=(0, 1),
                    )
                    entry["verify"][r["name"]] = summarise_verify(rc, vj, wall)
                except (RuntimeError, json.JSONDecodeError, KeyError, IndexError) as exc:
                    # recorded, not fatal: "could not evaluate" is data, never "not detected"
                    entry["verify"][r["name"]] = {"error": str(exc)[-2000:]}
            res["suspects"].append(entry)
            first = next(iter(entry["verify"].values()))
            _log(
                f"{ds_name}/{sp['name']}: acc {tj['test_accuracy']:.4f}, "
                + (
                    f"log10 p {first['log10_p']:.2f} ({first['tests']})"
                    if "error" not in first
                    else f"verify failed: {first['error'][-300:]}"
                )
            )

    # 5. null calibration: every clean suspect against many fresh random keys
    from radmark.models import load_model

    res["marker"]["identity"] = load_model(str(marker)).identity  # what carriers are bound to
    res["null"] = {}
    for entry in res["suspects"]:
        if entry["dataset"] != "control":
            continue
        path = work / "suspects" / f"control-{entry['suspect']}.safetensors"
        _log(f"null calibration: {entry['suspect']} against {cfg['null_keys']} random keys")
        res["null"][entry["suspect"]] = null_calibration(
            path, ks, res["runs"][0]["mark"]["record"], test_dir, cfg["null_keys"], device
        )
        res["null"][entry["suspect"]]["tests"].update(
            black_box_null(path, ks, res["runs"], cfg["null_keys"], device)
        )

    # 7. throughput: marking at the native size (from mark --json); 224 px against the roofline
    res["throughput"] = {
        "native": [
            {
                "run": r["name"],
                "images": r["mark"]["images"],
                "marked": r["mark"]["marked"],
                "steps": r.get("steps"),
                "images_per_s": r["mark"]["images_per_s"],
                "marked_per_s": r["mark"]["marked_per_s"],
                "device": res["device"],
                "size": "28x28x1",
            }
            for r in res["runs"]
        ],
        "verify_one_key_seconds": [
            v["verify_seconds"]
            for e in res["suspects"]
            for v in e["verify"].values()
            if "error" not in v
        ],
        "verify_100_keys_in_process_seconds": {
            k: v["verify_100_keys_seconds"] for k, v in res["null"].items()
        },
    }
    if cfg["throughput_224"]:
        cmd = [
            sys.executable,
            "-m",
            "bench.throughput",
            "--work",
            str(work / "throughput"),
            *dev,
            "--json",
        ]
        if device.startswith("cuda"):
            cmd += ["--roofline", args.roofline]
        try:
            _, tj, _ = R.json(cmd)
            res["throughput"]["224"] = tj
        except RuntimeError as exc:
            res["throughput"]["224"] = {"error": str(exc)[-2000:]}

    res["finished"] = _now()
    res["seconds"] = time.perf_counter() - t_start
    res["commands"] = R.commands
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{run_id}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=float) + "\n")
    tmp.replace(path)
    _log(f"wrote {path} ({res['seconds']:.0f} s)")
    if not args.keep_work and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_report:
        from . import report

        report.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
