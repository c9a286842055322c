"""Class-level CLI fuzz (issue #12): hostile files and bad arguments for every command.

Each command's *ingredients* replace one part of its otherwise valid invocation with something
hostile (a garbage, truncated or empty tar, a non-image member, a missing or out-of-range label,
an image declaring 100000×100000 pixels, a tampered, truncated, re-signed, too-open, huge or
symlinked key file, a wrong passphrase, a pickle checkpoint that would write a file if it were ever
unpickled, a symlinked or world-readable keystore, a FIFO, a directory where a file is expected, a
non-positive or NaN number, an output that exists ...) for ``keygen``, ``keys list | show |
export-public | import``, ``mark``, ``verify``, ``kit build`` and ``marker train`` (every command
the CLI registers: :func:`test_every_ingredient_is_exercised` checks that). Two passes:

- :func:`test_every_ingredient_alone`: every ingredient of every command on its own, once with
  ``--json`` and once without;
- :func:`test_cli_fuzz`: a seeded generator (the same cases on every run) combines one to three
  ingredients in distinct slots.

A few ingredients are *valid* (``Ingredient.valid``): inputs that look hostile but must work, such
as a shard starting with (or holding only) images under 8 px on a side, which ``mark`` copies
unmarked and counts. Alone they must succeed (exit 0, 0 or 1 for verify) and pass their own check;
combined with a bad ingredient the case is bad. Every bad case must:

- exit 2 (never 0 or 1, which CI reads as a verdict; never 3, an internal error: these are all
  the user's inputs),
- print no traceback, exactly one line on stderr (``radmark: error: ...``), nothing on stdout, or
  under ``--json`` exactly one JSON error object on stdout,
- write nothing outside the case's output directory (the whole case tree is snapshotted before and
  after: contents, modes, links), and never execute the planted pickle.

Valid cases may only add files to the keystore (a mark record, its run state) outside it.
:func:`test_valid_controls` runs each command's valid base invocation once, so an ingredient is
what makes a case fail. Commands run in-process through the console script's entry point
(``radmark.cli.main``), the same path as ``radmark`` in a shell, which keeps the ~880 cases (363
ingredients: 726 runs alone, 150 random) within 35-90 s on two shared cores (the module is
marked slow: ``make test`` runs it, ``make test-fast`` skips it); ``RADMARK_FUZZ_CASES`` and
``RADMARK_FUZZ_SEED`` change the random pass's count and seed.
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

pytestmark = pytest.mark.slow

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
    elif kind in ("tiny-first", "tiny-only"):  # valid for mark: copied unmarked and counted
        tiny = [(f"tiny{i:04d}.{e}", _png(5) if e == "png" else b"7") for i in range(TINY[kind])
                for e in ("png", "cls")]  # fmt: skip
        _tar(p, tiny + (good if kind == "tiny-first" else []))
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
#: Valid for mark (issue #12, audit G1): 5×5 images (labelled 7, so that a 5-class marker is
#: still refused) first in the shard or alone, copied unmarked and counted: how many of them.
TINY = {"tiny-first": 1, "tiny-only": 4}


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


#: What a valid ingredient checks of its successful run (case, outcome, json mode) -> problems.
Expect = Callable[[Case, Outcome, bool], list[str]]


@dataclass(frozen=True)
class Ingredient:
    slot: str  # the part of the valid invocation it replaces (or an option the base lacks)
    label: str
    make: Callable[[Case], list[str]]
    also: tuple[str, ...] = ()  # slots it drops from the base (it gives them itself)
    valid: bool = False  # hostile-looking but valid: alone, the command must succeed
    expect: Expect | None = None  # what a valid one checks of the successful run

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


def _rewrite_keyfile(src: Path, dst: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """``dst``: the key file ``src`` with its JSON edited by ``edit``, in canonical form, 0600."""
    from radmark.canonical import canonical_json

    doc = json.loads(src.read_bytes())
    edit(doc)
    dst.write_bytes(canonical_json(doc))
    dst.chmod(0o600)


def _import_ingredients() -> list[Ingredient]:
    """Hostile owner key files for ``keys import KEY_FILE`` (audit G4): each one must be refused
    before anything is written to the keystore."""
    from radmark.canonical import b64encode, canonical_json
    from radmark.keys.keypair import SecretKey

    def other() -> SecretKey:
        return SecretKey(hashlib.sha256(b"radmark fuzz: another key").digest())

    def resign(doc: dict[str, Any]) -> None:  # the owner's record, signed by another key
        body = {k: v for k, v in doc["public_record"].items() if k != "signature"}
        doc["public_record"] = other().sign(body)

    def flip_signature(doc: dict[str, Any]) -> None:
        v = doc["public_record"]["signature"]["value"]
        doc["public_record"]["signature"]["value"] = ("B" if v[0] == "A" else "A") + v[1:]

    edits: dict[str, Callable[[dict[str, Any]], Any]] = {
        "signature tampered": flip_signature,
        "record edited after signing": lambda d: d["public_record"].update(created="2000-01-01"),
        "record signed by another key": resign,
        "secret of another key": lambda d: d["secret"].update(
            secret=b64encode(other().secret_bytes())
        ),  # fmt: skip
        "secret for another fingerprint": lambda d: d["secret"].update(fingerprint="0" * 64),
        "unknown secret encryption": lambda d: d["secret"].update(encryption="rot13"),
        "no public record": lambda d: d.pop("public_record"),
    }
    enc_edits: dict[str, Callable[[dict[str, Any]], Any]] = {
        "scrypt n=2^40 edited": lambda d: d["secret"]["encryption"].update(n=2**40),
        "scrypt p=2^20 edited": lambda d: d["secret"]["encryption"].update(p=2**20),
        "ciphertext tampered": lambda d: d["secret"].update(ciphertext="A" * 64),
    }

    def keyfile(kind: str) -> Callable[[Case], list[str]]:
        def make(c: Case) -> list[str]:
            owner = c.w / "owner.key"
            p = c.w / "import.key"
            if kind in edits:
                _rewrite_keyfile(owner, p, edits[kind])
            elif kind in enc_edits:  # the encrypted key file, with the right passphrase
                _rewrite_keyfile(c.w / "enc.key", p, enc_edits[kind])
                c.env["RADMARK_PASSPHRASE"] = PASSPHRASE
            elif kind == "wrong passphrase":
                p = c.w / "enc.key"
                c.env["RADMARK_PASSPHRASE"] = "not the passphrase"
            elif kind == "encrypted, no passphrase":
                p = c.w / "enc.key"
            elif kind == "byte flipped":
                shutil.copy(owner, p)
                _flip_byte(p)
            elif kind == "truncated":
                p.write_bytes(owner.read_bytes()[: owner.stat().st_size // 2])
            elif kind == "re-indented (not canonical)":
                p.write_text(json.dumps(json.loads(owner.read_bytes()), indent=2))
            elif kind == "not JSON":
                p.write_bytes(b"\x00\xffnot a key\n" * 64)
            elif kind == "JSON, not a key file":
                p.write_bytes(canonical_json({"hello": "world"}))
            elif kind == "a public key record":
                p.write_bytes(canonical_json(json.loads(owner.read_bytes())["public_record"]))
            elif kind == "a keystore secret file":
                shutil.copy(next((c.w / "ks" / "secrets").iterdir()), p)
            elif kind == "huge (2 MiB)":
                p.write_bytes(owner.read_bytes() + b" " * (2 << 20))
            elif kind == "empty":
                p.write_bytes(b"")
            elif kind == "too open (0644)":
                shutil.copy(owner, p)
                p.chmod(0o644)
                return [str(p)]
            elif kind == "a directory":
                p.mkdir()
                return [str(p)]
            elif kind == "a symlink to the key file":
                p.symlink_to(owner)
                return [str(p)]
            elif kind == "a symlink to /dev/zero":
                p.symlink_to("/dev/zero")
                return [str(p)]
            elif kind == "a FIFO":
                os.mkfifo(p, 0o600)
                return [str(p)]
            elif kind == "missing":
                return [str(p)]
            else:  # pragma: no cover
                raise AssertionError(kind)
            p.chmod(0o600)
            return [str(p)]

        return make

    kinds = [*edits, *enc_edits, "wrong passphrase", "encrypted, no passphrase", "byte flipped",
             "truncated", "re-indented (not canonical)", "not JSON", "JSON, not a key file",
             "a public key record", "a keystore secret file", "huge (2 MiB)", "empty",
             "too open (0644)", "a directory", "a symlink to the key file",
             "a symlink to /dev/zero", "a FIFO", "missing"]  # fmt: skip
    return [Ingredient("keyfile", f"key file: {k}", keyfile(k)) for k in kinds]


def _expect_tiny_copied(kind: str) -> Expect:
    """``mark`` of a ``tiny-*`` shard: the tiny images copied byte-identical and counted."""

    def check(c: Case, res: Outcome, json_out: bool) -> list[str]:
        from radmark.data.sources import iter_samples

        src = c.w / "bad" / f"{kind}.tar"
        dst = c.w / "out" / "marked" / f"{kind}.tar"
        if not dst.is_file():
            return [f"no output shard {dst.name}"]
        tiny = {s.key: s.get("png") for s in iter_samples(str(src)) if s.key.startswith("tiny")}
        out = {s.key: s.get("png") for s in iter_samples(str(dst))}
        problems = [f"{k} not copied byte-identical" for k in tiny if out.get(k) != tiny[k]]
        if len(tiny) != TINY[kind]:
            problems.append(f"{len(tiny)} tiny images in the input, expected {TINY[kind]}")
        if json_out:
            doc = json.loads(res.out)
            want = (len(out), len(tiny))
            if (doc.get("images"), doc.get("skipped")) != want:
                problems.append(f"images, skipped = {doc.get('images')}, {doc.get('skipped')}, "
                                f"expected {want}")  # fmt: skip
        elif f"/{len(out)} images marked ({len(tiny)} skipped)" not in res.err:
            problems.append(f"the summary does not count {len(tiny)} of {len(out)} skipped")
        return problems

    return check


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
    "keys import": (
        lambda c: [
            ("cmd", ["keys", "import"]),
            ("keyfile", [str(c.w / "owner.key")]),
            # a new keystore, in the output directory; the keystore ingredients give the world's
            ("keystore", ["--keystore", str(c.w / "out" / "import-ks")]),
        ],  # fmt: skip
        _import_ingredients()
        + [i for i in _keystore_ingredients() if i.label != "keystore: missing"]
        + _opt("--bogus-option", "1"),
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
        + [
            Ingredient(
                "shards",
                f"shards: {k} (valid)",
                lambda c, k=k: [_shard(c.w, k)],
                valid=True,
                expect=_expect_tiny_copied(k),
            )
            for k in TINY
        ]
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


def check_success(res: Outcome, json_out: bool, command: str) -> list[str]:
    """What is wrong with a run that should have succeeded (empty = fine)."""
    problems = []
    if res.code not in ((0, 1) if command == "verify" else (0,)):
        problems.append(f"exit {res.code!r}, expected success")
    if "Traceback" in res.out + res.err:
        problems.append("a traceback was printed")
    if json_out:
        try:
            if "error" in json.loads(res.out):
                problems.append(f"a JSON error object: {res.out[:300]!r}")
        except ValueError:
            problems.append(f"stdout is not exactly one JSON object: {res.out[:200]!r}")
    return problems


def run_case(
    world: dict[str, Any], w: Path, command: str, chosen: list[Ingredient], json_out: bool
) -> str | None:
    """Run one case in a fresh copy of the world at ``w``; a report of what went wrong, or None.

    The case must succeed when every chosen ingredient is valid (and pass their checks), else
    fail as :func:`check_failure` says; either way nothing outside ``w/out`` may change, except
    that a successful run may add files to the keystore ``w/ks``.
    """
    case = _prepare(world, w)
    argv = _argv(case, command, chosen, json_out)
    before = snapshot(w, skip=w / "out")
    res = invoke(argv, case.env)
    valid = all(ing.valid for ing in chosen)
    if valid:
        problems = check_success(res, json_out, command)
        for ing in chosen:
            if ing.expect is not None and not problems:
                problems += ing.expect(case, res, json_out)
    else:
        problems = check_failure(res, json_out)
    after = snapshot(w, skip=w / "out")
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if valid:  # a successful run may add to the keystore (a mark record, its run state), only add
        changed = [k for k in changed if not (k.startswith("ks/") and k not in before)]
    if changed:
        problems.append(f"wrote outside the output directory: {changed[:5]}")
    if (w / "PWNED").exists():
        problems.append("the pickle was unpickled")
    if not problems:
        shutil.rmtree(w, ignore_errors=True)
        return None
    labels = ", ".join(i.label for i in chosen)
    mode = "--json" if json_out else "plain"
    return (f"[{command}: {labels}] ({mode}) {' '.join(argv)}\n    " + "\n    ".join(problems)
            + f"\n    stderr: {res.err[-300:]!r}")  # fmt: skip


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


def every_ingredient_plan() -> list[tuple[str, Ingredient, bool]]:
    """Every ingredient of every command alone, with and without ``--json`` (every command has
    it): (command, ingredient, json mode)."""
    return [(command, ing, json_out) for command in sorted(COMMANDS)
            for ing in COMMANDS[command][1] for json_out in (True, False)]  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=lambda c: c.replace(" ", "-"))
def test_every_ingredient_alone(world: dict[str, Any], tmp_path: Path, command: str) -> None:
    """Each ingredient on its own, with otherwise valid arguments (audit G4: the random pass
    drew fewer than half of them)."""
    ro_before = snapshot(world["ro"])
    cases = [(ing, j) for c, ing, j in every_ingredient_plan() if c == command]
    failures = []
    for n, (ing, json_out) in enumerate(cases):
        report = run_case(world, tmp_path / f"c{n:03d}", command, [ing], json_out)
        if report is not None:
            failures.append(report)
    assert snapshot(world["ro"]) == ro_before
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def test_cli_fuzz(world: dict[str, Any], tmp_path: Path) -> None:
    """Random combinations of one to three ingredients (seeded: the same cases on every run)."""
    rng = random.Random(SEED)
    failures: list[str] = []
    ro_before = snapshot(world["ro"])
    for index in range(CASES):
        command, chosen, json_out, w = build_case(rng, index, tmp_path)
        report = run_case(world, w, command, chosen, json_out)
        if report is not None:
            failures.append(f"case {index} {report}")
    assert snapshot(world["ro"]) == ro_before
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures)


def _registered_commands() -> set[str]:
    """Every leaf command of the ``radmark`` app, as typed (``keys import``)."""
    from typer.main import get_command

    from radmark.cli import app

    found: set[str] = set()

    def walk(cmd: Any, prefix: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, (*prefix, name))
        else:
            found.add(" ".join(prefix))

    walk(get_command(app), ())
    return found


def test_every_ingredient_is_exercised() -> None:
    """Every command the CLI registers is fuzzed; every ingredient runs alone, once with --json and
    once without; the random pass draws every command, both modes, and combinations too."""
    assert set(COMMANDS) == _registered_commands()
    plan = every_ingredient_plan()
    for command, (_base, ingredients) in COMMANDS.items():
        labels = [i.label for i in ingredients]
        assert len(set(labels)) == len(labels), f"{command}: two ingredients share a label"
        for json_out in (True, False):
            alone = [i.label for c, i, j in plan if c == command and j == json_out]
            assert sorted(alone) == sorted(labels), (command, json_out)
        assert any(i.valid for i in ingredients) == (command == "mark"), command
    assert {(c, i.label) for c, i, _j in plan} == {
        (c, i.label) for c, (_b, ings) in COMMANDS.items() for i in ings
    }
    rng = random.Random(SEED)
    drawn = [build_case(rng, index, Path("/nonexistent")) for index in range(CASES)]
    assert {command for command, *_ in drawn} == set(COMMANDS)
    assert any(len(chosen) >= 2 for _c, chosen, *_ in drawn)
    assert {j for *_, j, _w in drawn} == {True, False}
