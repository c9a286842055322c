"""Output people can read and paste (issue #16): nothing ``radmark verify`` prints is cut.

Off a terminal (a pipe, a CI log) every value of the report is printed whole, on one line: model
paths, hashes, fingerprints. On a narrow terminal a long value folds onto the next line; it never
ends in "…".
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from radmark.cli import app
from radmark.report import console
from tests.factories import make_marker, make_record, make_shards

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A signed record for an untrained smallcnn marker, a probe, and a suspect (a copy of the
    marker) at a path of about 200 characters."""
    root = tmp_path_factory.mktemp("output")
    make_shards(root / "probe", n=200, per_shard=100)
    marker = make_marker(root / "marker.safetensors")
    make_record(root / "ks", marker)
    deep = root
    while len(str(deep)) < 180:
        deep = deep / "a-long-directory-name"
    deep.mkdir(parents=True)
    suspect = deep / "suspect-model-with-a-long-name.safetensors"
    shutil.copyfile(marker, suspect)
    assert len(str(suspect)) >= 200
    return {"root": root, "probe": root / "probe", "ks": root / "ks", "suspect": suspect}


def _verify(world: dict[str, Path]):
    args = ["verify", str(world["suspect"]), "--probe", str(world["probe"]),
            "--keystore", str(world["ks"]), "--no-pullback"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code in (0, 1), res.output
    return res


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_piped_report_prints_paths_and_hashes_whole_on_one_line(world: dict[str, Path]) -> None:
    res = _verify(world)  # CliRunner's stdout is not a terminal, like a pipe
    out = res.stdout
    assert "…" not in out, out
    lines = out.splitlines()
    path, digest = str(world["suspect"]), _sha256(world["suspect"])
    model_line = next(ln for ln in lines if " model " in ln)
    assert path in model_line, model_line
    assert any("model sha256" in ln and digest in ln for ln in lines), out
    record_line = next(ln for ln in lines if ln.startswith("mark record"))
    assert re.search(r"sha256:[0-9a-f]{64}\b", record_line), record_line
    assert re.search(r"^key sha256:[0-9a-f]{64}$", out, re.M), out
    assert re.search(r"^marker +smallcnn@sha256:[0-9a-f]{64}\b", out, re.M), out


def test_narrow_terminal_folds_long_values_instead_of_cutting_them(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an 80-column terminal the header folds the path and the hash: every character stays."""

    def terminal() -> Console:
        return Console(file=sys.stdout, width=80, highlight=False, color_system=None)

    monkeypatch.setattr(console, "out", terminal)
    out = _verify(world).stdout
    assert "…" not in out, out
    assert max(len(ln) for ln in out.splitlines()) <= 80, out
    panel = out.split("╰")[0]  # the header panel: strip its borders and join the folded pieces
    joined = "".join(ln.strip().strip("│").strip() for ln in panel.splitlines())
    assert str(world["suspect"]) in joined, panel
    assert _sha256(world["suspect"]) in joined, panel
