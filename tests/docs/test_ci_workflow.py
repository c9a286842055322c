"""docs/examples/radmark-check.yml runs as written: a local simulation of the GitHub Actions job.

The owner's commands of docs/ci.md make the bundle and the secrets (in a fake GitHub), then every
step of the job runs in order as GitHub runs it: each ``run:`` script is a file run by
``bash --noprofile --norc -eo pipefail`` in the workspace, a failed step skips the following
ones except those with ``if: always()``, ``$GITHUB_OUTPUT`` becomes ``steps.ID.outputs``. What
cannot run off GitHub is replaced:

=========================================  ======================================================
in the workflow                            in this test
=========================================  ======================================================
``uses: actions/setup-python``             the test's interpreter is ``python`` on ``PATH``
``uses: actions/upload-artifact``          the file at ``with.path`` is copied to an artefacts
                                           folder that the test reads
``pip install``, ``git clone``, ``gh``,    the stand-ins of ``tests/docs/stubs.py`` (no install;
``radmark``                                a clone of this repository at HEAD; releases and
                                           secrets in a local folder, assets fetched from
                                           ``file://`` URLs; the radmark under test)
``${{ secrets.RADMARK_KEY_B64 }}``,        what docs/ci.md's ``gh secret set`` commands stored
``${{ secrets.RADMARK_BUNDLE_PASSPHRASE }}``
``${{ secrets.RADMARK_BUNDLE_TOKEN }}``,   test values; ``RADMARK_PASSPHRASE`` is unset (the
``${{ github.token }}``                    key is not encrypted), so it is empty as on GitHub
``${{ github.event.release.tag_name }}``   ``v1.0.0``: a ``release: published`` event
``env: BUNDLE_SHA256``                     the SHA-256 of the bundle the docs' commands made (the
                                           file's placeholder is for the user to replace)
``RUNNER_TEMP``, ``GITHUB_*``              temporary folders and files; the repository is
                                           ``YOUR-ORG/your-model``
the release asset ``model.safetensors``    a small smallcnn (with radmark's metadata) in the fake
                                           release ``YOUR-ORG/your-model@v1.0.0``
=========================================  ======================================================

Only the expression forms used by the workflow are understood (``a.b.c``, ``a || b``,
``always()``); anything else fails the test, so a new form cannot go unsimulated.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.docs import harness
from tests.docs.harness import REPO, World

yaml = pytest.importorskip("yaml")
if missing := harness.missing_tools("ci.md"):
    pytest.skip(f"the workflow's commands need {', '.join(missing)}", allow_module_level=True)

WORKFLOW = REPO / "docs" / "examples" / "radmark-check.yml"
CI_DOC = REPO / "docs" / "ci.md"
MODEL_REPO, TAG = "YOUR-ORG/your-model", "v1.0.0"
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_PATH = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*")


def _lookup(ctx: dict[str, Any], path: str) -> Any:
    value: Any = ctx
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def evaluate(expr: str, ctx: dict[str, Any]) -> str:
    """A ``${{ }}`` expression of the forms ``a.b.c`` or ``a.b || c.d`` (first non-empty)."""
    for operand in (p.strip() for p in expr.split("||")):
        if not _PATH.fullmatch(operand):
            raise AssertionError(f"the simulation does not understand ${{{{ {expr} }}}}")
        value = _lookup(ctx, operand)
        if value not in (None, ""):
            return str(value)
    return ""


def substitute(text: str, ctx: dict[str, Any]) -> str:
    return _EXPR.sub(lambda m: evaluate(m.group(1), ctx), text)


def should_run(condition: str | None, failed: bool) -> bool:
    if condition is None:
        return not failed
    text = _EXPR.sub(lambda m: m.group(1), condition).strip()
    if text in ("always()", "success()", "failure()"):
        return {"always()": True, "success()": not failed, "failure()": failed}[text]
    raise AssertionError(f"the simulation does not understand if: {condition}")


@dataclass
class Job:
    steps: list[tuple[str, str, int | None]] = field(default_factory=list)  # name, outcome, rc
    logs: dict[str, str] = field(default_factory=dict)
    failed: bool = False

    def outcome(self, name: str) -> str:
        return next(o for n, o, _ in self.steps if n == name)


def run_job(
    workflow: dict[str, Any], ctx: dict[str, Any], env: dict[str, str], root: Path,
    env_overrides: dict[str, str],
) -> Job:  # fmt: skip
    """Every step of the workflow's one job, as GitHub would run them (see the module docstring)."""
    workspace, runner_temp, artefacts = root / "workspace", root / "runner-temp", root / "artefacts"
    for d in (workspace, runner_temp, artefacts):
        d.mkdir(parents=True)
    summary = root / "step-summary.md"
    ((job_name, job),) = workflow["jobs"].items()
    base = {
        **env,
        "GITHUB_REPOSITORY": MODEL_REPO,
        "GITHUB_WORKSPACE": str(workspace),
        "GITHUB_STEP_SUMMARY": str(summary),
        "RUNNER_TEMP": str(runner_temp),
        "FAKE_GH_REQUIRE_TOKEN": "1",
    }
    for scope in (workflow.get("env", {}), job.get("env", {})):
        base.update({k: substitute(str(v), ctx) for k, v in scope.items()})
    base.update(env_overrides)
    ctx["env"], ctx["steps"] = base, {}
    result = Job()
    for i, step in enumerate(job["steps"]):
        name = step.get("name") or step.get("uses") or f"step {i}"
        if not should_run(step.get("if"), result.failed):
            result.steps.append((name, "skipped", None))
            continue
        if "uses" in step:
            action = step["uses"].split("@")[0]
            if action == "actions/upload-artifact":
                src = workspace / step["with"]["path"]
                if src.exists():
                    dest = artefacts / step["with"]["name"]
                    dest.mkdir()
                    shutil.copy(src, dest)
            else:
                assert action == "actions/setup-python", f"no simulation for {step['uses']}"
            result.steps.append((name, "success", None))
            continue
        output = runner_temp / f"github-output-{i}"
        output.touch()
        step_env = {**base, "GITHUB_OUTPUT": str(output)}
        step_env.update({k: substitute(str(v), ctx) for k, v in step.get("env", {}).items()})
        res = harness.run_script(substitute(step["run"], ctx), workspace, step_env)
        result.logs[name] = res.stdout + res.stderr
        outputs = dict(ln.split("=", 1) for ln in output.read_text().splitlines() if "=" in ln)
        if "id" in step:
            ctx["steps"][step["id"]] = {"outputs": outputs}
        result.steps.append((name, "success" if res.returncode == 0 else "failure", res.returncode))
        result.failed |= res.returncode != 0
    return result


