"""A marking run's bookkeeping: the output directory's lock and the private run state.

- ``.radmark.lock`` in ``--out`` (an exclusive flock, released even on SIGKILL) keeps two runs
  out of one directory; under torchrun each rank holds its own lock file. The lock files are
  empty; nothing else but the output shards is ever written to ``--out``, which is what the owner
  publishes.
- The run state (the settings, and per finished shard its hashes, counts and *marked sample keys*)
  reveals which samples are marked, a secret (issue #12), so it lives in the keystore:
  ``<keystore>/runs/<run id>/state.json`` (0600 in 0700 directories), run id = SHA-256 of the key
  fingerprint and the resolved ``--out`` path, so the owner finds it from the command line alone.
  Torchrun ranks other than 0 write ``rank<r>.json`` beside it. The state is written atomically
  before the first shard (pinning the settings) and after every shard; a resumed run skips shards
  whose output exists with the hash recorded there and refuses other settings. An earlier run that
  finished no shard needs no --resume; resuming needs the same ``--keystore`` and ``--out`` path.
- Temp files left by a killed run are removed by the next run (under the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radmark.canonical import address
from radmark.data.samples import printable
from radmark.data.sources import pipe_input_paths
from radmark.data.writer import sha256_file
from radmark.errors import InputError, RadmarkError
from radmark.fsutil import atomic_write_bytes
from radmark.keys.sealing import check_private
from radmark.keys.store import Keystore
from radmark.marking.methods import DEFAULT_METHOD

if TYPE_CHECKING:
    from radmark.marking.options import MarkOptions

LOCK = ".radmark.lock"
#: What radmark before issue #12 wrote into --out; it lists the marked samples.
LEGACY_MANIFEST = "radmark-manifest.json"
STATE = "state.json"
STATE_TYPE = "radmark.run"
STATE_VERSION = 2


@dataclass(frozen=True)
class ShardReport:
    """One shard of a run: hashes, counts, budget figures (no sample key: see the run state).

    unchanged: selected samples the method could not change (copied byte-identical, not marked,
        not counted in ``marked``). reencoded: marked images written back in a lossy container
        (JPEG, lossy WebP); lossy_mark_kept: their mean fraction of the mark that survived it
        (⟨stored − original, marked − original⟩ / ‖marked − original‖², 1 = all of it).
    skip_reasons: sample key → why it was copied unmarked (--on-error skip), the first 100.
    """

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
    unchanged: int = 0
    reencoded: int = 0
    lossy_mark_kept: float | None = None
    skip_reasons: dict[str, str] = field(default_factory=dict)
    resumed: bool = False


_REQUIRED = {
    f.name for f in fields(ShardReport) if f.default is MISSING and f.default_factory is MISSING
}
_OPTIONAL = {f.name for f in fields(ShardReport)} - _REQUIRED - {"resumed"}


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
        values = {f: entry[f] for f in _REQUIRED}
    except KeyError as exc:
        raise InputError(f"run state entry {entry.get('name')!r} lacks {exc}") from None
    values.update({f: entry[f] for f in _OPTIONAL if f in entry})
    return ShardReport(**values, resumed=resumed)


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


# ------------------------------------------------------------------ the private run state


@dataclass(frozen=True)
class RunDir:
    """Where one run's private state lives: ``<keystore>/runs/<run id>/``."""

    path: Path
    out: str  # the resolved --out, recorded in the state so tools can find it

    @classmethod
    def of(cls, keystore: Path, fingerprint: str, out_dir: Path) -> RunDir:
        out = str(Path(out_dir).resolve())
        run_id = hashlib.sha256(f"radmark/v1/run|{fingerprint}|{out}".encode()).hexdigest()
        return cls(Path(keystore) / "runs" / run_id, out)

    @property
    def state(self) -> Path:
        return self.path / STATE

    def partial(self, rank: int) -> Path:
        return self.path / f"rank{rank}.json"

    def make(self) -> None:
        """Create ``runs/`` and the run's directory, 0700; refuse symlinks and open modes."""
        for d in (self.path.parent, self.path):
            if d.is_symlink():
                raise InputError(f"keystore {d} is a symbolic link; refusing to follow it")
            try:
                d.mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot create {d}: {exc.strerror or exc}") from None
            if d.stat().st_mode & 0o077:
                raise InputError(
                    f"{d} holds which samples are marked but is open to others; run: chmod 700 {d}"
                )


_PARTIAL_RE = re.compile(r"rank(\d+)\.json")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    check_private(path)
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise InputError(f"{path}: not a radmark {what}")
    return doc


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", 0o600)


def load_state(
    run: RunDir, out_dir: Path, cfg: dict[str, Any], resume: bool, force: bool = False
) -> dict[str, dict[str, Any]]:
    """Shards finished by earlier runs: the state plus any torchrun ranks' partial files.

    An earlier run that finished no shard leaves nothing to protect, so it does not need
    --resume (and its settings need not match): a run that failed on its first shard can simply
    be started again with fixed inputs. Output shards that no state accounts for are never
    overwritten, --resume or not, unless ``force``.
    """
    if (out_dir / LEGACY_MANIFEST).exists():
        raise InputError(
            f"{out_dir} holds {LEGACY_MANIFEST} from an earlier radmark version; it lists the "
            "marked samples, so never publish it: finish that run with the earlier version, or "
            "use another --out"
        )
    done: dict[str, dict[str, Any]] = {}
    state_cfg: Any = None
    if run.state.exists():
        doc = _read_json(run.state, "run state")
        state_cfg = doc["config"]
        shards = doc.get("shards")
        done = dict(shards) if isinstance(shards, dict) else {}
    for entries in read_partials(run, state_cfg).values():
        done.update(entries)
    if not done:
        existing = [n for n in _listdir(out_dir) if n in cfg["shards"]]
        if existing and not force:
            raise InputError(
                f"{out_dir} already holds {existing[0]}, which no run of this key in keystore "
                f"{run.path.parent.parent} wrote; use another --out, or pass --force to replace "
                "such files"
            )
        return {}
    if not resume:
        raise InputError(
            f"{out_dir} holds an earlier run's shards; pass --resume to continue it, or use "
            "another --out"
        )
    if state_cfg != cfg:
        raise InputError(
            f"{out_dir}: the earlier run used other settings (marker, parameters, fraction, "
            "shards or options); use another --out"
        )
    return done


