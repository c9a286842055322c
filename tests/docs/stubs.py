"""Stand-ins for the commands the docs use that cannot run in a test (the substitution table).

Each documented command runs verbatim in bash; only these programs are replaced, by wrappers on
``PATH`` that call ``python -m tests.docs.stubs NAME ARGS`` (see ``harness.make_bin``):

==========  ======================================================================================
command     what the test runs instead
==========  ======================================================================================
radmark     the radmark under test (``python -m radmark`` with the repository on ``PYTHONPATH``),
            with its arguments rewritten for tiny data by :func:`rewrite_radmark_argv`
python      the test's interpreter; ``python -m pip ...`` goes to the ``pip`` stand-in
pip         nothing is installed (the radmark under test is importable already); a directory
            argument must hold radmark's ``pyproject.toml``; every call is logged
make        ``make --dry-run -C REPO TARGET``: the target exists and its recipe is printed, not run
            (``make test`` would run this suite inside itself; the demo runs for minutes)
git clone   ``git clone`` of the radmark repository itself, checked out at its ``HEAD`` commit;
            other ``git`` commands are the real git
gh          releases and secrets kept under ``$FAKE_GH``: ``release create|upload`` copy assets
            there, ``release download`` fetches them from ``file://`` URLs, ``secret set`` stores
            stdin or ``--body``; with ``FAKE_GH_REQUIRE_TOKEN=1`` a download needs ``GH_TOKEN``
aws         ``aws s3 cp`` between local paths and ``s3://BUCKET/KEY`` objects under ``$FAKE_S3``,
            with ``--recursive``, ``--exclude`` and ``--include`` as aws applies them
s5cmd       ``s5cmd cat s3://BUCKET/KEY`` prints the object under ``$FAKE_S3``
==========  ======================================================================================

Every call is appended to ``$DOCTEST_LOG`` as one JSON line, so tests can check what ran.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: radmark arguments rewritten for tiny data: ``(command, option, value)``; ``value`` replaces
#: the option's value where it is given and is appended where it is not (the last one wins).
FAST_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("marker train", "--arch", "smallcnn"),  # the docs' resnet18: minutes per epoch on CPU
    ("marker train", "--epochs", "1"),
    ("mark", "--steps", "2"),  # the preset's 100 optimisation steps per image
    ("kit build", "--decoys", "3"),  # 39 decoys x 10 images per class: 4,000 markings
    ("kit build", "--per-class", "1"),
    ("verify", "--pullback-limit", "32"),
)
#: Options rewritten only where the docs give them (never appended).
REPLACED_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("mark", "--kit-decoys", "3"),
    ("mark", "--kit-per-class", "1"),
    ("verify", "--arch", "smallcnn"),  # the suspect in the test's world is a smallcnn
)


def _log(name: str, argv: Sequence[str], **extra: object) -> None:
    path = os.environ.get("DOCTEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"cmd": name, "argv": list(argv), "cwd": os.getcwd(), **extra}))
            fh.write("\n")


def _command_of(argv: Sequence[str]) -> str:
    if argv[:2] in (["marker", "train"], ["kit", "build"]):
        return " ".join(argv[:2])
    return argv[0] if argv else ""


def rewrite_radmark_argv(argv: Sequence[str]) -> list[str]:
    """The documented radmark arguments with the tiny-data values of the substitution table.

    ``--device cuda...`` becomes ``--device cpu`` everywhere (the test machine may have no GPU).
    """
    out = list(argv)
    command = _command_of(out)
    for i, arg in enumerate(out[:-1]):
        if arg == "--device" and out[i + 1].startswith("cuda"):
            out[i + 1] = "cpu"
    for table, append in ((FAST_OPTIONS, True), (REPLACED_OPTIONS, False)):
        for cmd, option, value in table:
            if cmd != command:
                continue
            found = False
            for i, arg in enumerate(out[:-1]):
                if arg == option:
                    out[i + 1] = value
                    found = True
            for i, arg in enumerate(out):
                if arg.startswith(option + "="):
                    out[i] = f"{option}={value}"
                    found = True
            if append and not found:
                out += [option, value]
    return out


def radmark(argv: list[str]) -> int:
    new = rewrite_radmark_argv(argv)
    _log("radmark", argv, rewritten=new)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, "-m", "radmark", *new], env=env)


def python(argv: list[str]) -> int:
    if argv[:2] == ["-m", "pip"]:
        return pip(argv[2:])
    _log("python", argv)
    return subprocess.call([sys.executable, *argv])


def pip(argv: list[str]) -> int:
    _log("pip", argv)
    if not argv or argv[0] != "install":
        return _fail(f"pip stand-in: only `pip install` is expected, got {argv}")
    for arg in argv[1:]:
        path = Path(arg)
        if path.is_dir():
            pyproject = path / "pyproject.toml"
            if not pyproject.is_file() or 'name = "radmark"' not in pyproject.read_text():
                return _fail(f"pip stand-in: {arg} is not a radmark source tree")
    print(f"[doc-test] skipped: pip {' '.join(argv)}")
    return 0


def _real(name: str) -> str | None:
    """The real program, found on the PATH the test started with (not this stand-in)."""
    return shutil.which(name, path=os.environ.get("DOCTEST_REAL_PATH"))


def make(argv: list[str]) -> int:
    _log("make", argv)
    real = _real("make")
    if real is None:
        return _fail("make is not installed")
    return subprocess.call([real, "--dry-run", "-C", str(REPO), *argv])


def git(argv: list[str]) -> int:
    real = _real("git")
    if real is None:
        return _fail("git is not installed")
    if not argv or argv[0] != "clone":
        return subprocess.call([real, *argv])
    _log("git", argv)
    positional = []
    i = 1
    while i < len(argv):
        if argv[i] in ("--depth", "--branch", "-b"):
            i += 2
            continue
        if not argv[i].startswith("-"):
            positional.append(argv[i])
        i += 1
    if len(positional) != 2:
        return _fail(f"git stand-in: expected `git clone [options] URL DIR`, got {argv}")
    head = subprocess.run(
        [real, "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    rc = subprocess.call([real, "clone", "--quiet", str(REPO), positional[1]])
    return rc or subprocess.call([real, "-C", positional[1], "checkout", "--quiet", head])


def _opt(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def _positional(argv: list[str], with_value: Sequence[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in with_value:
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            out.append(argv[i])
            i += 1
    return out


def gh(argv: list[str]) -> int:
    _log("gh", argv)
    root = Path(os.environ["FAKE_GH"])
    repo = _opt(argv, "--repo") or os.environ.get("GITHUB_REPOSITORY", "")
    valued = ("--repo", "--pattern", "--dir", "--title", "--notes", "--body", "-R", "-p", "-D")
    args = _positional(argv, valued)
    if args[:2] == ["release", "download"]:
        if os.environ.get("FAKE_GH_REQUIRE_TOKEN") == "1" and not os.environ.get("GH_TOKEN"):
            return _fail("gh: To use GitHub CLI in a GitHub Actions workflow, set GH_TOKEN")
        tag, pattern = args[2], _opt(argv, "--pattern") or "*"
        release = root / "releases" / repo / tag
        assets = sorted(p for p in release.glob("*") if fnmatch.fnmatch(p.name, pattern))
        if not assets:
            return _fail(f"release not found or no asset matches {pattern!r}: {repo}@{tag}")
        dest = Path(_opt(argv, "--dir") or ".")
        dest.mkdir(parents=True, exist_ok=True)
        for asset in assets:
            with urllib.request.urlopen(asset.resolve().as_uri()) as src:  # a file:// URL
                (dest / asset.name).write_bytes(src.read())
        return 0
    if args[:2] in (["release", "create"], ["release", "upload"]):
        release = root / "releases" / repo / args[2]
        release.mkdir(parents=True, exist_ok=True)
        for f in args[3:]:
            shutil.copyfile(f, release / Path(f).name)
        return 0
    if args[:2] == ["secret", "set"]:
        body = _opt(argv, "--body")
        value = body if body is not None else sys.stdin.read()
        path = root / "secrets" / repo / args[2]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
        return 0
    return _fail(f"gh stand-in: unsupported command {argv}")


def _s3_path(url: str) -> Path:
    return Path(os.environ["FAKE_S3"]) / url.removeprefix("s3://")


def aws(argv: list[str]) -> int:
    _log("aws", argv)
    if argv[:2] != ["s3", "cp"]:
        return _fail(f"aws stand-in: only `aws s3 cp` is supported, got {argv}")
    src, dst = _positional(argv[2:], ("--exclude", "--include"))[:2]
    filters = [
        (a[2:], argv[i + 3]) for i, a in enumerate(argv[2:-1]) if a in ("--exclude", "--include")
    ]

    def wanted(name: str) -> bool:  # aws: every filter in order, the last match decides
        keep = True
        for kind, pattern in filters:
            if fnmatch.fnmatch(name, pattern):
                keep = kind == "include"
        return keep

    def local(url: str) -> Path:
        return _s3_path(url) if url.startswith("s3://") else Path(url)

    if "--recursive" in argv:
        base = local(src)
        for f in sorted(p for p in base.rglob("*") if p.is_file()):
            rel = f.relative_to(base).as_posix()
            if wanted(rel):
                target = local(dst) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
        return 0
    if dst == "-":
        sys.stdout.buffer.write(local(src).read_bytes())
        return 0
    target = local(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local(src), target)
    return 0


def s5cmd(argv: list[str]) -> int:
    _log("s5cmd", argv)
    if len(argv) != 2 or argv[0] != "cat":
        return _fail(f"s5cmd stand-in: only `s5cmd cat s3://...` is supported, got {argv}")
    path = _s3_path(argv[1])
    if not path.is_file():
        return _fail(f"ERROR cat {argv[1]}: NoSuchKey")
    sys.stdout.buffer.write(path.read_bytes())
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(message + "\n")
    return 1


STUBS = {
    "radmark": radmark,
    "python": python,
    "pip": pip,
    "make": make,
    "git": git,
    "gh": gh,
    "aws": aws,
    "s5cmd": s5cmd,
}

if __name__ == "__main__":
    sys.exit(STUBS[sys.argv[1]](sys.argv[2:]))
