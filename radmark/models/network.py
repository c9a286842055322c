"""A loaded model, ready for verification and marking, with one channel and normalisation policy.

Every network radmark runs (the marker and every suspect) is a :class:`LoadedModel`. Its
:meth:`~LoadedModel.features` and :meth:`~LoadedModel.logits` take raw pixels in [0, 1] with
either 1 or 3 channels and adapt them here, once: a 1-channel batch is replicated for a 3-channel
model, and a 3-channel batch given to a 1-channel model is taken to be replicated grayscale (its
first channel is used). Normalisation by the model's own mean and std happens here too, so no
caller ever re-decides channels or normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from radmark.errors import ModelError, UsageError
from radmark.models.heads import Head
from radmark.models.identity import marker_identity

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A model in eval mode with frozen parameters, and the provenance reports print.

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
    # Image sizes (H, W) a forward pass is known to accept (see check_input_size).
    _sizes_ok: set[tuple[int, int]] = field(default_factory=set, repr=False, compare=False)

    @property
    def identity(self) -> str:
        """``<name>@sha256:<hex>``: what carriers are bound to when this model is a marker."""
        return marker_identity(self.name, self.sha256)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Images float [B, 1|3, H, W] in [0, 1] → the model's channels, normalised."""
        if x.ndim != 4:
            raise UsageError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        channels = x.shape[1]
        if channels != self.in_chans:
            if channels == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1 and channels == 3:
                x = x[:, :1]  # replicated grayscale (the only 3-channel input a gray model gets)
            else:
                raise UsageError(
                    f"images have {channels} channels but {self.name} takes {self.in_chans}; "
                    "convert the images first"
                )
        self.check_input_size(int(x.shape[2]), int(x.shape[3]))
        device = self.device
        x = x.to(device=device, dtype=torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return (x - mean) / std

    def check_input_size(self, height: int, width: int) -> None:
        """Refuse images too small for the network's layers, once per size, before real work.

        A CNN's pooling stages need a minimum input size (smallcnn: 8×8); below it torch raises a
        RuntimeError deep in the forward pass, which is the user's input, not a bug: exit 2 with
        a line that says so (issue #12). One zero image is run through the model per new size.
        """
        if (height, width) in self._sizes_ok:
            return
        if height < 1 or width < 1:
            raise ModelError(f"model {self.source} cannot take empty {width}x{height} images")
        probe = torch.zeros(1, self.in_chans, height, width, device=self.device)
        try:
            with torch.no_grad():
                self.model(probe)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:160]
            raise ModelError(
                f"model {self.source} ({self.arch}) cannot take {width}x{height} images: they "
                f"are too small for its layers ({detail}); use larger images or another model"
            ) from None
        self._sizes_ok.add((height, width))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, d] float32 of images ``x`` in [0, 1] (1 or 3 channels).

        Differentiable in ``x``: marking back-propagates through it.
        """
        out = self.head.features(self._input(x))
        return out.reshape(out.shape[0], -1).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores [B, C] of images ``x`` in [0, 1] (1 or 3 channels), differentiable."""
        return self.model(self._input(x))

    def weight(self) -> torch.Tensor:
        """Classifier weight [C, d] in float64 (the bias carries no carrier direction)."""
        return self.head.linear.weight.detach().to(device="cpu", dtype=torch.float64)


def finalise(model: nn.Module, device: str) -> nn.Module:
    """Eval mode, frozen parameters, on ``device`` (a clear error for a device that is not there)."""
    model.eval()
    model.requires_grad_(False)
    try:
        return model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"cannot use device {device!r}: {exc}; try --device cpu") from None
