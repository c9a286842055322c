"""JSON for every command, derived from its result dataclass (field names are a contract).

``shared/spec/cli.md`` fixes the names other tools rely on; new fields may be added, none renamed
without a ``schema_version`` bump. Every document carries ``schema_version``; failures are
``{"schema_version", "error": {"kind", "message"}}`` so that ``--json > report.json`` is never an
empty file. p-values are rendered here from natural logs to log10.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radmark import SCHEMA_VERSION

if TYPE_CHECKING:
    from radmark.keys.manage import (
        ImportResult,
        KeygenResult,
        KeyListing,
        PublicExport,
        ShownObject,
    )
    from radmark.marking.kit import KitBuildResult
    from radmark.marking.run import MarkResult
    from radmark.models.training import TrainResult
    from radmark.verify.run import VerifyResult
    from radmark.verify.tests import TestResult


def _plain(value: Any) -> Any:
    """Dataclasses, paths and tuples as JSON values; non-finite floats as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" (an unchanged image's PSNR), never invalid JSON
    return value


def document(obj: dict[str, Any]) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, **_plain(obj)}, indent=2) + "\n"


def error_document(kind: str, message: str) -> str:
    return document({"error": {"kind": kind, "message": message}})


def keygen_json(res: KeygenResult) -> dict[str, Any]:
    """``radmark keygen``: fingerprint, path, keystore, encrypted, key_file."""
    return _plain(res)


def key_import_json(res: ImportResult) -> dict[str, Any]:
    """``radmark keys import``: fingerprint, path, keystore, encrypted, already_present."""
    return _plain(res)


def keys_list_json(res: KeyListing) -> dict[str, Any]:
    """``radmark keys list``: one entry per stored object, its summary fields inlined."""
    return {
        "entries": [
            {"kind": e.kind, "address": f"sha256:{e.address}", **_plain(e.summary)}
            for e in res.entries
        ]
    }


def keys_show_json(res: ShownObject) -> dict[str, Any]:
    """``radmark keys show``: address, kind, the verified record, has_secret."""
    return _plain(res)


def public_export_json(res: PublicExport) -> dict[str, Any]:
    """``radmark keys export-public --json``: address, record, path (never the raw bytes)."""
    return {"address": res.address, "record": _plain(res.record), "path": _plain(res.path)}


def train_json(res: TrainResult) -> dict[str, Any]:
    """``radmark marker train``: path, sha256, arch, num_classes, images, epochs, accuracy, time."""
    return _plain(res)


def kit_json(res: KitBuildResult) -> dict[str, Any]:
    """The kit build result: its fields, with ``kit_bytes`` named ``bytes``."""
    out = _plain(res)
    out["bytes"] = out.pop("kit_bytes")
    return out


def mark_json(res: MarkResult) -> dict[str, Any]:
    return {
        "kit": kit_json(res.kit) if res.kit is not None else None,
        "fingerprint": res.fingerprint,
        "record": res.record,
        "method": res.method,
        "shards": len(res.shards),
        "images": res.images,
        "marked": res.marked,
        "skipped": res.skipped,
        "unchanged": res.unchanged,
        "psnr_mean": res.psnr_mean,
        "psnr_min": res.psnr_min,
        "linf_max": res.linf_max,
        "feature_cos_mean": res.feature_cos_mean,
        "images_per_s": res.images_per_s,
        "seconds": res.seconds,
        "marker": res.marker,
        "preset": res.preset,
        "out": str(res.out_dir),
        "shard_reports": [
            {
                "name": r.name,
                "samples": r.samples,
                "marked": r.marked,
                "skipped": r.skipped,
                "unchanged": r.unchanged,
                "output_sha256": r.output_sha256,
                "resumed": r.resumed,
                "feature_cos_mean": r.feature_cos_mean,
                "reencoded": r.reencoded,
                "lossy_mark_kept": r.lossy_mark_kept,
                "skip_reasons": dict(r.skip_reasons),
            }
            for r in res.shards
        ],
    }


def _test_json(t: TestResult) -> dict[str, Any]:
    return {
        "log10_p": t.log10_p,
        "exact": t.exact,
        "statistic": t.statistic,
        "description": t.description,
        # a test's own measurements (the twin test's win rate and images), where it has any
        **({"extra": dict(t.extra)} if t.extra else {}),
    }


def verify_json(res: VerifyResult) -> dict[str, Any]:
    """The spec's JSON for ``verify`` (cli.md)."""
    return {
        "model": res.model,
        "model_sha256": res.model_sha256,
        "arch": res.arch,
        "alpha": res.alpha,
        "detected": res.detected,
        "probe_size": res.probe_size,
        "correction": res.correction,
        "warnings": res.warnings,
        "seconds": res.seconds,
        "preregistered": res.preregistered,
        "models": [
            {
                "model": m.model,
                "model_sha256": m.sha256,
                "arch": m.arch,
                "detected": any(r.detected for r in res.results if r.model_sha256 == m.sha256),
            }
            for m in res.models
        ],  # fmt: skip
        "results": [
            {
                "model": r.model,
                "model_sha256": r.model_sha256,
                "fingerprint": r.fingerprint,
                "record": r.record,
                "marker": r.marker,
                "method": r.method,
                "num_classes": r.num_classes,
                "dim": r.dim,
                "tests": {k: _test_json(t) for k, t in r.tests.items()},
                "log10_p": r.log10_p,
                "log10_p_adjusted": r.log10_p_adjusted,
                "combination": r.combination,
                "detected": r.detected,
                "plan": {
                    "registered": r.plan.registered,
                    "followed": r.plan.followed,
                    "deviations": list(r.plan.deviations),
                },
                "exploratory": r.exploratory,
                "cosines": r.cosines,
                "class_log10_p": r.class_log10_p,
                "black_box": (
                    None
                    if r.black_box_ranks is None
                    else {"ranks": r.black_box_ranks, "slots": r.black_box_slots}
                ),
                "alignment": {
                    "r2": r.alignment_r2,
                    "relative_residual": r.alignment_residual,
                    "warning": None,
                },
            }
            for r in res.results
        ],
    }
