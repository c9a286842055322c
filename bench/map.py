"""The power map (issue #14): will radmark detect a model trained on my data? On 2 CPU cores.

    python -m bench.map                       # every stage, then the report (make bench)
    python -m bench.map --stage suspects      # one stage (its inputs must be done)
    python -m bench.map --cells 'fmnist-60k/scratch/*'   # only these cells (and what they need)
    python -m bench.map --plan                # the units, their state and estimated cost
    python -m bench.map --smoke --work DIR    # tiny sizes, every stage and regime (make test)

A *cell* is (data variant, training regime, marking method, q, seed). Its work is split into
*units*, each cached on disk under ``--work`` (default ``bench/work/map``) in a directory named by
a content key: the SHA-256 of the unit's configuration and of the keys of the units it depends
on. A unit is done when its ``result.json`` exists (written last, atomically); a directory
without one is a unit that was killed, and is redone from scratch. So a killed run picks up where
it stopped, finished units are never recomputed, and a changed setting recomputes exactly what
depends on it.

Stages (units of one kind; ``--stage NAME`` runs one, in the background if you like):

``data``      Fashion-MNIST or the glyph set (``bench/glyphs.py``, C in {10, 100, 1000}) at the
              variant's scale, written as shards with ``radmark.data.writer.write_dataset``;
              hashes recorded. The test split (10k) is the clean probe and the accuracy set.
``markers``   The owner's marking network (smallcnn), trained on the clean train split with the
              data's augmentation (``bench.train_suspect``; see README for why not ``radmark
              marker train``).
``marking``   ``radmark keygen`` (a fresh key per run) and ``radmark mark --method NAME
              --fraction q`` (``--kit-probe`` for the black-box test's kit where configured).
``suspects``  The data user's model (``bench.train_suspect``), per regime: ``scratch``
              (smallcnn, the marker's architecture), ``cross`` (slimresnet), ``finetune`` (every
              layer from the marker's weights), ``probe`` (linear probe on frozen marker
              features). q = 0 is the control, trained on the clean shards.
``verify``    ``radmark verify --json`` (``--black-box`` when there is a kit): every test's log10 p,
              read generically from the JSON, and the verdict. A control is verified against the
              key of every marking run of its variant, method and seed.
``null``      Each control against many fresh keys through the verification seam
              (``bench.run.null_calibration``; the kit test conditionally, ``black_box_null``),
              plus more keys for the pull-back test's KS question.
``report``    One result file ``bench/results/map-<UTC>.json`` (configuration, every unit's result,
              wall times, load averages) and ``docs/benchmarks.md`` regenerated.

Units run as child processes (``python -m bench.map --unit ID``), ``--jobs`` at a time with
``--threads`` torch threads each (default 2 x 1: on 2 cores two one-thread jobs train about twice
as fast as one two-thread job, and much faster when the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STAGES = ("data", "markers", "marking", "suspects", "verify", "null", "report")
# Part of every verify and null unit's key: a change to how radmark computes a test's statistic
# must change this, so that cached verdicts of the older code are not reported as the new one's.
# (White-box rows fitted leave-class-out since issue #17's fix; the earlier cache used one fit.)
TESTS_VERSION = {"white_box_alignment": "leave-class-out"}
KIND_OF_STAGE = {
    "data": "data",
    "markers": "marker",
    "marking": "marking",
    "suspects": "suspect",
    "verify": "verify",
    "null": "null",
}
#: bumped when a unit's code changes what it computes (part of every content key)
UNIT_VERSION = 1

# --------------------------------------------------------------------------------------------
# Configurations. A block expands to cells: every regime x q x seed of one variant and method.

MAP: dict[str, Any] = {
    "name": "map",
    "variants": {
        # full data scale (the headline cells)
        "fmnist-60k": {"source": "fmnist", "train": None},
        "glyphs1000-60k": {"source": "glyphs", "classes": 1000, "train": None},
        # the stated reduced scale: 20,000 training images (class-balanced subset), same test set
        "fmnist-20k": {"source": "fmnist", "train": 20_000},
        "glyphs1000-20k": {"source": "glyphs", "classes": 1000, "train": 20_000},
        "glyphs100-20k": {"source": "glyphs", "classes": 100, "train": 20_000},
        "glyphs10-20k": {"source": "glyphs", "classes": 10, "train": 20_000},
    },
    # one marker per data set, trained on the clean train split of the named variant; the
    # variants of one data set share it
    "markers": {
        "fmnist": {"variant": "fmnist-20k", "epochs": 4},
        "glyphs1000": {"variant": "glyphs1000-60k", "epochs": 6},
        "glyphs100": {"variant": "glyphs100-20k", "epochs": 5},
        "glyphs10": {"variant": "glyphs10-20k", "epochs": 3},
    },
    "marker_arch": "smallcnn",
    "marker_seed": 0,
    "batch_size": 256,
    "lr": {"scratch": 0.1, "cross": 0.1, "finetune": 0.02, "probe": 0.01},
    "regime_arch": {"scratch": "smallcnn", "cross": "slimresnet"},
    "mark": {"preset": "default", "batch_size": 64},
    # the black-box test's kit, per number of classes: K decoys, images per class
    "kit": {
        10: {"decoys": 19, "per_class": 5},
        100: {"decoys": 9, "per_class": 1},
        1000: {"decoys": 4, "per_class": 1},
    },  # fmt: skip
    "null_keys": 1000,
    "pullback_keys": 5000,
    "pullback_keys_max_classes": 100,
    "train_eval": 10_000,
    "blocks": [
        # headline: full scale, two seeds (seed 1: a second key and suspect seed; the control
        # only at seed 0)
        {
            "variant": "fmnist-60k",
            "regimes": {"scratch": 3},
            "q": [0, 0.01, 0.10],
            "seeds": [0, 1],
            "control_seeds": [0],
            "kit_q": [0.01, 0.10],
            "kit_seeds": [0],
            "priority": 0,
        },
        {
            "variant": "glyphs1000-60k",
            "regimes": {"scratch": 6},
            "q": [0, 0.01],
            "seeds": [0, 1],
            "control_seeds": [0],
            "kit_q": [0.01],
            "kit_seeds": [0],
            "priority": 0,
        },
        # the rest of the map at 20k training images; epochs per regime
        {
            "variant": "fmnist-20k",
            "regimes": {"finetune": 2, "probe": 20},
            "q": [0, 0.01, 0.10],
            "seeds": [0],
            "kit_q": [0.10],
            "priority": 1,
        },
        {
            "variant": "fmnist-20k",
            "regimes": {"cross": 2},
            "q": [0, 0.10],
            "seeds": [0],
            "kit_q": [0.10],
            "priority": 1,
        },
        {
            "variant": "glyphs1000-20k",
            # 2 fine-tuning epochs left the fresh 1000-way head at 5.8 % test accuracy (the
            # 11:19 map): 156 steps are too few for 20 images a class; the probe needs 20 epochs
            "regimes": {"finetune": 8, "probe": 20},
            "q": [0, 0.01, 0.10],
            "seeds": [0],
            "kit_q": [],
            "priority": 1,
        },
        {
            "variant": "glyphs100-20k",
            "regimes": {"scratch": 4, "finetune": 2, "probe": 20},
            "q": [0, 0.01, 0.10],
            "seeds": [0],
            "kit_q": [0.10],
            "priority": 1,
        },
        {
            "variant": "glyphs10-20k",
            "regimes": {"scratch": 4, "finetune": 2, "probe": 20},
            "q": [0, 0.01, 0.10],
            "seeds": [0],
            "kit_q": [0.10],
            "priority": 1,
        },
        # twin marks (issue #15) on the cells the issue names: the headline from scratch at
        # full scale (two seeds; the control is the radioactive block's, shared), the second
        # architecture and fine-tuning at 20k. 40 marker passes per marked image.
        {
            "variant": "fmnist-60k",
            "methods": ["twins"],
            "regimes": {"scratch": 3},
            "q": [0, 0.01, 0.10],
            "seeds": [0, 1],
            "control_seeds": [0],
            "kit_q": [],
            "priority": 1,
        },
        {
            "variant": "fmnist-20k",
            "methods": ["twins"],
            "regimes": {"finetune": 2, "cross": 2},
            "q": [0, 0.10],
            "seeds": [0],
            "kit_q": [],
            "priority": 1,
        },
        # the twins' ceiling (issue #15's dead-end rule: a method above -2 at q = 100% at its
        # best setting is a dead end): every image of the 20k set gets a published twin
        {
            "variant": "fmnist-20k",
            "methods": ["twins"],
            "regimes": {"scratch": 3},
            "q": [0, 1.0],
            "seeds": [0],
            "kit_q": [],
            "priority": 2,
        },
        # the ceiling: every image marked (20k x 100 marking steps: the costliest marking run)
        {
            "variant": "fmnist-20k",
            "regimes": {"scratch": 3, "finetune": 2, "probe": 20},
            "q": [0, 1.0],
            "seeds": [0],
            "kit_q": [],
            "priority": 2,
        },
    ],  # fmt: skip
    # every method the blocks use, in report order; a block without "methods" uses the first
    "methods": ["radioactive", "twins"],
    "deviations": [
        "headline cells at full data scale (60k train / 10k test); the rest at 20k training "
        "images (class-balanced subset) with the full 10k test split",
        "epochs chosen for 2 CPU cores (per block, in the configuration): one-cycle schedules "
        "that anneal to zero within them",
        "q = 100% only on Fashion-MNIST at 20k (marking 20k images x 100 steps costs ~30 min "
        "of one core); cross-architecture (slimresnet) only on Fashion-MNIST at 20k, q = 0 and "
        "10%; from-scratch smallcnn at 20k only on glyphs C = 10, 100 (Fashion-MNIST and C = "
        "1000 have it at full scale) and Fashion-MNIST q = 100%",
        "the headline controls (q = 0) at seed 0 only; the marked cells at seeds 0 and 1",
        "kits (black-box test) only where kit_q says: a C = 1000 kit costs (K+1) x 1000 markings",
        "markers trained by bench.train_suspect (the recipe of radmark marker train, with a "
        "crop-only augmentation for glyphs), not by the CLI",
    ],
}

SMOKE: dict[str, Any] = {
    "name": "smoke",
    "variants": {
        # the project's small real subset (300 / 100 per class), no Debian package needed
        "fmnist-tiny": {
            "source": "fmnist",
            "npz": "radmark/demo_data/fmnist-small.npz",
            "train": 200,
            "test": 200,
        },
        "glyphs-tiny": {
            "source": "glyphs",
            "classes": 6,
            "train": 120,
            "test": 204,
            "synthetic_masters": True,
        },
    },  # fmt: skip
    "markers": {
        "fmnist": {"variant": "fmnist-tiny", "epochs": 1},
        "glyphs6": {"variant": "glyphs-tiny", "epochs": 1},
    },
    "marker_arch": "smallcnn",
    "marker_seed": 0,
    "batch_size": 64,
    "lr": {"scratch": 0.05, "cross": 0.05, "finetune": 0.01, "probe": 0.01},
    "regime_arch": {"scratch": "smallcnn", "cross": "slimresnet"},
    "mark": {"preset": "default", "batch_size": 64, "steps": 2},
    "kit": {10: {"decoys": 3, "per_class": 1}, 6: {"decoys": 3, "per_class": 1}},
    "null_keys": 50,
    "pullback_keys": 80,
    "pullback_keys_max_classes": 100,
    "train_eval": 100,
    "blocks": [
        {
            "variant": "fmnist-tiny",
            "regimes": {"scratch": 1, "probe": 2},
            "q": [0, 0.1],
            "seeds": [0],
            "kit_q": [0.1],
            "priority": 0,
        },
        {
            "variant": "fmnist-tiny",
            "methods": ["twins"],
            "regimes": {"scratch": 1},
            "q": [0, 0.1],
            "seeds": [0],
            "kit_q": [],
            "priority": 1,
        },
        {
            "variant": "glyphs-tiny",
            "regimes": {"cross": 1, "finetune": 1},
            "q": [0.5],
            "seeds": [0],
            "kit_q": [],
            "priority": 1,
        },
    ],  # fmt: skip
    "methods": ["radioactive", "twins"],
    "deviations": ["smoke test: tiny sizes, 2 marking steps; says nothing about power"],
}

CONFIGS = {"map": MAP, "smoke": SMOKE}


def _log(msg: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[map {stamp}] {msg}", file=sys.stderr, flush=True)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def content_key(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def qname(q: float) -> str:
    """``q0``, ``q1``, ``q10``, ``q100`` (percent; fractions below 1% as e.g. ``q0.5``)."""
    pct = round(q * 100, 6)
    return f"q{int(pct)}" if pct == int(pct) else f"q{pct:g}"


# --------------------------------------------------------------------------------------------
# The plan: units and cells


@dataclass
class Unit:
    """One cached piece of work: its kind (stage), a readable id, its spec and dependencies."""

    kind: str
    uid: str
    spec: dict[str, Any]
    deps: list[str]
    priority: int = 1
    cost: float = 1.0  # estimated seconds of one core (scheduling order only)
    key: str = ""

    def dir(self, work: Path) -> Path:
        return work / self.kind / f"{self.uid.split('/', 1)[1]}-{self.key[:12]}"


@dataclass
class Cell:
    variant: str
    regime: str
    method: str
    q: float
    seed: int
    suspect: str  # unit id
    verifies: list[str] = field(default_factory=list)  # verify unit ids (a control: several)
    priority: int = 1

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.regime}/{self.method}/{qname(self.q)}/s{self.seed}"


@dataclass
class Plan:
    config: dict[str, Any]
    units: dict[str, Unit]
    cells: list[Cell]

    def closure(self, uids: list[str]) -> set[str]:
        out: set[str] = set()
        todo = list(uids)
        while todo:
            u = todo.pop()
            if u not in out:
                out.add(u)
                todo.extend(self.units[u].deps)
        return out


def variant_source(cfg: dict[str, Any], variant: str) -> str:
    v = cfg["variants"][variant]
    return "fmnist" if v["source"] == "fmnist" else f"glyphs{v['classes']}"


def variant_classes(cfg: dict[str, Any], variant: str) -> int:
    v = cfg["variants"][variant]
    return 10 if v["source"] == "fmnist" else int(v["classes"])


def variant_aug(cfg: dict[str, Any], variant: str) -> str:
    """The augmentation a data user would use: flips suit clothes, not characters."""
    return "crop+flip" if cfg["variants"][variant]["source"] == "fmnist" else "crop"


def image_steps(cfg: dict[str, Any], method: str) -> int:
    """Marker forward-backward passes per marked image: the preset's steps, times the number of
    candidates for twins (each step moves every candidate)."""
    from radmark.marking import presets, twins

    override = cfg["mark"].get("steps")
    if method == "twins":
        p = twins.PRESETS[cfg["mark"]["preset"]]
        return p.candidates * (override or p.steps)
    return int(override or presets.PRESETS[cfg["mark"]["preset"]].steps)


def variant_train_images(cfg: dict[str, Any], variant: str) -> int:
    n = cfg["variants"][variant].get("train")
    return 60_000 if n is None else int(n)


def build_plan(cfg: dict[str, Any]) -> Plan:
    units: dict[str, Unit] = {}

    def add(u: Unit) -> Unit:
        dep_keys = [units[d].key for d in u.deps]
        u.key = content_key({"v": UNIT_VERSION, "kind": u.kind, "spec": u.spec, "deps": dep_keys})
        if u.uid in units:
            units[u.uid].priority = min(units[u.uid].priority, u.priority)
            if units[u.uid].key != u.key:
                raise ValueError(f"unit {u.uid} is configured twice, differently")
            return units[u.uid]
        units[u.uid] = u
        return u

    bs = cfg["batch_size"]
    rate_train = {"smallcnn": 400.0, "slimresnet": 80.0}  # images/s of one core (estimates)
    rate_mark = 1100.0  # image-steps/s of one core through the small CNN (estimate)

    def data_unit(variant: str, prio: int) -> Unit:
        v = cfg["variants"][variant]
        return add(Unit("data", f"data/{variant}", {"variant": variant, **v}, [], prio, 60.0))

    def marker_unit(variant: str, prio: int) -> Unit:
        src = variant_source(cfg, variant)
        m = cfg["markers"][src]
        d = data_unit(m["variant"], prio)
        spec = {
            "source": src,
            "arch": cfg["marker_arch"],
            "epochs": m["epochs"],
            "seed": cfg["marker_seed"],
            "aug": variant_aug(cfg, m["variant"]),
            "batch_size": bs,
            "lr": cfg["lr"]["scratch"],
            "train_eval": cfg["train_eval"],
        }
        n = variant_train_images(cfg, m["variant"])
        cost = n * m["epochs"] / rate_train[cfg["marker_arch"]]
        return add(Unit("marker", f"marker/{src}", spec, [d.uid], prio, cost))

    def marking_unit(blk: dict[str, Any], method: str, q: float, seed: int, prio: int) -> Unit:
        variant = blk["variant"]
        d, m = data_unit(variant, prio), marker_unit(variant, prio)
        c = variant_classes(cfg, variant)
        kit = None
        if q in blk.get("kit_q", []) and seed in blk.get("kit_seeds", [0]):
            kit = cfg["kit"].get(c) or cfg["kit"].get(str(c))
        spec = {"method": method, "q": q, "seed": seed, "kit": kit, **cfg["mark"]}
        n = variant_train_images(cfg, variant)
        steps = image_steps(cfg, method)
        cost = 10 + n * q * steps / rate_mark
        if kit:
            cost += (kit["decoys"] + 1) * kit["per_class"] * c * steps / rate_mark
        uid = f"marking/{variant}.{method}.{qname(q)}.s{seed}"
        return add(Unit("marking", uid, spec, [d.uid, m.uid], prio, cost))

    cells: list[Cell] = []
    for blk in cfg["blocks"]:
        variant, prio = blk["variant"], blk.get("priority", 1)
        n = variant_train_images(cfg, variant)
        for regime, epochs in blk["regimes"].items():
            for seed in blk["seeds"]:
                for method in blk.get("methods", cfg["methods"][:1]):
                    for q in blk["q"]:
                        if q == 0 and seed not in blk.get("control_seeds", blk["seeds"]):
                            continue
                        deps = [data_unit(variant, prio).uid]
                        if regime in ("finetune", "probe"):
                            deps.append(marker_unit(variant, prio).uid)
                        mk = None
                        if q > 0:
                            mk = marking_unit(blk, method, q, seed, prio)
                            deps.append(mk.uid)
                        spec = {
                            "regime": regime,
                            "arch": cfg["regime_arch"].get(regime),
                            "epochs": epochs,
                            "seed": cfg["marker_seed"] + 1 + 10 * seed,
                            "aug": variant_aug(cfg, variant),
                            "batch_size": bs,
                            "lr": cfg["lr"][regime],
                            "train_eval": cfg["train_eval"],
                        }
                        arch = cfg["regime_arch"].get(regime, cfg["marker_arch"])
                        cost = (
                            n / 3000 + 5 * epochs
                            if regime == "probe"
                            else n * epochs / rate_train[arch]
                        )
                        tag = "clean" if q == 0 else method
                        uid = f"suspect/{variant}.{regime}.{tag}.{qname(q)}.s{seed}"
                        su = add(Unit("suspect", uid, spec, deps, prio, cost))
                        cell = Cell(variant, regime, method, q, seed, su.uid, [], prio)
                        if all(c.name != cell.name for c in cells):
                            cells.append(cell)
    # verify: a marked suspect against its own key; a control against every key of its
    # variant, method and seed
    for cell in cells:
        marks = [
            u
            for u in units.values()
            if u.kind == "marking"
            and u.uid.startswith(f"marking/{cell.variant}.{cell.method}.")
            and u.spec["seed"] == cell.seed
            and (cell.q == 0 or u.spec["q"] == cell.q)
        ]
        for mk in sorted(marks, key=lambda u: u.spec["q"]):
            c = variant_classes(cfg, cell.variant)
            uid = f"verify/{cell.suspect.split('/', 1)[1]}@{cell.method}.{qname(mk.spec['q'])}"
            deps = [cell.suspect, mk.uid, data_unit(cell.variant, cell.priority).uid]
            deps.append(marker_unit(cell.variant, cell.priority).uid)
            v = add(Unit("verify", uid, {"black_box": bool(mk.spec["kit"]), **TESTS_VERSION}, deps,
                         cell.priority, 10 + c / 20))  # fmt: skip
            cell.verifies.append(v.uid)
    # null: every control against fresh keys (a real record of its variant for marker, d and
    # C; every kit of its variant and seed for the conditional kit null)
    for cell in cells:
        if cell.q != 0 or cell.method != cfg["methods"][0]:
            continue
        uid = f"null/{cell.suspect.split('/', 1)[1]}"
        keyed = [d for v in cell.verifies for d in units[v].deps if d.startswith("marking/")]
        if not keyed:
            continue
        # the lowest-q record (marker, d, C for the white-box and pull-back nulls) and every kit
        # (the conditional kit null); not the other records, so no null waits for a long marking
        marks = [keyed[0]] + [d for d in keyed[1:] if units[d].spec["kit"]]
        c = variant_classes(cfg, cell.variant)
        # more keys for the pull-back test's KS question where a key is cheap (C <= 100)
        more = cfg["pullback_keys"] if c <= cfg["pullback_keys_max_classes"] else 0
        spec = {"keys": cfg["null_keys"], "pullback_keys": more, **TESTS_VERSION}
        deps = [cell.suspect, data_unit(cell.variant, cell.priority).uid, *marks]
        add(Unit("null", uid, spec, deps, cell.priority + 1, 20 + c / 10))
    return Plan(cfg, units, cells)


# --------------------------------------------------------------------------------------------
# Running units (in a child process: python -m bench.map --unit ID)


def _result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


class Ctx:
    """What a unit needs: the plan, the work dir, the threads, and how to run a command."""

    def __init__(self, plan: Plan, work: Path, threads: int) -> None:
        self.plan, self.work, self.threads = plan, work, threads
        self.commands: list[dict[str, Any]] = []

    def dir(self, uid: str) -> Path:
        return self.plan.units[uid].dir(self.work)

    def res(self, uid: str) -> dict[str, Any]:
        r = _result(self.dir(uid))
        if r is None:
            raise RuntimeError(f"{uid} is not done: run its stage first")
        return r

    def run(self, cmd: list[str], ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        self.commands.append(
            {"cmd": cmd, "rc": r.returncode, "wall_s": round(time.perf_counter() - t0, 3)}
        )
        if r.returncode not in ok:
            raise RuntimeError(
                f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}"
            )
        return r.returncode, r.stdout

    def train(self, argv: list[str]) -> dict[str, Any]:
        """``python -m bench.train_suspect ARGV``, in this process (one import less)."""
        from .train_suspect import train

        t0 = time.perf_counter()
        info = train(argv)
        self.commands.append(
            {"cmd": [*SUSPECT, *argv], "rc": 0, "wall_s": round(time.perf_counter() - t0, 3)}
        )
        return info

    def json(self, cmd: list[str], ok: tuple[int, ...] = (0,)) -> tuple[int, dict[str, Any]]:
        rc, out = self.run(cmd, ok)
        try:
            return rc, json.loads(out)
        except json.JSONDecodeError:
            return rc, json.loads(out.strip().splitlines()[-1])


RADMARK = [sys.executable, "-m", "radmark"]
SUSPECT = [sys.executable, "-m", "bench.train_suspect"]


def unit_data(ctx: Ctx, u: Unit, out: Path) -> dict[str, Any]:
    from radmark.data.writer import write_dataset

    from . import fmnist
    from .run import balanced_subset

    v = u.spec
    info: dict[str, Any] = {"variant": v["variant"], "source": v["source"]}
    if v["source"] == "fmnist" and v.get("npz"):
        z = np.load(REPO / v["npz"])
        tri, trl = z["train_images"], z["train_labels"].astype(np.int64)
        tei, tel = z["test_images"], z["test_labels"].astype(np.int64)
        info["source_file"] = v["npz"]
        classes = 10
    elif v["source"] == "fmnist":
        d = fmnist.ensure_installed(fmnist.DEFAULT_DIR)
        tri, trl = fmnist.load("train", d)
        tei, tel = fmnist.load("test", d)
        info["source_dir"] = str(d)
        classes = 10
    else:
        from . import glyphs

        masters: Any = None
        sizes: dict[str, int] = {}
        if v.get("synthetic_masters"):  # the smoke test: no fonts needed, only what it uses
            masters = _synthetic_masters(int(v["classes"]))
            sizes = {"n_train": int(v["train"]), "n_test": int(v["test"])}
        g = glyphs.make_glyph_dataset(
            int(v["classes"]), int(v.get("seed", 0)), masters=masters, **sizes
        )
        tri, trl, tei, tel = g.train_images, g.train_labels, g.test_images, g.test_labels
        classes = int(v["classes"])
        info.update(
            glyphs_sha256=g.sha256,
            masters_sha256=g.masters_sha256,
            glyph_seed=g.seed,
            faces=len(g.faces),
        )
    info["full_sha256"] = _arrays_sha256(tri, trl, tei, tel)
    for split, images, labels, n in (
        ("train", tri, trl, v.get("train")),
        ("test", tei, tel, v.get("test")),
    ):
        per_class = None if n is None else int(n) // classes
        idx = balanced_subset(np.asarray(labels), per_class, seed=0)
        write_dataset(images[idx], np.asarray(labels)[idx].tolist(), out / split,
                      prefix=split, samples_per_shard=5000)  # fmt: skip
        info[split] = {"images": int(idx.size), "of": int(len(labels)), "per_class": per_class}
        info[f"{split}_sha256"] = _arrays_sha256(images[idx], np.asarray(labels)[idx])
    info["classes"] = classes
    return info


def _arrays_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _synthetic_masters(chars: int) -> Any:
    """Blocky synthetic 'glyphs' (the smoke test runs without fonts)."""
    from . import glyphs

    rng = np.random.default_rng(1234)
    m, faces = glyphs.MASTER, 3
    bits = np.zeros((chars, faces, m, m), bool)
    for k in range(chars):
        for f in range(faces):
            for _ in range(3 + k % 4):
                y, x = rng.integers(12, 52, size=2)
                if rng.random() < 0.5:
                    bits[k, f, y : y + 3 + f, x - 12 : x + 12] = True
                else:
                    bits[k, f, y - 12 : y + 12, x : x + 3 + f] = True
    return glyphs.Masters(bits, [chr(0x4E00 + k) for k in range(chars)],
                          [f"face{f}" for f in range(faces)], {"synthetic": True})  # fmt: skip


def unit_marker(ctx: Ctx, u: Unit, out: Path) -> dict[str, Any]:
    s = u.spec
    data = ctx.dir(u.deps[0])
    path = out / "marker.safetensors"
    info = ctx.train([
        str(data / "train"), "--test", str(data / "test"), "--arch", s["arch"],
        "--aug", s["aug"], "--epochs", str(s["epochs"]), "--seed", str(s["seed"]),
        "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]), "--out", str(path),
        "--threads", str(ctx.threads), "--train-eval", str(s["train_eval"]),
    ])  # fmt: skip
    info.pop("command", None)
    from radmark.models import load_model

    info["identity"] = load_model(str(path)).identity
    info["path"] = str(path)
    return info


def unit_marking(ctx: Ctx, u: Unit, out: Path) -> dict[str, Any]:
    s = u.spec
    data, marker = ctx.dir(u.deps[0]), ctx.res(u.deps[1])["path"]
    ks, keyfile = out / "keystore", out / "owner.key"
    _, kj = ctx.json([*RADMARK, "keygen", "--keystore", str(ks), "--no-passphrase", "--out",
                      str(keyfile), "--json"])  # fmt: skip
    cmd = [
        *RADMARK, "mark", str(data / "train"), "--key", str(keyfile), "--keystore", str(ks),
        "--out", str(out / "marked"), "--marker", marker, "--method", s["method"],
        "--fraction", str(s["q"]), "--preset", s["preset"], "--batch-size",
        str(s["batch_size"]), "--device", "cpu", "--json",
    ]  # fmt: skip
    if "steps" in s:
        cmd += ["--steps", str(s["steps"])]
    if s["kit"]:
        cmd += ["--kit-probe", str(data / "test"), "--kit-decoys", str(s["kit"]["decoys"]),
                "--kit-per-class", str(s["kit"]["per_class"])]  # fmt: skip
    t0 = time.perf_counter()
    _, mk = ctx.json(cmd)
    wall = time.perf_counter() - t0
    mk.pop("shard_reports", None)
    passes = image_steps(ctx.plan.config, s["method"])
    return {
        "key_fingerprint": kj["fingerprint"],
        "keyfile": str(keyfile),
        "keystore": str(ks),
        "marked_dir": str(out / "marked"),
        "mark": mk,
        "mark_wall_s": wall,
        "image_steps_per_marked": passes,
        "marked_image_steps_per_s": (mk.get("marked") or 0)
        * passes
        / max(mk.get("seconds") or wall, 1e-9),
    }


def unit_suspect(ctx: Ctx, u: Unit, out: Path) -> dict[str, Any]:
    s = u.spec
    data = ctx.dir(u.deps[0])
    marking = next((d for d in u.deps if d.startswith("marking/")), None)
    train = ctx.res(marking)["marked_dir"] if marking else str(data / "train")
    path = out / "suspect.safetensors"
    cmd = [
        train, "--test", str(data / "test"), "--out", str(path),
        "--epochs", str(s["epochs"]), "--seed", str(s["seed"]), "--batch-size",
        str(s["batch_size"]), "--lr", str(s["lr"]), "--threads", str(ctx.threads),
        "--train-eval", str(s["train_eval"]),
    ]  # fmt: skip
    marker = next((d for d in u.deps if d.startswith("marker/")), None)
    if s["regime"] in ("scratch", "cross"):
        cmd += ["--arch", s["arch"], "--aug", s["aug"]]
    elif s["regime"] == "finetune":
        assert marker is not None
        cmd += ["--finetune", ctx.res(marker)["path"], "--aug", s["aug"]]
    elif s["regime"] == "probe":
        assert marker is not None
        cmd += ["--linear-probe", ctx.res(marker)["path"]]
    else:
        raise ValueError(f"unknown regime {s['regime']!r}")
    info = ctx.train(cmd)
    info.pop("command", None)
    info["path"] = str(path)
    info["trained_on"] = train
    return info


def _tests_of(result: dict[str, Any]) -> dict[str, float]:
    """Every test's log10 p of one verify key result, whatever the tests are called."""
    return {
        name: float(t["log10_p"])
        for name, t in (result.get("tests") or {}).items()
        if isinstance(t, dict) and t.get("log10_p") is not None
    }


