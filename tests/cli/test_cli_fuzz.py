"""Class-level CLI fuzz (issue #12): hostile files and bad arguments for every command.

A seeded generator (deterministic: the same cases on every run) combines one to three *bad
ingredients* (a garbage, truncated or empty tar, a non-image member, a missing or out-of-range
label, an image declaring 100000×100000 pixels, a tampered, too-open or symlinked key file, a wrong
passphrase, a pickle checkpoint that would write a file if it were ever unpickled, a symlinked or
world-readable keystore, a FIFO, a directory where a file is expected, a non-positive or NaN
number, an output that exists ...) with an otherwise valid invocation of ``keygen``, ``keys
list | show | export-public``, ``mark``, ``verify``, ``kit build`` or ``marker train``. Every
ingredient is invalid for the command it is given to, so every case must:

- exit 2 (never 0 or 1, which CI reads as a verdict; never 3, an internal error: these are all
  the user's inputs),
- print no traceback, exactly one line on stderr (``radmark: error: ...``), nothing on stdout, or
  under ``--json`` exactly one JSON error object on stdout,
- write nothing outside the case's output directory (the whole case tree is snapshotted before and
  after: contents, modes, links), and never execute the planted pickle.

:func:`test_valid_controls` runs each command's valid base invocation once, so an ingredient is
what makes a case fail. Commands run in-process through the console script's entry point
(``radmark.cli.main``), the same path as ``radmark`` in a shell, which keeps ~150 cases within a
minute or so; ``RADMARK_FUZZ_CASES`` and ``RADMARK_FUZZ_SEED`` change the count and the seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import stat
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.factories import fmnist, make_key, make_marker, make_shards

SEED = int(os.environ.get("RADMARK_FUZZ_SEED", "12"))
CASES = int(os.environ.get("RADMARK_FUZZ_CASES", "150"))
PASSPHRASE = "correct horse"


# --------------------------------------------------------------------------------------------
# running the real entry point in-process


@dataclass
class Outcome:
    code: int | str
    out: str
    err: str


def invoke(argv: list[str], env: dict[str, str] | None = None) -> Outcome:
    """``radmark ARGV`` as the console script runs it (``radmark.cli.main``), in this process."""
    from radmark.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    saved = sys.argv, sys.stdin
    os.environ.pop("RADMARK_PASSPHRASE", None)
    os.environ.update({"COLUMNS": "200", **(env or {})})
    sys.argv, sys.stdin = ["radmark", *argv], io.StringIO("")
    code: int | str
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = "returned without SystemExit"
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else f"SystemExit({exc.code!r})"
    except BaseException as exc:  # what would have been a traceback in a shell
        code = f"Traceback: uncaught {type(exc).__name__}: {exc}"
    finally:
        sys.argv, sys.stdin = saved
        os.environ.clear()
        os.environ.update(saved_env)
    return Outcome(code, out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------------------------
# the world every case starts from (copied per case) and the read-only models and probes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from radmark.canonical import canonical_json, sha256_hex
    from radmark.keys.sealing import load_keyfile, seal_secret
    from radmark.keys.store import Keystore
    from radmark.marking.kit import build_kit
    from radmark.marking.run import MarkOptions, mark_shards

    root = tmp_path_factory.mktemp("fuzz")
    ro, tpl = root / "ro", root / "template"
    make_marker(ro / "marker.safetensors")
    make_marker(ro / "suspect.safetensors", seed=1)
    make_shards(ro / "probe", n=1300, per_shard=1300, offset=1500, with_json=False)
    make_shards(ro / "kitprobe", n=60, per_shard=60, offset=12, with_json=False)
    make_shards(tpl / "in", n=12, per_shard=12)
    fp = make_key(tpl / "ks", tpl / "owner.key")
    key, pub = load_keyfile(tpl / "owner.key", lambda: None)
    # an encrypted copy of the owner key file (for the wrong-passphrase ingredient)
    doc = seal_secret(key, pub.fingerprint, PASSPHRASE, scrypt_n=2**10)
    from radmark.keys.sealing import keyfile_bytes

    (tpl / "enc.key").write_bytes(keyfile_bytes(pub, doc))
    (tpl / "enc.key").chmod(0o600)
    (tpl / "out").mkdir(mode=0o700)
    # a mark record (for verify, kit build) and its kit (for verify --black-box)
    res = mark_shards([str(tpl / "in")], key=key, key_record=pub, keystore=tpl / "ks",
                      out_dir=root / "marked", marker_spec=str(ro / "marker.safetensors"),
                      options=MarkOptions(fraction=0.5, overrides={"steps": 1}))  # fmt: skip
    store = Keystore.open(tpl / "ks")
    build_kit(store=store, record=store.mark_record(res.record), key=key,
              probe=[str(ro / "kitprobe")], decoys=2, per_class=1)  # fmt: skip
    # hostile keystore material, kept aside and planted by ingredients
    extra = root / "extra"
    extra.mkdir()
    body = {k: v for k, v in store.mark_record(res.record).signed.items() if k != "signature"}
    del body["marker"]
    data = canonical_json(key.sign(body))  # a valid signature over a malformed body
    (extra / f"{sha256_hex(data)}.json").write_bytes(data)
    for name, change in (("n40", {"n": 2**40}), ("p20", {"p": 2**20}), ("n62", {"n": 2**62})):
        sealed = seal_secret(key, pub.fingerprint, PASSPHRASE, scrypt_n=2**10)
        sealed["encryption"] = {**sealed["encryption"], **change}
        data = canonical_json(sealed)
        (extra / name).mkdir()
        (extra / name / f"{pub.fingerprint}.{sha256_hex(data)}.secret").write_bytes(data)
    return {"root": root, "ro": ro, "tpl": tpl, "fp": fp, "record": res.record, "extra": extra}


# --------------------------------------------------------------------------------------------
# hostile files


def _tar(path: Path, members: list[tuple[str, bytes]], *, link: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo("00000099.png")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tf.addfile(info)
    return str(path)


def _png(side: int = 28, mode: str = "L") -> bytes:
    from PIL import Image

    img = Image.fromarray(fmnist(1)[0][0][:side, :side]).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _huge_png() -> bytes:
    """A valid PNG signature and IHDR declaring 100000×100000 pixels, and nothing else."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))  # fmt: skip


