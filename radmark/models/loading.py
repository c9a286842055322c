"""Architectures, safe model loading and classifier-head resolution.

Both the marking network and every suspect model come through :func:`load_model`, so this module
is where we decide what we are willing to execute. The rules, and why:

* ``.safetensors`` is the preferred format: it is plain tensors plus a JSON header, so loading it
  cannot run code. We still parse the header ourselves first, because a hostile length field could
  otherwise make us allocate gigabytes before anything complains.
* Any other file goes through ``torch.load(..., weights_only=True)`` and nothing else. A checkpoint
  that needs arbitrary unpickling is refused: unpickling is code execution, and "verify this suspect
  model" is exactly the situation where the file comes from someone we do not trust.
* Loading is always strict. The official radioactive-data code loaded with ``strict=False``, so a
  mismatched marker silently became partly random and every downstream p-value was meaningless.
* Non-finite weights are refused: they would turn the alignment and every statistic into NaN, and
  NaN must never be reported as "not detected".
* ``torchvision:NAME`` / ``timm:NAME`` use only weights already in the local cache; we never start
  a download (verification runs on air-gapped machines and must not hang).

Importing this module imports torch and torchvision (CPU-safe) but never CUDA-only code, and never
touches the network. ``timm`` is imported lazily, only for ``timm:`` specs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from radmark.errors import ModelError, UsageError

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Head",
    "LoadedModel",
    "SmallCNN",
    "build_model",
    "load_model",
    "read_safetensors_header",
    "resolve_head",
    "save_model",
]

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

#: torchvision architectures we can build from scratch and recognise in a bare state dict.
_TORCHVISION_ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11_bn",
    "vgg16",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "vit_b_16",
)
ARCHS: tuple[str, ...] = (*_TORCHVISION_ARCHS, "smallcnn")

#: Key of the final classifier weight in each architecture's state dict. Recognition reads the
#: number of classes from it, so it must name the *last* Linear of the network.
_HEAD_KEYS: dict[str, str] = {
    "resnet18": "fc.weight",
    "resnet34": "fc.weight",
    "resnet50": "fc.weight",
    "vgg11_bn": "classifier.6.weight",
    "vgg16": "classifier.6.weight",
    "mobilenet_v2": "classifier.1.weight",
    "mobilenet_v3_small": "classifier.3.weight",
    "efficientnet_b0": "classifier.1.weight",
    "densenet121": "classifier.weight",
    "vit_b_16": "heads.head.weight",
    "smallcnn": "fc.weight",
}

_META_ARCH = "radmark.arch"
_META_CLASSES = "radmark.num_classes"
_META_SMALL_STEM = "radmark.small_stem"
_META_IN_CHANS = "radmark.in_chans"
_META_MEAN = "radmark.mean"
_META_STD = "radmark.std"
_RESERVED_META = (
    _META_ARCH,
    _META_CLASSES,
    _META_SMALL_STEM,
    _META_IN_CHANS,
    _META_MEAN,
    _META_STD,
)

#: A safetensors header larger than this is treated as hostile (real headers are kilobytes).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_STRIP_PREFIXES = ("module.", "_orig_mod.")
#: torchvision's published DenseNet weights use pre-0.4 names ("norm.1" for "norm1"); torchvision
#: renames them when it loads its own weights, we do the same for files holding that state dict.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """A tiny VGG-style CNN (32-64-128 channels, feature dim 128).

    It exists so that tests, the benchmark and CPU-only users can train and mark with a network
    that runs in milliseconds; it is not meant to be a strong classifier.
    """

    def __init__(self, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(in_chans, 32), *block(32, 64), *block(64, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _unknown_arch(arch: str) -> UsageError:
    return UsageError(f"unknown architecture {arch!r}; use one of: {', '.join(ARCHS)}")


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def build_model(
    arch: str, num_classes: int, *, small_stem: bool = False, in_chans: int = 3
) -> nn.Module:
    """Build an untrained ``arch`` with ``num_classes`` outputs (never downloads weights).

    ``small_stem`` gives ResNets the CIFAR-style stem (3x3 stride-1 conv1, no max-pool) that small
    images need to keep any spatial resolution; it is refused for other architectures rather than
    silently ignored, because a state dict saved with it would then fail to reload. ``in_chans``
    replaces the first convolution, so grayscale datasets can be trained natively.
    """
    if arch not in ARCHS:
        raise _unknown_arch(arch)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise UsageError(f"in_chans must be a positive integer, got {in_chans!r}")
    if small_stem and not arch.startswith("resnet"):
        raise UsageError(
            f"--small-stem only applies to ResNets, not {arch}; drop it or pick a resnet"
        )
    if arch == "smallcnn":
        return SmallCNN(num_classes, in_chans=in_chans)

    from torchvision.models import get_model

    model = get_model(arch, weights=None, num_classes=num_classes)
    if small_stem:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        found = _first_conv(model)
        assert found is not None  # every torchvision arch in ARCHS starts with a convolution
        name, conv = found
        _replace_module(
            model,
            name,
            nn.Conv2d(
                in_chans,
                conv.out_channels,
                kernel_size=conv.kernel_size,  # type: ignore[arg-type]
                stride=conv.stride,  # type: ignore[arg-type]
                padding=conv.padding,  # type: ignore[arg-type]
                dilation=conv.dilation,  # type: ignore[arg-type]
                groups=conv.groups,
                bias=conv.bias is not None,
            ),
        )
    return model


# --------------------------------------------------------------------------------------------
# Head resolution
# --------------------------------------------------------------------------------------------


class _Captured(BaseException):  # noqa: N818 - control flow, not an error
    """Carries the head's input out of the forward pass (BaseException: survives `except
    Exception` inside user models)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class _LinearInput(nn.Module):
    """Penultimate features = whatever the classifier Linear receives.

    A forward pre-hook captures the Linear's input and aborts the pass, so nothing after the head
    runs and the original model is neither copied nor modified (the hook lives only for the
    duration of one call). This is exact for any model whose logits are that Linear's output,
    whatever the forward does before it.
    """

    def __init__(self, model: nn.Module, linear: nn.Linear, name: str) -> None:
        super().__init__()
        self.model = model
        self.linear = linear
        self.head_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            raise _Captured(args[0])

        handle = self.linear.register_forward_pre_hook(hook)
        try:
            self.model(x)
        except _Captured as captured:
            out = captured.value
        else:
            raise ModelError(
                f"the model's forward never called its head {self.head_name!r}; "
                "pass --head NAME naming the final nn.Linear"
            )
        finally:
            handle.remove()
        if out.ndim != 2:
            raise ModelError(
                f"head {self.head_name!r} receives a tensor of shape {tuple(out.shape)}, not "
                "[batch, features]; pass --head NAME naming a Linear applied to pooled features"
            )
        return out


class _TimmFeatures(nn.Module):
    """timm's own split of a model into trunk and pre-logits (pooling, norms, dropout)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return torch.flatten(feats, 1)


@dataclass
class Head:
    """A model split into ``features`` (input -> penultimate [B, d]) and its ``linear`` head."""

    features: nn.Module
    linear: nn.Linear
    name: str


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    return type(target).__name__


def _last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    found: tuple[str, nn.Linear] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found


#: Where torchvision families (and our SmallCNN) keep their classifier, in lookup order:
#: ResNet/RegNet/SmallCNN "fc"; VGG/EfficientNet/MobileNet last Linear of "classifier";
#: DenseNet "classifier"; ViT "heads.head"; Swin/ConvNeXt-style "head".
_HEAD_CANDIDATES: tuple[str, ...] = ("fc", "classifier", "heads.head", "heads", "head")


def resolve_head(model: nn.Module, head: str | None = None) -> Head:
    """Split ``model`` into penultimate features and its final Linear.

    ``head`` (a dotted module name, e.g. ``classifier.6``) overrides the automatic choice for
    architectures we do not know. The features are the exact input of that Linear, so
    ``head.linear(head.features(x)) == model(x)`` whenever the Linear produces the logits.
    """
    if head is not None:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-3:]
            hint = f" (its last Linear layers: {', '.join(names)})" if names else ""
            raise ModelError(f"the model has no module named {head!r}{hint}") from None
        if not isinstance(module, nn.Linear):
            raise ModelError(
                f"head {head!r} is a {type(module).__name__}, not nn.Linear; "
                "pass --head NAME naming the final Linear layer"
            )
        return Head(features=_LinearInput(model, module, head), linear=module, name=head)

    if all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        classifier = model.get_classifier()  # type: ignore[operator]
        if not isinstance(classifier, nn.Linear):
            raise ModelError(
                f"the model's classifier is a {type(classifier).__name__}, not nn.Linear "
                "(e.g. num_classes=0); pass --head NAME naming the final Linear layer"
            )
        name = _module_name(model, classifier)
        return Head(features=_TimmFeatures(model), linear=classifier, name=name)

    for candidate in _HEAD_CANDIDATES:
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return Head(_LinearInput(model, module, candidate), module, candidate)
        found = _last_linear(module)
        if found is not None:
            sub, linear = found
            name = f"{candidate}.{sub}"
            return Head(_LinearInput(model, linear, name), linear, name)
    raise ModelError(
        f"cannot find the classifier head of this {type(model).__name__}; "
        "pass --head NAME with the dotted name of its final nn.Linear"
    )


# --------------------------------------------------------------------------------------------
# Loaded models
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for feature extraction, with the provenance verification reports print.

    ``sha256`` identifies the weights: for files, the hash of the file's bytes; for
    ``torchvision:``/``timm:`` specs, the hash of the cached weights file that was loaded.
    """

    name: str
    source: str
    sha256: str
    arch: str
    model: nn.Module
    head: Head
    num_classes: int
    dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    in_chans: int = 3

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, d] float32 of images ``x`` in [0, 1].

        Grayscale images are replicated to 3 channels (the marker sees them that way, method.md)
        and normalisation happens here, so callers always pass raw pixels. Differentiable in
        ``x``: marking back-propagates through it.
        """
        if x.ndim != 4:
            raise UsageError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        channels = x.shape[1]
        if channels != self.in_chans:
            if channels == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            else:
                raise UsageError(
                    f"images have {channels} channels but {self.name} takes {self.in_chans}; "
                    "convert the images first"
                )
        device = self._device()
        x = x.to(device=device, dtype=torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        out = self.head.features((x - mean) / std)
        return out.reshape(out.shape[0], -1).float()

    def weight(self) -> torch.Tensor:
        """Classifier weight [C, d] in float64 (the bias carries no carrier direction)."""
        return self.head.linear.weight.detach().to(device="cpu", dtype=torch.float64)


def _finalise(model: nn.Module, device: str) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    try:
        return model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"cannot use device {device!r}: {exc}; try --device cpu") from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    for key, value in state.items():
        floating = value.is_floating_point() or value.is_complex()
        if floating and not bool(torch.isfinite(value).all()):
            raise ModelError(
                f"{where}: tensor {key!r} contains NaN or inf; the model is corrupt or "
                "diverged and cannot be tested"
            )


def _few(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _is_optional_buffer(key: str) -> bool:
    """BatchNorm step counters: some exporters drop them and they never affect inference."""
    return key.endswith("num_batches_tracked")


def _mismatches(
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


def _meta_build(
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
    head_key = _HEAD_KEYS[arch]
    head = state.get(head_key)
    if head is None or head.ndim != 2 or head.shape[0] < 1:
        return None
    if in_chans is None:
        with torch.device("meta"):
            probe = build_model(arch, 1, small_stem=small_stem)
        found = _first_conv(probe)
        conv = state.get(f"{found[0]}.weight") if found else None
        in_chans = int(conv.shape[1]) if conv is not None and conv.ndim == 4 else 3
    return _Candidate(arch, int(head.shape[0]), small_stem, max(in_chans, 1))


def _matches(candidate: _Candidate, state: Mapping[str, torch.Tensor]) -> bool:
    try:
        expected = _meta_build(
            candidate.arch, candidate.num_classes, candidate.small_stem, candidate.in_chans
        )
    except (UsageError, RuntimeError, ValueError):
        return False
    missing, unexpected, wrong = _mismatches(expected, state)
    return not (missing or unexpected or wrong)


def _resolve_arch(
    state: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    arch: str | None,
    where: str,
) -> _Candidate:
    """Decide arch / num_classes / stem for a state dict: metadata, then --arch, then recognition.

    Recognition builds every candidate on the meta device and demands an exact match of names and
    shapes, so it costs milliseconds and cannot pick a "close enough" architecture.
    """
    meta_arch = meta.get(_META_ARCH)
    if meta_arch is not None and arch is not None and meta_arch != arch:
        raise ModelError(
            f"{where} says its architecture is {meta_arch!r} but --arch {arch} was given; "
            "drop --arch"
        )
    chosen = meta_arch or arch
    if chosen is not None and chosen not in ARCHS:
        if meta_arch is not None:
            raise ModelError(
                f"{where} has architecture {meta_arch!r}, which this version cannot build "
                f"(known: {', '.join(ARCHS)})"
            )
        raise _unknown_arch(chosen)

    stems: tuple[bool, ...] = (False, True)
    if _META_SMALL_STEM in meta:
        stems = (meta[_META_SMALL_STEM] == "1",)
    in_chans: int | None = None
    if _META_IN_CHANS in meta:
        try:
            in_chans = int(meta[_META_IN_CHANS])
        except ValueError:
            raise ModelError(f"{where}: bad metadata {_META_IN_CHANS}") from None

    archs = (chosen,) if chosen is not None else ARCHS
    found: list[_Candidate] = []
    for name in archs:
        for stem in stems:
            if stem and not name.startswith("resnet"):
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
            f"(one of {', '.join(ARCHS)})"
        )
    # A named architecture that does not fit: say which tensors are wrong.
    stem = stems[0]
    if chosen.startswith("resnet") and len(stems) == 2:
        conv1 = state.get("conv1.weight")
        stem = conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3)
    cand = _candidate_for(chosen, stem, state, in_chans)
    if cand is None:
        raise ModelError(
            f"{where} has no {_HEAD_KEYS[chosen]!r} tensor, so it is not a {chosen}; check --arch"
        )
    expected = _meta_build(cand.arch, cand.num_classes, cand.small_stem, cand.in_chans)
    missing, unexpected, wrong = _mismatches(expected, state)
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    if wrong:
        parts.append(f"wrong shape {_few(wrong)}")
    raise ModelError(f"{where} does not fit {chosen}: {'; '.join(parts)}; check --arch")


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    expected = _expected_shapes(model)
    missing, unexpected, wrong = _mismatches(expected, state)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {_few(wrong)}")
        raise ModelError(f"{where} does not fit the architecture: {'; '.join(parts)}")
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


def _parse_floats(value: str, key: str, where: str) -> tuple[float, ...]:
    try:
        parsed = json.loads(value)
        out = tuple(float(v) for v in parsed)
    except (ValueError, TypeError):
        raise ModelError(f"{where}: metadata {key} is not a JSON list of numbers") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ModelError(f"{where}: metadata {key} must be a non-empty list of finite numbers")
    return out


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


def _load_file(path: Path, arch: str | None, head: str | None, device: str) -> LoadedModel:
    if path.is_dir():
        raise ModelError(f"{path} is a directory; pass the weights file inside it")
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
    else:
        state, meta = _read_torch_file(path), {}
    where = str(path)
    state = _strip_prefixes(state)
    _check_finite(state, where)
    cand = _resolve_arch(state, meta, arch, where)
    if _META_CLASSES in meta and meta[_META_CLASSES] != str(cand.num_classes):
        raise ModelError(
            f"{where}: metadata says {meta[_META_CLASSES]} classes but the head has "
            f"{cand.num_classes}; the file is inconsistent"
        )
    mean = _parse_floats(meta[_META_MEAN], _META_MEAN, where) if _META_MEAN in meta else None
    std = _parse_floats(meta[_META_STD], _META_STD, where) if _META_STD in meta else None
    mean = mean or (IMAGENET_MEAN if cand.in_chans == 3 else (0.5,) * cand.in_chans)
    std = std or (IMAGENET_STD if cand.in_chans == 3 else (0.5,) * cand.in_chans)
    if len(mean) not in (1, cand.in_chans) or len(std) not in (1, cand.in_chans):
        raise ModelError(f"{where}: mean/std metadata do not match {cand.in_chans} channels")
    if any(s <= 0 for s in std):
        raise ModelError(f"{where}: metadata {_META_STD} must be positive")

    model = build_model(
        cand.arch, cand.num_classes, small_stem=cand.small_stem, in_chans=cand.in_chans
    )
    _load_strict(model, state, where)
    del state
    model = _finalise(model, device)
    resolved = resolve_head(model, head)
    return LoadedModel(
        name=cand.arch,
        source=str(path),
        sha256=_sha256_file(path),
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


def _offline(spec: str, wanted: str) -> ModelError:
    return ModelError(
        f"{spec}: pretrained weights are not in the local cache and radmark never downloads "
        f"(offline); put {wanted} in $TORCH_HOME/hub/checkpoints "
        f"({os.path.join(torch.hub.get_dir(), 'checkpoints')}) or pass a .safetensors file"
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
    _check_finite(model.state_dict(), spec)
    model = _finalise(model, device)
    resolved = resolve_head(model, head)
    return LoadedModel(
        name=f"{hub}:{name}",
        source=spec,
        sha256=_sha256_file(cached),
        arch=name,
        model=model,
        head=resolved,
        num_classes=resolved.linear.out_features,
        dim=resolved.linear.in_features,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        metadata=metadata,
    )


def _load_torchvision(spec: str, name: str, head: str | None, device: str) -> LoadedModel:
    from torchvision.models import get_model, get_model_weights

    try:
        weights = get_model_weights(name).DEFAULT  # type: ignore[attr-defined]
    except (ValueError, KeyError, AttributeError):
        raise ModelError(
            f"{spec}: torchvision has no pretrained classification model {name!r}; "
            "see torchvision.models.list_models()"
        ) from None
    filename = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise _offline(spec, filename)
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


def _load_timm(spec: str, name: str, head: str | None, device: str) -> LoadedModel:
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        raise ModelError(
            f"{spec}: timm is not installed; pip install timm, or export the model to .safetensors"
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
        raise _offline(spec, wanted)
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


def load_model(
    spec: str | os.PathLike[str],
    *,
    arch: str | None = None,
    head: str | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load a model from a ``.safetensors``/``.pt`` file, ``torchvision:NAME`` or ``timm:NAME``.

    The result is in eval mode with gradients disabled for its parameters (inputs can still
    require grad). See the module docstring for what is refused and why.
    """
    text = os.fspath(spec)
    if arch is not None and arch not in ARCHS:
        raise _unknown_arch(arch)
    if text.startswith("torchvision:"):
        name = text.split(":", 1)[1].strip()
        if not name:
            raise UsageError("torchvision: needs a model name, e.g. torchvision:resnet18")
        return _load_torchvision(text, name, head, device)
    if text.startswith("timm:"):
        name = text.split(":", 1)[1].strip()
        if not name:
            raise UsageError("timm: needs a model name, e.g. timm:resnet50.a1_in1k")
        return _load_timm(text, name, head, device)
    path = Path(text).expanduser()
    if not path.exists():
        hint = ""
        if path.suffix == "" and "/" not in text and os.sep not in text:
            hint = f"; for pretrained weights use torchvision:{text}"
        raise ModelError(f"model file {text} does not exist{hint}")
    return _load_file(path, arch, head, device)


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
) -> str:
    """Write ``model`` as safetensors with the metadata :func:`load_model` needs; return SHA-256.

    The file is written to a temporary name and renamed into place, so a crash never leaves a
    truncated model that later loads as something else. The state dict is checked against
    ``arch`` first, so a file that claims an architecture always loads as it.
    """
    from safetensors.torch import save

    if arch not in ARCHS:
        raise _unknown_arch(arch)
    path = Path(path)
    mean_t = tuple(float(v) for v in mean)
    std_t = tuple(float(v) for v in std)
    if not mean_t or len(mean_t) != len(std_t) or any(s <= 0 for s in std_t):
        raise UsageError("mean and std must be non-empty lists of equal length, std positive")
    extra = dict(extra or {})
    clash = [k for k in extra if k in _RESERVED_META]
    if clash:
        raise UsageError(f"extra metadata may not set reserved keys: {', '.join(clash)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise UsageError("extra metadata must map strings to strings")

    state = _strip_prefixes(model.state_dict())
    conv = _first_conv(model)
    in_chans = conv[1].in_channels if conv is not None else 3
    if len(mean_t) not in (1, in_chans):
        raise UsageError(f"mean/std have {len(mean_t)} values but the model takes {in_chans}")
    expected = _meta_build(arch, num_classes, small_stem, in_chans)
    missing, unexpected, wrong = _mismatches(expected, state)
    if missing or unexpected or wrong:
        bad = _few([*missing, *unexpected, *wrong])
        raise UsageError(f"the model is not a {arch} with {num_classes} classes: {bad}")
    _check_finite(state, "model to save")

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {
        **extra,
        _META_ARCH: arch,
        _META_CLASSES: str(num_classes),
        _META_SMALL_STEM: "1" if small_stem else "0",
        _META_IN_CHANS: str(in_chans),
        _META_MEAN: json.dumps(list(mean_t)),
        _META_STD: json.dumps(list(std_t)),
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest
