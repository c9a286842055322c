"""The CLI habits of issue #16, pinned for every command the Typer app registers.

``-h`` is ``--help``; no ``-q`` (it means "quiet" elsewhere; the marked fraction is ``--fraction``);
``--device`` defaults to ``auto``; the choice options reject a typo with exit 2 and the list of
valid values; every command that reads RADMARK_PASSPHRASE or RADMARK_KEYSTORE says so in its
help; every option has a help text; shell completion works; the installed package never reads the
test-only kill hook; the benchmark never runs apt-get unless asked; and the default marker's
offline error gives the exact command that fetches its weights and the offline alternative.

Commands are enumerated from the app itself, so a command added later is covered (or makes a
test fail until it is).
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer.main
from typer.testing import CliRunner

import radmark
from radmark.cli import app
from radmark.cli.app import resolve_device
from radmark.errors import UsageError
from tests.factories import make_key, make_marker, make_record, make_shards

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _walk(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


ROOT = typer.main.get_command(app)
ALL = list(_walk(ROOT))  # the root, the groups (keys, marker, kit) and every command
LEAVES = [(path, cmd) for path, cmd in ALL if not hasattr(cmd, "commands")]


def _ids(path: tuple[str, ...]) -> str:
    return " ".join(path) or "radmark"


def _opts(param: Any) -> list[str]:
    return [*param.opts, *getattr(param, "secondary_opts", [])]


def _options(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if getattr(p, "param_type_name", "") == "option"]


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def test_the_app_has_the_commands_of_the_contract() -> None:
    """A sanity check on the enumeration the other tests rely on."""
    names = {_ids(path) for path, _ in LEAVES}
    assert {"keygen", "mark", "verify", "keys list", "keys show", "keys export-public",
            "keys import", "marker train", "kit build"} <= names  # fmt: skip


# --- -h, -q ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=_ids)
def test_dash_h_is_help(path: tuple[str, ...]) -> None:
    short, long = run(*path, "-h"), run(*path, "--help")
    assert short.exit_code == 0, short.output
    assert long.exit_code == 0, long.output
    assert short.stdout.startswith("Usage: ") and short.stdout == long.stdout


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[_ids(p) for p, _ in ALL])
def test_no_command_has_a_q_option(path: tuple[str, ...], cmd: Any) -> None:
    for param in cmd.params:
        assert "-q" not in _opts(param), (path, param.name)


def test_the_marked_fraction_is_dash_dash_fraction_only(tmp_path: Path) -> None:
    (mark,) = [cmd for path, cmd in LEAVES if path == ("mark",)]
    (fraction,) = [p for p in mark.params if p.name == "fraction"]
    assert _opts(fraction) == ["--fraction"]
    res = run("mark", tmp_path, "--key", "k", "--out", tmp_path / "o", "-q", "0.1")
    assert res.exit_code == 2 and "No such option: -q" in res.output, res.output


# --- --device -------------------------------------------------------------------------------------


def test_every_device_option_defaults_to_auto() -> None:
    having = {}
    for path, cmd in LEAVES:
        for param in _options(cmd):
            if "--device" in _opts(param):
                having[_ids(path)] = param.default
    assert {"mark", "verify", "marker train", "kit build"} <= set(having), having
    assert set(having.values()) == {"auto"}, having


def test_auto_is_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda:1"]
    for bad in ("cdua", "gpu", "cuda:", "cuda:x"):
        with pytest.raises(UsageError, match="auto, cpu, cuda"):
            resolve_device(bad)


# --- choices --------------------------------------------------------------------------------------


def _choices() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each choice option: a typo, and the values its error must list."""
    from radmark.marking.methods import get_method, method_names

    return {
        "--device": ("cdua", ("auto", "cpu", "cuda")),
        "--preset": ("defualt", tuple(get_method("radioactive").presets)),
        "--on-error": ("skp", ("fail", "skip")),
        "--expect": ("markd", ("clean", "marked")),
        "--method": ("radiaoctive", tuple(method_names())),
    }


