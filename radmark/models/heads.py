"""Splitting a classifier into penultimate features and its final Linear layer.

The white-box tests compare the suspect's classifier rows with the carriers, so every model must be
split exactly at its last Linear: its input is the feature vector, its weight the class rows. The
split is exact for any model whose logits are that Linear's output, whatever its forward does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from radmark.errors import ModelError


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
        trunk = self.model.forward_features(x)  # type: ignore[operator]
        feats = self.model.forward_head(trunk, pre_logits=True)  # type: ignore[operator]
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
