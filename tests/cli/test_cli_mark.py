"""``radmark mark`` through the real CLI: JSON contract, resume rules, malformed shards, the lock,
an unwritable output directory and a full disk. Every failure must be exit 2 with one line on
stderr, no output shard for the failing shard, no temp file, and inputs untouched."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.data.sources import iter_samples
from radmark.marking.manifest import LOCK, find_state
from tests.factories import (
    make_broken_marker,
    make_key,
    make_marker,
    make_shards,
    sha256_tree,
    temp_files,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mark-cli")
    make_shards(root / "in", n=32, per_shard=16)
    make_marker(root / "marker.safetensors")
    make_key(root / "ks", root / "owner.key")
    return {"root": root, "in": root / "in", "marker": root / "marker.safetensors",
            "ks": root / "ks", "key": root / "owner.key"}  # fmt: skip


def _args(world: dict[str, Path], out: Path, *extra: str, shards: list[str] | None = None):
    return [
        "mark",
        *(shards or [str(world["in"])]),
        "--key", str(world["key"]),
        "--keystore", str(world["ks"]),
        "--out", str(out),
        "--marker", str(world["marker"]),
        "--fraction", "0.5",
        "--steps", "2",
        *extra,
    ]  # fmt: skip


def run(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def _one_error_line(res, *needles: str) -> str:
    """Exit 2 and exactly one stderr line, 'radmark: error: ...' naming the problem.

    Callers pass --json: without it the rich progress bar currently leaves its last frame on
    stderr before the error (see test_error_without_json_is_one_line)."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("radmark: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _no_shards_or_temps(out: Path) -> None:
    if out.is_dir():
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tar")]
        assert not temp_files(out)


# --------------------------------------------------------------------------------------------
# success: the JSON contract and the record


def test_mark_json_fields_record_and_keys_show(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = sha256_tree(world["in"])
    res = run(*_args(world, out, "--json"))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    for f in ("schema_version", "fingerprint", "record", "shards", "images", "marked",
              "psnr_mean", "psnr_min", "linf_max", "images_per_s"):  # fmt: skip
        assert f in doc, f
    assert doc["schema_version"] == 1 and doc["shards"] == 2 and doc["images"] == 32
    assert 0 < doc["marked"] < 32 and doc["psnr_min"] >= 42 and doc["linf_max"] <= 2
    assert doc["record"].startswith("sha256:") and doc["images_per_s"] > 0
    assert sha256_tree(world["in"]) == before
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "data-000000.tar", "data-000001.tar"]
    man = find_state(world["ks"], out)  # which samples are marked: in the keystore only
    assert man is not None and man["record"] == doc["record"]
    assert sum(len(e["marked_keys"]) for e in man["shards"].values()) == doc["marked"]
    shown = run("keys", "show", doc["record"][:20], "--keystore", str(world["ks"]), "--json")
    assert shown.exit_code == 0, shown.output
    rec = json.loads(shown.stdout)["record"]
    assert rec["counts"]["marked"] == doc["marked"] and rec["counts"]["images"] == 32
    assert [s["name"] for s in rec["shards"]] == ["data-000000.tar", "data-000001.tar"]


