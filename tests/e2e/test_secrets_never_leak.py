"""Secrets never appear in any output: a full keygen → mark → verify → keys run, every stdout,
stderr and every file written outside ``secrets/`` and the owner key file, grepped for the
secret, its derived seeds, the signing key and the carriers (raw bytes and printed values)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from radmark.keys.carriers import derive_carriers
from radmark.keys.sealing import load_keyfile
from radmark.models import load_model
from tests.factories import make_key, make_marker, make_shards


def _needles(key_file: Path, marker: Path) -> list[bytes]:
    key, _ = load_keyfile(key_file, lambda: None)
    m = load_model(str(marker))
    carriers = derive_carriers(key.carrier_seed(), m.dim, 10, f"{m.name}@sha256:{m.sha256}")
    raw_sk = key.signing_key().private_bytes_raw()
    out: list[bytes] = []
    seeds = (key.carrier_seed(), key.selection_seed(), key.decoy_seed(), key.kit_slot_seed(),
             key.selection_digest_key())  # fmt: skip
    for blob in (key.secret_bytes(), *seeds, raw_sk):
        out += [blob, blob.hex().encode(), base64.b64encode(blob), blob[:12]]
    out.append(np.ascontiguousarray(carriers, "<f4").tobytes()[:64])
    for v in carriers[:3, :3].ravel():  # values as a report or JSON would print them
        out += [repr(float(v)).encode(), f"{v:.6f}".encode()]
    return [n for n in out if len(n) >= 8]


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "radmark", *args], capture_output=True, env=env, timeout=600
    )


def test_full_run_outputs_contain_no_secret(tmp_path: Path) -> None:
    ks, key_file = tmp_path / "ks", tmp_path / "owner.key"
    # pinned: a 6-digit needle matches a printed cosine of a random key about one run in 1000
    fp = make_key(ks, key_file, pinned="secrets-never-leak")
    marker = make_marker(tmp_path / "marker.safetensors")
    make_shards(tmp_path / "in", n=32, per_shard=16)
    make_shards(tmp_path / "probe", n=160, per_shard=80, offset=1000)
    env = {**os.environ, "COLUMNS": "200", "RADMARK_KEYSTORE": str(ks)}
    outputs: list[bytes] = []
    steps = [
        (
            "mark",
            str(tmp_path / "in"),
            "--key",
            str(key_file),
            "--out",
            str(tmp_path / "out"),
            "--marker",
            str(marker),
            "--fraction",
            "0.5",
            "--steps",
            "2",
        ),
        (
            "mark",
            str(tmp_path / "in"),
            "--key",
            fp,
            "--out",
            str(tmp_path / "out2"),
            "--marker",
            str(marker),
            "--fraction",
            "0.5",
            "--steps",
            "2",
            "--json",
        ),
        ("verify", str(marker), "--probe", str(tmp_path / "probe"), "--key", str(key_file)),
        (
            "verify",
            str(marker),
            "--probe",
            str(tmp_path / "probe"),
            "--json",
            "--plot",
            str(tmp_path / "plot.png"),
        ),
        ("keys", "list"),
        ("keys", "list", "--json"),
        ("keys", "show", fp),
        ("keys", "export-public", fp),
        ("verify", str(marker), "--probe", str(tmp_path / "probe"), "--key", "ffff"),  # an error
    ]
    for args in steps:
        res = _run(*args, env=env)
        assert res.returncode in (0, 1, 2), res.stderr
        assert b"Traceback" not in res.stderr, res.stderr.decode()
        outputs += [res.stdout, res.stderr]
    # the black-box test: a verification kit, then verification with it
    marks = json.loads(_run("keys", "list", "--json", env=env).stdout)["entries"]
    record = next(e["address"] for e in marks if e["kind"] == "mark")
    for args in (
        ("kit", "build", record, "--probe", str(tmp_path / "probe"), "--decoys", "3",
         "--per-class", "2", "--json"),
        ("verify", str(marker), "--black-box", "--key", record, "--json"),
        ("verify", str(marker), "--black-box", "--key", record),
    ):  # fmt: skip
        res = _run(*args, env=env)
        assert res.returncode in (0, 1), res.stderr
        outputs += [res.stdout, res.stderr]
    written = [
        p for p in tmp_path.rglob("*") if p.is_file() and "secrets" not in p.parts and p != key_file
    ]
    assert any(p.name == "state.json" for p in written)  # the private run state is grepped too
    needles = _needles(key_file, marker)
    for blob in outputs + [p.read_bytes() for p in written]:
        for n in needles:
            assert n not in blob, f"secret material {n[:16]!r} leaked"
    # sanity: the needles would be found where they do live
    assert any(n in key_file.read_bytes() for n in needles)
    rec = json.loads(_run("keys", "list", "--json", env=env).stdout)["entries"]
    assert {e["kind"] for e in rec} == {"key", "mark", "kit"}