def unit_verify(ctx: Ctx, u: Unit, out: Path) -> dict[str, Any]:
    suspect, marking, data, marker = (ctx.res(d) for d in u.deps)
    cmd = [
        *RADMARK, "verify", suspect["path"], "--probe", str(ctx.dir(u.deps[2]) / "test"),
        "--keystore", marking["keystore"], "--key", marking["keyfile"], "--marker",
        marker["path"], "--device", "cpu", "--json",
    ]  # fmt: skip
    if u.spec["black_box"]:
        cmd.append("--black-box")
    t0 = time.perf_counter()
    rc, js = ctx.json(cmd, ok=(0, 1))
    wall = time.perf_counter() - t0
    r = js["results"][0]
    return {
        "exit_code": rc,
        "detected": bool(js["detected"]),
        "log10_p": r.get("log10_p"),
        "tests": _tests_of(r),
        # a test's own measurements (the twin test's win rate), by test
        "test_extra": {n: t["extra"] for n, t in (r.get("tests") or {}).items() if t.get("extra")},
        "alignment_r2": (r.get("alignment") or {}).get("r2"),
        "black_box": r.get("black_box"),
        "dim": r.get("dim"),
        "num_classes": r.get("num_classes"),
        "verify_seconds": js.get("seconds"),
        "wall_seconds": wall,
        "warnings": js.get("warnings"),
        "key_fingerprint": marking["key_fingerprint"],
    }


