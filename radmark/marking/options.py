"""What a marking run is asked to do: the options of ``radmark mark``, checked before any work.

Options are checked here, before hours of marking, not after (a bad kit probe, a bad fraction, a
kit asked of a method that has none).
``plan`` is the verification plan the run signs into its mark record (``keys/plan.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from radmark.data.sources import expand_shards
from radmark.errors import UsageError, check_count
from radmark.marking.methods import DEFAULT_METHOD, decoy_kit_step
from radmark.marking.pipeline import MAX_BATCH_PIXELS


@dataclass(frozen=True)
class KitRequest:
    """Build the black-box verification kit right after marking (``--kit-probe``)."""

    probe: Sequence[str]
    decoys: int = 39
    per_class: int = 10


@dataclass(frozen=True)
class MarkOptions:
    fraction: float = 0.1
    method: str = DEFAULT_METHOD
    preset: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # default: the marker's number of classes
    label_field: str = "cls"
    batch_size: int = 64
    device: str = "cpu"
    resume: bool = False
    on_error: str = "fail"  # "fail" | "skip" (copy the sample unmarked, count it)
    kit: KitRequest | None = None
    reencode_all: bool = False  # re-encode unmarked images too: encodings reveal nothing
    max_batch_pixels: int = MAX_BATCH_PIXELS  # decoded pixels marked together (and per image)
    force: bool = False  # replace same-named files in an --out that has no manifest
    plan: Mapping[str, Any] | None = None  # the verification plan signed into the record


def check_options(options: MarkOptions) -> None:
    if not 0.0 < options.fraction <= 1.0:
        raise UsageError(f"--fraction must be in (0, 1], got {options.fraction}")
    if options.on_error not in ("fail", "skip"):
        raise UsageError("--on-error must be 'fail' or 'skip'")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.max_batch_pixels < 1:
        raise UsageError(f"--max-batch-pixels must be at least 1, got {options.max_batch_pixels}")
    check_count("--num-classes", options.num_classes)
    if options.kit is not None:  # checked before hours of marking, not after
        decoy_kit_step(options.method, "--kit-probe")
        if options.kit.decoys < 1 or options.kit.per_class < 1:
            raise UsageError("--kit-decoys and --kit-per-class must be at least 1")
        expand_shards(options.kit.probe)