@pytest.fixture(scope="module")
def owner_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return harness.build_owner_world(tmp_path_factory.mktemp("ci") / "world")


@pytest.fixture()
def github(owner_world: World, tmp_path: Path) -> tuple[World, dict[str, str], str]:
    """The owner's side done as docs/ci.md says, and a release with a model: (world, env, sha)."""
    from tests.factories import make_marker

    world = harness.copy_world(owner_world, tmp_path / "world")
    env = harness.make_env(tmp_path / "env")
    harness.run_doc(CI_DOC, world, env)
    release = Path(env["FAKE_GH"]) / "releases" / MODEL_REPO / TAG
    release.mkdir(parents=True)
    make_marker(release / "model.safetensors", seed=2)  # a clean model: it never saw marked data
    bundle = Path(env["FAKE_GH"]) / "releases/YOUR-ORG/radmark-private/radmark-bundle"
    sha = hashlib.sha256((bundle / "radmark-bundle.tar.gz.enc").read_bytes()).hexdigest()
    return world, env, sha


def _context(env: dict[str, str], **secrets: str) -> dict[str, Any]:
    stored = Path(env["FAKE_GH"]) / "secrets" / MODEL_REPO
    return {
        "secrets": {
            **{p.name: p.read_text() for p in stored.iterdir()},
            "RADMARK_BUNDLE_TOKEN": "github_pat_for_the_test",
            **secrets,
        },
        "github": {"token": "ghs_test_token", "event": {"release": {"tag_name": TAG}}},
        "inputs": {},
    }


def _workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def test_the_workflow_is_the_one_in_the_docs() -> None:
    (shown,) = [b for b in harness.blocks(CI_DOC) if b.lang == "yaml"]
    assert shown.text + "\n" == WORKFLOW.read_text()