def unit_null(ctx: Ctx, u: Unit, out: Path) -> dict[str, Any]:
    from pathlib import Path as P

    from .run import _calibration, black_box_null, null_calibration

    suspect = ctx.res(u.deps[0])
    probe = ctx.dir(u.deps[1]) / "test"
    marks = [ctx.res(d) for d in u.deps[2:]]
    first = marks[0]
    res = null_calibration(
        P(suspect["path"]), P(first["keystore"]), first["mark"]["record"], probe,
        max(u.spec["keys"], u.spec["pullback_keys"]), "cpu",
    )  # fmt: skip
    # the protocol's numbers on the first `keys` keys; the pull-back test also on all of them
    n = u.spec["keys"]
    all_keys = res["keys"]
    tests = res["tests"]
    out_tests: dict[str, Any] = {}
    for name, t in tests.items():
        lp = t["log10_p"]
        out_tests[name] = _calibration(lp[:n], n, conservative=name == "combined")
        if "pullback" in name and all_keys > n:
            out_tests[f"{name}[{all_keys} keys]"] = _calibration(lp, all_keys, conservative=False)
    res["tests"] = out_tests
    res["keys"] = n
    res["keys_total"] = all_keys
    for mk, dep in zip(marks, u.deps[2:], strict=True):
        if mk["mark"].get("kit") is None:
            continue
        run = {"name": dep.split("/", 1)[1], "mark": mk["mark"]}
        res["tests"].update(black_box_null(P(suspect["path"]), P(mk["keystore"]), [run], n, "cpu"))
    for t in res["tests"].values():
        t["log10_p"] = [round(x, 5) for x in t["log10_p"]]
    return res


