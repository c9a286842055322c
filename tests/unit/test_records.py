"""Typed records (radmark/keys/records.py): schema checks after the signature, one reader.

A record whose signature verifies but whose body is malformed must be refused with one clear
IntegrityError when the keystore opens (issue #12: it used to surface as a KeyError in verify and
an AttributeError in ``keys list``), and only records signed by the key they name are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from radmark.cli import app
from radmark.errors import IntegrityError
from radmark.keys.keypair import SecretKey
from radmark.keys.records import DEFAULT_METHOD, MarkRecord
from radmark.keys.store import Keystore
from tests.factories import make_marker, make_record


@pytest.fixture()
def record(tmp_path: Path) -> MarkRecord:
    return make_record(tmp_path / "ks", make_marker(tmp_path / "m.safetensors"))


def _store_body(ks: Path, rec: MarkRecord, body: dict, key: SecretKey | None = None) -> None:
    """Re-sign an edited body with the record's own key (a valid signature) and store it."""
    store = Keystore.open(ks)
    if key is None:
        key = store.secret(rec.fingerprint, lambda: None)[0]
    store.put(key.sign(body))


def _body(rec: MarkRecord) -> dict:
    return {k: v for k, v in rec.signed.items() if k != "signature"}


def test_typed_fields(record: MarkRecord) -> None:
    assert record.method == DEFAULT_METHOD  # absent in the body: records of earlier versions
    assert "method" not in record.signed
    assert record.dim == 128 and record.num_classes == 10
    assert record.marker.id.startswith("smallcnn@sha256:")
    assert record.carrier_group == (record.fingerprint, record.marker.id, 128, 10)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda b: b.pop("marker"), "marker"),
        (lambda b: b.update(dim="128"), "dim"),
        (lambda b: b.update(num_classes=0), "num_classes"),
        (lambda b: b["selection"].update(fraction=1.5), "selection.fraction"),
        (lambda b: b.update(shards=[{"name": "x"}]), "input_sha256"),
        (lambda b: b["marker"].update(sha256="zz"), "sha256"),
        (lambda b: b.update(plan=[1, 2]), "plan"),
    ],
)
def test_valid_signature_malformed_body_is_refused_on_open(
    record: MarkRecord, tmp_path: Path, edit, field: str
) -> None:
    body = _body(record)
    body = json.loads(json.dumps(body))
    edit(body)
    _store_body(tmp_path / "ks", record, body)
    with pytest.raises(IntegrityError, match="malformed record") as exc:
        Keystore.open(tmp_path / "ks")
    assert field.split(".")[-1] in str(exc.value)
    for cmd in (["keys", "list"], ["verify", "m.safetensors", "--probe", "p"]):
        res = CliRunner().invoke(app, [*cmd, "--keystore", str(tmp_path / "ks")])
        assert res.exit_code == 2, res.output
        assert "malformed record" in res.output and "Traceback" not in res.output


def test_record_naming_another_key_is_refused(record: MarkRecord, tmp_path: Path) -> None:
    """A body that names key A but is signed by key B (also in the store) is refused."""
    other = SecretKey.generate()
    store = Keystore.open(tmp_path / "ks")
    store.add_key(other, other.public_record(), None, scrypt_n=2**10)
    forged = other.sign(_body(record))  # still names the first key
    store.put(forged)
    with pytest.raises(IntegrityError, match="signature does not verify"):
        Keystore.open(tmp_path / "ks")


def test_unknown_record_types_from_later_versions_are_listed_not_used(
    record: MarkRecord, tmp_path: Path
) -> None:
    key = Keystore.open(tmp_path / "ks").secret(record.fingerprint, lambda: None)[0]
    body = {"type": "radmark.future-thing", "key": record.fingerprint, "created": "2030-01-01"}
    _store_body(tmp_path / "ks", record, body, key)
    store = Keystore.open(tmp_path / "ks")
    assert [r.address for r in store.mark_records()] == [record.address]
    assert "future-thing" in {e.kind for e in store.entries()}
