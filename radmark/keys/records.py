"""Signed records in the keystore, one typed class per kind, built and read only here.

A record is a canonical-JSON object signed by the key it names (``keys/keypair.py``). The
keystore verifies the signature first; the classes below then check the body against its schema
in their constructor (issue #12: a record with a valid signature but a malformed body is refused
with one line, never a ``KeyError`` somewhere downstream), so a record object that exists in
memory is both authentic and well-formed. Every other module reads records through these
properties, never through string keys.

The bodies are also *written* here (:func:`mark_record_body`, :func:`kit_record_body`), so the
schema exists once. Fields added later are optional with a default that reproduces what older
records meant (``method`` absent = the paper's radioactive method), so every record made by an
earlier version still loads and verifies (tests/data/legacy holds such files).

Which samples were marked is a secret (issue #12): each shard's ``marked_keys_sha256`` is, since
``selection.digest`` = ``"hmac-sha256"``, an HMAC keyed from the owner's secret
(``keys/keypair.py``: ``selection_digest``), not a plain hash that could be inverted by trying
subsets. Records without ``selection.digest`` (made before) hold a plain SHA-256 of the keys
joined by newlines; they load as before and say so in :attr:`MarkRecord.selection_digest`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from radmark import __version__
from radmark.canonical import address, utc_timestamp
from radmark.errors import IntegrityError
from radmark.keys.keypair import SELECTION_DIGEST, PublicKeyRecord

MARK_RECORD_TYPE = "radmark.mark"
KIT_RECORD_TYPE = "radmark.kit"
DEFAULT_METHOD = "radioactive"
_HEX = frozenset("0123456789abcdef")


class _Body:
    """Typed reads of a record body; the first malformed field raises one IntegrityError."""

    def __init__(self, body: Mapping[str, Any], where: str) -> None:
        if not isinstance(body, Mapping):
            raise IntegrityError(f"{where}: malformed record (not a JSON object)")
        self.body = body
        self.where = where

    def _bad(self, name: str, want: str) -> IntegrityError:
        return IntegrityError(f"{self.where}: malformed record (field {name!r} must be {want})")

    def get(self, name: str, default: Any = ..., body: Mapping[str, Any] | None = None) -> Any:
        src = self.body if body is None else body
        if name not in src:
            if default is ...:
                raise self._bad(name, "present")
            return default
        return src[name]

    def text(self, name: str, body: Mapping[str, Any] | None = None, default: Any = ...) -> str:
        v = self.get(name, default, body)
        if not isinstance(v, str):
            raise self._bad(name, "a string")
        return v

    def hexdigest(self, name: str, body: Mapping[str, Any] | None = None) -> str:
        v = self.text(name, body)
        if len(v) != 64 or not set(v) <= _HEX:
            raise self._bad(name, "a SHA-256 hex digest")
        return v

    def integer(self, name: str, lo: int = 0, body: Mapping[str, Any] | None = None) -> int:
        v = self.get(name, ..., body)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise self._bad(name, f"an integer >= {lo}")
        return v

    def number(self, name: str, body: Mapping[str, Any] | None = None) -> float:
        v = self.get(name, ..., body)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(name, "a finite number")
        return float(v)

    def mapping(self, name: str, body: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
        v = self.get(name, ..., body)
        if not isinstance(v, Mapping):
            raise self._bad(name, "an object")
        return v

    def sequence(self, name: str, body: Mapping[str, Any] | None = None) -> Sequence[Any]:
        v = self.get(name, ..., body)
        if not isinstance(v, list):
            raise self._bad(name, "a list")
        return v


@dataclass(frozen=True)
class MarkerRef:
    """The marking network a record was made with: ``id`` = ``<name>@sha256:<hex>``."""

    id: str
    name: str
    arch: str
    sha256: str
    dim: int
    source: str | None


@dataclass(frozen=True)
class ShardRef:
    """One input shard of a marking run and the output shard it became.

    ``marked_keys_digest`` commits to the shard's marked sample keys: an HMAC (record field
    ``marked_keys_sha256``, kind in :attr:`MarkRecord.selection_digest`), never the keys.
    """

    name: str
    input_sha256: str
    output_sha256: str
    samples: int
    marked: int
    marked_keys_digest: str


@dataclass(frozen=True)
class MarkRecord:
    """A verified, schema-checked mark record. Build with :meth:`from_signed` only."""

    signed: dict[str, Any]
    address: str  # hex SHA-256 of the canonical bytes
    key: PublicKeyRecord
    method: str
    marker: MarkerRef
    dim: int
    num_classes: int
    carriers_sha256: str | None  # None: a method without class carriers
    params: Mapping[str, Any]
    fraction: float
    label_field: str
    created: str
    marked: int
    shards: tuple[ShardRef, ...]
    plan: Mapping[str, Any] | None
    method_data: Mapping[str, Any]
    selection_digest: str = "sha256"  # how shards' marked_keys_sha256 were made (legacy: sha256)

    @classmethod
    def from_signed(
        cls, signed: dict[str, Any], hexd: str, key: PublicKeyRecord, where: str = "mark record"
    ) -> MarkRecord:
        """Check the body's schema (the signature was checked by the keystore already)."""
        b = _Body(signed, where)
        if b.text("type") != MARK_RECORD_TYPE:
            raise b._bad("type", repr(MARK_RECORD_TYPE))
        if b.get("format_version") != 1:
            raise b._bad("format_version", "1")
        if b.hexdigest("key") != key.fingerprint:
            raise IntegrityError(f"{where}: names key {b.body['key']!r} but is signed by another")
        m = b.mapping("marker")
        source = m.get("source")
        marker = MarkerRef(
            id=b.text("id", m),
            name=b.text("name", m),
            arch=b.text("arch", m),
            sha256=b.hexdigest("sha256", m),
            dim=b.integer("dim", 2, m),
            source=source if isinstance(source, str) else None,
        )
        dim, classes = b.integer("dim", 2), b.integer("num_classes", 1)
        if dim != marker.dim:
            raise b._bad("dim", "the marker's dim")
        sel = b.mapping("selection")
        fraction = b.number("fraction", sel)
        if not 0.0 < fraction <= 1.0:
            raise b._bad("selection.fraction", "in (0, 1]")
        digest_kind = b.text("digest", sel, default="sha256")
        if digest_kind not in ("sha256", SELECTION_DIGEST):
            raise b._bad("selection.digest", f"'sha256' or {SELECTION_DIGEST!r}")
        counts = b.mapping("counts")
        shards = []
        for s in b.sequence("shards"):
            if not isinstance(s, Mapping):
                raise b._bad("shards", "a list of objects")
            shards.append(
                ShardRef(
                    name=b.text("name", s),
                    input_sha256=b.text("input_sha256", s),  # "" for pipe: inputs
                    output_sha256=b.hexdigest("output_sha256", s),
                    samples=b.integer("samples", 0, s),
                    marked=b.integer("marked", 0, s),
                    marked_keys_digest=b.text("marked_keys_sha256", s),
                )
            )
        plan = b.get("plan", None)
        if plan is not None and not isinstance(plan, Mapping):
            raise b._bad("plan", "an object")
        method_data = b.get("method_data", {})
        if not isinstance(method_data, Mapping):
            raise b._bad("method_data", "an object")
        return cls(
            signed=signed,
            address=hexd,
            key=key,
            method=b.text("method", default=DEFAULT_METHOD),
            marker=marker,
            dim=dim,
            num_classes=classes,
            carriers_sha256=(
                b.hexdigest("sha256", b.mapping("carriers")) if "carriers" in signed else None
            ),
            params=b.mapping("params"),
            fraction=fraction,
            label_field=b.text("label_field"),
            created=b.text("created"),
            marked=b.integer("marked", 0, counts),
            shards=tuple(shards),
            plan=plan,
            method_data=method_data,
            selection_digest=digest_kind,
        )

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    @property
    def short(self) -> str:
        """A short printable address, enough to name the record in one-line messages."""
        return address(self.address)[:19]

    def check_carriers(self, digest: str) -> None:
        """Refuse a key whose carriers are not the ones this record committed to."""
        if self.carriers_sha256 is None or digest != self.carriers_sha256:
            raise IntegrityError(
                f"the key does not derive the carriers committed in record {address(self.address)}"
            )

    @property
    def carrier_group(self) -> tuple[str, str, int, int]:
        """Records with equal groups share their carriers (same key, marker, d, C)."""
        return (self.fingerprint, self.marker.id, self.dim, self.num_classes)


