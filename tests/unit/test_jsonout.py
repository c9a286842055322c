"""JSON documents (radmark/report/jsonout.py): derived from each command's result dataclass, with
the field names and values of the CLI contract (shared/spec/cli.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from radmark.models.training import TrainResult
from radmark.report.jsonout import document, error_document, train_json


def test_marker_train_json_is_its_result_dataclass() -> None:
    res = TrainResult(Path("/tmp/m.safetensors"), "ab" * 32, "smallcnn", 10, 600, 2, 0.5, 1.25)
    doc = json.loads(document(train_json(res)))
    assert doc == {"schema_version": 1, "path": "/tmp/m.safetensors", "sha256": "ab" * 32,
                   "arch": "smallcnn", "num_classes": 10, "images": 600, "epochs": 2,
                   "train_accuracy": 0.5, "seconds": 1.25}  # fmt: skip
    assert list(doc) == ["schema_version", "path", "sha256", "arch", "num_classes", "images",
                         "epochs", "train_accuracy", "seconds"]  # fmt: skip


def test_documents_are_valid_json_even_for_non_finite_floats() -> None:
    doc = json.loads(document({"psnr": math.inf, "nested": {"x": [math.nan]}}))
    assert doc["psnr"] == "inf" and doc["nested"]["x"] == ["nan"]
    err = json.loads(error_document("UsageError", "bad"))
    assert err == {"schema_version": 1, "error": {"kind": "UsageError", "message": "bad"}}