CHOICE_CASES = [
    (path, opt)
    for path, cmd in LEAVES
    for param in _options(cmd)
    for opt in _opts(param)
    if opt in _choices()
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("habits")
    make_shards(root / "in", n=32, per_shard=16)
    marker = make_marker(root / "marker.safetensors")
    make_key(root / "ks", root / "owner.key")
    record = make_record(root / "ks", marker)
    return {"root": root, "in": root / "in", "marker": marker, "ks": root / "ks",
            "key": root / "owner.key", "record": record.address}  # fmt: skip


def _base(path: tuple[str, ...], w: dict[str, Any], out: Path) -> list[str]:
    """A command line of ``path`` that would run if its choice options were right."""
    ks = ["--keystore", str(w["ks"])]
    mark = ["--key", str(w["key"]), "--out", str(out), "--marker", str(w["marker"]), "--steps", "1"]
    train = ["--out", str(out / "m.safetensors"), "--arch", "smallcnn", "--epochs", "1"]
    return {
        ("mark",): ["mark", str(w["in"]), *mark, *ks],
        ("verify",): ["verify", str(w["marker"]), "--probe", str(w["in"]), *ks],
        ("marker", "train"): ["marker", "train", str(w["in"]), *train],
        ("kit", "build"): ["kit", "build", w["record"], "--probe", str(w["in"]), *ks],
    }[path]


def test_every_choice_option_is_tested() -> None:
    assert {opt for _, opt in CHOICE_CASES} == set(_choices())
    assert {path for path, _ in CHOICE_CASES} <= {
        ("mark",),
        ("verify",),
        ("marker", "train"),
        ("kit", "build"),
    }, "a new command has a choice option: give it a base command line in _base"


@pytest.mark.parametrize(
    ("path", "opt"), CHOICE_CASES, ids=[f"{_ids(p)} {o}" for p, o in CHOICE_CASES]
)
def test_a_typo_in_a_choice_lists_the_valid_values(
    path: tuple[str, ...], opt: str, world: dict[str, Any], tmp_path: Path
) -> None:
    typo, valid = _choices()[opt]
    res = run(*_base(path, world, tmp_path / "out"), opt, typo)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if typo in ln]
    assert lines, res.output
    for value in valid:
        assert value in lines[0], (value, lines[0])
    assert not (tmp_path / "out").exists()


# --- help texts -----------------------------------------------------------------------------------


