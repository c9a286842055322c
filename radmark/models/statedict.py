"""What a state dict must be before radmark builds a model from it.

Loading is always strict (the official code's ``strict=False`` silently turned a mismatched marker
into a partly random one); non-finite weights are refused (NaN must never reach a p-value as "not
detected"); and a bare state dict's architecture is *recognised* by building every registered
candidate on the meta device and demanding an exact match of names and shapes, so it costs
milliseconds and never picks a "close enough" architecture.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from radmark.errors import ModelError, UsageError
from radmark.models.registry import ARCH_REGISTRY, build_model, first_conv, get_arch

META_ARCH = "radmark.arch"
META_CLASSES = "radmark.num_classes"
META_SMALL_STEM = "radmark.small_stem"
META_IN_CHANS = "radmark.in_chans"
META_MEAN = "radmark.mean"
META_STD = "radmark.std"
RESERVED_META = (META_ARCH, META_CLASSES, META_SMALL_STEM, META_IN_CHANS, META_MEAN, META_STD)
_STRIP_PREFIXES = ("module.", "_orig_mod.")
#: torchvision's published DenseNet weights use pre-0.4 names ("norm.1" for "norm1"); torchvision
#: renames them when it loads its own weights, we do the same for files holding that state dict.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel ("module.") / torch.compile ("_orig_mod.") prefixes; fix legacy names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if new.startswith(prefix):
                    new = new[len(prefix) :]
                    changed = True
        legacy = _DENSENET_LEGACY.match(new)
        if legacy is not None:
            new = legacy.group(1) + legacy.group(2)
        if new in out:
            raise ModelError(f"duplicate tensor {new!r} after removing wrapper prefixes")
        out[new] = value
    return out


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/inf weights; exotic float types (float8, ...) are widened to check them."""
    for key, value in state.items():
        floating = value.is_floating_point() or value.is_complex()
        if not floating:
            continue
        if not value.is_complex() and value.dtype not in _FLOATS:
            try:
                value = value.to(torch.float32)
            except (RuntimeError, TypeError):
                raise ModelError(
                    f"{where}: tensor {key!r} has dtype {value.dtype}, which radmark cannot read; "
                    "save the model in float32, float16 or bfloat16"
                ) from None
        if not bool(torch.isfinite(value).all()):
            raise ModelError(
                f"{where}: tensor {key!r} contains NaN or inf; the model is corrupt or "
                "diverged and cannot be tested"
            )


