"""radmark.marking.run: sample selection, the library round trip, progress events and stale temp files."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radmark.data.sources import iter_samples
from radmark.errors import InputError
from radmark.keys.manage import load_secret_key, show_object
from radmark.marking.manifest import LOCK, RunDir, find_state
from radmark.marking.run import MarkOptions, Progress, mark_shards
from radmark.marking.selection import is_selected
from tests.factories import fmnist, make_key, make_marker, make_shards, sha256_tree, temp_files


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mark-unit")
    make_shards(root / "in", n=48, per_shard=16)
    make_marker(root / "marker.safetensors")
    make_key(root / "ks", root / "owner.key")
    return {
        "root": root,
        "in": root / "in",
        "marker": root / "marker.safetensors",
        "ks": root / "ks",
        "key": root / "owner.key",
    }


def _mark(world: dict[str, Path], out: Path, progress=None, **opts):
    secret, record = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    options = MarkOptions(**{"fraction": 0.5, "overrides": {"steps": 3}, **opts})
    return secret, mark_shards(
        [str(world["in"])],
        key=secret,
        key_record=record,
        keystore=world["ks"],
        out_dir=out,
        marker_spec=str(world["marker"]),
        options=options,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# selection


SEED_A = hashlib.sha256(b"radmark test seed A").digest()
SEED_B = hashlib.sha256(b"radmark test seed B").digest()
KEYS = [f"{i:08d}" for i in range(20000)]


def _selected(seed: bytes, q: float, keys: list[str] = KEYS) -> set[str]:
    return {k for k in keys if is_selected(seed, k, q)}


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
def test_selection_is_deterministic_secret_and_has_the_right_rate(q: float) -> None:
    a, a2, b = _selected(SEED_A, q), _selected(SEED_A, q), _selected(SEED_B, q)
    assert a == a2  # same key, same set
    assert a != b  # another key picks another set
    n = len(KEYS)
    sd = math.sqrt(n * q * (1 - q))
    for s in (a, b):
        assert abs(len(s) - n * q) < 5 * sd, (len(s), n * q)
    # two keys' choices are independent: the overlap is about q² n, not q n
    assert abs(len(a & b) - n * q * q) < 5 * math.sqrt(n * q * q) + 1


def test_selection_edges() -> None:
    assert _selected(SEED_A, 1.0, KEYS[:100]) == set(KEYS[:100])
    assert _selected(SEED_A, 1e-12, KEYS[:1000]) == set()
    # the rule is HMAC-SHA256(seed, key) < q 2^64, pinned so old records stay checkable
    import hmac

    digest = hmac.new(SEED_A, b"00000042", hashlib.sha256).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    assert is_selected(SEED_A, "00000042", min(1.0, u + 1e-9)) is True
    assert is_selected(SEED_A, "00000042", u * (1 - 1e-9)) is False


@pytest.mark.parametrize("seed", [SEED_A, SEED_B])
def test_selection_is_uniform_across_classes(seed: bytes) -> None:
    """Selection looks only at the key: per-class rates match q (chi-square, 9 dof)."""
    _, labels = fmnist(3000)
    q = 0.2
    keys = [f"{i:08d}" for i in range(len(labels))]
    chosen = np.array([is_selected(seed, k, q) for k in keys])
    chi2 = 0.0
    for c in range(10):
        n_c = int((labels == c).sum())
        got = int(chosen[labels == c].sum())
        expected = q * n_c
        chi2 += (got - expected) ** 2 / (expected * (1 - q))
        assert abs(got - expected) < 5 * math.sqrt(n_c * q * (1 - q)), (c, got, expected)
    assert chi2 < 33.7, chi2  # chi-square(9) upper 1e-4 quantile


# --------------------------------------------------------------------------------------------
# round trip through the library


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_round_trip_keeps_everything_but_the_selected_images(
    world: dict[str, Path], tmp_path: Path
) -> None:
    before = sha256_tree(world["in"])
    out = tmp_path / "out"
    secret, res = _mark(world, out)
    assert sha256_tree(world["in"]) == before  # inputs untouched
    seed = secret.selection_seed()
    state = find_state(world["ks"], out)  # the private run state: in the keystore, 0600
    assert state is not None and state["record"] == res.record
    assert sorted(p.name for p in out.iterdir()) == [LOCK, *sorted(r.name for r in res.shards)]
    total_marked = selected = 0
    for src in sorted(world["in"].glob("*.tar")):
        ins = list(iter_samples(str(src)))
        outs = list(iter_samples(str(out / src.name)))
        assert [s.key for s in outs] == [s.key for s in ins]
        expected = [s.key for s in ins if is_selected(seed, s.key, 0.5)]
        marked = state["shards"][src.name]["marked_keys"]
        assert set(marked) <= set(expected)  # unchanged selected images are not "marked"
        selected += len(expected)
        for a, b in zip(ins, outs, strict=True):
            assert [e for e, _ in b.members] == [e for e, _ in a.members]
            assert b.get("json") == a.get("json") and b.get("cls") == a.get("cls")
            if a.key not in marked:
                assert b.get("png") == a.get("png")
                continue
            total_marked += 1
            ia, ib = Image.open(io.BytesIO(a.get("png"))), Image.open(io.BytesIO(b.get("png")))
            assert ib.mode == "L" and ib.size == ia.size  # grayscale stays grayscale
            xa, xb = np.asarray(ia), np.asarray(ib)
            linf = int(np.abs(xa.astype(int) - xb.astype(int)).max())
            assert 1 <= linf <= 2  # changed, within the default preset's radius of 2 levels
            assert _psnr(xa, xb) >= 42.0
    assert total_marked == res.marked == sum(r.marked for r in res.shards) > 0
    assert res.marked + res.unchanged == selected
    assert res.marked >= selected // 2  # a 3-step mark moves (almost) every selected image
    assert res.images == 48 and res.skipped == 0 and len(res.shards) == 3
    assert res.linf_max <= 2 and res.psnr_min is not None and res.psnr_min >= 42.0
    assert res.fingerprint.startswith("sha256:") and res.preset == "default+custom"
    # the signed mark record is in the keystore and agrees with the result
    shown = show_object(world["ks"], res.record)
    assert shown.kind == "mark"
    rec = shown.record
    assert rec["counts"] == {
        "images": 48, "marked": res.marked, "skipped": 0, "unchanged": res.unchanged
    }  # fmt: skip
    assert [s["name"] for s in rec["shards"]] == [r.name for r in res.shards]
    assert [s["output_sha256"] for s in rec["shards"]] == [r.output_sha256 for r in res.shards]
    assert rec["key"] == res.fingerprint.removeprefix("sha256:")
    assert rec["selection"]["fraction"] == 0.5 and rec["params"]["steps"] == 3
    assert not temp_files(out)


def test_marking_is_deterministic_and_progress_reports_batches(
    world: dict[str, Path], tmp_path: Path
) -> None:
    events: list[Progress] = []
    _, first = _mark(world, tmp_path / "a", progress=events.append, batch_size=2)
    _, second = _mark(world, tmp_path / "b", batch_size=2)
    assert [r.output_sha256 for r in first.shards] == [r.output_sha256 for r in second.shards]
    assert sha256_tree(tmp_path / "a").keys() == sha256_tree(tmp_path / "b").keys()
    # one event per batch and one per shard; the last one says everything is done
    assert len(events) > len(first.shards)
    assert events[-1].shards_done == events[-1].shards_total == 3
    assert events[-1].images_done == 48 and events[-1].marked_done == first.marked
    assert all(e.psnr_mean is None or e.psnr_mean >= 42 for e in events)


def test_resume_removes_only_its_own_stale_temp_files(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    secret, res = _mark(world, out)
    run = RunDir.of(world["ks"], res.fingerprint.removeprefix("sha256:"), out)
    (out / ".data-000001.tar.4242.deadbeef.tmp").write_bytes(b"left by a killed run")
    (run.path / ".state.json.4242.tmp").write_bytes(b"left by a killed run")
    (out / ".mine.tmp").write_bytes(b"not ours")
    _, again = _mark(world, out, resume=True)
    assert all(r.resumed for r in again.shards)
    assert [r.output_sha256 for r in again.shards] == [r.output_sha256 for r in res.shards]
    assert temp_files(out) == [".mine.tmp"] and not temp_files(run.path)


def test_output_directory_holding_the_inputs_is_refused(
    world: dict[str, Path], tmp_path: Path
) -> None:
    before = sha256_tree(world["in"])
    with pytest.raises(InputError, match="would overwrite the input shard"):
        _mark(world, world["in"], resume=True)
    assert sha256_tree(world["in"]) == before


def test_undecodable_image_is_refused_even_when_not_selected(tmp_path: Path, world) -> None:
    """Whether a shard is refused must not depend on the secret selection."""
    secret, _ = load_secret_key(world["ks"], str(world["key"]), lambda: None)
    seed = secret.selection_seed()
    key = next(f"{i:08d}" for i in range(1000) if not is_selected(seed, f"{i:08d}", 0.5))
    shard = tmp_path / "in" / "bad.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in [(f"{key}.png", b"not a png at all"), (f"{key}.cls", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    w = {**world, "in": shard.parent}
    with pytest.raises(InputError, match=rf"bad\.tar.*{key}.*does not decode"):
        _mark(w, tmp_path / "out")
    assert not (tmp_path / "out" / "bad.tar").exists() and not temp_files(tmp_path / "out")


def test_resume_picks_up_a_killed_torchrun_ranks_partial_manifest(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """Rank 1 finished a shard and recorded it in its partial file, then the job was killed
    before rank 0 merged: a resume (with any number of processes) keeps that shard."""
    out = tmp_path / "out"
    _, res = _mark(world, out)
    run = RunDir.of(world["ks"], res.fingerprint.removeprefix("sha256:"), out)
    man = json.loads(run.state.read_bytes())
    moved = man["shards"].pop("data-000001.tar")
    man["record"] = None
    run.state.write_text(json.dumps(man))
    partial = run.partial(1)
    partial.write_text(
        json.dumps({"config": man["config"], "rank": 1, "shards": {"data-000001.tar": moved}})
    )
    partial.chmod(0o600)
    _, again = _mark(world, out, resume=True)
    assert [r.resumed for r in again.shards] == [True, True, True]
    assert [r.output_sha256 for r in again.shards] == [r.output_sha256 for r in res.shards]
    assert not partial.exists()
    assert json.loads(run.state.read_bytes())["shards"]["data-000001.tar"] == moved


def test_world_size_without_torchrun_is_a_clear_usage_error(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from radmark.errors import UsageError

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="WORLD_SIZE=2 .*launch with torchrun"):
        _mark(world, tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="must be integers"):
        _mark(world, tmp_path / "out")
    assert not (tmp_path / "out").exists()
