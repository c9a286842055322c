"""A wheel built from the repository works when installed elsewhere: radmark, python -m radmark, the demo.

The wheel is built from a copy of what the build needs (``pyproject.toml``, ``README.md``,
``LICENSE``, ``radmark/``), so nothing else in the checkout can leak into it, and installed with
``--no-deps`` into a fresh venv (made with ``--system-site-packages``). The venv then sees the
running environment's packages (torch, typer, ...) through a ``.pth`` file written *after* the
install, since that environment is usually itself a venv; the venv's own site-packages comes
first on ``sys.path``, so ``import radmark`` is the installed wheel (the test checks it). Every
command runs from a directory outside the repository with no ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from radmark import __version__

REPO = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "radmark")


def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    if _setuptools_ok():  # this environment can build it: no package index needed
        cmd.append("--no-build-isolation")
    res = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = out.glob("radmark-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(root)],
        check=True,
    )
    py = root / "bin" / "python"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_radmark_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return root


def _run(
    venv: Path, *args: str, cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_holds_the_package_its_data_and_licenses(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "radmark/demo_data/fmnist-small.npz" in names
    assert "radmark/demo_data/LICENSE-fashion-mnist.txt" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    assert "License-Expression: Apache-2.0" in meta
    requires = [
        ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")
    ]
    assert any(r.startswith("braceexpand") for r in requires)
    assert not any(r.startswith("webdataset") and "extra" not in r for r in requires)
    for extra in ("timm", "plot", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    assert "Operating System :: POSIX :: Linux" in meta and "Operating System :: MacOS" in meta


def test_the_installed_commands_work_outside_the_repository(venv: Path, tmp_path: Path) -> None:
    where = _run(venv, "python", "-c", "import radmark; print(radmark.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), (
        "radmark was not imported from the wheel"
    )

    version = _run(venv, str(venv / "bin" / "radmark"), "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"radmark {__version__}"

    helped = _run(venv, "python", "-m", "radmark", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("keygen", "mark", "verify", "keys", "marker", "kit"):
        assert command in helped.stdout

    data = _run(
        venv, "python", "-c",
        "from radmark.demo import DATA, load_data; d = load_data(); "
        "print(DATA); print(d['train_images'].shape, d['test_images'].shape)",
        cwd=tmp_path,
    )  # fmt: skip
    assert data.returncode == 0, data.stderr
    path, shapes = data.stdout.splitlines()
    assert Path(path).is_relative_to(venv)
    assert shapes == "(3000, 28, 28) (1000, 28, 28)"


@pytest.mark.slow
def test_the_demo_runs_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    """The whole demo chain (--quick: a small size) from the installed wheel, offline."""
    res = _run(
        venv, "python", "-m", "radmark.demo", "demo-out", "--quick", cwd=tmp_path, timeout=1200
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "summary: suspect-marked: exit" in res.stdout
    assert (tmp_path / "demo-out" / "marker.safetensors").is_file()
    assert len(list((tmp_path / "demo-out" / "marked").glob("*.tar"))) == 1


def test_the_demo_never_wipes_a_directory_it_did_not_make(tmp_path: Path) -> None:
    from radmark import demo

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="not made by the demo"):
        demo.main(str(mine))
    assert (mine / "thesis.tex").read_text() == "precious"