RUNNERS = {
    "data": unit_data,
    "marker": unit_marker,
    "marking": unit_marking,
    "suspect": unit_suspect,
    "verify": unit_verify,
    "null": unit_null,
}


#: the process computing a unit (a second scheduler on the same work dir waits for it)
PID_FILE = "running.pid"


def _pid_of(out: Path) -> int | None:
    try:
        return int((out / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def busy_elsewhere(out: Path) -> bool:
    """A unit without result.json whose recorded process is alive (and is not this one)."""
    pid = _pid_of(out)
    if pid is None or pid == os.getpid() or (out / "result.json").exists():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # killed: the directory is a partial attempt, redone from scratch
    except PermissionError:
        return True
    return True


def run_unit(plan: Plan, work: Path, uid: str, threads: int) -> int:
    """Run one unit here (the child process): redo it from scratch unless it is done."""
    import torch

    torch.set_num_threads(threads)
    u = plan.units[uid]
    out = u.dir(work)
    if _result(out) is not None:
        return 0
    if busy_elsewhere(out):
        raise SystemExit(f"{uid} is being computed by process {_pid_of(out)}")
    if out.exists():
        shutil.rmtree(out)  # a killed attempt: its partial files are never trusted
    out.mkdir(parents=True)
    (out / PID_FILE).write_text(f"{os.getpid()}\n")
    _write_json(out / "spec.json", {"uid": uid, "key": u.key, "spec": u.spec, "deps": u.deps})
    ctx = Ctx(plan, work, threads)
    started, load0 = _now(), os.getloadavg()
    t0 = time.perf_counter()
    res = RUNNERS[u.kind](ctx, u, out)
    res["_unit"] = {
        "uid": uid,
        "key": u.key,
        "started": started,
        "finished": _now(),
        "seconds": time.perf_counter() - t0,
        "loadavg_start": list(load0),
        "loadavg_end": list(os.getloadavg()),
        "threads": threads,
        "commands": ctx.commands,
    }
    _write_json(out / "result.json", res)
    return 0


# --------------------------------------------------------------------------------------------
# The scheduler (the parent process)


def select_units(plan: Plan, stage: str | None, cells: list[str] | None) -> list[str]:
    if cells:
        chosen = [c for c in plan.cells if any(fnmatch.fnmatch(c.name, p) for p in cells)]
        if not chosen:
            raise SystemExit(f"no cell matches {cells}; cells are e.g. {plan.cells[0].name}")
        roots = [uid for c in chosen for uid in [c.suspect, *c.verifies]]
        roots += [
            n.uid for n in plan.units.values()
            if n.kind == "null" and n.deps[0] in {c.suspect for c in chosen}
        ]  # fmt: skip
        uids = plan.closure(roots)
    else:
        uids = set(plan.units)
    if stage and stage != "all":
        uids = {u for u in uids if plan.units[u].kind == KIND_OF_STAGE[stage]}
    return [u for u in plan.units if u in uids]  # plan order


def critical_paths(plan: Plan) -> dict[str, float]:
    """Per unit, its cost plus the costliest chain of units that wait for it: starting the
    longest chains first keeps both jobs busy to the end."""
    users: dict[str, list[str]] = {u: [] for u in plan.units}
    for uid, u in plan.units.items():
        for d in u.deps:
            users[d].append(uid)
    memo: dict[str, float] = {}

    def length(uid: str) -> float:
        if uid not in memo:
            memo[uid] = plan.units[uid].cost + max((length(v) for v in users[uid]), default=0.0)
        return memo[uid]

    return {uid: length(uid) for uid in plan.units}


def schedule(plan: Plan, work: Path, uids: list[str], jobs: int, threads: int) -> dict[str, Any]:
    """Run ``uids`` (their dependencies must be done or among them), ``jobs`` at a time."""
    todo = {u for u in uids if _result(plan.units[u].dir(work)) is None}
    skipped = len(uids) - len(todo)
    _log(f"{len(uids)} units selected, {skipped} already done, {len(todo)} to run")
    running: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
    failed: dict[str, str] = {}
    ran: list[str] = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    waiting: set[str] = set()
    chain = critical_paths(plan)

    def is_done(uid: str) -> bool:
        if uid not in done and (plan.units[uid].dir(work) / "result.json").exists():
            done.add(uid)
        return uid in done

    def ready(uid: str) -> bool:
        return all(d not in todo and d not in running and is_done(d) for d in plan.units[uid].deps)

    while todo or running:
        blocked = {u for u in todo if any(d in failed for d in plan.closure([u]) - {u})}
        for u in blocked:
            failed[u] = "a dependency failed"
            todo.discard(u)
        elsewhere = {u for u in todo if busy_elsewhere(plan.units[u].dir(work))}
        for u in elsewhere - waiting:
            _log(f"wait  {u}: computed by process {_pid_of(plan.units[u].dir(work))}")
        waiting.clear()
        waiting.update(elsewhere)
        for u in [u for u in todo if is_done(u)]:  # finished by another process
            todo.discard(u)
            _log(f"done  {u} (by another process)")
        launchable = sorted(
            (u for u in todo if ready(u) and u not in elsewhere),
            key=lambda u: (plan.units[u].priority, -chain[u]),
        )
        while launchable and len(running) + len(elsewhere) < jobs:  # the cores are shared
            uid = launchable.pop(0)
            todo.discard(uid)
            log = (work / "logs" / (uid.replace("/", "_") + ".log")).open("ab")
            cmd = [sys.executable, "-m", "bench.map", "--config", plan.config["name"],
                   "--work", str(work), "--threads", str(threads), "--unit", uid]  # fmt: skip
            _log(f"start {uid} (~{plan.units[uid].cost:.0f} s)")
            p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env=env)
            running[uid] = (p, time.perf_counter(), log)
        if not running and not elsewhere:
            if todo:  # nothing can start: inputs of another stage are missing
                missing = sorted({d for u in todo for d in plan.units[u].deps
                                  if d not in todo and not is_done(d)})  # fmt: skip
                for u in list(todo):
                    failed[u] = f"inputs not done (run their stage first): {missing[:3]}"
                todo.clear()
            break
        time.sleep(0.5)
        for uid, (p, t0, log) in list(running.items()):
            if p.poll() is None:
                continue
            log.close()
            del running[uid]
            wall = time.perf_counter() - t0
            if p.returncode == 0 and is_done(uid):
                ran.append(uid)
                _log(f"done  {uid} in {wall:.0f} s")
            else:
                failed[uid] = f"exit {p.returncode}, see {work / 'logs'}"
                _log(f"FAILED {uid} (exit {p.returncode}) in {wall:.0f} s")
    return {"selected": len(uids), "already_done": skipped, "ran": ran, "failed": failed}


# --------------------------------------------------------------------------------------------
# The report: one result file from every done unit


def collect(plan: Plan, work: Path) -> dict[str, Any]:
    cfg = plan.config
    res: dict[str, Any] = {"schema": "radmark-bench-map-v1", "config_name": cfg["name"]}
    units = {uid: _result(u.dir(work)) for uid, u in plan.units.items()}
    done = {k: v for k, v in units.items() if v is not None}
    res["data"] = {k.split("/", 1)[1]: v for k, v in done.items() if k.startswith("data/")}
    res["markers"] = {k.split("/", 1)[1]: v for k, v in done.items() if k.startswith("marker/")}
    res["markings"] = {
        k.split("/", 1)[1]: {
            # runs older than the field: the same function of the (unchanged) configuration
            "image_steps_per_marked": image_steps(cfg, plan.units[k].spec["method"]),
            **{kk: vv for kk, vv in v.items() if kk not in ("keyfile", "keystore")},
        }
        for k, v in done.items()
        if k.startswith("marking/")
    }
    cells = []
    for c in plan.cells:
        s = done.get(c.suspect)
        entry: dict[str, Any] = {
            "name": c.name, "variant": c.variant, "regime": c.regime, "method": c.method,
            "q": c.q, "seed": c.seed, "priority": c.priority,
            "train_images": variant_train_images(cfg, c.variant),
            "classes": variant_classes(cfg, c.variant),
            "suspect": None if s is None else {
                k: s.get(k) for k in ("kind", "arch", "aug", "epochs", "batch_size", "lr", "seed",
                                      "train_accuracy", "test_accuracy", "train_test_gap",
                                      "train_accuracy_running", "train_seconds",
                                      "train_images_per_s", "train_images")
            },
            "verify": {},
        }  # fmt: skip
        for v in c.verifies:
            r = done.get(v)
            if r is not None:
                r = {k: vv for k, vv in r.items() if k != "_unit"}
            entry["verify"][v.rsplit(".", 1)[1]] = r  # by the key's q: "q1", "q10", ...
        if c.q > 0:
            mk = done.get(f"marking/{c.variant}.{c.method}.{qname(c.q)}.s{c.seed}")
            if mk is not None:
                m = mk["mark"]
                entry["mark"] = {k: m.get(k) for k in ("images", "marked", "psnr_mean",
                                                       "psnr_min", "linf_max", "method")}  # fmt: skip
        cells.append(entry)
    res["cells"] = cells
    res["null"] = {k.split("/", 1)[1]: v for k, v in done.items() if k.startswith("null/")}
    stages: dict[str, Any] = {}
    for stage, kind in KIND_OF_STAGE.items():
        us = [v["_unit"] for k, v in done.items() if plan.units[k].kind == kind]
        if not us:
            stages[stage] = {"units": 0, "of": sum(u.kind == kind for u in plan.units.values())}
            continue
        stages[stage] = {
            "units": len(us),
            "of": sum(u.kind == kind for u in plan.units.values()),
            "unit_seconds": sum(u["seconds"] for u in us),
            "first_start": min(u["started"] for u in us),
            "last_finish": max(u["finished"] for u in us),
            "loadavg_1min_mean": float(
                np.mean([(u["loadavg_start"][0] + u["loadavg_end"][0]) / 2 for u in us])
            ),  # fmt: skip
        }
    res["stages"] = stages
    res["units_total"] = len(plan.units)
    res["units_done"] = len(done)
    res["missing"] = sorted(set(plan.units) - set(done))
    res["complete"] = not res["missing"]
    sessions = work / "sessions.jsonl"
    res["sessions"] = (
        [json.loads(line) for line in sessions.read_text().splitlines() if line.strip()]
        if sessions.exists()
        else []
    )
    res["wall_seconds_total"] = sum(s.get("seconds", 0.0) for s in res["sessions"])
    res["unit_seconds_total"] = sum(v["_unit"]["seconds"] for v in done.values() if "_unit" in v)
    return res


def write_report(plan: Plan, work: Path, out_dir: Path, *, docs: bool) -> Path:
    from .run import device_name, git_commit, versions

    res = collect(plan, work)
    res.update(
        {
            "written": _now(),
            "device": device_name("cpu"),
            "cpu_count": os.cpu_count(),
            "loadavg_at_report": list(os.getloadavg()),
            "versions": versions(),
            "git": git_commit(),
            "config": plan.config,
            "work": str(work),
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{plan.config['name']}-{stamp}.json"
    _write_json(path, res)
    _log(f"wrote {path} ({res['units_done']}/{res['units_total']} units done)")
    if docs:
        from . import report

        report.main(["--results", str(out_dir)])
    return path


# --------------------------------------------------------------------------------------------


def print_plan(plan: Plan, work: Path, uids: list[str]) -> None:
    total = 0.0
    for uid in uids:
        u = plan.units[uid]
        state = "done" if _result(u.dir(work)) is not None else "todo"
        if state == "todo":
            total += u.cost
        print(f"{state:4}  p{u.priority}  ~{u.cost:7.0f} s  {uid}")
    print(f"{len(uids)} units, ~{total / 3600:.2f} core-hours to do (rough estimate)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    ap.add_argument("--cells", nargs="+", help="only these cells (glob on variant/regime/...)")
    ap.add_argument("--smoke", action="store_true", help="the tiny configuration (tests)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None)
    ap.add_argument(
        "--work", type=Path, default=None, help="cache dir (default bench/work/<config>)"
    )
    ap.add_argument("--out", type=Path, default=None, help="default bench/results (smoke: WORK)")
    ap.add_argument("--jobs", type=int, default=2, help="units at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per unit")
    ap.add_argument("--plan", action="store_true", help="print the units and exit")
    ap.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    ap.add_argument("--unit", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)

    name = args.config or ("smoke" if args.smoke else "map")
    cfg = copy.deepcopy(CONFIGS[name])
    plan = build_plan(cfg)
    work = (args.work or REPO / "bench" / "work" / name).resolve()
    if args.unit:
        return run_unit(plan, work, args.unit, args.threads)
    uids = select_units(plan, None if args.stage == "report" else args.stage, args.cells)
    if args.plan:
        print_plan(plan, work, uids)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    rc = 0
    if args.stage != "report":
        session: dict[str, Any] = {
            "started": _now(), "argv": sys.argv[1:] if argv is None else argv,
            "jobs": args.jobs, "threads": args.threads, "loadavg_start": list(os.getloadavg()),
        }  # fmt: skip
        t0 = time.perf_counter()

        def _stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
        try:
            out = schedule(plan, work, uids, args.jobs, args.threads)
        except KeyboardInterrupt:
            # units already started keep running (their pid files make a later run wait)
            out = {"ran": [], "failed": {"(session)": "interrupted"}}
            session["note"] = "interrupted (SIGTERM / Ctrl-C)"
        session.update(finished=_now(), seconds=time.perf_counter() - t0,
                       loadavg_end=list(os.getloadavg()), ran=len(out["ran"]),
                       failed=out["failed"])  # fmt: skip
        with (work / "sessions.jsonl").open("a") as fh:
            fh.write(json.dumps(session) + "\n")
        if out["failed"]:
            for uid, why in out["failed"].items():
                _log(f"not done: {uid}: {why}")
            rc = 1
    if args.stage in ("report", "all"):
        out_dir = args.out or (work / "results" if name == "smoke" else REPO / "bench" / "results")
        write_report(plan, work, out_dir, docs=not args.no_docs and name != "smoke")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