def few(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _is_optional_buffer(key: str) -> bool:
    """BatchNorm step counters: some exporters drop them and they never affect inference."""
    return key.endswith("num_batches_tracked")


def mismatches(
    expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in state and not _is_optional_buffer(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    return missing, unexpected, wrong


def _expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def meta_build(
    arch: str, num_classes: int, small_stem: bool, in_chans: int
) -> dict[str, torch.Size]:
    """State-dict shapes of an architecture without allocating any memory."""
    with torch.device("meta"):
        return _expected_shapes(
            build_model(arch, num_classes, small_stem=small_stem, in_chans=in_chans)
        )


@dataclass(frozen=True)
class _Candidate:
    arch: str
    num_classes: int
    small_stem: bool
    in_chans: int


def _candidate_for(
    arch: str, small_stem: bool, state: Mapping[str, torch.Tensor], in_chans: int | None
) -> _Candidate | None:
    head_key = get_arch(arch).head_key
    head = state.get(head_key)
    if head is None or head.ndim != 2 or head.shape[0] < 1:
        return None
    if in_chans is None:
        with torch.device("meta"):
            probe = build_model(arch, 1, small_stem=small_stem)
        found = first_conv(probe)
        conv = state.get(f"{found[0]}.weight") if found else None
        in_chans = int(conv.shape[1]) if conv is not None and conv.ndim == 4 else 3
    return _Candidate(arch, int(head.shape[0]), small_stem, max(in_chans, 1))


def _matches(candidate: _Candidate, state: Mapping[str, torch.Tensor]) -> bool:
    try:
        expected = meta_build(
            candidate.arch, candidate.num_classes, candidate.small_stem, candidate.in_chans
        )
    except (UsageError, RuntimeError, ValueError):
        return False
    missing, unexpected, wrong = mismatches(expected, state)
    return not (missing or unexpected or wrong)


def resolve_arch(
    state: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    arch: str | None,
    where: str,
) -> _Candidate:
    """Decide arch / num_classes / stem for a state dict: metadata, then --arch, then recognition.

    Recognition builds every candidate on the meta device and demands an exact match of names and
    shapes, so it costs milliseconds and cannot pick a "close enough" architecture.
    """
    meta_arch = meta.get(META_ARCH)
    if meta_arch is not None and arch is not None and meta_arch != arch:
        raise ModelError(
            f"{where} says its architecture is {meta_arch!r} but --arch {arch} was given; "
            "drop --arch"
        )
    chosen = meta_arch or arch
    if chosen is not None and chosen not in ARCH_REGISTRY:
        if meta_arch is not None:
            raise ModelError(
                f"{where} has architecture {meta_arch!r}, which this version cannot build "
                f"(known: {', '.join(ARCH_REGISTRY)})"
            )
        get_arch(chosen)  # raises the usage error listing the known architectures

    stems: tuple[bool, ...] = (False, True)
    if META_SMALL_STEM in meta:
        stems = (meta[META_SMALL_STEM] == "1",)
    in_chans: int | None = None
    if META_IN_CHANS in meta:
        try:
            in_chans = int(meta[META_IN_CHANS])
        except ValueError:
            raise ModelError(f"{where}: bad metadata {META_IN_CHANS}") from None

    archs = (chosen,) if chosen is not None else tuple(ARCH_REGISTRY)
    found: list[_Candidate] = []
    for name in archs:
        for stem in stems:
            if stem and not get_arch(name).resnet_stem:
                continue
            cand = _candidate_for(name, stem, state, in_chans)
            if cand is not None and _matches(cand, state):
                found.append(cand)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(f"{c.arch}{' (small stem)' if c.small_stem else ''}" for c in found)
        raise ModelError(f"{where} matches several architectures ({names}); pass --arch NAME")
    if chosen is None:
        raise ModelError(
            f"could not recognise the architecture of {where}; pass --arch NAME "
            f"(one of {', '.join(ARCH_REGISTRY)})"
        )
    # A named architecture that does not fit: say which tensors are wrong.
    stem = stems[0]
    if get_arch(chosen).resnet_stem and len(stems) == 2:
        conv1 = state.get("conv1.weight")
        stem = conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3)
    cand = _candidate_for(chosen, stem, state, in_chans)
    if cand is None:
        raise ModelError(
            f"{where} has no {get_arch(chosen).head_key!r} tensor, so it is not a {chosen}; check --arch"
        )
    expected = meta_build(cand.arch, cand.num_classes, cand.small_stem, cand.in_chans)
    raise ModelError(f"{where} does not fit {chosen}: {_misfit(expected, state)}; check --arch")


def _misfit(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor]) -> str:
    """What is wrong with ``state`` against ``expected`` ("" when it fits), for one error line."""
    missing, unexpected, wrong = mismatches(expected, state)
    parts = [f"{what} {few(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]  # fmt: skip
    return "; ".join(parts)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    expected = _expected_shapes(model)
    misfit = _misfit(expected, state)
    if misfit:
        raise ModelError(f"{where} does not fit the architecture: {misfit}")
    full = dict(state)
    for key, shape in expected.items():
        if key not in full:  # an optional BatchNorm counter
            full[key] = torch.zeros(shape, dtype=torch.long)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(
            f"{where} does not fit the architecture: {first[-1] if first else exc}"
        ) from None


def parse_floats(value: str, key: str, where: str) -> tuple[float, ...]:
    try:
        parsed = json.loads(value)
        out = tuple(float(v) for v in parsed)
    except (ValueError, TypeError):
        raise ModelError(f"{where}: metadata {key} is not a JSON list of numbers") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ModelError(f"{where}: metadata {key} must be a non-empty list of finite numbers")
    return out
