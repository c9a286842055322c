"""The probe guard: images marked with the key under test must not reach the clean probe set.

The white-box alignment is fitted on the probe; if the probe holds images marked with the key
being tested, the fitted map depends on the carriers and the test is no longer exact (issue #17:
measured +0.0125 per-class cosine bias with a fully marked probe, which adds up over classes).
The guard refuses, before any feature is extracted:

- a probe shard file whose SHA-256 is the output hash of a shard that a mark record of the key
  wrote (the common mistake: passing the marked shards as ``--probe``);
- a probe image whose decoded pixels are, bit for bit, an image a run of the key marked (shards
  re-packed or renamed), when the keystore holds that run's private index of marked pixels
  (``marked_pixel_digests``: keyed digests, so the index reveals nothing without the key).

What it cannot see: marked images re-encoded lossily or edited; docs/method.md states the residual
bias measured in that case.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from radmark.data.writer import sha256_file
from radmark.errors import InputError
from radmark.keys.keypair import pixel_digest

if TYPE_CHECKING:
    from radmark.data.arrays import Probe
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord


def check_probe_shards(probe: Sequence[str], records: Iterable[MarkRecord]) -> None:
    """Refuse a probe shard that is an output shard of any of ``records`` (by file hash)."""
    from radmark.data.sources import expand_shards

    marked = {s.output_sha256: (rec, s.name) for rec in records for s in rec.shards}
    if not marked:
        return
    for url in expand_shards(list(probe)):
        if url.startswith("pipe:"):
            continue  # hashed only where it can be read twice; the pixel index still applies
        digest = sha256_file(Path(url))
        if digest in marked:
            rec, name = marked[digest]
            raise InputError(
                f"probe shard {url} is the marked shard {name} of mark record {rec.short}: the "
                "probe must be clean images that were never marked (a marked probe biases the "
                "white-box test); use a held-out split"
            )


def check_probe_pixels(probe: Probe, key: SecretKey, marked: set[bytes], record: str) -> None:
    """Refuse a probe holding any image whose pixels a run of this key marked."""
    if not marked:
        return
    seed = key.selection_seed()
    for i in range(probe.images.shape[0]):
        if pixel_digest(seed, probe.images[i]) in marked:
            raise InputError(
                f"probe image {probe.keys[i]} is an image marked by mark record {record}: the "
                "probe must be clean images that were never marked; use a held-out split"
            )
