"""``load_model``: the one door through which every network enters radmark.

Both the marking network and every suspect come through here, so this is where we decide what we
are willing to execute (the rules, and why, are in ``models/files.py`` and
``models/pretrained.py``): safetensors first, otherwise ``torch.load(weights_only=True)`` and
nothing else; always strict; never a download; non-finite weights refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from radmark.errors import ModelError, UsageError
from radmark.models.network import LoadedModel
from radmark.models.registry import get_arch


def load_model(
    spec: str | os.PathLike[str],
    *,
    arch: str | None = None,
    head: str | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load a model from a ``.safetensors``/``.pt`` file, ``torchvision:NAME`` or ``timm:NAME``.

    The result is in eval mode with gradients disabled for its parameters (inputs can still
    require grad).
    """
    from radmark.models.files import load_file
    from radmark.models.pretrained import load_timm, load_torchvision

    text = os.fspath(spec)
    if arch is not None:
        get_arch(arch)  # a UsageError naming the known architectures
    if text.startswith("torchvision:"):
        name = text.split(":", 1)[1].strip()
        if not name:
            raise UsageError("torchvision: needs a model name, e.g. torchvision:resnet18")
        return load_torchvision(text, name, head, device)
    if text.startswith("timm:"):
        name = text.split(":", 1)[1].strip()
        if not name:
            raise UsageError("timm: needs a model name, e.g. timm:resnet50.a1_in1k")
        return load_timm(text, name, head, device)
    path = Path(text).expanduser()
    if not path.exists():
        hint = ""
        if path.suffix == "" and "/" not in text and os.sep not in text:
            hint = f"; for pretrained weights use torchvision:{text}"
        raise ModelError(f"model file {text} does not exist{hint}")
    return load_file(path, arch, head, device)
