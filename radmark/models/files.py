"""Model files: reading safetensors and plain tensor files safely, and writing safetensors.

``.safetensors`` is the preferred format: plain tensors plus a JSON header, so loading it cannot
run code. We still parse the header ourselves first, because a hostile length field could
otherwise make us allocate gigabytes before anything complains. Any other file goes through
``torch.load(..., weights_only=True)`` and nothing else: a checkpoint that needs arbitrary
unpickling is refused, because "verify this suspect model" is exactly the situation where the
file comes from someone we do not trust. Files we write are canonical (sorted header), so the
same weights always have the same SHA-256, hence the same marker identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from radmark.data.writer import sha256_file
from radmark.errors import ModelError, UsageError
from radmark.fsutil import place_file
from radmark.models.heads import resolve_head
from radmark.models.network import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, finalise
from radmark.models.registry import build_model, first_conv, get_arch
from radmark.models.statedict import (
    META_ARCH,
    META_CLASSES,
    META_IN_CHANS,
    META_MEAN,
    META_SMALL_STEM,
    META_STD,
    RESERVED_META,
    check_finite,
    few,
    load_strict,
    meta_build,
    mismatches,
    parse_floats,
    resolve_arch,
    strip_prefixes,
)

#: A safetensors header larger than this is treated as hostile (real headers are kilobytes).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict[str, object]:
    """Parse a safetensors header without trusting its length field.

    The format is an 8-byte little-endian length followed by that many bytes of JSON. We refuse
    lengths beyond the file or above 100 MB *before* reading, so a forged header cannot make us
    allocate memory proportional to a number an attacker chose.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER_BYTES or length > size - 8:
            raise ModelError(
                f"{path} is not a valid safetensors file (header length {length} bytes, file "
                f"{size} bytes); re-export it with safetensors"
            )
        blob = fh.read(length)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"{path} has a corrupt safetensors header; re-export it") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} has a corrupt safetensors header; re-export it")
    return header


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header = read_safetensors_header(path)
    raw_meta = header.get("__metadata__") or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise ModelError(f"{path} has malformed safetensors metadata; re-export it")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{path} is not a readable safetensors file ({exc}); re-export it"
        ) from None
    return state, dict(raw_meta)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` and nothing else: unpickling runs code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a plain tensor file"
        reason = " ".join(str(exc).split())[:200]
        raise ModelError(
            f"refusing to unpickle {path}: it is not loadable with weights_only=True ({reason}); "
            "convert it to safetensors"
        ) from None
    state: object = obj
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                state = inner
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ModelError(
            f"{path} does not hold a state dict (a mapping of names to tensors, possibly under "
            "'state_dict' or 'model'); save model.state_dict() or convert it to safetensors"
        )
    return dict(state)


def load_file(path: Path, arch: str | None, head: str | None, device: str) -> LoadedModel:
    if path.is_dir():
        raise ModelError(f"{path} is a directory; pass the weights file inside it")
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
    else:
        state, meta = _read_torch_file(path), {}
    where = str(path)
    state = strip_prefixes(state)
    check_finite(state, where)
    cand = resolve_arch(state, meta, arch, where)
    if META_CLASSES in meta and meta[META_CLASSES] != str(cand.num_classes):
        raise ModelError(
            f"{where}: metadata says {meta[META_CLASSES]} classes but the head has "
            f"{cand.num_classes}; the file is inconsistent"
        )
    mean = parse_floats(meta[META_MEAN], META_MEAN, where) if META_MEAN in meta else None
    std = parse_floats(meta[META_STD], META_STD, where) if META_STD in meta else None
    mean = mean or (IMAGENET_MEAN if cand.in_chans == 3 else (0.5,) * cand.in_chans)
    std = std or (IMAGENET_STD if cand.in_chans == 3 else (0.5,) * cand.in_chans)
    if len(mean) not in (1, cand.in_chans) or len(std) not in (1, cand.in_chans):
        raise ModelError(f"{where}: mean/std metadata do not match {cand.in_chans} channels")
    if any(s <= 0 for s in std):
        raise ModelError(f"{where}: metadata {META_STD} must be positive")

    model = build_model(
        cand.arch, cand.num_classes, small_stem=cand.small_stem, in_chans=cand.in_chans
    )
    load_strict(model, state, where)
    del state
    model = finalise(model, device)
    resolved = resolve_head(model, head)
    return LoadedModel(
        name=cand.arch,
        source=str(path),
        sha256=sha256_file(path),
        arch=cand.arch,
        model=model,
        head=resolved,
        num_classes=resolved.linear.out_features,
        dim=resolved.linear.in_features,
        mean=mean,
        std=std,
        metadata=meta,
        in_chans=cand.in_chans,
    )


def canonical_safetensors(data: bytes) -> bytes:
    """Re-serialise the header with sorted keys so the same weights always give the same bytes.

    safetensors writes its metadata map in hash-map order, which changes from process to process;
    a marker's identity is the SHA-256 of its file, so without this one model saved twice would
    get two identities (and two sets of carriers). Offsets are relative to the data section, so
    a different header length is harmless; the header is padded with spaces to 8 bytes.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save_model(
    model: nn.Module,
    path: Path | str,
    *,
    arch: str,
    num_classes: int,
    small_stem: bool = False,
    mean: Iterable[float] = IMAGENET_MEAN,
    std: Iterable[float] = IMAGENET_STD,
    extra: dict[str, str] | None = None,
    overwrite: bool = True,
) -> str:
    """Write ``model`` as safetensors with the metadata :func:`load_model` needs; return SHA-256.

    The file is written to a temporary name and renamed into place, so a crash never leaves a
    truncated model that later loads as something else; ``overwrite=False`` refuses an existing
    ``path`` (``marker train`` without ``--force``). The state dict is checked against
    ``arch`` first, so a file that claims an architecture always loads as it.
    """
    from safetensors.torch import save

    get_arch(arch)  # a UsageError naming the known architectures
    path = Path(path)
    mean_t = tuple(float(v) for v in mean)
    std_t = tuple(float(v) for v in std)
    if not mean_t or len(mean_t) != len(std_t) or any(s <= 0 for s in std_t):
        raise UsageError("mean and std must be non-empty lists of equal length, std positive")
    extra = dict(extra or {})
    clash = [k for k in extra if k in RESERVED_META]
    if clash:
        raise UsageError(f"extra metadata may not set reserved keys: {', '.join(clash)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise UsageError("extra metadata must map strings to strings")

    state = strip_prefixes(model.state_dict())
    conv = first_conv(model)
    in_chans = conv[1].in_channels if conv is not None else 3
    if len(mean_t) not in (1, in_chans):
        raise UsageError(f"mean/std have {len(mean_t)} values but the model takes {in_chans}")
    expected = meta_build(arch, num_classes, small_stem, in_chans)
    missing, unexpected, wrong = mismatches(expected, state)
    if missing or unexpected or wrong:
        bad = few([*missing, *unexpected, *wrong])
        raise UsageError(f"the model is not a {arch} with {num_classes} classes: {bad}")
    check_finite(state, "model to save")

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {
        **extra,
        META_ARCH: arch,
        META_CLASSES: str(num_classes),
        META_SMALL_STEM: "1" if small_stem else "0",
        META_IN_CHANS: str(in_chans),
        META_MEAN: json.dumps(list(mean_t)),
        META_STD: json.dumps(list(std_t)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        data = canonical_safetensors(save(tensors, metadata=metadata))
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        digest = hashlib.sha256(data).hexdigest()
        place_file(Path(tmp), path, overwrite=overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest
