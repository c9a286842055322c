"""``radmark kit build`` + ``radmark verify --black-box`` end to end on the shared real-data run.

The kit is built from the clean probe shards with the real CLI; verification with the kit alone
uses only the suspect's outputs. The keystore is copied first: the session fixture is shared.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from radmark.cli import app

pytestmark = pytest.mark.slow

DECOYS = "9"
PER_CLASS = "5"


def _run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def kit(e2e: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ks = tmp_path_factory.mktemp("bb") / "keys"
    shutil.copytree(e2e["keystore"], ks)
    res = _run(
        "kit", "build", e2e["record"][:16],
        "--probe", str(e2e["probe"]),
        "--decoys", DECOYS, "--per-class", PER_CLASS,
        "--marker", str(e2e["marker"]),
        "--keystore", str(ks), "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"keystore": ks, "build": json.loads(res.stdout), "output": res.output}


def _verify(e2e: dict[str, Any], ks: Path, model: str, *extra: str):
    return _run(
        "verify", str(e2e[model]), "--black-box", "--keystore", str(ks),
        "--marker", str(e2e["marker"]), *extra,
    )  # fmt: skip


def test_kit_is_stored_private_and_content_addressed(kit: dict[str, Any]) -> None:
    b = kit["build"]
    assert b["images"] == 10 * int(PER_CLASS) and b["decoys"] == int(DECOYS)
    assert b["markings"] == b["images"] * (int(DECOYS) + 1)
    files = [p for p in (kit["keystore"] / "kits").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert files[0].name == b["kit_sha256"].removeprefix("sha256:") + ".safetensors"
    assert "slot" not in kit["output"].lower()  # which slot is true is never written


def test_black_box_alone_uses_only_the_kit(e2e: dict[str, Any], kit: dict[str, Any]) -> None:
    res = _verify(e2e, kit["keystore"], "suspect", "--json")
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    r = doc["results"][0]
    assert list(r["tests"]) == ["black_box_rank"]
    assert r["tests"]["black_box_rank"]["exact"] is True
    assert r["log10_p"] == pytest.approx(r["tests"]["black_box_rank"]["log10_p"])
    assert len(r["black_box"]["ranks"]) == 10 and r["black_box"]["slots"] == int(DECOYS) + 1
    assert all(1 <= k <= int(DECOYS) + 1 for k in r["black_box"]["ranks"])
    assert doc["probe_size"] == 0 and r["cosines"] == []
    assert res.exit_code == (1 if doc["detected"] else 0)


def test_black_box_joins_the_white_box_tests(e2e: dict[str, Any], kit: dict[str, Any]) -> None:
    res = _verify(e2e, kit["keystore"], "suspect", "--probe", str(e2e["probe"]), "--json")
    assert res.exit_code in (0, 1), res.output
    r = json.loads(res.stdout)["results"][0]
    assert set(r["tests"]) == {
        "white_box_fisher",
        "white_box_zscore",
        "pullback_fisher",
        "black_box_rank",
    }
    exact = [t["log10_p"] for t in r["tests"].values() if t["exact"]]
    assert r["log10_p"] == pytest.approx(min(0.0, min(exact) + 0.47712125472), abs=1e-9)


def test_rich_report_shows_the_ranks(e2e: dict[str, Any], kit: dict[str, Any]) -> None:
    res = _verify(e2e, kit["keystore"], "control")
    assert res.exit_code in (0, 1), res.output
    assert "black_box_rank" in res.output and "black-box ranks" in res.output


def test_missing_kit_is_a_clear_error(e2e: dict[str, Any]) -> None:
    res = _verify(e2e, e2e["keystore"], "suspect")
    assert res.exit_code == 2
    assert "no verification kit" in res.output and "radmark kit build" in res.output


def test_tampered_kit_is_refused(e2e: dict[str, Any], kit: dict[str, Any], tmp_path: Path) -> None:
    ks = tmp_path / "keys"
    shutil.copytree(kit["keystore"], ks)
    (f,) = [p for p in (ks / "kits").rglob("*") if p.is_file()]
    data = bytearray(f.read_bytes())
    data[-7] ^= 1
    os.chmod(f, 0o600)
    f.write_bytes(bytes(data))
    res = _verify(e2e, ks, "suspect")
    assert res.exit_code == 2 and "tampered or corrupt" in res.output
    assert res.output.count("\n") == 1


def test_world_readable_kit_is_refused(
    e2e: dict[str, Any], kit: dict[str, Any], tmp_path: Path
) -> None:
    ks = tmp_path / "keys"
    shutil.copytree(kit["keystore"], ks)
    (f,) = [p for p in (ks / "kits").rglob("*") if p.is_file()]
    os.chmod(f, 0o644)
    res = _verify(e2e, ks, "suspect")
    assert res.exit_code == 2 and "too open" in res.output


def test_kit_build_needs_the_owner_key(e2e: dict[str, Any], tmp_path: Path) -> None:
    ks = tmp_path / "keys"
    shutil.copytree(e2e["keystore"], ks)
    shutil.rmtree(ks / "secrets")
    res = _run(
        "kit", "build", e2e["record"][:16], "--probe", str(e2e["probe"]),
        "--keystore", str(ks),
    )  # fmt: skip
    assert res.exit_code == 2 and "only the public part" in res.output