def _good_samples(n: int = 3) -> list[tuple[str, bytes]]:
    images, labels = fmnist(n)
    from radmark.data.images import encode_png

    out = []
    for i in range(n):
        out += [(f"{i:08d}.png", encode_png(images[i])), (f"{i:08d}.cls", str(labels[i]).encode())]
    return out


def _shard(w: Path, kind: str) -> str:
    """A bad shard (or shard path) of ``kind`` under ``w/bad``; returns the path or URL."""
    bad = w / "bad"
    bad.mkdir(exist_ok=True)
    good = _good_samples()
    p = bad / f"{kind}.tar"
    if kind == "garbage":
        p.write_bytes(os.urandom(3000))
    elif kind == "empty-file":
        p.write_bytes(b"")
    elif kind == "end-blocks-only":
        p.write_bytes(b"\0" * 10240)
    elif kind == "truncated":
        data = Path(_tar(p, good)).read_bytes()
        p.write_bytes(data[: len(data) // 2 + 7])
    elif kind == "gzip-garbage":
        p = bad / "gz.tar.gz"
        p.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(500))
    elif kind == "non-image-member":
        _tar(p, [*good, ("00000009.txt", b"hello"), ("00000009.cls", b"1")])
    elif kind == "missing-label":
        _tar(p, [*good, ("00000009.png", _png())])
    elif kind == "label-out-of-range":
        _tar(p, [*good, ("00000009.png", _png()), ("00000009.cls", b"99")])
    elif kind == "label-not-a-number":
        _tar(p, [*good, ("00000009.png", _png()), ("00000009.cls", b"cat")])
    elif kind == "huge-declared-image":
        _tar(p, [*good, ("00000009.png", _huge_png()), ("00000009.cls", b"1")])
    elif kind == "undecodable-image":
        _tar(p, [*good, ("00000009.png", b"\x89PNG\r\n\x1a\n garbage"), ("00000009.cls", b"1")])
    elif kind == "rgba-image":
        _tar(p, [*good, ("00000009.png", _png(mode="RGBA")), ("00000009.cls", b"1")])
    elif kind == "two-images":
        _tar(p, [*good, ("00000009.png", _png()), ("00000009.jpg", _png()),
                 ("00000009.cls", b"1")])  # fmt: skip
    elif kind == "symlink-member":
        _tar(p, good, link="/etc/passwd")
    elif kind == "dotdot-member":
        _tar(p, [*good, ("../00000009.png", _png()), ("../00000009.cls", b"1")])
    elif kind == "duplicate-key":
        _tar(p, [*good, *good[:2]])
    elif kind == "mixed-sizes":
        _tar(p, [*good, ("00000009.png", _png(20)), ("00000009.cls", b"1")])
    elif kind == "tiny-images":
        _tar(p, [(f"{i:08d}.{e}", _png(5) if e == "png" else b"1") for i in range(4)
                 for e in ("png", "cls")])  # fmt: skip
    elif kind == "directory-named-tar":
        p.mkdir()
    elif kind == "empty-directory":
        p = bad / "nothing-here"
        p.mkdir()
    elif kind == "missing":
        p = bad / "missing.tar"
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "symlink-loop":
        p.symlink_to(p.name)
    elif kind == "device":
        p.symlink_to("/dev/zero")
    elif kind == "pipe-fails":
        return f"pipe:false {bad}/x.tar"
    elif kind == "pipe-missing-file":
        return f"pipe:cat {bad}/missing.tar"
    else:  # pragma: no cover
        raise AssertionError(kind)
    return str(p)


SHARD_KINDS_ANY = [
    "garbage", "empty-file", "end-blocks-only", "truncated", "gzip-garbage", "non-image-member",
    "huge-declared-image", "undecodable-image", "rgba-image", "two-images", "symlink-member",
    "dotdot-member", "duplicate-key", "directory-named-tar", "empty-directory", "missing", "fifo",
    "symlink-loop", "device", "pipe-fails", "pipe-missing-file",
]  # fmt: skip
#: Bad for what needs labels (mark, marker train, kit build), not for an unlabelled probe.
SHARD_KINDS_LABELLED = ["missing-label", "label-out-of-range", "label-not-a-number"]
#: Bad where every image must have one size the model takes (probes, training), not for mark.
SHARD_KINDS_ONE_SIZE = ["mixed-sizes", "tiny-images"]


class _Payload:
    """Unpickling this would create the file: a stand-in for arbitrary code execution."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> Any:
        return (open, (str(self.flag), "w"))


def _model(w: Path, world: dict[str, Any], kind: str) -> str:
    """A bad model file of ``kind`` under ``w/bad``."""
    import torch
    from safetensors.torch import save_file

    from radmark.models import build_model, save_model

    bad = w / "bad"
    bad.mkdir(exist_ok=True)
    marker = world["ro"] / "marker.safetensors"
    p = bad / f"{kind}.safetensors"
    if kind == "pickle":
        p = bad / "evil.pt"
        state: dict[str, Any] = dict(build_model("smallcnn", 10, in_chans=1).state_dict())
        state["payload"] = _Payload(w / "PWNED")
        torch.save(state, p)
    elif kind == "garbage":
        p.write_bytes(os.urandom(2000))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        data = marker.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "huge-header":
        p.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    elif kind == "nan-weights":
        st = {k: v.clone() for k, v in build_model("smallcnn", 10, in_chans=1).state_dict().items()}
        st["features.0.weight"][0, 0, 0, 0] = float("nan")
        save_file(st, str(p), metadata={"radmark.arch": "smallcnn", "radmark.num_classes": "10",
                                        "radmark.in_chans": "1"})  # fmt: skip
    elif kind == "five-classes":
        save_model(build_model("smallcnn", 5, in_chans=1), p, arch="smallcnn", num_classes=5,
                   mean=(0.5,), std=(0.25,))  # fmt: skip
    elif kind == "wrong-arch-metadata":
        st = build_model("smallcnn", 10, in_chans=1).state_dict()
        save_file({k: v.contiguous() for k, v in st.items()}, str(p),
                  metadata={"radmark.arch": "resnet18", "radmark.num_classes": "10"})  # fmt: skip
    elif kind == "directory":
        p.mkdir()
    elif kind == "missing":
        pass
    else:  # pragma: no cover
        raise AssertionError(kind)
    return str(p)


MODEL_KINDS = ["pickle", "garbage", "empty", "truncated", "huge-header", "nan-weights",
               "wrong-arch-metadata", "directory", "missing"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# ingredients: each replaces one slot of a valid invocation with something bad for it


@dataclass
class Case:
    w: Path
    world: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ingredient:
    slot: str  # the part of the valid invocation it replaces (or an option the base lacks)
    label: str
    make: Callable[[Case], list[str]]
    also: tuple[str, ...] = ()  # slots it drops from the base (it gives them itself)

    @property
    def slots(self) -> set[str]:
        return {self.slot, *self.also}


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] = ord("A") if data[i] != ord("A") else ord("B")
    path.write_bytes(bytes(data))


def _first_object(ks: Path) -> Path:
    return sorted((ks / "objects").glob("*/*.json"))[0]


def _keystore_ingredients() -> list[Ingredient]:
    def missing(c: Case) -> list[str]:
        return ["--keystore", str(c.w / "no-such-keystore")]

    def a_file(c: Case) -> list[str]:
        (c.w / "ks-file").write_bytes(b"not a keystore")
        return ["--keystore", str(c.w / "ks-file")]

    def root_open(c: Case) -> list[str]:
        (c.w / "ks").chmod(0o755)
        return ["--keystore", str(c.w / "ks")]

    def secrets_open(c: Case) -> list[str]:
        (c.w / "ks" / "secrets").chmod(0o755)
        return ["--keystore", str(c.w / "ks")]

    def symlinked_root(c: Case) -> list[str]:
        (c.w / "ks-link").symlink_to(c.w / "ks")
        return ["--keystore", str(c.w / "ks-link")]

    def symlinked_subdir(c: Case) -> list[str]:
        sub = _first_object(c.w / "ks").parent
        real = c.w / "elsewhere"
        shutil.move(str(sub), real)
        sub.symlink_to(real)
        return ["--keystore", str(c.w / "ks")]

    def tampered_object(c: Case) -> list[str]:
        _flip_byte(_first_object(c.w / "ks"))
        return ["--keystore", str(c.w / "ks")]

    def malformed_signed_record(c: Case) -> list[str]:
        src = next(p for p in c.world["extra"].glob("*.json"))
        dst = c.w / "ks" / "objects" / src.name[:2]
        dst.mkdir(exist_ok=True)
        shutil.copy(src, dst / src.name)
        return ["--keystore", str(c.w / "ks")]

    def unexpected_file(c: Case) -> list[str]:
        (_first_object(c.w / "ks").parent / "notes.txt").write_text("hello")
        return ["--keystore", str(c.w / "ks")]

    def secret_open(c: Case) -> list[str]:
        next((c.w / "ks" / "secrets").iterdir()).chmod(0o644)
        return ["--keystore", str(c.w / "ks")]

    return [
        Ingredient("keystore", "keystore: missing", missing),
        Ingredient("keystore", "keystore: a file", a_file),
        Ingredient("keystore", "keystore: root readable by others", root_open),
        Ingredient("keystore", "keystore: secrets/ readable by others", secrets_open),
        Ingredient("keystore", "keystore: symlinked root", symlinked_root),
        Ingredient("keystore", "keystore: symlinked objects/xx", symlinked_subdir),
        Ingredient("keystore", "keystore: tampered object", tampered_object),
        Ingredient("keystore", "keystore: signed record, malformed body", malformed_signed_record),
        Ingredient("keystore", "keystore: unexpected file", unexpected_file),
        Ingredient("keystore", "keystore: secret file 0644", secret_open),
    ]


def _edited_scrypt(name: str) -> Ingredient:
    """The key's secret replaced by an encrypted one whose scrypt parameters were edited (and the
    file renamed to its new hash): bounded before use, never a MemoryError or a hang."""

    def make(c: Case) -> list[str]:
        secrets = c.w / "ks" / "secrets"
        for p in secrets.iterdir():
            p.unlink()
        src = next((c.world["extra"] / name).iterdir())
        shutil.copy(src, secrets / src.name)
        (secrets / src.name).chmod(0o600)
        c.env["RADMARK_PASSPHRASE"] = PASSPHRASE
        return []

    return Ingredient("keystore", f"secret: scrypt {name} edited", make)


def _key_ingredients() -> list[Ingredient]:
    def keyfile(kind: str) -> Callable[[Case], list[str]]:
        def make(c: Case) -> list[str]:
            p = c.w / f"{kind}.key"
            if kind == "tampered":
                shutil.copy(c.w / "owner.key", p)
                _flip_byte(p)
            elif kind == "too-open":
                shutil.copy(c.w / "owner.key", p)
                p.chmod(0o644)
            elif kind == "directory":
                p.mkdir()
            elif kind == "symlink":
                p.symlink_to(c.w / "owner.key")
            elif kind == "empty":
                p.write_bytes(b"")
                p.chmod(0o600)
            elif kind == "wrong-passphrase":
                p = c.w / "enc.key"
                c.env["RADMARK_PASSPHRASE"] = "not the passphrase"
            elif kind == "no-passphrase":
                p = c.w / "enc.key"
            elif kind == "public-record-only":
                rec = next(
                    o for o in (c.world["tpl"] / "ks" / "objects").glob("*/*.json")
                    if json.loads(o.read_bytes())["type"] == "radmark.key"
                )  # fmt: skip
                shutil.copy(rec, p)
                p.chmod(0o600)
            elif kind == "missing":
                pass
            return ["--key", str(p)]

        return make

    kinds = ["tampered", "too-open", "directory", "symlink", "empty", "wrong-passphrase",
             "no-passphrase", "public-record-only", "missing"]  # fmt: skip
    out = [Ingredient("key", f"key file: {k}", keyfile(k)) for k in kinds]
    out.append(Ingredient("key", "key: not hex", lambda c: ["--key", "zz"]))
    out.append(Ingredient("key", "key: unknown fingerprint", lambda c: ["--key", "abcdef0123"]))
    return out


def _opt(slot: str, *values: str) -> list[Ingredient]:
    return [Ingredient(slot, f"{slot} {v}", lambda c, v=v: [slot, v]) for v in values]


def _out_exists(slot: str) -> list[Ingredient]:
    """An output that exists outside the output directory: it must survive untouched."""
    return [
        Ingredient(slot, f"{slot} = the owner key file", lambda c: [slot, str(c.w / "owner.key")]),
        Ingredient(slot, f"{slot} = a directory", lambda c: [slot, str(c.w / "in")]),
        Ingredient(slot, f"{slot} in a missing dir", lambda c: [slot, str(c.w / "no/dir/x.out")]),
    ]


def _shard_slot(slot: str, kinds: list[str], flag: str | None = None) -> list[Ingredient]:
    def make(kind: str) -> Callable[[Case], list[str]]:
        return lambda c: ([flag] if flag else []) + [_shard(c.w, kind)]

    return [Ingredient(slot, f"{slot}: {k}", make(k)) for k in kinds]


def _model_slot(slot: str, flag: str | None, kinds: list[str]) -> list[Ingredient]:
    def make(kind: str) -> Callable[[Case], list[str]]:
        return lambda c: ([flag] if flag else []) + [_model(c.w, c.world, kind)]

    return [Ingredient(slot, f"{slot}: {k}", make(k)) for k in kinds]


# Each command: its valid invocation as (slot, argv fragment) pairs, and its bad ingredients.
Base = Callable[[Case], list[tuple[str, list[str]]]]


def _ro(c: Case, name: str) -> str:
    return str(c.world["ro"] / name)


COMMANDS: dict[str, tuple[Base, list[Ingredient]]] = {
    "keygen": (
        lambda c: [
            ("cmd", ["keygen"]),
            ("keystore", ["--keystore", str(c.w / "ks")]),
            ("passphrase", ["--no-passphrase"]),
        ],  # fmt: skip
        [i for i in _keystore_ingredients() if i.label != "keystore: missing"]
        + _out_exists("--out")
        + [Ingredient("passphrase", "--passphrase without one", lambda c: ["--passphrase"])],
    ),
    "keys list": (
        lambda c: [("cmd", ["keys", "list"]), ("keystore", ["--keystore", str(c.w / "ks")])],
        _keystore_ingredients(),
    ),
    "keys show": (
        lambda c: [
            ("cmd", ["keys", "show"]),
            ("ref", [c.world["fp"][:20]]),
            ("keystore", ["--keystore", str(c.w / "ks")]),
        ],  # fmt: skip
        _keystore_ingredients()
        + [
            Ingredient("ref", "ref: not hex", lambda c: ["zz"]),
            Ingredient("ref", "ref: unknown", lambda c: ["abcdef0123"]),
        ],  # fmt: skip
    ),
    "keys export-public": (
        lambda c: [
            ("cmd", ["keys", "export-public"]),
            ("ref", [c.world["fp"]]),
            ("keystore", ["--keystore", str(c.w / "ks")]),
            ("--out", ["--out", str(c.w / "out" / "public.json")]),
        ],  # fmt: skip
        _keystore_ingredients()
        + _out_exists("--out")
        + [Ingredient("ref", "ref: unknown", lambda c: ["abcdef0123"])],
    ),
    "mark": (
        lambda c: [
            ("cmd", ["mark"]),
            ("shards", [str(c.w / "in")]),
            ("key", ["--key", c.world["fp"]]),
            ("keystore", ["--keystore", str(c.w / "ks")]),
            ("--out", ["--out", str(c.w / "out" / "marked")]),
            ("marker", ["--marker", _ro(c, "marker.safetensors")]),
            ("steps", ["--steps", "1"]),
        ],  # fmt: skip
        _shard_slot("shards", SHARD_KINDS_ANY + SHARD_KINDS_LABELLED)
        + _key_ingredients()
        + _keystore_ingredients()
        + [_edited_scrypt(n) for n in ("n40", "p20", "n62")]
        + _model_slot("marker", "--marker", [*MODEL_KINDS, "five-classes"])
        + _opt("--fraction", "0", "-1", "1.5", "nan", "inf", "abc")
        + _opt("--batch-size", "0", "-3")
        + _opt("--steps", "0", "-2")
        + _opt("--radius", "0", "-1", "nan", "1e9")
        + _opt("--psnr-floor", "nan", "inf")
        + _opt("--num-classes", "0", "-1")
        + _opt("--device", "tpu")
        + _opt("--method", "nope")
        + _opt("--preset", "nope")
        + _opt("--on-error", "maybe")
        + _opt("--label-field", "nope")
        + _opt("--bogus-option", "1")
        + [
            Ingredient("--out", "--out = a file", lambda c: ["--out", str(c.w / "owner.key")]),
            Ingredient(
                "--out",
                "--out = the input directory",
                lambda c: [str(c.w / "in"), "--out", str(c.w / "in"), "--resume"],
                also=("shards",),
            ),
            Ingredient(
                "shards",
                "pipe:cat input, --out = its directory",
                lambda c: [
                    f"pipe:cat {c.w / 'in' / 'data-000000.tar'}",
                    "--out",
                    str(c.w / "in"),
                    "--resume",
                ],
                also=("--out",),
            ),  # fmt: skip
            Ingredient(
                "kit",
                "--kit-decoys 0",
                lambda c: ["--kit-probe", _ro(c, "kitprobe"), "--kit-decoys", "0"],
            ),  # fmt: skip
            Ingredient(
                "kit", "--kit-probe missing", lambda c: ["--kit-probe", str(c.w / "nope")]
            ),  # fmt: skip
        ],
    ),
    "verify": (
        lambda c: [
            ("cmd", ["verify"]),
            ("model", [_ro(c, "suspect.safetensors")]),
            ("key", ["--key", c.world["fp"]]),
            ("keystore", ["--keystore", str(c.w / "ks")]),
            ("marker", ["--marker", _ro(c, "marker.safetensors")]),
            ("probe", ["--probe", _ro(c, "probe")]),
            ("pullback", ["--no-pullback"]),
        ],
        _shard_slot("probe", SHARD_KINDS_ANY + SHARD_KINDS_ONE_SIZE, "--probe")
        + _model_slot("model", None, [*MODEL_KINDS, "five-classes"])
        + _model_slot("marker", "--marker", MODEL_KINDS)
        + [i for i in _key_ingredients() if "no-passphrase" not in i.label]
        + _keystore_ingredients()
        + [_edited_scrypt(n) for n in ("n40", "p20", "n62")]
        + _opt("--alpha", "0", "1", "2", "-1", "nan")
        + _opt("--probe-limit", "0", "-1")
        + _opt("--expect", "maybe")
        + _opt("--device", "tpu")
        + _opt("--arch", "nope")
        + _opt("--head", "no.such.layer")
        + _out_exists("--plot")
        + [
            Ingredient(
                "pullback", "--pullback-limit 0", lambda c: ["--pullback", "--pullback-limit", "0"]
            ),  # fmt: skip
            Ingredient(
                "probe",
                "--black-box --plot without --probe",
                lambda c: ["--black-box", "--plot", str(c.w / "out" / "p.png")],
            ),
        ],
    ),
    "kit build": (
        lambda c: [
            ("cmd", ["kit", "build"]),
            ("ref", [c.world["record"]]),
            ("keystore", ["--keystore", str(c.w / "ks")]),
            ("probe", ["--probe", _ro(c, "kitprobe")]),
            # the world's record has its kit already: another one needs --force (issue #17)
            ("size", ["--decoys", "2", "--per-class", "1", "--force"]),
        ],  # fmt: skip
        _shard_slot("probe", SHARD_KINDS_ANY + SHARD_KINDS_LABELLED, "--probe")
        + _keystore_ingredients()
        + [_edited_scrypt(n) for n in ("n40", "p20", "n62")]
        + [i for i in _key_ingredients() if "file" in i.label and "no-passphrase" not in i.label]
        + _model_slot("marker", "--marker", MODEL_KINDS)
        + _opt("--decoys", "0", "-1")
        + _opt("--per-class", "0", "-1", "1000")
        + _opt("--batch-size", "0")
        + _opt("--device", "tpu")
        + [
            Ingredient("ref", "record: unknown", lambda c: ["abcdef0123"]),
            Ingredient("ref", "record: a key, not a record", lambda c: [c.world["fp"]]),
        ],  # fmt: skip
    ),
    "marker train": (
        lambda c: [
            ("cmd", ["marker", "train"]),
            ("shards", [str(c.w / "in")]),
            ("--out", ["--out", str(c.w / "out" / "m.safetensors")]),
            ("arch", ["--arch", "smallcnn"]),
            ("epochs", ["--epochs", "1"]),
        ],  # fmt: skip
        # (without --num-classes a label of 99 only means 100 classes: not bad for training)
        _shard_slot(
            "shards",
            [*SHARD_KINDS_ANY, "missing-label", "label-not-a-number", *SHARD_KINDS_ONE_SIZE],
        )  # fmt: skip
        + _out_exists("--out")
        + _opt("--epochs", "0", "-1")
        + _opt("--batch-size", "0", "-5")
        + _opt("--lr", "0", "-1", "nan", "inf")
        + _opt("--limit", "0", "-1")
        + _opt("--num-classes", "0", "-1", "3")
        + _opt("--arch", "nope")
        + _opt("--label-field", "nope")
        + _opt("--device", "tpu"),
    ),
}


def build_case(
    rng: random.Random, index: int, root: Path
) -> tuple[str, list[Ingredient], bool, Path]:
    """Case ``index``: a command, 1-3 bad ingredients in distinct slots, and its argv."""
    command = rng.choice(sorted(COMMANDS))
    base, ingredients = COMMANDS[command]
    k = rng.choice((1, 1, 1, 2, 2, 3))
    chosen: list[Ingredient] = []
    for ing in rng.sample(ingredients, len(ingredients)):
        if len(chosen) < k and all(not ing.slots & c.slots for c in chosen):
            chosen.append(ing)
    json_out = rng.random() < 0.5
    w = root / f"case{index:03d}"
    return command, chosen, json_out, w


def _prepare(world: dict[str, Any], w: Path) -> Case:
    shutil.copytree(world["tpl"], w, symlinks=True)
    # the default keystore (no --keystore) is inside the snapshotted tree, and not there
    return Case(w=w, world=world, env={"RADMARK_KEYSTORE": str(w / "default-keystore")})


def _argv(case: Case, command: str, chosen: list[Ingredient], json_out: bool) -> list[str]:
    base, _ = COMMANDS[command]
    slots = dict(base(case))
    replaced = {ing.slot: ing.make(case) for ing in chosen}
    for ing in chosen:
        replaced.update({s: [] for s in ing.also})
    argv: list[str] = []
    for slot, frag in slots.items():
        argv += replaced.pop(slot, frag)
    for frag in replaced.values():  # options the base does not give
        argv += frag
    return argv + (["--json"] if json_out else [])


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (except ``skip``): type, mode, link target or content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                detail: Any = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                detail = None
            out[str(p.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), detail)
    return out


def check_failure(res: Outcome, json_out: bool) -> list[str]:
    """What is wrong with a failing run's output, as a list of problems (empty = fine)."""
    problems = []
    if res.code != 2:
        problems.append(f"exit {res.code!r}, expected 2")
    if "Traceback" in res.out + res.err:
        problems.append("a traceback was printed")
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    if len(lines) != 1 or not lines[0].startswith("radmark: error: "):
        problems.append(f"stderr is not one 'radmark: error:' line: {lines[-3:]!r}")
    if json_out:
        try:
            doc = json.loads(res.out)
            if set(doc) != {"schema_version", "error"} or set(doc["error"]) != {"kind", "message"}:
                problems.append(f"not a JSON error object: {doc!r}")
        except ValueError:
            problems.append(f"stdout is not exactly one JSON object: {res.out[:200]!r}")
    elif res.out:
        problems.append(f"stdout not empty on failure: {res.out[:200]!r}")
    return problems


