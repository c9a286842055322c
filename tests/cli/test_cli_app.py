"""The guard in ``radmark/cli/app.py``: an unexpected exception is exit 3, never 0 or 1.

Every other failure path of the guard (RadmarkError → 2, usage errors, aborts) is exercised by the
command tests and the CLI fuzz; this is the path for a bug in radmark itself, reached here by
making a library function a command calls raise.
"""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.cli.app import EXIT_INTERNAL

runner = CliRunner()


def _boom(*_args: object, **_kwargs: object) -> None:
    raise ZeroDivisionError("division by zero\nsecond line " + "x" * 500)


@pytest.mark.parametrize("json_out", [False, True], ids=["plain", "json"])
@pytest.mark.parametrize("debug", [None, "0"], ids=["no-debug", "debug-0"])
def test_internal_error_is_exit_3_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path, json_out: bool, debug: str | None
) -> None:
    monkeypatch.setattr("radmark.keys.manage.list_keystore", _boom)
    if debug is not None:
        monkeypatch.setenv("RADMARK_DEBUG", debug)  # only "1" re-raises
    args = ["keys", "list", "--keystore", str(tmp_path / "ks")] + (["--json"] if json_out else [])
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert EXIT_INTERNAL == 3
    assert res.exit_code == 3, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("radmark: error: internal error (ZeroDivisionError: division by zero)")
    assert "this is a bug in radmark, please report it (RADMARK_DEBUG=1" in line
    assert "second line" not in line  # the exception's first line only
    if json_out:
        doc = json.loads(res.stdout)  # exactly one JSON object: --json > report.json is not empty
        assert set(doc) == {"schema_version", "error"}
        assert doc["error"] == {
            "kind": "InternalError",
            "message": line.removeprefix("radmark: error: "),
        }
    else:
        assert res.stdout == ""


def test_internal_error_long_message_is_cut(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The exception's text is cut to 200 characters: one readable line, never a dump."""

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("y" * 1000)

    monkeypatch.setattr("radmark.keys.manage.list_keystore", boom)
    res = runner.invoke(app, ["keys", "list", "--keystore", str(tmp_path / "ks"), "--json"])
    assert res.exit_code == 3, res.output
    assert "y" * 200 in res.stderr and "y" * 201 not in res.stderr
    assert json.loads(res.stdout)["error"]["kind"] == "InternalError"


def test_radmark_debug_1_lets_the_exception_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """RADMARK_DEBUG=1 re-raises (app.py's docstring), so a developer sees the traceback."""
    monkeypatch.setattr("radmark.keys.manage.list_keystore", _boom)
    monkeypatch.setenv("RADMARK_DEBUG", "1")
    res = runner.invoke(app, ["keys", "list", "--keystore", str(tmp_path / "ks"), "--json"])
    assert isinstance(res.exception, ZeroDivisionError)
    assert "internal error" not in res.stderr
    assert res.stdout == ""  # no JSON error object either: the exception is not handled


def test_internal_error_through_the_console_script(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """The same through ``radmark.cli.main`` (what ``radmark`` in a shell runs): exit status 3."""
    from radmark.cli import main

    monkeypatch.setattr("radmark.keys.manage.list_keystore", _boom)
    monkeypatch.setattr(
        sys, "argv", ["radmark", "keys", "list", "--keystore", str(tmp_path), "--json"]
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 3
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["kind"] == "InternalError"
    assert len(err.splitlines()) == 1 and err.startswith("radmark: error: internal error (")
