"""radmark.marking.manifest: the run state that lists the marked samples is private (issue #12):
it lives in the keystore, 0600 in 0700 directories, is refused when open to others or behind a
symlink, and output shards that no run state accounts for are never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radmark.errors import InputError, KeystoreError
from radmark.marking.manifest import (
    LEGACY_MANIFEST,
    RunDir,
    ShardReport,
    find_state,
    load_state,
    report_from_entry,
    write_state,
)

FP = "ab" * 32
CFG = {"key": FP, "shards": ["data-000000.tar"], "fraction": 0.5}


def _entry(**extra: object) -> dict[str, object]:
    return {
        "name": "data-000000.tar", "input_sha256": "1" * 64, "output_sha256": "2" * 64,
        "samples": 8, "marked": 3, "skipped": 0, "psnr_mean": 50.0, "psnr_min": 48.0,
        "linf_max": 2, "feature_cos_mean": 0.1, "marked_keys_sha256": "3" * 64, **extra,
    }  # fmt: skip


def test_state_lives_in_the_keystore_private_and_is_found_by_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "ks").mkdir(mode=0o700)  # an existing keystore
    run = RunDir.of(tmp_path / "ks", FP, out)
    assert run.path.parent == tmp_path / "ks" / "runs"
    assert RunDir.of(tmp_path / "ks", FP, tmp_path / "." / "out").path == run.path  # resolved
    assert RunDir.of(tmp_path / "ks", "cd" * 32, out).path != run.path  # per key
    run.make()
    write_state(run, CFG, {"data-000000.tar": _entry(marked_keys=["a", "b", "c"])})
    assert run.state.stat().st_mode & 0o777 == 0o600
    assert run.path.stat().st_mode & 0o777 == 0o700
    assert run.path.parent.stat().st_mode & 0o777 == 0o700
    state = find_state(tmp_path / "ks", out)
    assert state is not None and state["shards"]["data-000000.tar"]["marked_keys"] == [
        "a",
        "b",
        "c",
    ]
    assert list(out.iterdir()) == []  # nothing in the directory the owner publishes
    done = load_state(run, out, CFG, resume=True)
    assert done["data-000000.tar"]["marked"] == 3
    with pytest.raises(InputError, match="pass --resume"):
        load_state(run, out, CFG, resume=False)
    with pytest.raises(InputError, match="other settings"):
        load_state(run, out, {**CFG, "fraction": 0.25}, resume=True)


def test_state_open_to_others_or_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "ks").mkdir(mode=0o700)  # an existing keystore
    run = RunDir.of(tmp_path / "ks", FP, out)
    run.make()
    write_state(run, CFG, {})
    run.state.chmod(0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_state(run, out, CFG, resume=True)
    run.path.chmod(0o755)
    with pytest.raises(InputError, match="chmod 700"):
        run.make()
    other = tmp_path / "ks2"
    (other / "elsewhere").mkdir(parents=True)
    (other / "runs").symlink_to(other / "elsewhere")
    with pytest.raises(InputError, match="symbolic link"):
        RunDir.of(other, FP, out).make()


def test_shards_no_state_accounts_for_are_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "ks").mkdir(mode=0o700)  # an existing keystore
    (out / "data-000000.tar").write_bytes(b"someone else's shard")
    run = RunDir.of(tmp_path / "ks", FP, out)
    run.make()
    for resume in (False, True):
        with pytest.raises(InputError, match="already holds data-000000.tar"):
            load_state(run, out, CFG, resume=resume)
    (out / "data-000000.tar").unlink()
    (out / LEGACY_MANIFEST).write_text(json.dumps({"config": CFG, "shards": {}}))
    with pytest.raises(InputError, match="never publish it"):
        load_state(run, out, CFG, resume=True)


def test_reports_read_entries_without_the_later_fields() -> None:
    rep = report_from_entry(_entry(), resumed=True)
    assert rep == ShardReport(**_entry(), resumed=True)  # type: ignore[arg-type]
    assert rep.unchanged == 0 and rep.skip_reasons == {} and rep.lossy_mark_kept is None
    with pytest.raises(InputError, match="lacks 'samples'"):
        report_from_entry({k: v for k, v in _entry().items() if k != "samples"}, resumed=False)