def mark_record_body(
    *,
    key_fingerprint: str,
    method: str,
    marker: MarkerRef,
    num_classes: int,
    carriers: Mapping[str, Any] | None,
    params: Mapping[str, Any],
    fraction: float,
    selection_rule: str,
    label_field: str,
    counts: Mapping[str, int],
    shards: Sequence[ShardRef],
    plan: Mapping[str, Any] | None = None,
    method_data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The unsigned body of a mark record (the one place its fields are written)."""
    body: dict[str, Any] = {
        "type": MARK_RECORD_TYPE,
        "format_version": 1,
        "key": key_fingerprint,
        "created": utc_timestamp(),
        "radmark_version": __version__,
        "marker": {
            "id": marker.id,
            "name": marker.name,
            "arch": marker.arch,
            "sha256": marker.sha256,
            "dim": marker.dim,
            # where verify finds it by default; its hash is checked, so a moved file only
            # needs --marker, and a different file is refused
            "source": marker.source,
        },
        "dim": marker.dim,
        "num_classes": num_classes,
        "params": dict(params),
        "selection": {"rule": selection_rule, "fraction": fraction, "digest": SELECTION_DIGEST},
        "label_field": label_field,
        "counts": dict(counts),
        "shards": [
            {
                "name": s.name,
                "input_sha256": s.input_sha256,
                "output_sha256": s.output_sha256,
                "samples": s.samples,
                "marked": s.marked,
                "marked_keys_sha256": s.marked_keys_digest,
            }
            for s in shards
        ],
    }
    if carriers is not None:
        body["carriers"] = dict(carriers)
    if method != DEFAULT_METHOD:  # absent = radioactive: records of earlier versions read alike
        body["method"] = method
    if method_data:
        body["method_data"] = dict(method_data)
    if plan is not None:
        body["plan"] = dict(plan)
    return body


@dataclass(frozen=True)
class KitRecord:
    """A verified, schema-checked verification-kit record (see marking/kit.py)."""

    signed: dict[str, Any]
    address: str
    key_fingerprint: str
    mark_record: str
    marker_id: str
    kit_sha256: str
    kit_bytes: int
    kit_format: str
    decoys: int
    per_class: int
    images: int
    image_shape: tuple[int, ...]
    created: str

    @classmethod
    def from_signed(cls, signed: dict[str, Any], hexd: str, where: str = "kit record") -> KitRecord:
        b = _Body(signed, where)
        if b.text("type") != KIT_RECORD_TYPE or b.get("format_version") != 1:
            raise b._bad("type", f"{KIT_RECORD_TYPE!r} version 1")
        kit = b.mapping("kit")
        shape = tuple(b.sequence("image_shape"))
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise b._bad("image_shape", "three positive integers")
        return cls(
            signed=signed,
            address=hexd,
            key_fingerprint=b.hexdigest("key"),
            mark_record=b.hexdigest("mark_record"),
            marker_id=b.text("marker"),
            kit_sha256=b.hexdigest("sha256", kit),
            kit_bytes=b.integer("bytes", 1, kit),
            kit_format=b.text("format", kit),
            decoys=b.integer("decoys", 1),
            per_class=b.integer("per_class", 1),
            images=b.integer("images", 1),
            image_shape=shape,
            created=b.text("created"),
        )

    @property
    def slots(self) -> int:
        return self.decoys + 1


def kit_record_body(
    *,
    record: MarkRecord,
    kit_format: str,
    kit_sha256: str,
    kit_bytes: int,
    decoys: int,
    per_class: int,
    images: int,
    image_shape: Sequence[int],
    statistic: str,
    probe: Sequence[str],
) -> dict[str, Any]:
    """The unsigned body of a kit record (the one place its fields are written)."""
    return {
        "type": KIT_RECORD_TYPE,
        "format_version": 1,
        "key": record.fingerprint,
        "created": utc_timestamp(),
        "radmark_version": __version__,
        "mark_record": record.address,
        "marker": record.marker.id,
        "kit": {"format": kit_format, "sha256": kit_sha256, "bytes": kit_bytes},
        "decoys": decoys,
        "per_class": per_class,
        "images": images,
        "image_shape": [int(v) for v in image_shape],
        "statistic": statistic,
        "augmentation_seed": 0,
        "probe": [str(p) for p in probe],
    }


def check_schema(obj: dict[str, Any], hexd: str, key: PublicKeyRecord, where: str) -> None:
    """Schema check of any signed object the keystore holds (called after its signature check)."""
    kind = obj.get("type")
    if kind == MARK_RECORD_TYPE:
        MarkRecord.from_signed(obj, hexd, key, where)
    elif kind == KIT_RECORD_TYPE:
        rec = KitRecord.from_signed(obj, hexd, where)
        if rec.key_fingerprint != key.fingerprint:
            raise IntegrityError(f"{where}: names another key than the one that signed it")
    # Other types (made by a later version) are authentic but unknown here: listed, never used.
