"""``radmark mark`` under ``torchrun`` (two CPU processes, gloo): shards split by rank, one merged
manifest and one mark record, output bytes identical to a single-process run; a failure on one
rank stops both with exit 2 instead of a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.keys.manage import show_object
from radmark.marking.manifest import find_state
from tests.factories import make_key, make_marker, make_shards, sha256_tree, temp_files

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed"),
]


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "mark", str(root / "in"),
        "--key", str(root / "owner.key"), "--keystore", str(root / "ks"),
        "--out", str(out), "--marker", str(root / "marker.safetensors"),
        "--fraction", "0.5", "--steps", "2", *extra,
    ]  # fmt: skip


def _torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "radmark", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    make_shards(tmp_path / "in", n=40, per_shard=8)  # 5 shards: rank 0 gets 3, rank 1 gets 2
    make_marker(tmp_path / "marker.safetensors")
    make_key(tmp_path / "ks", tmp_path / "owner.key")
    return tmp_path


def _manifest(out: Path) -> dict:
    man = find_state(out.parent / "ks", out)  # the private run state, in the keystore
    assert man is not None
    return man


def _state(out: Path) -> tuple[dict[str, str], dict, dict]:
    man = _manifest(out)
    tars = {k: v for k, v in sha256_tree(out).items() if k.endswith(".tar")}
    return tars, man["shards"], man["config"]


def test_torchrun_two_ranks_equals_one_process(root: Path) -> None:
    before = sha256_tree(root / "in")
    single = CliRunner().invoke(app, _args(root, root / "single", "--json"))
    assert single.exit_code == 0, single.output
    ref_tars, ref_entries, ref_config = _state(root / "single")

    res = _torchrun(_args(root, root / "multi"))
    assert res.returncode == 0, res.stdout + res.stderr
    out = root / "multi"
    tars, entries, config = _state(out)
    assert tars == ref_tars  # byte-identical shards whichever rank marked them
    assert entries == ref_entries and config == ref_config
    assert sha256_tree(root / "in") == before
    assert not temp_files(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".tar")) == [
        ".radmark.lock",
        ".radmark.rank1.lock",
    ]  # only shards and locks: nothing that reveals the selection
    # one record, covering all five shards in input order, reported by rank 0 only
    man = _manifest(out)
    assert not list(Path(root / "ks" / "runs").glob("*/rank*.json"))  # partials merged, removed
    rec = show_object(root / "ks", man["record"]).record
    assert [s["name"] for s in rec["shards"]] == [f"data-{i:06d}.tar" for i in range(5)]
    assert [s["output_sha256"] for s in rec["shards"]] == [
        ref_tars[s["name"]] for s in rec["shards"]
    ]
    assert rec["counts"]["images"] == 40
    assert rec["counts"]["marked"] == json.loads(single.stdout)["marked"]
    assert man["record"] in res.stdout
    assert (res.stdout + res.stderr).count("marked with key") == 1  # one summary, from rank 0

    # a torchrun run resumed by a single process (and vice versa) continues where it stopped
    for name in ("data-000001.tar", "data-000004.tar"):
        (out / name).unlink()
    again = CliRunner().invoke(app, _args(root, out, "--resume", "--json"))
    assert again.exit_code == 0, again.output
    assert [r["resumed"] for r in json.loads(again.stdout)["shard_reports"]] == [
        True, False, True, True, False,
    ]  # fmt: skip
    assert _state(out)[:2] == (ref_tars, ref_entries)


def test_torchrun_failure_on_one_rank_stops_both(root: Path) -> None:
    # shard 1 (rank 1's) is truncated: rank 1 fails, rank 0 must not wait for it forever
    bad = root / "in" / "data-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    res = _torchrun(_args(root, root / "multi"), timeout=240)
    assert res.returncode != 0
    assert "radmark: error: shard" in res.stderr and "data-000001.tar" in res.stderr
    assert "another rank of this torchrun job failed" in res.stderr
    out = root / "multi"
    assert not (out / "data-000001.tar").exists() and not temp_files(out)
    assert _manifest(out)["record"] is None  # no record written
    shutil.rmtree(out)
