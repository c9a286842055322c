"""Running the shell blocks of README.md and docs/*.md: parsing, tiny worlds, stand-ins on PATH.

A doc's fenced ``bash``/``sh``/``console`` blocks run in order, each as one ``bash -eo pipefail``
script (as GitHub Actions runs steps), in a fresh copy of a small *world* directory, with the
stand-ins of ``tests/docs/stubs.py`` first on ``PATH``. A block's text runs as written except for
the substitutions of :data:`TEXT_SUBSTITUTIONS`; radmark's own arguments are rewritten for tiny
data by ``stubs.rewrite_radmark_argv``. Standard input is :data:`STDIN` (what ``read`` gets).

The worlds (built once per test session from ``tests/factories.py``):

* **data** (README.md): ``shards/`` (48 real Fashion-MNIST images in three shards
  ``data-000000..000002.tar``), ``probe/`` (160 other images), ``suspect.safetensors`` (a smallcnn
  state dict saved with ``safetensors.torch.save_file``, as the README's snippet does);
* **owner** (every page under docs/): the data world plus a key in ``keys/`` with its portable
  file ``owner.key``, ``marker.safetensors``, and a mark record of ``shards/`` with a verification
  kit (3 decoys, 1 image per class) and ``probe/`` pinned in its plan, as if the quickstart
  (``--plan-probe probe/``) and ``--kit-probe`` had run.

Both have ``s3://my-bucket/train/`` holding the three shards (``$FAKE_S3``) and an empty fake
GitHub (``$FAKE_GH``).

A block may be preceded by a directive comment: ``<!-- doc-test: skip REASON -->`` (not run; the
reason is required) or ``<!-- doc-test: exit 0 or 1 (...) -->`` (the exit codes accepted; 0 by
default).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.docs import stubs

REPO = stubs.REPO
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = frozenset({"bash", "sh", "shell", "console"})
WORLD_OF = {"README.md": "data"}  # every other page: "owner"
#: Programs a page's commands need besides the stand-ins; a page is skipped where one is missing.
#: docs/ci.md's commands are those of a Linux runner (GNU coreutils: ``sha256sum``, ``base64 -w0``).
TOOLS = {
    "README.md": ("make",),
    "keys.md": ("tar",),
    "ci.md": ("openssl", "sha256sum", "base64", "tar", "git", "linux"),
}
STDIN = "doc-test passphrase\n"
BLOCK_TIMEOUT_S = 600

_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
_DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
_SKIP = re.compile(r"^skip(?:\s+(.*))?$")
_EXIT = re.compile(r"^exit\s+(\d+(?:\s*(?:,|or)\s*\d+)*)(?:\s*\(.*\))?$")


@dataclass(frozen=True)
class World:
    """A directory to run a doc in, and what the substitutions need to know about it."""

    root: Path
    key_prefix: str | None = None  # the owner world's key fingerprint, 8 hex digits


#: Text substitutions applied to a block before it runs: (pattern, replacement, why).
TEXT_SUBSTITUTIONS: tuple[tuple[str, Callable[[World], str], str], ...] = (
    (r"\{000000\.\.\d{6}\}", lambda w: "{000000..000002}", "the worlds have three shards"),
    (
        r"\b3f1c\b",
        lambda w: w.key_prefix or "3f1c",
        "the docs' example key prefix stands for the owner world's key",
    ),
)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    directive: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS

    @property
    def skip_reason(self) -> str | None:
        """The reason given for skipping ("" when the directive gives none), or None."""
        m = _SKIP.match(self.directive or "")
        return None if m is None else (m.group(1) or "").strip()

    @property
    def exits(self) -> frozenset[int]:
        m = _EXIT.match(self.directive or "")
        if m is None:
            return frozenset({0})
        return frozenset(int(v) for v in re.findall(r"\d+", m.group(1)))

    def directive_ok(self) -> bool:
        d = self.directive
        return d is None or _EXIT.match(d) is not None or bool(self.skip_reason)

    def script(self, world: World) -> str:
        text = self.text
        if self.lang == "console":  # the commands are the lines after "$ "
            text = "\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("$ "))
        for pattern, replacement, _why in TEXT_SUBSTITUTIONS:
            text = re.sub(pattern, replacement(world), text)
        return text


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the directive comment just before it."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = _DIRECTIVE.match(lines[k].strip()) if k >= 0 else None
        out.append(
            Block(path, start + 1, lang, "\n".join(lines[start + 1 : j]), d.group(1) if d else None)
        )
        i = j + 1
    return out


def directives(path: Path) -> list[tuple[int, str]]:
    """Every doc-test directive of a file with its line, to find ones that precede no block."""
    return [
        (n, m.group(1))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if (m := _DIRECTIVE.match(line.strip()))
    ]


# --- the environment the blocks run in ----------------------------------------------------------


def missing_tools(page: str) -> list[str]:
    """What ``page`` needs (:data:`TOOLS`) and this machine lacks; ``bash`` is always needed."""
    needed = ("bash", *TOOLS.get(page, ()))
    return [
        t for t in needed if (sys.platform != "linux" if t == "linux" else shutil.which(t) is None)
    ]


def make_env(base: Path) -> dict[str, str]:
    """A bin folder of stand-ins, fake GitHub and S3 folders, and the environment that uses them."""
    bin_dir = base / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in stubs.STUBS:
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.docs.stubs {name} "$@"\n')
        wrapper.chmod(0o755)
    for d in ("fake-gh", "fake-s3"):
        (base / d).mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RADMARK_KEYSTORE", "RADMARK_PASSPHRASE", "GH_TOKEN", "GITHUB_TOKEN")
    }
    real_path = env.get("PATH", os.defpath)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{real_path}",
        DOCTEST_REAL_PATH=real_path,
        DOCTEST_LOG=str(base / "calls.jsonl"),
        FAKE_GH=str(base / "fake-gh"),
        FAKE_S3=str(base / "fake-s3"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        COLUMNS="120",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    return env


def run_script(
    script: str, cwd: Path, env: dict[str, str], *, timeout: float = BLOCK_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """``script`` as GitHub runs a step: a file run by ``bash --noprofile --norc -eo pipefail``."""
    path = cwd.parent / f".doc-step-{os.getpid()}.sh"
    path.write_text(script + "\n")
    try:
        return subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
            cwd=cwd,
            env=env,
            input=STDIN,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        path.unlink(missing_ok=True)


def run_doc(
    path: Path, world: World, env: dict[str, str]
) -> list[tuple[Block, subprocess.CompletedProcess[str] | None]]:
    """Run every shell block of ``path`` in order in ``world``; ``None`` for a skipped block."""
    out: list[tuple[Block, subprocess.CompletedProcess[str] | None]] = []
    for block in blocks(path):
        if not block.is_shell:
            continue
        if block.skip_reason is not None:
            out.append((block, None))
            continue
        res = run_script(block.script(world), world.root, env)
        assert res.returncode in block.exits, (
            f"{block.where}: exit {res.returncode}, expected {sorted(block.exits)}\n"
            f"--- script\n{block.script(world)}\n--- stdout\n{res.stdout[-3000:]}\n"
            f"--- stderr\n{res.stderr[-3000:]}"
        )
        out.append((block, res))
    return out


# --- the worlds -----------------------------------------------------------------------------------


def build_data_world(root: Path) -> World:
    import torch
    from safetensors.torch import save_file

    from radmark.models import build_model
    from tests.factories import make_shards

    root.mkdir(parents=True)
    make_shards(root / "shards", n=48, per_shard=16)
    make_shards(root / "probe", n=160, per_shard=80, offset=2000, prefix="probe")
    torch.manual_seed(1)
    suspect = build_model("smallcnn", 10, in_chans=1)
    save_file(suspect.state_dict(), str(root / "suspect.safetensors"))
    return World(root)


def build_owner_world(root: Path) -> World:
    """The data world, a key, a marker, and a mark record of ``shards/`` with its kit, its plan
    pinning ``probe/``.

    Marked from inside the world with relative paths, so the record finds ``marker.safetensors``
    in every copy of the world, as the quickstart's record would.
    """
    from typer.testing import CliRunner

    from radmark.cli import app
    from tests.factories import make_key, make_marker

    build_data_world(root)
    make_marker(root / "marker.safetensors")
    fingerprint = make_key(root / "keys", root / "owner.key")
    here = os.getcwd()
    os.chdir(root)
    try:
        res = CliRunner().invoke(
            app,
            [
                "mark", "shards", "--key", "owner.key", "--keystore", "keys",
                "--marker", "marker.safetensors", "--out", "../owner-marked", "--steps", "2",
                "--kit-probe", "probe", "--kit-decoys", "3", "--kit-per-class", "1",
                "--plan-probe", "probe",
            ],
        )  # fmt: skip
    finally:
        os.chdir(here)
    assert res.exit_code == 0, res.output
    shutil.rmtree(root.parent / "owner-marked")
    return World(root, fingerprint.removeprefix("sha256:")[:8])


def copy_world(world: World, dest: Path) -> World:
    """A fresh copy (modes kept: secrets stay 0600) for one doc to change as it likes."""
    shutil.copytree(world.root, dest, symlinks=True)
    return World(dest, world.key_prefix)


def fill_fake_s3(world: World, env: dict[str, str]) -> None:
    bucket = Path(env["FAKE_S3"]) / "my-bucket" / "train"
    bucket.mkdir(parents=True, exist_ok=True)
    for shard in sorted((world.root / "shards").glob("*.tar")):
        shutil.copyfile(shard, bucket / shard.name)