# --------------------------------------------------------------------------------------------
# the tests


def test_valid_controls(world: dict[str, Any], tmp_path: Path) -> None:
    """Each command's base invocation is valid: the ingredients are what makes cases fail."""
    for i, command in enumerate(sorted(COMMANDS)):
        case = _prepare(world, tmp_path / f"control{i}")
        argv = _argv(case, command, [], json_out=True)
        if command == "keygen":  # the new key goes into the output directory, not the world
            argv[argv.index("--keystore") + 1] = str(case.w / "out" / "new-ks")
        res = invoke(argv, case.env)
        assert res.code in ((0, 1) if command == "verify" else (0,)), (command, res)
        assert "error" not in json.loads(res.out), (command, res.out)


def test_cli_fuzz(world: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    failures: list[str] = []
    ro_before = snapshot(world["ro"])
    for index in range(CASES):
        command, chosen, json_out, w = build_case(rng, index, tmp_path)
        case = _prepare(world, w)
        argv = _argv(case, command, chosen, json_out)
        before = snapshot(w, skip=w / "out")
        res = invoke(argv, case.env)
        problems = check_failure(res, json_out)
        after = snapshot(w, skip=w / "out")
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            problems.append(f"wrote outside the output directory: {changed[:5]}")
        if (w / "PWNED").exists():
            problems.append("the pickle was unpickled")
        if problems:
            labels = ", ".join(i.label for i in chosen)
            failures.append(
                f"case {index} [{command}: {labels}] {' '.join(argv)}\n    "
                + "\n    ".join(problems)
                + f"\n    stderr: {res.err[-300:]!r}"
            )
        else:
            shutil.rmtree(w, ignore_errors=True)
    assert snapshot(world["ro"]) == ro_before
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures)


def test_every_ingredient_is_drawn() -> None:
    """The seeded cases cover most of each command's ingredients (the generator is not stuck)."""
    rng = random.Random(SEED)
    seen: dict[str, set[str]] = {c: set() for c in COMMANDS}
    for index in range(CASES):
        command, chosen, _json, _w = build_case(rng, index, Path("/nonexistent"))
        seen[command] |= {i.label for i in chosen}
    for command, (_base, ingredients) in COMMANDS.items():
        assert len(seen[command]) >= min(len(ingredients), CASES // 40), command
