"""Pretrained ``torchvision:NAME`` and ``timm:NAME`` models, from the local weights cache only.

radmark never starts a download: verification runs on air-gapped machines and must not hang, and
a marker's identity is the hash of the exact weights file. A missing file is a one-line error that
gives the command that fetches it once. ``timm`` is imported only for ``timm:`` specs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from radmark.data.writer import sha256_file
from radmark.errors import ModelError
from radmark.models.heads import resolve_head
from radmark.models.network import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, finalise
from radmark.models.statedict import check_finite


def _offline(spec: str, wanted: str, fetch: str) -> ModelError:
    return ModelError(
        f"{spec}: pretrained weights are not in the local cache and radmark never downloads "
        f"them; fetch them once on a machine with internet: {fetch} (they land in "
        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} as {wanted}), or train a marker on "
        "your own shards offline: radmark marker train SHARDS --out marker.safetensors"
    )


def _pretrained(
    hub: str,
    spec: str,
    name: str,
    model: nn.Module,
    cached: Path,
    head: str | None,
    device: str,
    mean: Iterable[float],
    std: Iterable[float],
    metadata: dict[str, str],
) -> LoadedModel:
    """The checks and bookkeeping shared by every model loaded from a local weights cache."""
    check_finite(model.state_dict(), spec)
    model = finalise(model, device)
    resolved = resolve_head(model, head)
    return LoadedModel(
        name=f"{hub}:{name}",
        source=spec,
        sha256=sha256_file(cached),
        arch=name,
        model=model,
        head=resolved,
        num_classes=resolved.linear.out_features,
        dim=resolved.linear.in_features,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        metadata=metadata,
    )


def load_torchvision(spec: str, name: str, head: str | None, device: str) -> LoadedModel:
    from torchvision.models import get_model, get_model_weights

    try:
        weights = get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ModelError(
            f"{spec}: torchvision has no pretrained classification model {name!r}; "
            "see torchvision.models.list_models()"
        ) from None
    filename = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise _offline(
            spec,
            filename,
            f"python -c \"import torchvision; torchvision.models.get_model('{name}', "
            "weights='DEFAULT')\"",
        )
    try:
        model = get_model(name, weights=weights)
    except Exception as exc:  # noqa: BLE001 - corrupt cache files surface as many types
        raise ModelError(
            f"{spec}: the cached weights {cached} cannot be loaded ({exc}); delete the file and "
            "provide it again"
        ) from None
    transforms = weights.transforms()
    return _pretrained(
        "torchvision",
        spec,
        name,
        model,
        cached,
        head,
        device,
        getattr(transforms, "mean", IMAGENET_MEAN),
        getattr(transforms, "std", IMAGENET_STD),
        {"weights": str(weights), "weights_file": filename},
    )


def load_timm(spec: str, name: str, head: str | None, device: str) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise ModelError(
            f"{spec}: timm is not installed; pip install timm (or, in your radmark checkout, "
            "pip install '.[timm]'), or export the model to .safetensors"
        ) from None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001
        cfg = None
    if cfg is None:
        raise ModelError(f"{spec}: timm has no pretrained model {name!r}; see timm.list_models()")
    cached: Path | None = None
    wanted = name
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(hf_id, fname)
                if isinstance(hit, str) and os.path.isfile(hit):
                    cached = Path(hit)
                    break
        wanted = f"{hf_id} (Hugging Face cache)"
    url = getattr(cfg, "url", None)
    if cached is None and url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        wanted = os.path.basename(url)
        if candidate.is_file():
            cached = candidate
    if cached is None:
        raise _offline(
            spec, wanted, f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
        )
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{spec}: cannot load cached weights {cached} ({exc})") from None
    data_cfg = getattr(model, "pretrained_cfg", {}) or {}
    return _pretrained(
        "timm",
        spec,
        name,
        model,
        cached,
        head,
        device,
        data_cfg.get("mean", IMAGENET_MEAN),
        data_cfg.get("std", IMAGENET_STD),
        {"weights_file": str(cached.name)},
    )