def read_partials(run: RunDir, cfg: dict[str, Any] | None) -> dict[int, dict[str, dict[str, Any]]]:
    found: dict[int, dict[str, dict[str, Any]]] = {}
    if cfg is None or not run.path.is_dir():
        return found
    for fname in _listdir(run.path):
        m = _PARTIAL_RE.fullmatch(fname)
        if m is None:
            continue
        doc = _read_json(run.path / fname, "partial run state")
        if doc.get("config") == cfg:
            shards = doc.get("shards")
            if isinstance(shards, dict):
                names = set(cfg.get("shards") or [])
                found[int(m.group(1))] = {k: v for k, v in shards.items() if k in names}
    return found


def write_partial(run: RunDir, rank: int, cfg: dict[str, Any], mine: dict[str, Any]) -> None:
    doc = {"type": f"{STATE_TYPE}.partial", "rank": rank, "config": cfg, "shards": mine}
    _write_json(run.partial(rank), doc)


def write_state(
    run: RunDir, cfg: dict[str, Any], done: dict[str, dict[str, Any]], record: str | None = None
) -> None:
    doc = {
        "type": STATE_TYPE,
        "format_version": STATE_VERSION,
        "out": run.out,
        "config": cfg,
        "shards": {k: done[k] for k in sorted(done)},
        "record": record,
    }
    _write_json(run.state, doc)


def find_state(keystore: Path, out_dir: Path) -> dict[str, Any] | None:
    """The private state of the run(s) that wrote ``out_dir``, by any key, or None.

    For the owner and the tests: which samples each shard's run marked (``shards[name]
    ["marked_keys"]``), with which settings, and its record.
    """
    out = str(Path(out_dir).resolve())
    runs = Path(keystore) / "runs"
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        if (d / STATE).is_file():
            doc = _read_json(d / STATE, "run state")
            if doc.get("out") == out:
                return doc
    return None


def pixel_index(keystore: Path, record: str) -> set[bytes]:
    """The keyed digests of every image the runs that signed ``record`` (hex address) marked.

    For the probe guard (``verify/guard.py``); runs made before the index existed have none.
    """
    out: set[bytes] = set()
    runs = Path(keystore) / "runs"
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        if (d / STATE).is_file():
            doc = _read_json(d / STATE, "run state")
            if str(doc.get("record", "")).removeprefix("sha256:") == record:
                for entry in (doc.get("shards") or {}).values():
                    out.update(bytes.fromhex(h) for h in entry.get("pixel_digests") or [])
    return out


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


def remove_partials(run: RunDir) -> None:
    for fname in _listdir(run.path):
        if _PARTIAL_RE.fullmatch(fname):
            _unlink(run.path / fname)


# shards.write_shard: .NAME.PID.HEX8.tmp; fsutil.atomic_write_bytes: .NAME.PID.tmp
_TEMP_RE = re.compile(r"\.(?P<base>.+?)\.\d+(?:\.[0-9a-f]{8})?\.tmp")


def remove_stale_temps(out_dir: Path, names: list[str], run: RunDir) -> None:
    """Delete temp files a killed run left (we hold the lock, so none is being written)."""
    for directory, ours in ((out_dir, set(names)), (run.path, {STATE})):
        for fname in _listdir(directory):
            m = _TEMP_RE.fullmatch(fname)
            if m is not None and (
                m.group("base") in ours or _PARTIAL_RE.fullmatch(m.group("base"))
            ):
                _unlink(directory / fname)


def discard_empty(run: RunDir) -> None:
    """Remove the state of a run that finished no shard (it protects nothing)."""
    if run.state.is_file() and not (_read_json(run.state, "run state").get("shards") or {}):
        _unlink(run.state)
        with contextlib.suppress(OSError):
            run.path.rmdir()  # only when empty
        with contextlib.suppress(OSError):
            run.path.parent.rmdir()


def recorded_record(run: RunDir) -> str | None:
    """The mark record the run state names (an earlier run of this --out that finished), or None."""
    if not run.state.is_file():
        return None
    rec = _read_json(run.state, "run state").get("record")
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


def config(
    fp: str,
    marker_id: str,
    method: str,
    params: dict[str, Any],
    options: MarkOptions,
    num_classes: int,
    names: list[str],
) -> dict[str, Any]:
    """What must match for a resume to continue an earlier run."""
    cfg = {
        "key": fp,
        "marker": marker_id,
        "params": params,
        "fraction": options.fraction,
        "num_classes": num_classes,
        "label_field": options.label_field,
        "shards": names,
        "on_error": options.on_error,
    }
    if method != DEFAULT_METHOD:  # absent = the default method, as in records
        cfg["method"] = method
    if options.reencode_all:  # absent = only marked images are re-encoded
        cfg["reencode_all"] = True
    return cfg
