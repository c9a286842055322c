"""Every shell command shown in README.md and docs/*.md runs, so the docs cannot drift.

How a block runs (the worlds, the directives, the text substitutions) is in
``tests/docs/harness.py``; which programs are replaced and how radmark's arguments are shrunk for
tiny data is the table at the top of ``tests/docs/stubs.py``. Each page runs in its own copy of
a world, its blocks in order; after a page has run, the checks below look at what its commands
produced (a page that "works" but makes nothing would pass otherwise).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.docs import harness
from tests.docs.harness import DOCS, REPO, World

Ran = list[tuple[harness.Block, "subprocess.CompletedProcess[str] | None"]]
RUNNABLE = [p for p in DOCS if any(b.is_shell for b in harness.blocks(p))]
COMMANDS = frozenset({"$", "radmark", "python", "pip", "make", "git", "torchrun", "gh", "tar"})


@pytest.fixture(scope="session")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, World]:
    base = tmp_path_factory.mktemp("doc-worlds")
    return {
        "data": harness.build_data_world(base / "data" / "world"),
        "owner": harness.build_owner_world(base / "owner" / "world"),
    }


def _calls(env: dict[str, str], name: str) -> list[dict[str, Any]]:
    log = Path(env["DOCTEST_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    return [c for c in map(json.loads, lines) if c["cmd"] == name]


# --- what each page's commands must have produced --------------------------------------------------


def _check_readme(world: World, env: dict[str, str], ran: Ran) -> None:
    assert sorted(p.name for p in (world.root / "marked").glob("*.tar")) == [
        f"data-00000{i}.tar" for i in range(3)
    ]
    assert (world.root / "owner.key").stat().st_mode & 0o777 == 0o600
    verbs = [c["argv"][:2] for c in _calls(env, "radmark")]
    assert verbs == [
        ["keygen", "--out"],
        ["marker", "train"],
        ["mark", "shards/"],
        ["verify", "suspect.safetensors"],
    ]
    assert [c["argv"] for c in _calls(env, "make")] == [["demo"], ["test"]]


def _check_keys(world: World, env: dict[str, str], ran: Ran) -> None:
    exported = (world.root / "owner-public.json").read_text()
    assert json.loads(exported)["type"] == "radmark.key"
    secret = json.loads((world.root / "owner.key").read_text())["secret"]["secret"]
    assert len(secret) >= 40 and secret not in exported
    backup = world.root / "radmark-keys-backup.tar.gz"
    assert backup.stat().st_mode & 0o077 == 0, "the backup must be readable by its owner only"
    with tarfile.open(backup) as tar:
        names = tar.getnames()
    assert "owner.key" in names and any(n.startswith("keys/secrets/") for n in names)
    (secret,) = (world.root / "vault" / "secrets").iterdir()
    assert json.loads(secret.read_text())["encryption"] != "none"  # --passphrase, read from stdin
    assert (world.root / "other-machine" / "keys").stat().st_mode & 0o077 == 0


def _check_scale(world: World, env: dict[str, str], ran: Ran) -> None:
    shards = [f"data-00000{i}.tar" for i in range(3)]
    assert sorted(p.name for p in (world.root / "marked-s3").glob("*.tar")) == shards
    uploaded = Path(env["FAKE_S3"]) / "my-bucket" / "train-marked"
    assert sorted(p.name for p in uploaded.iterdir()) == shards, "only the shards are uploaded"
    # the same key and marker give the same bytes whether the shards came from disk or a pipe
    for name in shards:
        a, b = world.root / "marked" / name, world.root / "marked-s3" / name
        assert a.read_bytes() == b.read_bytes()


def _check_report(world: World, env: dict[str, str], ran: Ran) -> None:
    page = harness.blocks(REPO / "docs" / "report.md")
    report = json.loads((world.root / "report.json").read_text())
    (example,) = [b for b in page if b.lang == "json"]
    _same_shape(json.loads(example.text), report, "report.json")
    assert set(report["results"][0]["tests"]) >= {"white_box_fisher", "black_box_rank"}
    # every label of the console excerpt is in the console report the page's command printed
    (shown,) = [b for b in page if b.lang == "text"]
    console = next(r for b, r in ran if r is not None and "--json" not in b.text)
    printed = " ".join((console.stdout + console.stderr).split())
    for label in _labels(shown.text):
        assert label in printed, f"docs/report.md shows {label!r}; the report has no such line"


def _labels(excerpt: str) -> list[str]:
    """The left-hand labels of a console excerpt ("model sha256", "alignment", ...)."""
    out = []
    for line in excerpt.splitlines():
        text = line.strip(" │╭╮╰╯─")
        parts = re.split(r"\s{2,}", text)
        if len(parts) > 1 and not text.startswith(("test ", "radmark verify")):
            out.append(parts[0])
        elif text.startswith(("key sha256:", "warning:")):
            out.append(text.split(":")[0] + ":")
    return out


def _check_ci(world: World, env: dict[str, str], ran: Ran) -> None:
    gh = Path(env["FAKE_GH"])
    asset = gh / "releases" / "YOUR-ORG" / "radmark-private" / "radmark-bundle"
    assert [p.name for p in asset.iterdir()] == ["radmark-bundle.tar.gz.enc"]
    secrets = gh / "secrets" / "YOUR-ORG" / "your-model"
    key = base64.b64decode((secrets / "RADMARK_KEY_B64").read_text())
    assert key == (world.root / "owner.key").read_bytes()
    assert len((secrets / "RADMARK_BUNDLE_PASSPHRASE").read_text()) >= 40
    assert not (world.root / "radmark-bundle").exists()  # the clear-text copy is removed


CHECKS: dict[str, Callable[[World, dict[str, str], Ran], None]] = {
    "README.md": _check_readme,
    "keys.md": _check_keys,
    "scale.md": _check_scale,
    "report.md": _check_report,
    "ci.md": _check_ci,
}


def _same_shape(example: Any, actual: Any, where: str) -> None:
    """Every field of the documented example exists in the real output, with the same JSON type."""
    if isinstance(example, dict):
        assert isinstance(actual, dict), where
        for k, v in example.items():
            assert k in actual, f"{where}.{k} is documented but not in the output"
            _same_shape(v, actual[k], f"{where}.{k}")
    elif isinstance(example, list):
        assert isinstance(actual, list), where
        if example and actual:
            _same_shape(example[0], actual[0], f"{where}[0]")
    elif example is not None and actual is not None:
        kinds = (bool, (int, float), str)
        kind = next(k for k in kinds if isinstance(example, k))
        assert isinstance(actual, kind), f"{where}: {actual!r} is not like {example!r}"


# --- the tests ------------------------------------------------------------------------------------


def test_every_directive_is_understood_and_every_skip_has_a_reason() -> None:
    for path in DOCS:
        found = harness.blocks(path)
        for b in found:
            if b.directive is not None:
                assert b.is_shell, f"{b.where}: a doc-test directive before a {b.lang!r} block"
                assert b.directive_ok(), (
                    f"{b.where}: doc-test directive {b.directive!r} needs a reason"
                )
        used = {b.line for b in found if b.directive is not None}
        for line, text in harness.directives(path):
            following = [b.line for b in found if b.line > line]
            assert following and following[0] in used, (
                f"{path.relative_to(REPO)}:{line}: directive {text!r} is not just before a block"
            )
        for b in found:  # an unlabelled block must not hide commands from this test
            starts = {ln.split()[0] for ln in b.text.splitlines() if ln.split()}
            assert b.lang or not starts & COMMANDS, f"{b.where}: label it ```bash to have it run"


def test_the_pages_with_commands_are_all_run() -> None:
    names = {p.name for p in RUNNABLE}
    assert {"README.md", "keys.md", "scale.md", "report.md", "ci.md"} <= names
    assert set(CHECKS) <= names


@pytest.mark.slow  # every shell block of the docs, on tiny worlds (about 35 s); in make test
@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_commands_run(path: Path, worlds: dict[str, World], tmp_path: Path) -> None:
    if missing := harness.missing_tools(path.name):
        pytest.skip(f"needs {', '.join(missing)}")
    world = harness.copy_world(worlds[harness.WORLD_OF.get(path.name, "owner")], tmp_path / "world")
    env = harness.make_env(tmp_path / "env")
    harness.fill_fake_s3(world, env)
    ran = harness.run_doc(path, world, env)
    if path.name in CHECKS:
        CHECKS[path.name](world, env, ran)


def test_make_targets_of_the_readme_do_what_it_says() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    for target, wanted in (("demo", "-m radmark.demo"), ("test", "-m pytest")):
        out = subprocess.run(
            [make, "--dry-run", "-C", str(REPO), target], capture_output=True, text=True, check=True
        ).stdout
        assert wanted in out, out


def test_readme_links_work_from_a_package_index() -> None:
    """The README is the wheel's long description: links go to docs/ only, and say where."""
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith("https://"):
            continue
        assert link.startswith("docs/") and (REPO / link.split("#")[0]).is_file(), link
    assert "(in the repository)" in text
    head = text.split("\n\n")[1]
    assert "make demo" in head and "make test" in head


def test_keys_readme_documents_every_record_format() -> None:
    text = (REPO / "keys" / "README.md").read_text()
    for heading in ("## Key (format version 1)", "## Mark record (format version 1)",
                    "## Kit record (format version 1)"):  # fmt: skip
        assert heading in text
    from radmark.keys import records

    assert records.MARK_RECORD_TYPE in text and records.KIT_RECORD_TYPE in text
    for optional in ("`method`", "`method_data`", "`plan`"):
        assert optional in text


def test_secret_files_stay_private_in_copied_worlds(
    worlds: dict[str, World], tmp_path: Path
) -> None:
    world = harness.copy_world(worlds["owner"], tmp_path / "w")
    for p in (world.root / "keys" / "secrets").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