def _help(path: tuple[str, ...]) -> str:
    res = run(*path, "--help", env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    return " ".join(res.stdout.split())


def _reads_passphrase(cmd: Any) -> bool:
    source = inspect.getsource(inspect.unwrap(cmd.callback))
    return any(s in source for s in ("passphrase_fn(", "passphrase_from_env_or_prompt(",
                                     "RADMARK_PASSPHRASE"))  # fmt: skip


def test_commands_that_read_the_environment_say_so_in_their_help() -> None:
    keystore = {
        path for path, cmd in LEAVES
        for p in _options(cmd)
        if "RADMARK_KEYSTORE" in ([p.envvar] if isinstance(p.envvar, str) else (p.envvar or []))
    }  # fmt: skip
    passphrase = {path for path, cmd in LEAVES if _reads_passphrase(cmd)}
    assert {("keygen",), ("mark",), ("verify",), ("keys", "list"), ("kit", "build")} <= keystore
    assert {("keygen",), ("mark",), ("verify",), ("keys", "import"), ("kit", "build")} <= passphrase
    for path in keystore:
        assert "RADMARK_KEYSTORE" in _help(path), path
    for path in passphrase:
        assert "RADMARK_PASSPHRASE" in _help(path), path


@pytest.mark.parametrize(("path", "cmd"), LEAVES, ids=[_ids(p) for p, _ in LEAVES])
def test_every_option_and_argument_has_a_help_text(path: tuple[str, ...], cmd: Any) -> None:
    assert (cmd.help or "").strip(), path
    for param in cmd.params:
        assert (getattr(param, "help", None) or "").strip(), (path, param.name)


def test_marker_train_options_have_help_texts() -> None:
    (cmd,) = [c for path, c in LEAVES if path == ("marker", "train")]
    options = _options(cmd)
    assert len(options) >= 10
    text = _help(("marker", "train"))
    for param in options:
        assert param.help and " ".join(param.help.split()) in text, param.name


# --- completion -----------------------------------------------------------------------------------


def _radmark(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "radmark", *args], cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_shell_completion_is_available() -> None:
    script = _radmark("--show-completion", "bash", env={})
    assert script.returncode == 0, script.stderr
    assert "_RADMARK_COMPLETE=complete_bash" in script.stdout and "complete " in script.stdout
    words = _radmark(env={"_RADMARK_COMPLETE": "complete_bash", "COMP_WORDS": "radmark ma",
                          "COMP_CWORD": "1"})  # fmt: skip
    assert words.returncode == 0, words.stderr
    assert words.stdout.split() == ["mark", "marker"]
    sub = _radmark(env={"_RADMARK_COMPLETE": "complete_bash", "COMP_WORDS": "radmark keys ",
                        "COMP_CWORD": "2"})  # fmt: skip
    assert {"list", "show", "export-public", "import"} <= set(sub.stdout.split()), sub.stdout


# --- no test hook, no apt-get ---------------------------------------------------------------------


def test_the_package_never_reads_the_kill_hook() -> None:
    package = Path(radmark.__file__).parent
    readers = [
        str(f.relative_to(package))
        for f in package.rglob("*")
        if f.is_file() and b"KILL_AT" in f.read_bytes()
    ]
    assert readers == []
    assert "RADMARK_TEST_KILL_AT" in (REPO / "tests" / "kill_hook.py").read_text()


PACKAGE_MANAGERS = ("apt-get", "apt", "dpkg", "dpkg-query", "sudo")


@pytest.fixture
def no_package_manager(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records every package-manager command the code starts (none really runs).

    Every way to start a process is wrapped: ``subprocess.run`` answers a package-manager call
    with success, the others refuse it; any other command runs normally. The code also sees root
    and apt-get, so only ``--install`` stands between it and the package manager.
    """
    import bench.fmnist

    calls: list[list[str]] = []

    def wrap(name: str, real: Any) -> Any:
        def start(cmd: Any, *args: Any, **kwargs: Any) -> Any:
            argv = [str(c) for c in (cmd if isinstance(cmd, list | tuple) else str(cmd).split())]
            if any(os.path.basename(a) in PACKAGE_MANAGERS for a in argv):
                calls.append(argv)
                if name == "run":
                    return subprocess.CompletedProcess(argv, 0, "", "")
                raise AssertionError(f"{name} started a package manager: {argv}")
            return real(cmd, *args, **kwargs)

        return start

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, wrap(name, getattr(subprocess, name)))
    for name in ("system", "execv", "execvp", "execlp", "spawnvp"):
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    monkeypatch.setattr(bench.fmnist.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(bench.fmnist.os, "geteuid", lambda: 0)
    return calls


def test_the_benchmark_runs_apt_get_only_with_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_package_manager: list[list[str]]
) -> None:
    import bench.fmnist
    import bench.run

    monkeypatch.setattr(bench.fmnist, "DEFAULT_DIR", tmp_path / "no-fashion-mnist")
    argv = ["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results"),
            "--no-report", "--device", "cpu"]  # fmt: skip
    with pytest.raises(FileNotFoundError) as info:
        bench.run.main(argv)
    assert no_package_manager == []
    assert bench.fmnist.INSTALL_COMMAND in str(info.value) and "--install" in str(info.value)
    # the same run with --install does run it (the files still do not appear, so it then fails)
    with pytest.raises(FileNotFoundError):
        bench.run.main([*argv, "--install"])
    assert ["apt-get", "install", "-y", "dataset-fashion-mnist"] in no_package_manager


# --- the default marker offline -------------------------------------------------------------------


def test_the_default_marker_offline_names_the_fetch_command_and_marker_train(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    out = tmp_path / "out"
    res = run("mark", world["in"], "--key", world["key"], "--keystore", world["ks"],
              "--out", out, "--json")  # no --marker: the default, torchvision:resnet18  # fmt: skip
    assert res.exit_code == 2, res.output
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    fetch = (
        "python -c \"import torchvision; torchvision.models.get_model('resnet18', "
        "weights='DEFAULT')\""
    )
    assert fetch in line, line
    compile(fetch.split('"')[1], "<fetch>", "exec")  # the quoted program is valid Python
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    assert f"{checkpoints} as resnet18-f37072fd.pth" in line, line
    assert "radmark marker train SHARDS --out marker.safetensors" in line, line
    assert not list(out.glob("*.tar")) if out.exists() else True


@pytest.mark.parametrize("path", [path for path, _cmd in LEAVES], ids=" ".join)
def test_help_shows_no_rst_markup(path: tuple[str, ...]) -> None:
    """Command docstrings are help texts: no reStructuredText double backticks shown literally
    (the audit found them in ``keys export-public -h``)."""
    res = run(*path, "--help")
    assert res.exit_code == 0, res.output
    assert "``" not in res.stdout, res.stdout
