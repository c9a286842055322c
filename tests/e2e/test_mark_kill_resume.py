"""Killed (SIGKILL) and resumed equals uninterrupted, byte for byte (issue #7).

``radmark mark`` runs as a real subprocess and is SIGKILLed again and again: at random times in
[0, T] (T = the measured uninterrupted duration) and at exact points placed with the test-only
hook ``RADMARK_TEST_KILL_AT``, read only by ``tests/kill_hook.py`` (after a marked batch, with a
shard's temp file partly written, after a shard's rename but before the run state's update). Each kill is followed by ``--resume``.
When a chain finally completes, every output shard and every per-shard manifest entry must equal
an uninterrupted run's, the inputs must be unchanged and no temp file may remain.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from radmark.keys.manage import load_secret_key
from radmark.marking.manifest import find_state
from radmark.marking.selection import is_selected
from tests.factories import make_key, make_marker, make_shards, sha256_tree, temp_files

SHARDS, PER_SHARD = 6, 8


def _cmd(root: Path, out: Path, resume: bool) -> list[str]:
    return [
        sys.executable, "-m", "tests.kill_hook", "mark", str(root / "in"),
        "--key", str(root / "owner.key"), "--keystore", str(root / "ks"),
        "--out", str(out), "--marker", str(root / "marker.safetensors"),
        "--fraction", "0.5", "--steps", "2", "--batch-size", "2", "--json",
        *(["--resume"] if resume else []),
    ]  # fmt: skip


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RADMARK_TEST_KILL_AT", None)
    if kill_at:
        env["RADMARK_TEST_KILL_AT"] = kill_at
    return env


def _state(out: Path) -> dict[str, object]:
    """Where a kill landed: shards recorded in the run state, shard files, temp files."""
    recorded: list[str] = []
    man = find_state(out.parent / "ks", out) if out.is_dir() else None
    if man is not None:
        recorded = sorted(man["shards"])
    files = sorted(p.name for p in out.glob("*.tar")) if out.is_dir() else []
    return {
        "recorded": len(recorded),
        "files": len(files),
        "temps": temp_files(out) if out.is_dir() else [],
    }


def _shards_and_entries(out: Path) -> tuple[dict[str, str], dict[str, object], dict[str, object]]:
    man = find_state(out.parent / "ks", out)  # the private run state, in the keystore
    assert man is not None
    tars = {k: v for k, v in sha256_tree(out).items() if k.endswith(".tar")}
    return tars, man["shards"], man["config"]


# Kill plans, one per chain ("t": a random time in [0, T]; otherwise the hook's EVENT:N). Hook
# points are chosen so that together they land before anything is written (batch:1 on a fresh
# directory), with a half-written temp shard (write:N), with a renamed shard that the manifest
# does not list yet (shard:N), and after 1, 2 or 3 recorded shards (shard:2..4).
PLANS = [
    ["batch:1", "t", "shard:2", "t", "write:1", "t"],
    ["shard:3", "t", "write:2", "t", "shard:1", "t"],
    ["write:1", "t", "shard:4", "t", "batch:1", "t"],
    ["t", "shard:2", "t", "write:3", "t", "shard:1"],
]
EXTRA_PLAN = ["batch:2", "t", "write:1", "t", "shard:1", "t"]
MIN_KILLS = 20


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_identical_bytes(tmp_path: Path) -> None:
    root = tmp_path
    make_shards(root / "in", n=SHARDS * PER_SHARD, per_shard=PER_SHARD)
    make_marker(root / "marker.safetensors")
    make_key(root / "ks", root / "owner.key", pinned="kill-resume")
    # the "batch:1" kill must land before shard 0 is written: shard 0 needs a selected sample
    secret, _ = load_secret_key(root / "ks", str(root / "owner.key"), lambda: None)
    assert any(is_selected(secret.selection_seed(), f"{i:06d}", 0.5) for i in range(PER_SHARD))
    inputs_before = sha256_tree(root / "in")

    t0 = time.monotonic()
    ref = subprocess.run(_cmd(root, root / "ref", False), env=_env(), capture_output=True)
    T = time.monotonic() - t0
    assert ref.returncode == 0, ref.stderr.decode()
    ref_tars, ref_entries, ref_config = _shards_and_entries(root / "ref")
    assert len(ref_tars) == SHARDS

    def chain(c: int, plan: list[str]) -> list[dict[str, object]]:
        """Kill, resume, kill... then resume to completion and compare with the reference."""
        rng = random.Random(1000 + c)
        out = root / f"chain{c}"
        landed: list[dict[str, object]] = []
        for point in plan:
            kill_at = None if point == "t" else point
            proc = subprocess.Popen(
                _cmd(root, out, resume=True),
                env=_env(kill_at),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if point == "t":
                delay = rng.uniform(0, T)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                point = f"t={delay:.2f}s"
            _, err = proc.communicate(timeout=120)
            assert proc.returncode in (0, -signal.SIGKILL), err.decode()
            landed.append({"chain": c, "at": point, "killed": proc.returncode != 0, **_state(out)})
            if proc.returncode == 0:
                break  # this run finished before its kill: the chain is complete
        final = subprocess.run(_cmd(root, out, True), env=_env(), capture_output=True)
        assert final.returncode == 0, final.stderr.decode()
        tars, entries, config = _shards_and_entries(out)
        assert tars == ref_tars, c  # every shard byte-identical to the uninterrupted run
        assert entries == ref_entries and config == ref_config
        assert not temp_files(out), temp_files(out)
        doc = json.loads(final.stdout)
        assert doc["images"] == SHARDS * PER_SHARD
        assert doc["marked"] == sum(len(e["marked_keys"]) for e in ref_entries.values())
        return landed

    # two chains at a time (two cores); more chains until enough kills have landed
    landed: list[dict[str, object]] = []
    plans = list(PLANS)
    chains_run = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        while plans:
            batch, plans = plans[:2], plans[2:]
            ids = range(chains_run, chains_run + len(batch))
            for result in pool.map(chain, ids, batch):
                landed.extend(result)
            chains_run += len(batch)
            if not plans and sum(bool(k["killed"]) for k in landed) < MIN_KILLS and chains_run < 8:
                plans = [EXTRA_PLAN]

    assert sha256_tree(root / "in") == inputs_before  # inputs never touched
    killed = [k for k in landed if k["killed"]]
    print(f"\nuninterrupted run: {T:.2f}s; {len(killed)} kills survived:")
    for k in landed:
        print("  ", k)
    assert len(killed) >= MIN_KILLS
    assert any(k["files"] == 0 and not k["temps"] for k in killed)  # before anything written
    assert any(k["temps"] for k in killed)  # half-written temp shard
    assert any(int(k["files"]) > int(k["recorded"]) for k in killed)  # renamed, not recorded
    assert {1, 2, 3} <= {k["recorded"] for k in killed}  # between finished shards