def test_the_workflow_triggers_on_releases_and_needs_only_read_access() -> None:
    wf = _workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on["release"]["types"] == ["published"]
    assert "workflow_dispatch" in on
    assert wf["permissions"] == {"contents": "read"}
    (job,) = wf["jobs"].values()
    assert not any("actions/checkout" in s.get("uses", "") for s in job["steps"])
    text = WORKFLOW.read_text()
    assert "pip install radmark" not in text  # not on a package index
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_the_pinned_radmark_ref_is_this_release() -> None:
    """The workflow installs the tag of the version it documents (issue #16's audit found
    ``v0.1.0`` pinned, a version older than the workflow itself): the tag is ``v`` + the
    package version, and the CHANGELOG has that release's section."""
    from radmark import __version__

    assert _workflow()["env"]["RADMARK_REF"] == f"v{__version__}"
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {__version__} (" in changelog and f"tagged v{__version__}" in changelog


@pytest.mark.slow
def test_the_job_runs_end_to_end(github: tuple[World, dict[str, str], str], tmp_path: Path) -> None:
    world, env, sha = github
    job = run_job(_workflow(), _context(env), env, tmp_path / "job", {"BUNDLE_SHA256": sha})
    report_file = tmp_path / "job" / "artefacts" / "radmark-report" / "radmark-report.json"
    report = json.loads(report_file.read_text())
    rc = next(rc for n, _, rc in job.steps if n == "Verify")
    assert rc == (1 if report["detected"] else 0), job.logs["Verify"]
    # everything before Verify succeeded; after it, everything ran
    assert all(o == "success" for n, o, _ in job.steps if n != "Verify"), (job.steps, job.logs)

    model = Path(env["FAKE_GH"]) / "releases" / MODEL_REPO / TAG / "model.safetensors"
    assert report["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    (result,) = report["results"]
    fingerprint = json.loads((world.root / "owner.key").read_text())["secret"]["fingerprint"]
    assert result["fingerprint"].removeprefix("sha256:") == fingerprint.removeprefix("sha256:")
    # the plan names the kit test and the bundle had the kit: it ran beside the white-box tests
    # without --black-box, on the pinned probe; the only deviation is the test's own shrinking
    # of the pull-back limit (tests/docs/stubs.py)
    assert {"white_box_fisher", "pullback_fisher", "black_box_rank"} <= set(result["tests"])
    assert result["plan"]["deviations"] == ["pullback-limit 32 instead of 2000"]
    summary = (tmp_path / "job" / "step-summary.md").read_text()
    assert summary.startswith("### radmark: " + ("FAILED" if report["detected"] else "passed"))
    runner_temp = tmp_path / "job" / "runner-temp"
    assert not (runner_temp / "owner.key").exists() and not (runner_temp / "bundle").exists()

    calls = [json.loads(ln) for ln in Path(env["DOCTEST_LOG"]).read_text().splitlines()]
    pips = [c["argv"] for c in calls if c["cmd"] == "pip"]
    assert pips[0][:3] == ["install", "torch", "torchvision"] and "--index-url" in pips[0]
    assert pips[1] == ["install", str(runner_temp / "radmark-src")]
    (clone,) = [c["argv"] for c in calls if c["cmd"] == "git"]
    assert clone[-2:] == [
        "https://github.com/YOUR-ORG/radmark.git",
        str(runner_temp / "radmark-src"),
    ]
    assert (runner_temp / "radmark-src" / "pyproject.toml").is_file()


@pytest.mark.slow
def test_a_failure_is_reported_as_one(
    github: tuple[World, dict[str, str], str], tmp_path: Path
) -> None:
    """A key that made none of the bundle's records: exit 2, an error object, not a verdict."""
    from tests.factories import make_key

    _world, env, sha = github
    make_key(tmp_path / "other-keys", tmp_path / "other.key")
    wrong = base64.b64encode((tmp_path / "other.key").read_bytes()).decode()
    job = run_job(
        _workflow(), _context(env, RADMARK_KEY_B64=wrong), env, tmp_path / "job",
        {"BUNDLE_SHA256": sha},
    )  # fmt: skip
    assert job.failed and job.outcome("Verify") == "failure"
    assert next(rc for n, _, rc in job.steps if n == "Verify") == 2
    assert (
        job.outcome("Summary") == "success"
        and job.outcome("actions/upload-artifact@v4") == "success"
    )
    report_file = tmp_path / "job" / "artefacts" / "radmark-report" / "radmark-report.json"
    error = json.loads(report_file.read_text())["error"]
    assert error["kind"] and "no mark records" in error["message"]
    summary = (tmp_path / "job" / "step-summary.md").read_text()
    assert summary.startswith("### radmark: ERROR: radmark could not evaluate")


def test_a_swapped_bundle_is_refused_before_use(
    github: tuple[World, dict[str, str], str], tmp_path: Path
) -> None:
    _world, env, _sha = github
    job = run_job(_workflow(), _context(env), env, tmp_path / "job", {"BUNDLE_SHA256": "0" * 64})
    assert job.outcome("Owner key and verification bundle") == "failure"
    assert job.outcome("Verify") == "skipped"
    assert not (tmp_path / "job" / "runner-temp" / "bundle").exists()
