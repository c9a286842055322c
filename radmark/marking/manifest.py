"""The output directory's bookkeeping: lock, manifest, resume state, leftovers of killed runs.

- ``.radmark.lock`` (an exclusive flock, released even on SIGKILL) keeps two runs out of one
  directory; under torchrun each rank holds its own lock file.
- The manifest is written atomically before the first shard (pinning the settings) and after every
  shard; a resumed run skips shards whose output exists with the hash recorded there and refuses
  other settings. An earlier run that finished no shard needs no --resume.
- Temp files left by a killed run are removed by the next run (under the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radmark.canonical import address
from radmark.data.samples import printable
from radmark.data.sources import pipe_input_paths
from radmark.data.writer import sha256_file
from radmark.errors import InputError, RadmarkError
from radmark.fsutil import atomic_write_bytes
from radmark.keys.store import Keystore

MANIFEST = "radmark-manifest.json"
LOCK = ".radmark.lock"


@dataclass(frozen=True)
class ShardReport:
    name: str
    input_sha256: str
    output_sha256: str
    samples: int
    marked: int
    skipped: int
    psnr_mean: float | None
    psnr_min: float | None
    linf_max: int
    feature_cos_mean: float | None
    marked_keys_sha256: str
    resumed: bool = False


_REPORT_FIELDS = set(ShardReport.__dataclass_fields__)


@contextlib.contextmanager
def lock(out_dir: Path, name: str = LOCK) -> Iterator[None]:
    """Hold an exclusive flock on ``out_dir/name`` (released when the process dies, even SIGKILL)."""
    path = out_dir / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise InputError(f"cannot write to {out_dir}: {exc.strerror or exc} ({path})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{out_dir} is being written by another radmark mark run (lock {path} is held); "
                "wait for it to finish or use another --out"
            ) from None
        except OSError as exc:
            raise InputError(f"cannot lock {path}: {exc.strerror or exc}") from None
        yield
    finally:
        os.close(fd)


def report_from_entry(entry: dict[str, Any], *, resumed: bool) -> ShardReport:
    try:
        return ShardReport(
            **{**{f: entry[f] for f in _REPORT_FIELDS - {"resumed"}}, "resumed": resumed}
        )
    except KeyError as exc:
        raise InputError(f"manifest entry {entry.get('name')!r} lacks {exc}") from None


def make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the output directory {out_dir}: {exc.strerror or exc}"
        ) from None
    if not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is not a directory")


def check_not_inputs(out_dir: Path, urls: list[str], names: list[str]) -> None:
    """Refuse an --out that holds any input shard's file, whatever the URL form (issue #12).

    Inputs are never modified: an output shard must not replace its own input, nor any other
    input (``mark 'pipe:cat in/data.tar' --out in`` would write ``in/data.tar``). A local shard,
    and every file a ``pipe:`` command names (:func:`~radmark.data.sources.pipe_input_paths`),
    must not lie in --out itself, and no output shard may be the same file as an input (a hard
    link under another directory).
    """
    if not out_dir.is_dir():
        return
    out_real = os.path.realpath(out_dir)
    inputs: list[tuple[str, str]] = []  # (input file, the URL that reads it)
    for url in urls:
        files = pipe_input_paths(url) if url.startswith("pipe:") else [url]
        inputs.extend((f, url) for f in files)
    for path, url in inputs:
        if os.path.dirname(os.path.realpath(path)) == out_real:
            via = f" (read by {url!r})" if url != path else ""
            raise InputError(
                f"--out {out_dir} would overwrite the input shard {path}{via}, which lies in "
                "it; inputs are never modified, so choose another --out"
            )
    for name in names:
        target = out_dir / name
        for path, _url in inputs:
            try:
                same = target.exists() and os.path.samefile(target, path)
            except OSError:
                same = False  # the input's own problem is reported when it is read
            if same:
                raise InputError(
                    f"--out {out_dir} would overwrite the input shard {path} ({target} is the "
                    "same file); inputs are never modified, so choose another --out"
                )


def rank_lock(rank: int) -> str:
    return f".radmark.rank{rank}.lock"


_PARTIAL_RE = re.compile(r"\.radmark-manifest\.rank(\d+)\.json")


def _partial_name(rank: int) -> str:
    return f".radmark-manifest.rank{rank}.json"


def load_state(
    out_dir: Path, cfg: dict[str, Any], resume: bool, force: bool = False
) -> dict[str, dict[str, Any]]:
    """Shards finished by earlier runs: the manifest plus any torchrun ranks' partial files.

    An earlier run that finished no shard leaves nothing to protect, so it does not need
    --resume (and its settings need not match): a run that failed on its first shard can simply
    be started again with fixed inputs. A directory without a manifest that holds files named
    like output shards is not radmark's to overwrite, --resume or not, unless ``force``.
    """
    path = out_dir / MANIFEST
    if not path.exists():
        existing = [n for n in _listdir(out_dir) if n in cfg["shards"]]
        if existing and not force:
            raise InputError(
                f"{out_dir} already holds {existing[0]} and no radmark manifest, so it is not an "
                "earlier run to resume; use another --out, or pass --force to replace such files"
            )
        return {}
    try:
        man = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(man, dict) or not isinstance(man.get("config"), dict):
        raise InputError(f"{path}: not a radmark manifest; use another --out")
    shards = man.get("shards")
    done: dict[str, dict[str, Any]] = dict(shards) if isinstance(shards, dict) else {}
    for entries in read_partials(out_dir, man["config"]).values():
        done.update(entries)
    if not done:
        return {}
    if not resume:
        raise InputError(
            f"{out_dir} holds an earlier run's manifest; pass --resume to continue "
            "it, or use another --out"
        )
    if man["config"] != cfg:
        raise InputError(
            f"{path}: the earlier run used other settings (key, marker, parameters, "
            "fraction or shards); use another --out"
        )
    return done


def read_partials(out_dir: Path, cfg: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for fname in _listdir(out_dir):
        m = _PARTIAL_RE.fullmatch(fname)
        if m is None:
            continue
        try:
            doc = json.loads((out_dir / fname).read_bytes())
        except (OSError, ValueError) as exc:
            raise InputError(f"{out_dir / fname}: unreadable partial manifest ({exc})") from None
        if isinstance(doc, dict) and doc.get("config") == cfg:
            shards = doc.get("shards")
            if isinstance(shards, dict):
                names = set(cfg.get("shards") or [])
                found[int(m.group(1))] = {k: v for k, v in shards.items() if k in names}
    return found


def write_partial(
    out_dir: Path, rank: int, cfg: dict[str, Any], mine: dict[str, dict[str, Any]]
) -> None:
    doc = {"type": "radmark.manifest.partial", "rank": rank, "config": cfg, "shards": mine}
    atomic_write_bytes(
        out_dir / _partial_name(rank), json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    )


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InputError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _listdir(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as exc:
        raise InputError(f"cannot list {directory}: {exc.strerror or exc}") from None


def remove_partials(out_dir: Path) -> None:
    for fname in _listdir(out_dir):
        if _PARTIAL_RE.fullmatch(fname):
            _unlink(out_dir / fname)


# shards.write_shard: .NAME.PID.HEX8.tmp; fsutil.atomic_write_bytes: .NAME.PID.tmp
_TEMP_RE = re.compile(r"\.(?P<base>.+?)\.\d+(?:\.[0-9a-f]{8})?\.tmp")


def remove_stale_temps(out_dir: Path, names: list[str]) -> None:
    """Delete temp files a killed run left (we hold the lock, so none is being written)."""
    ours = set(names) | {MANIFEST}
    for fname in _listdir(out_dir):
        m = _TEMP_RE.fullmatch(fname)
        if m is not None and (m.group("base") in ours or _PARTIAL_RE.fullmatch(m.group("base"))):
            _unlink(out_dir / fname)


def write_manifest(
    out_dir: Path, cfg: dict[str, Any], done: dict[str, dict[str, Any]], record: str | None = None
) -> None:
    man = {
        "type": "radmark.manifest",
        "format_version": 1,
        "config": cfg,
        "shards": {k: done[k] for k in sorted(done)},
        "record": record,
    }
    atomic_write_bytes(
        out_dir / MANIFEST, json.dumps(man, indent=1, sort_keys=True).encode() + b"\n"
    )


def recorded_record(out_dir: Path) -> str | None:
    """The mark record the manifest names (an earlier run that finished), or None."""
    try:
        rec = json.loads((out_dir / MANIFEST).read_bytes()).get("record")
    except (OSError, ValueError, AttributeError):
        return None
    return rec if isinstance(rec, str) else None


def finished_record(
    addr: str | None, store: Keystore, fp: str, reports: list[ShardReport]
) -> str | None:
    """``addr`` if that record is in ``store``, by key ``fp``, for exactly these output shards;
    else None. A finished run resumed is then a no-op: signing again would only add a newer
    record for the same shards, one without the earlier run's kit (issue #12)."""
    if addr is None:
        return None
    try:
        rec = store.mark_record(addr)
    except RadmarkError:
        return None
    same = [(s.name, s.output_sha256) for s in rec.shards] == [
        (printable(r.name), r.output_sha256) for r in reports
    ]
    return address(rec.address) if rec.fingerprint == fp and same else None


def still_valid(path: Path, url: str, prev: dict[str, Any]) -> bool:
    try:
        if not path.is_file() or sha256_file(path) != prev.get("output_sha256"):
            return False
        if url.startswith("pipe:"):
            return True  # cannot re-read a pipe cheaply; the output hash is the check
        return sha256_file(Path(url)) == prev.get("input_sha256")
    except OSError:
        return False