def test_resume_rules(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = run(*_args(world, out, "--json"))
    assert first.exit_code == 0, first.output
    shards_before = {k: v for k, v in sha256_tree(out).items() if k.endswith(".tar")}
    # an earlier manifest without --resume: refused, nothing touched
    _one_error_line(run(*_args(world, out, "--json")), "--resume", str(out))
    # --resume with other settings: refused
    changed = _args(world, out, "--resume")
    changed[changed.index("--fraction") + 1] = "0.25"
    _one_error_line(run(*changed, "--json"), "other settings")
    _one_error_line(run(*_args(world, out, "--resume", "--steps", "3", "--json")), "other settings")
    # --resume with the same settings: every shard is kept, same bytes
    again = run(*_args(world, out, "--resume", "--json"))
    assert again.exit_code == 0, again.output
    doc = json.loads(again.stdout)
    assert all(r["resumed"] for r in doc["shard_reports"])
    assert {k: v for k, v in sha256_tree(out).items() if k.endswith(".tar")} == shards_before
    assert doc["marked"] == json.loads(first.stdout)["marked"]
    # a finished run resumed is a no-op: the same record, nothing new signed (issue #12)
    assert doc["record"] == json.loads(first.stdout)["record"]
    objects = sorted((world["ks"] / "objects").rglob("*.json"))
    # a record signed now would differ from the first even within the same second
    monkeypatch.setattr("radmark.keys.records.utc_timestamp", lambda: "2099-01-01T00:00:00Z")
    again = run(*_args(world, out, "--resume", "--json"))
    assert again.exit_code == 0 and json.loads(again.stdout)["record"] == doc["record"]
    assert sorted((world["ks"] / "objects").rglob("*.json")) == objects


def test_existing_output_shard_without_manifest_is_refused(world, tmp_path: Path) -> None:
    """Not radmark's file: refused with or without --resume (issue #12), replaced only with
    --force."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "data-000000.tar").write_bytes(b"someone else's file")
    _one_error_line(run(*_args(world, out, "--json")), "already holds data-000000.tar")
    _one_error_line(
        run(*_args(world, out, "--resume", "--json")), "which no run of this key", "--force"
    )
    assert (out / "data-000000.tar").read_bytes() == b"someone else's file"
    res = run(*_args(world, out, "--resume", "--force", "--json"))
    assert res.exit_code == 0, res.output
    assert [s.key for s in iter_samples(str(out / "data-000000.tar"))][0] == "00000000"


@pytest.mark.parametrize(
    "form",
    ["pipe:cat {shard}", "pipe:cat < {shard}", "pipe:cat {rel}", "{shard}"],
)
def test_out_never_holds_an_input_whatever_the_url_form(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """``mark 'pipe:cat in/data.tar' --out in --resume`` overwrote the input before #12."""
    src = tmp_path / "in"
    shutil.copytree(world["in"], src)
    monkeypatch.chdir(tmp_path)
    before = sha256_tree(src)
    shard = src / "data-000000.tar"
    spec = form.format(shard=shard, rel="in/data-000000.tar")
    for extra in (["--resume"], ["--resume", "--force"], []):
        res = run(*_args(world, src, "--json", *extra, shards=[spec]))
        _one_error_line(res, "would overwrite the input shard", "data-000000.tar")
    assert sha256_tree(src) == before


def test_mark_numeric_options_are_checked(world, tmp_path: Path) -> None:
    for opt, value in (("--num-classes", "0"), ("--num-classes", "-1"), ("--batch-size", "0"),
                       ("--fraction", "nan"), ("--kit-per-class", "0")):  # fmt: skip
        extra = ["--kit-probe", str(world["in"])] if opt.startswith("--kit") else []
        res = run(*_args(world, tmp_path / "out", "--json", opt, value, *extra))
        _one_error_line(res, opt)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# malformed shards


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _good_members(world: dict[str, Path]) -> list[tuple[str, bytes]]:
    sample = next(iter_samples(str(world["in"] / "data-000000.tar")))
    return [(f"{sample.key}.{e}", d) for e, d in sample.members]


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("truncated", "truncated"),
        ("not-an-image", "does not decode"),
        ("missing-label", "no label member 'cls'"),
        ("label-out-of-range", "out of range for 10 classes"),
        ("path-traversal", "'..' path component"),
    ],
)
def test_malformed_shard_exit_2_one_line_no_output(
    world: dict[str, Path], tmp_path: Path, kind: str, needle: str
) -> None:
    good = _good_members(world)
    png = next(d for n, d in good if n.endswith(".png"))
    bad = tmp_path / "in" / "bad-000000.tar"
    if kind == "truncated":
        data = (world["in"] / "data-000000.tar").read_bytes()
        bad.parent.mkdir(parents=True)
        bad.write_bytes(data[: len(data) // 2 + 100])
    elif kind == "not-an-image":
        _tar(
            bad,
            [*good, ("00000777.png", b"GIF89a but not really an image"), ("00000777.cls", b"1")],
        )
    elif kind == "missing-label":
        _tar(bad, [*good, ("00000777.png", png), ("00000777.json", b"{}")])
    elif kind == "label-out-of-range":
        _tar(bad, [*good, ("00000777.png", png), ("00000777.cls", b"12")])
    else:
        _tar(bad, [*good, ("../00000777.png", png), ("../00000777.cls", b"1")])
    before = sha256_tree(bad.parent)
    out = tmp_path / "out"
    _one_error_line(run(*_args(world, out, "--json", shards=[str(bad)])), "bad-000000.tar", needle)
    _no_shards_or_temps(out)
    assert sha256_tree(bad.parent) == before


def test_a_run_that_finished_no_shard_can_simply_be_rerun(world, tmp_path: Path) -> None:
    bad = _tar(
        tmp_path / "in" / "bad-000000.tar", [("00000001.png", b"junk"), ("00000001.cls", b"1")]
    )
    out = tmp_path / "out"
    _one_error_line(run(*_args(world, out, "--json", shards=[str(bad)])), "bad-000000.tar")
    assert (
        find_state(world["ks"], out) is None
    )  # no shard finished: nothing kept, nothing to protect
    res = run(*_args(world, out, "--json"))  # other shards, no --resume: nothing to protect
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 32


def test_on_error_skip_copies_the_bad_sample_and_counts_it(world, tmp_path: Path) -> None:
    good = _good_members(world)
    junk = b"\x89PNG\r\n\x1a\n but truncated"
    bad = _tar(tmp_path / "in" / "bad-000000.tar",
               [*good, ("00000777.png", junk), ("00000777.cls", b"1")])  # fmt: skip
    out = tmp_path / "out"
    _one_error_line(run(*_args(world, out, "--json", shards=[str(bad)])), "00000777")
    _no_shards_or_temps(out)
    res = run(*_args(world, tmp_path / "out2", "--on-error", "skip", "--json",
                     shards=[str(bad)]))  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["skipped"] == 1 and doc["images"] == 2
    man = find_state(world["ks"], tmp_path / "out2")
    assert man is not None and man["shards"]["bad-000000.tar"]["skipped"] == 1
    assert doc["shard_reports"][0]["skip_reasons"] == {"00000777": man["shards"][
        "bad-000000.tar"]["skip_reasons"]["00000777"]}  # fmt: skip
    assert "does not decode" in doc["shard_reports"][0]["skip_reasons"]["00000777"]
    copied = {s.key: s for s in iter_samples(str(tmp_path / "out2" / "bad-000000.tar"))}
    assert copied["00000777"].get("png") == junk  # copied unmarked, byte for byte


# --------------------------------------------------------------------------------------------
# the lock, an unwritable directory, a full disk


def test_second_run_on_a_locked_directory_is_refused(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running mark holds it
        _one_error_line(
            run(*_args(world, out, "--json")), "being written by another radmark mark run"
        )
    finally:
        os.close(fd)
    _no_shards_or_temps(out)
    assert run(*_args(world, out)).exit_code == 0  # the lock is gone with its holder


@pytest.mark.slow
def test_concurrent_real_runs_second_refused_first_completes(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "radmark", *_args(world, out, "--batch-size", "2")]
    cmd[cmd.index("--steps") + 1] = "30"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while find_state(world["ks"], out) is None:  # written once the first run holds the lock
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        second = run(*_args(world, out, "--resume", "--json"))
        _one_error_line(second, "being written by another radmark mark run", str(out))
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr.decode()
    assert (find_state(world["ks"], out) or {})["record"] is not None
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar", "data-000001.tar"]


def test_unwritable_output_directory(world, tmp_path: Path, monkeypatch) -> None:
    """Tests run as root, where chmod does not stop writes, so two simulations are used: --out
    below a regular file (the kernel refuses with ENOTDIR), and os.open failing with EROFS for
    every path inside --out (a read-only mount)."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    _one_error_line(
        run(*_args(world, blocker / "out", "--json")), "cannot create the output directory"
    )
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    _one_error_line(run(*_args(world, out, "--json")), "Read-only file system", str(out))
    monkeypatch.undo()
    assert not list(out.iterdir())


def test_disk_full_exit_2_no_partial_shard(world, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC half-way through the second shard's bytes (simulated in the shard writer)."""
    import radmark.data.writer as shards_mod

    real_write = shards_mod._HashingWriter.write
    writers: list[object] = []

    def write(self, data):
        if self not in writers:
            writers.append(self)
        if len(writers) == 2 and self.size > 5000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(shards_mod._HashingWriter, "write", write)
    before = sha256_tree(world["in"])
    out = tmp_path / "out"
    _one_error_line(run(*_args(world, out, "--json")), "No space left on device", "data-000001.tar")
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar"]  # the finished one
    assert not temp_files(out)
    assert sha256_tree(world["in"]) == before
    # once space is freed, --resume keeps the finished shard and writes the other
    monkeypatch.undo()
    res = run(*_args(world, out, "--resume", "--json"))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [r["resumed"] for r in doc["shard_reports"]] == [True, False]
    assert doc["images"] == 32 and not temp_files(out)


def test_error_without_json_is_one_line(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "data-000000.tar").write_bytes(b"someone else's file")
    _one_error_line(run(*_args(world, out)), "already holds data-000000.tar")


def test_kit_probe_builds_the_verification_kit_after_marking(world, tmp_path: Path) -> None:
    probe = make_shards(tmp_path / "probe", n=200, per_shard=100, offset=1500)
    res = run(
        *_args(world, tmp_path / "out", "--json"),
        "--kit-probe", str(probe[0].parent), "--kit-decoys", "2", "--kit-per-class", "1",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    kit = doc["kit"]
    assert kit["mark_record"] == doc["record"]
    assert (kit["images"], kit["decoys"], kit["markings"]) == (10, 2, 30)
    kits = [p for p in (world["ks"] / "kits").rglob("*.safetensors")]
    assert kit["kit_sha256"].removeprefix("sha256:") in {p.stem for p in kits}


def test_bad_kit_options_fail_before_marking(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(*_args(world, out, "--json"), "--kit-probe", str(tmp_path / "nope"))
    _one_error_line(res, "nope")
    assert not out.exists() or not any(out.glob("*.tar"))
    res = run(*_args(world, out, "--json"), "--kit-probe", str(world["in"]), "--kit-decoys", "0")
    _one_error_line(res, "--kit-decoys")


# --------------------------------------------------------------------------------------------
# issue #12: a broken marker never wipes a dataset; the output directory reveals no selection;
# memory is bounded by the batch


def _fresh_key(tmp_path: Path) -> tuple[Path, Path]:
    ks, key = tmp_path / "ks", tmp_path / "owner.key"
    make_key(ks, key)
    return ks, key


def _mark_records(ks: Path) -> list[object]:
    res = run("keys", "list", "--keystore", str(ks), "--json")
    assert res.exit_code == 0, res.output
    return [e for e in json.loads(res.stdout)["entries"] if e["kind"] == "mark"]


def test_marker_whose_features_overflow_exit_2_nothing_written_no_record(
    world, tmp_path: Path
) -> None:
    """Before: exit 0, PSNR min 2.85 dB, L-inf 255, nearly black images and a signed record."""
    ks, key = _fresh_key(tmp_path)
    marker = make_broken_marker(tmp_path / "overflow.safetensors", "overflow")
    w = {**world, "ks": ks, "key": key, "marker": marker}
    out = tmp_path / "out"
    _one_error_line(run(*_args(w, out, "--json")), "features are not finite", "data-000000.tar")
    assert not out.exists()  # refused at load time, before --out was even created
    assert _mark_records(ks) == []


def test_marker_whose_gradients_vanish_reports_nothing_marked(world, tmp_path: Path) -> None:
    """Before: 'marked' counted selected images whose bytes were identical to the input."""
    ks, key = _fresh_key(tmp_path)
    marker = make_broken_marker(tmp_path / "dead.safetensors", "dead")
    w = {**world, "ks": ks, "key": key, "marker": marker}
    out = tmp_path / "out"
    res = run(*_args(w, out, "--json"))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["marked"] == 0 and doc["unchanged"] > 0 and doc["linf_max"] == 0
    assert all(r["marked"] == 0 for r in doc["shard_reports"])
    for src in sorted(world["in"].glob("*.tar")):
        assert (out / src.name).read_bytes() == src.read_bytes()  # byte-identical copies
    (rec,) = _mark_records(ks)
    assert rec["images"] == 0  # `keys list` shows the record's marked count
    shown = json.loads(run("keys", "show", rec["address"], "--keystore", str(ks), "--json").stdout)
    assert shown["record"]["counts"]["unchanged"] == doc["unchanged"]
    assert "could not be marked" in run(*_args(w, tmp_path / "out2")).stderr  # said to people


def test_run_state_is_private_and_out_holds_only_shards(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(*_args(world, out, "--json"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "data-000000.tar", "data-000001.tar"]
    assert (out / LOCK).stat().st_size == 0
    runs = [p for p in (world["ks"] / "runs").iterdir() if (p / "state.json").is_file()]
    state = next(p / "state.json" for p in runs if find_state(world["ks"], out) is not None)
    assert state.stat().st_mode & 0o777 == 0o600 and state.parent.stat().st_mode & 0o777 == 0o700
    # a manifest an earlier version left in --out (it lists the marked samples) is refused
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "radmark-manifest.json").write_text('{"config": {}, "shards": {}}')
    _one_error_line(run(*_args(world, legacy, "--json")), "radmark-manifest.json", "never publish")


def _peak_rss_mb(args: list[str]) -> tuple[int, str, float]:
    """Exit code, stderr and peak RSS (MB) of ``python -m radmark ARGS`` in a fresh process."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "radmark", *args],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    rc, kb = proc.stdout.split()
    return int(rc), proc.stderr, int(kb) / 1024


def _zeros_tar_gz(path: Path, members: int, size: int) -> Path:
    """A tar.gz of ``members`` all-zero members of ``size`` bytes, streamed (never in memory)."""
    import gzip

    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.n = n

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # noqa: ANN001
            k = min(len(b), self.n)
            b[:k] = bytes(k)
            self.n -= k
            return k

    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        gzip.open(path, "wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tf,
    ):
        for i in range(members):
            info = tarfile.TarInfo(f"{i:08d}.bin" if i else "00000000.png")
            info.size = size
            tf.addfile(info, Zeros(size))
    return path


@pytest.mark.slow
def test_hostile_sizes_exit_2_or_mark_in_bounded_memory(world, tmp_path: Path) -> None:
    """A 20 KB tar holding one 4000x4000 PNG, and a .tar.gz of three 400 MB zero members.
    Before: 2.8 GB RSS and a 1.2 GB output, or MemoryError (exit 1). After: exit 2 with one line
    (or, with --on-error skip, the image copied unmarked), in about the memory of a tiny run."""
    buf = io.BytesIO()
    from PIL import Image

    Image.new("L", (4000, 4000)).save(buf, format="PNG", optimize=True)
    big = _tar(tmp_path / "big" / "big-000000.tar", [("00000001.png", buf.getvalue()),
                                                     ("00000001.cls", b"1")])  # fmt: skip
    assert big.stat().st_size < 40_000
    zeros = _zeros_tar_gz(tmp_path / "zeros" / "zeros-000000.tar.gz", 3, 400 << 20)
    rc, err, base = _peak_rss_mb(_args(world, tmp_path / "base", "--json"))
    assert rc == 0, err
    rc, err, peak = _peak_rss_mb(_args(world, tmp_path / "o1", "--json", shards=[str(big)]))
    assert rc == 2 and "4000x4000" in err and "--max-batch-pixels" in err, err
    assert peak < base + 200, (peak, base)
    rc, err, peak = _peak_rss_mb(
        _args(world, tmp_path / "o2", "--json", "--on-error", "skip", shards=[str(big)])
    )
    assert rc == 0, err
    assert peak < base + 200, (peak, base)
    rc, err, peak = _peak_rss_mb(_args(world, tmp_path / "o3", "--json", shards=[str(zeros)]))
    assert rc == 2 and "too large" in err, err
    assert peak < base + 200, (peak, base)
    assert not (tmp_path / "o3").exists() or not list((tmp_path / "o3").glob("*.tar*"))


# issue #12: any input: tiny images, names that are not UTF-8, compressed shards, marker train


def test_tiny_images_are_copied_unmarked_and_counted(world, tmp_path: Path) -> None:
    """Images under 8 px on a side (MIN_MARK_SIDE) were a traceback; now copied and counted."""
    from radmark.data.images import encode_png
    from radmark.marking.views import MIN_MARK_SIDE

    good = _good_members(world)
    rng = np.random.default_rng(0)
    tiny = {
        f"t{side}": encode_png(rng.integers(0, 256, (side, side + 2, 1), dtype=np.uint8))
        for side in (1, 3, MIN_MARK_SIDE - 1)
    }
    members = list(good)
    for key, png in tiny.items():
        members += [(f"{key}.png", png), (f"{key}.cls", b"3")]
    shard = _tar(tmp_path / "in" / "tiny-000000.tar", members)
    out = tmp_path / "out"
    res = run(*_args(world, out, "--json", "--fraction", "1.0", shards=[str(shard)]))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["images"], doc["marked"], doc["skipped"]) == (4, 1, 3)
    copied = {s.key: s for s in iter_samples(str(out / "tiny-000000.tar"))}
    for key, png in tiny.items():
        assert copied[key].get("png") == png  # byte-identical
    assert copied["00000000"].get("png") != dict(good)["00000000.png"]  # the 28x28 one is marked


def test_a_tiny_image_first_does_not_decide_the_marker_check(world, tmp_path: Path) -> None:
    """A 5×5 image first in the first shard failed the whole run (exit 2, audit G1): the marker
    check at load used the first image's size. Now the check uses images the run marks; the tiny
    one is copied byte-identical and counted, the 28×28 images the key selects are marked."""
    from radmark.data.images import encode_png
    from radmark.keys.sealing import load_keyfile
    from radmark.marking.selection import is_selected

    tiny = encode_png(np.random.default_rng(0).integers(0, 256, (5, 5, 1), dtype=np.uint8))
    good = [s for s in iter_samples(str(world["in"] / "data-000000.tar"))]
    members = [("tiny.png", tiny), ("tiny.cls", b"3")]
    members += [(f"{s.key}.{e}", d) for s in good for e, d in s.members]
    shard = _tar(tmp_path / "in" / "tinyfirst-000000.tar", members)
    out = tmp_path / "out"
    res = run(*_args(world, out, "--json", shards=[str(shard)]))
    assert res.exit_code == 0, res.output
    key, _ = load_keyfile(world["key"], lambda: None)
    selected = {s.key for s in good if is_selected(key.selection_seed(), s.key, 0.5)}
    assert 0 < len(selected) < len(good)
    doc = json.loads(res.stdout)
    assert (doc["images"], doc["marked"], doc["skipped"]) == (17, len(selected), 1), doc
    written = {s.key: s.get("png") for s in iter_samples(str(out / shard.name))}
    assert written["tiny"] == tiny
    for s in good:
        assert (written[s.key] != s.get("png")) == (s.key in selected), s.key
    # the check at load still runs, on the 28×28 images: an overflowing marker is refused there
    broken = make_broken_marker(tmp_path / "overflow.safetensors", "overflow")
    args = _args(world, tmp_path / "out3", "--json", shards=[str(shard)])
    args[args.index("--marker") + 1] = str(broken)
    _one_error_line(run(*args), "features are not finite", "on the first images")
    # a shard of only tiny images: nothing to mark, every image copied and counted, exit 0
    only = _tar(tmp_path / "in2" / "tiny-000000.tar",
                [(f"t{i}.{e}", tiny if e == "png" else b"1") for i in range(3)
                 for e in ("png", "cls")])  # fmt: skip
    res = run(*_args(world, tmp_path / "out2", "--json", shards=[str(only)]))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["images"], doc["marked"], doc["skipped"]) == (3, 0, 3), doc
    assert (tmp_path / "out2" / only.name).read_bytes() == only.read_bytes()


def test_names_that_are_not_utf8_are_marked(world, tmp_path: Path) -> None:
    """A shard file and member names with Latin-1 bytes were a traceback; bytes are kept."""
    good = _good_members(world)
    shard = Path(os.fsdecode(os.fsencode(str(tmp_path / "in")) + b"/d\xe9ta.tar"))
    _tar(shard, [(f"caf\udce9{i}.{n.split('.', 1)[1]}", d) for i in range(3) for n, d in good])
    out = tmp_path / "out"
    res = run(*_args(world, out, "--json", shards=[str(shard.parent)]))
    assert res.exit_code == 0, res.output
    assert os.listdir(os.fsencode(str(out))).count(b"d\xe9ta.tar") == 1
    keys = [os.fsencode(s.key) for s in iter_samples(str(out / shard.name))]
    assert keys == [b"caf\xe90", b"caf\xe91", b"caf\xe92"]
    record = run("keys", "show", json.loads(res.stdout)["record"], "--keystore", str(world["ks"]),
                 "--json")  # fmt: skip
    assert [s["name"] for s in json.loads(record.stdout)["record"]["shards"]] == ["d\\xe9ta.tar"]
    # a bad sample in such a shard: one printable line
    _tar(shard, [*[(f"caf\udce9.{n.split('.', 1)[1]}", d) for n, d in good[:1]]])
    _one_error_line(run(*_args(world, tmp_path / "o2", "--json", shards=[str(shard)])),
                    "d\\xe9ta.tar", "caf\\xe9")  # fmt: skip


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar.xz", ".tar.bz2"])
def test_compressed_shards_keep_their_compression(world, tmp_path: Path, suffix: str) -> None:
    from radmark.data.writer import write_dataset
    from tests.factories import fmnist

    images, labels = fmnist(20)
    write_dataset(images, labels, tmp_path / "in", samples_per_shard=10, suffix=suffix)
    magic = {".tar.gz": b"\x1f\x8b", ".tgz": b"\x1f\x8b", ".tar.xz": b"\xfd7zXZ",
             ".tar.bz2": b"BZh"}[suffix]  # fmt: skip
    outs = []
    for name in ("out", "again"):
        res = run(*_args(world, tmp_path / name, "--json", shards=[str(tmp_path / "in")]))
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["images"] == 20
        outs.append({k: v for k, v in sha256_tree(tmp_path / name).items() if k.endswith(suffix)})
    assert sorted(outs[0]) == [f"data-00000{j}{suffix}" for j in (0, 1)]
    assert outs[0] == outs[1]  # reproducible compressed bytes
    for name in outs[0]:
        out = tmp_path / "out" / name
        assert out.read_bytes().startswith(magic)
        assert len(list(iter_samples(str(out)))) == 10
    res = run(*_args(world, tmp_path / "out", "--resume", "--json", shards=[str(tmp_path / "in")]))
    assert res.exit_code == 0 and all(r["resumed"] for r in json.loads(res.stdout)["shard_reports"])


@pytest.mark.parametrize(
    ("opt", "value"),
    [
        ("--batch-size", "0"),
        ("--batch-size", "-1"),
        ("--epochs", "0"),
        ("--lr", "0"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--limit", "0"),
        ("--num-classes", "0"),
        ("--arch", "nope"),
    ],  # fmt: skip
)
def test_marker_train_options_are_checked_before_any_work(
    world, tmp_path: Path, opt: str, value: str
) -> None:
    """--batch-size 0 was a ZeroDivisionError (exit 1), --lr 0 trained nothing and exited 0."""
    out = tmp_path / "m.safetensors"
    res = run("marker", "train", str(world["in"]), "--out", str(out), "--arch", "smallcnn",
              "--epochs", "1", opt, value, "--json")  # fmt: skip
    _one_error_line(res, opt if opt != "--arch" else "nope")
    assert json.loads(res.stdout)["error"]["kind"] == "UsageError"
    assert not out.exists()


def test_marker_train_never_replaces_a_marker(world, tmp_path: Path) -> None:
    """Mark records bind a marker by its hash: replacing one silently would orphan them."""
    out = tmp_path / "m.safetensors"
    out.write_bytes(world["marker"].read_bytes())
    args = ["marker", "train", str(world["in"]), "--out", str(out), "--arch", "smallcnn",
            "--epochs", "1", "--json"]  # fmt: skip
    _one_error_line(run(*args), "already exists", "--force")
    assert out.read_bytes() == world["marker"].read_bytes()
    res = run(*args, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_marker_train_on_images_too_small_for_the_architecture(world, tmp_path: Path) -> None:
    from radmark.data.writer import write_dataset

    rng = np.random.default_rng(0)
    write_dataset(rng.integers(0, 256, (12, 5, 5), dtype=np.uint8), list(range(10)) + [0, 1],
                  tmp_path / "in")  # fmt: skip
    res = run("marker", "train", str(tmp_path / "in"), "--out", str(tmp_path / "m.safetensors"),
              "--arch", "smallcnn", "--epochs", "1", "--json")  # fmt: skip
    _one_error_line(res, "smallcnn cannot take 5x5 images")


def test_marker_train_never_writes_over_its_input_even_with_force(tmp_path: Path) -> None:
    """Issue #12 §6 (audit G2): ``marker train IN --out IN/data-000000.tar --force`` replaced a
    training shard with the marker; inputs are never written, whatever the spelling or URL."""
    shards = make_shards(tmp_path / "in", n=16, per_shard=16)
    shard = tmp_path / "in" / "data-000000.tar"
    before = shard.read_bytes()
    for spec, out in (
        (str(tmp_path / "in"), shard),
        (str(shard), tmp_path / "in" / ".." / "in" / "data-000000.tar"),
        (f"pipe:cat {shard}", shard),
    ):
        res = runner.invoke(app, ["marker", "train", spec, "--out", str(out), "--arch",
                                  "smallcnn", "--epochs", "1", "--force"])  # fmt: skip
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "one of this command's inputs" in lines[0], res.stderr
        assert shard.read_bytes() == before
    assert shards
