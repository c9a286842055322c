"""``radmark verify`` through the real CLI: the JSON contract, Holm over several keys, the plot,
and every way the input can be wrong (exit 2 with one clear line, never "not detected").

The world is small and real: a smallcnn marker trained one epoch on real Fashion-MNIST images,
two keys whose mark records come from the real ``radmark mark`` on a tiny shard, a clean model
trained independently, and a clean probe set of 300 test images.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from radmark import SCHEMA_VERSION
from radmark.cli import app
from radmark.data.writer import write_dataset
from radmark.demo import DATA
from radmark.keys.manage import generate_key
from radmark.keys.store import Keystore
from radmark.models import build_model, save_model
from radmark.models.training import train_classifier

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def _mark(root: Path, ks: Path, fingerprint: str, marker: Path, name: str, fraction: str) -> str:
    res = run(
        "mark", root / "tiny",
        "--key", fingerprint,
        "--keystore", ks,
        "--out", root / name,
        "--marker", marker,
        "--fraction", fraction,
        "--steps", "1",
        "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["record"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("verify-cli")
    d = np.load(DATA)
    x, y = d["train_images"][:1000], d["train_labels"][:1000].astype(np.int64)
    probe_x, probe_y = d["test_images"], d["test_labels"].astype(np.int64)

    def train(seed: int):
        return train_classifier(x[:, None], y, arch="smallcnn", num_classes=10, epochs=1, seed=seed)

    model, mean, std, _, _ = train(0)
    marker = root / "marker.safetensors"
    save_model(model, marker, arch="smallcnn", num_classes=10, mean=mean, std=std)
    model, mean, std, _, _ = train(1)
    clean = root / "clean.safetensors"
    save_model(model, clean, arch="smallcnn", num_classes=10, mean=mean, std=std)

    write_dataset(probe_x[:300], probe_y[:300], root / "probe", samples_per_shard=150)
    write_dataset(probe_x[300:350], probe_y[300:350], root / "probe50")
    write_dataset(x[:16], y[:16], root / "tiny")

    ks = root / "keys"
    k1 = generate_key(ks, passphrase=None, out_file=root / "k1.key", scrypt_n=2**10)
    k2 = generate_key(ks, passphrase=None, scrypt_n=2**10)
    k3 = generate_key(ks, passphrase=None, scrypt_n=2**10)  # a key that never marked anything
    rec1 = _mark(root, ks, k1.fingerprint, marker, "m1", "1.0")
    rec2 = _mark(root, ks, k2.fingerprint, marker, "m2", "1.0")
    # Same key, marker, d and C again: the same carriers, so one test, not two.
    rec2b = _mark(root, ks, k2.fingerprint, marker, "m2b", "0.5")
    other = generate_key(root / "other-keys", passphrase=None, scrypt_n=2**10)
    return {
        "root": root,
        "marker": marker,
        "clean": clean,
        "probe": root / "probe",
        "probe50": root / "probe50",
        "ks": ks,
        "k1": k1.fingerprint,
        "k1_file": root / "k1.key",
        "k2": k2.fingerprint,
        "k3": k3.fingerprint,
        "records": {k1.fingerprint: rec1, k2.fingerprint: rec2},
        "rec2b": rec2b,
        "other_ks": root / "other-keys",
        "other": other.fingerprint,
    }


def verify(world: dict[str, Any], model: Any, *extra: Any, probe: bool = True, marker: bool = True):
    args: list[Any] = ["verify", model, "--keystore", world["ks"]]
    if probe:
        args += ["--probe", world["probe"]]
    if marker:
        args += ["--marker", world["marker"]]
    return run(*args, *extra)


def one_error_line(res, *needles: str) -> str:
    """Exit 2, exactly one stderr line naming the problem, and on stdout nothing, or under --json
    exactly one JSON error object carrying the same message (issue #12)."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    if res.stdout.strip():
        doc = json.loads(res.stdout)
        assert set(doc) == {"schema_version", "error"}, doc
        assert set(doc["error"]) == {"kind", "message"}
        assert doc["error"]["message"] in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("radmark: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# the JSON contract


def test_json_fields_per_spec(world: dict[str, Any]) -> None:
    res = verify(world, world["clean"], "--key", world["k1"], "--json")
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["model_sha256"] == hashlib.sha256(world["clean"].read_bytes()).hexdigest()
    assert doc["alpha"] == 1e-3
    assert isinstance(doc["detected"], bool)
    assert doc["arch"] == "smallcnn" and doc["probe_size"] == 300
    (r,) = doc["results"]
    assert r["fingerprint"] == world["k1"]
    assert r["record"] == world["records"][world["k1"]]
    assert r["num_classes"] == 10 and r["dim"] == 128
    assert set(r["tests"]) >= {"white_box_fisher", "white_box_zscore"}
    for t in r["tests"].values():
        assert isinstance(t["log10_p"], float) and t["log10_p"] <= 0.0
    assert isinstance(r["log10_p"], float) and r["log10_p"] <= 0.0
    exact = [t["log10_p"] for t in r["tests"].values() if t["exact"]]
    assert set(r["tests"]) >= {"white_box_fisher", "pullback_fisher"} and len(exact) == 2
    # the verdict: Bonferroni on the minimum over the exact tests (valid under dependence)
    assert r["log10_p"] == pytest.approx(min(0.0, min(exact) + math.log10(2)))
    assert r["detected"] is (r["log10_p"] <= math.log10(1e-3))
    assert doc["detected"] is r["detected"]
    assert res.exit_code == (1 if doc["detected"] else 0)
    assert len(r["cosines"]) == 10 and all(-1.0 <= c <= 1.0 for c in r["cosines"])


def test_alpha_sets_the_verdict_and_json_keeps_the_exit_code(world: dict[str, Any]) -> None:
    # A clean model's p is uniform over keys. With the white-box test alone (continuous p; the
    # Bonferroni verdict sits at 1 with probability ~1/4) take the first key whose p is far
    # enough from 1 to put an alpha on either side of it (both keys above 0.977: 0.05%).
    for k in ("k1", "k2"):
        base = verify(world, world["clean"], "--key", world[k], "--no-pullback", "--json")
        lp = json.loads(base.stdout)["results"][0]["log10_p"]
        if lp <= -0.01:
            break
    else:
        pytest.skip(f"p = {10**lp:.3f} for both keys: too close to 1 to pick an alpha above it")
    above, below = 10 ** (lp + 0.005), 10 ** (lp - 0.005)
    for alpha, detected in ((above, True), (below, False)):
        for extra in (["--json"], []):
            res = verify(
                world, world["clean"], "--key", world[k], "--no-pullback", "--alpha", alpha, *extra
            )
            assert res.exit_code == (1 if detected else 0), res.output
            if extra:
                assert json.loads(res.stdout)["detected"] is detected
                assert json.loads(res.stdout)["alpha"] == pytest.approx(alpha)


# --------------------------------------------------------------------------------------------
# several keys: Holm


def test_holm_over_all_keys_in_the_keystore(world: dict[str, Any]) -> None:
    assert len(Keystore.open(world["ks"]).mark_records()) == 3
    res = verify(world, world["clean"], "--json")
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    assert doc["correction"] == "holm"
    # Two records of k2 share their carriers: tested once. k3 has no record: not tested.
    got = {r["fingerprint"]: r for r in doc["results"]}
    assert set(got) == {world["k1"], world["k2"]}
    for r in got.values():
        assert r["log10_p_adjusted"] >= r["log10_p"]
        assert r["detected"] is (r["log10_p_adjusted"] <= -3.0)
    best = min(r["log10_p"] for r in got.values())
    assert min(r["log10_p_adjusted"] for r in got.values()) == pytest.approx(
        min(0.0, best + math.log10(2)), abs=1e-9
    )
    text = verify(world, world["clean"]).stdout
    assert "Holm" in text and "2 keys tested" in text
    # the same family through repeated --key (a CI job names its keys; issue #16): same numbers
    res = verify(world, world["clean"], "--key", world["k1_file"], "--key", world["k2"], "--json")
    assert res.exit_code in (0, 1), res.output
    again = {r["fingerprint"]: r for r in json.loads(res.stdout)["results"]}
    assert set(again) == set(got)
    for fp, r in again.items():
        assert r["log10_p_adjusted"] == pytest.approx(got[fp]["log10_p_adjusted"], abs=1e-9)
    res = verify(world, world["clean"], "--key", world["k1"], "--json")  # one key: no correction
    assert json.loads(res.stdout)["correction"] is None


def test_plot_writes_a_png(world: dict[str, Any], tmp_path: Path) -> None:
    png = tmp_path / "cosines.png"
    res = verify(world, world["clean"], "--plot", png, "--json")
    assert res.exit_code in (0, 1), res.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# --------------------------------------------------------------------------------------------
# bad input: exit 2, one line


def test_resnet18_without_metadata_is_recognised_then_refused_for_its_classes(
    world: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    model = build_model("resnet18", 1000)
    path = tmp_path / "resnet18-raw.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    res = verify(world, path, "--key", world["k1"])
    one_error_line(res, "resnet18", "1000 classes", "has 10", str(path))


def test_model_with_other_classes(world: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "five.safetensors"
    save_model(build_model("smallcnn", 5, in_chans=1), path, arch="smallcnn", num_classes=5,
               mean=(0.3,), std=(0.3,))  # fmt: skip
    one_error_line(verify(world, path, "--key", world["k1"], "--json"), "5 classes", "has 10")


def test_nan_weights(world: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in build_model("smallcnn", 10, in_chans=1).state_dict().items()}
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    meta = {"radmark.arch": "smallcnn", "radmark.num_classes": "10", "radmark.in_chans": "1"}
    save_file(state, str(path), metadata=meta)
    one_error_line(verify(world, path, "--key", world["k1"]), "NaN", str(path))


class _Payload:
    """Unpickling this would create ``flag``: a stand-in for arbitrary code execution."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def test_pickle_with_side_effect_is_refused_without_running_it(
    world: dict[str, Any], tmp_path: Path
) -> None:
    flag = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state: dict[str, Any] = dict(build_model("smallcnn", 10, in_chans=1).state_dict())
    state["payload"] = _Payload(flag)
    torch.save(state, path)
    assert not flag.exists()
    one_error_line(verify(world, path, "--key", world["k1"]), "weights_only", str(path))
    assert not flag.exists()


def test_probe_smaller_than_the_feature_dimension(world: dict[str, Any]) -> None:
    args = ["--key", world["k1"], "--probe", world["probe50"]]
    res = verify(world, world["clean"], *args, probe=False)
    one_error_line(res, "50 images", "d=128", str(world["probe50"]))


def test_missing_probe(world: dict[str, Any]) -> None:
    one_error_line(verify(world, world["clean"], "--key", world["k1"], probe=False), "--probe")


def test_no_mark_records_in_the_keystore(world: dict[str, Any]) -> None:
    args = ["verify", world["clean"], "--probe", world["probe"], "--marker", world["marker"]]
    one_error_line(run(*args, "--keystore", world["other_ks"]), "no mark records", "radmark mark")
    # a key of this keystore that never marked anything
    one_error_line(run(*args, "--keystore", world["ks"], "--key", world["k3"]), "no mark records")


def test_key_not_in_the_keystore(world: dict[str, Any]) -> None:
    one_error_line(verify(world, world["clean"], "--key", world["other"]), "no key", world["other"])


def test_wrong_marker_file(world: dict[str, Any]) -> None:
    res = verify(
        world, world["clean"], "--key", world["k1"], "--marker", world["clean"], marker=False
    )
    one_error_line(res, "marker", str(world["clean"]), "the mark was made with")


def test_marker_from_the_record_or_from_marker(world: dict[str, Any]) -> None:
    """Without --marker: the record's marker path if it has one (hash checked), else one line
    asking for --marker; a recorded marker that moved names the path and --marker."""
    rec = Keystore.open(world["ks"]).mark_record(world["records"][world["k1"]])
    source = rec.marker.source
    if not source:
        one_error_line(
            verify(world, world["clean"], "--key", world["k1"], marker=False), "--marker"
        )
        return
    assert Path(source) == world["marker"].resolve()
    res = verify(world, world["clean"], "--key", world["k1"], "--json", marker=False)
    assert res.exit_code in (0, 1), res.output
    assert json.loads(res.stdout)["results"][0]["fingerprint"] == world["k1"]
    moved = world["marker"].with_name("moved.safetensors")
    world["marker"].rename(moved)
    try:
        res = verify(world, world["clean"], "--key", world["k1"], marker=False)
        one_error_line(res, source, "--marker")
        res = verify(world, world["clean"], "--key", world["k1"], "--marker", moved, marker=False)
        assert res.exit_code in (0, 1), res.output
    finally:
        moved.rename(world["marker"])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--alpha", "0"], "--alpha"),
        (["--alpha", "1.5"], "--alpha"),
        (["--expect", "maybe"], "--expect"),
    ],
)
def test_bad_options(world: dict[str, Any], extra: list[str], needle: str) -> None:
    one_error_line(verify(world, world["clean"], "--key", world["k1"], *extra), needle)


def test_missing_model_file(world: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    one_error_line(verify(world, missing, "--key", world["k1"]), str(missing), "does not exist")


# --------------------------------------------------------------------------------------------
# issue #12: a crash is never a verdict; the plot never replaces one; records chosen by verify


def test_plot_never_replaces_a_file_and_is_checked_before_any_work(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = tmp_path / "cosines.png"
    png.write_bytes(b"an earlier plot")
    calls: list[str] = []
    import radmark.verify.run as verify_run

    real = verify_run.verify_model
    monkeypatch.setattr(
        verify_run, "verify_model", lambda *a, **k: calls.append("x") or real(*a, **k)
    )
    one_error_line(verify(world, world["clean"], "--key", world["k1"], "--plot", png, "--json"),
                   str(png), "already exists", "--force")  # fmt: skip
    assert png.read_bytes() == b"an earlier plot" and not calls  # refused before any work
    res = verify(world, world["clean"], "--key", world["k1"], "--plot", png, "--force")
    assert res.exit_code in (0, 1), res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = tmp_path / "no" / "dir" / "p.png"
    one_error_line(verify(world, world["clean"], "--key", world["k1"], "--plot", missing),
                   "does not exist")  # fmt: skip


def test_a_plot_that_cannot_be_written_keeps_the_verdict(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from radmark.errors import InputError

    def fail(*_a: Any, **_k: Any) -> None:
        raise InputError("--plot p.png: cannot write (No space left on device)")

    monkeypatch.setattr("radmark.report.plot.cosine_plot", fail)
    res = verify(
        world, world["clean"], "--key", world["k1"], "--plot", tmp_path / "p.png", "--json"
    )
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)  # exactly one JSON object: the verdict
    assert res.exit_code == (1 if doc["detected"] else 0)
    assert "warning: the plot was not written" in res.stderr


def test_black_box_plot_without_probe_is_refused_before_any_work(world: dict[str, Any]) -> None:
    """Before #12: ``max()`` of an empty list in the plot code, after the work, no verdict."""
    res = verify(world, world["clean"], "--key", world["k1"], "--black-box", "--plot", "p.png",
                 "--json", probe=False)  # fmt: skip
    one_error_line(res, "--plot", "--probe")


def test_probe_images_too_small_for_the_marker(world: dict[str, Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_dataset(rng.integers(0, 256, (300, 7, 7), dtype=np.uint8), [i % 10 for i in range(300)],
                  tmp_path / "probe7")  # fmt: skip
    args = ["--key", world["k1"], "--probe", tmp_path / "probe7", "--json"]
    one_error_line(verify(world, world["clean"], *args, probe=False), "cannot take 7x7 images")


def test_float8_suspect_gets_a_verdict(world: dict[str, Any], tmp_path: Path) -> None:
    """Before #12: ``"isfinite" not implemented for 'Float8_e4m3fn'`` (exit 1)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(world["clean"]), "pt") as f:
        meta = f.metadata()
    state = load_file(str(world["clean"]))
    name = sorted(state)[0]
    state[name] = state[name].to(torch.float8_e4m3fn)
    path = tmp_path / "f8.safetensors"
    save_file(state, str(path), metadata=meta)
    res = verify(world, path, "--key", world["k1"], "--json")
    assert res.exit_code in (0, 1), res.output
    assert json.loads(res.stdout)["results"][0]["fingerprint"] == world["k1"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--probe-limit", "0"],
        ["--probe-limit", "-3"],
        ["--pullback-limit", "0"],
        ["--alpha", "nan"],
        ["--alpha", "inf"],
    ],  # fmt: skip
)
def test_non_positive_numbers(world: dict[str, Any], extra: list[str]) -> None:
    one_error_line(verify(world, world["clean"], "--key", world["k1"], *extra, "--json"), extra[0])


@pytest.mark.slow  # three marks and four verifications (about 9 s)
def test_black_box_finds_an_earlier_kit_after_a_later_mark_without_one(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """Issue #12 §7: a later ``mark`` with the same key and marker (no --kit-probe) made verify
    --black-box pick the newest record, which has no kit, and fail."""
    ks = tmp_path / "keys"
    fp = generate_key(ks, passphrase=None, scrypt_n=2**10).fingerprint
    base = ["mark", world["root"] / "tiny", "--key", fp, "--keystore", ks, "--marker",
            world["marker"], "--steps", "1", "--json"]  # fmt: skip
    first = run(*base, "--out", tmp_path / "m1", "--kit-probe", world["probe"],
                "--kit-decoys", "3", "--kit-per-class", "2")  # fmt: skip
    assert first.exit_code == 0, first.output
    kit_record = json.loads(first.stdout)["record"]
    import time

    time.sleep(1.1)  # a strictly newer record
    later = run(*base, "--out", tmp_path / "m2", "--fraction", "0.5")
    assert later.exit_code == 0, later.output
    newest = json.loads(later.stdout)["record"]
    assert newest != kit_record
    assert [r.address for r in Keystore.open(ks).mark_records()][-1] == newest.removeprefix(
        "sha256:"
    )
    res = run("verify", world["clean"], "--keystore", ks, "--key", fp, "--black-box", "--json")
    assert res.exit_code in (0, 1), res.output
    (r,) = json.loads(res.stdout)["results"]
    assert r["record"] == kit_record and "black_box_rank" in r["tests"]
    # A later record with another marker (other carriers) and no kit is reported, not fatal (the
    # audit found exit 2 "no verification kit"): with --probe it gets the white-box tests...
    other = run(*base[:-5], "--marker", world["clean"], "--steps", "1", "--json", "--out",
                tmp_path / "m3", "--fraction", "0.5")  # fmt: skip
    assert other.exit_code == 0, other.output
    other_record = json.loads(other.stdout)["record"]
    res = run("verify", world["clean"], "--keystore", ks, "--key", fp, "--black-box", "--probe",
              world["probe"], "--json")  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    by_record = {r["record"]: r for r in doc["results"]}
    assert set(by_record) == {kit_record, other_record}
    assert "black_box_rank" in by_record[kit_record]["tests"]
    assert "black_box_rank" not in by_record[other_record]["tests"]
    assert "white_box_fisher" in by_record[other_record]["tests"]
    assert any(other_record.removeprefix("sha256:")[:12] in w and "no verification kit" in w
               for w in doc["warnings"]), doc["warnings"]  # fmt: skip
    # ... and without a probe it cannot be tested: the kit's record is, the other is reported
    res = run("verify", world["clean"], "--keystore", ks, "--key", fp, "--black-box", "--json")
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    assert [r["record"] for r in doc["results"]] == [kit_record]
    assert any("was not tested" in w for w in doc["warnings"]), doc["warnings"]


def test_progress_is_reported_once_per_model_and_key(world: dict[str, Any]) -> None:
    """The bar behind `verify` (shown on a terminal only) is fed by verify_models: one event per
    model x key pair, counting up to the total, and feature batches in between."""
    from radmark.verify.run import verify_models

    events: list[tuple[int, int, str]] = []
    res = verify_models(
        [str(world["clean"]), str(world["clean"])],
        keystore=world["ks"],
        probe=[str(world["probe"])],
        marker_spec=str(world["marker"]),
        pullback=False,
        progress=lambda done, total, what: events.append((done, total, what)),
    )
    assert len(res.results) == 4
    pairs = [(d, t, w) for d, t, w in events if " vs " in w]
    assert [(d, t) for d, t, _ in pairs] == [(i, 4) for i in range(4)]
    assert all(str(world["clean"]) in what for _, _, what in pairs)
    # within a pair the text moves batch by batch (issue #16: a single pair showed 0/1 until done)
    steps = [w for _, _, w in events if "probe images" in w]
    assert "smallcnn features, 256/300 probe images" in steps
    assert "smallcnn features, 300/300 probe images" in steps
    assert [d for d, _, _ in events] == sorted(d for d, _, _ in events)


def test_plot_never_writes_over_an_input_even_with_force(world: dict[str, Any], tmp_path: Path
                                                          ) -> None:  # fmt: skip
    """Issue #12 §6 (audit G2): ``--plot P/probe-000000.tar --force`` overwrote the probe shard
    and ``--plot MODEL --force`` the model; inputs are never written."""
    import shutil

    probe = tmp_path / "probe"
    shutil.copytree(world["probe"], probe)
    model = tmp_path / "clean.safetensors"
    shutil.copy(world["clean"], model)
    shard = sorted(probe.iterdir())[0]
    before = {p: p.read_bytes() for p in (shard, model)}
    for target in (shard, model):
        res = run("verify", model, "--keystore", world["ks"], "--probe", probe, "--marker",
                  world["marker"], "--no-pullback", "--plot", target, "--force")  # fmt: skip
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "one of this command's inputs" in lines[0], res.stderr
    assert {p: p.read_bytes() for p in before} == before
