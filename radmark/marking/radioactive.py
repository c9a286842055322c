"""The paper's marking method ("radioactive"): nudge each image of class c along its secret
carrier u_c in the marking network φ's feature space (Sablayrolles et al., ICML 2020).

Objective, summed over the images of a batch::

    L(x̃) = −(φ(t(x̃)) − φ(x))ᵀ u_c  +  λ_img ‖x̃ − x‖²  +  λ_ft ‖φ(t(x̃)) − φ(x)‖

where t is a random differentiable augmentation (``marking/views.py``) so that the mark survives
the training augmentations of whoever uses the data, and φ(x) is computed once on the
un-augmented original. Units and the budget (L∞ radius, optional PSNR floor) are those of
``marking/budget.py``. :func:`mark_batch` is a pure function on tensors (no I/O, no keys);
:class:`RadioactiveMethod` binds it to a key's carriers for the shard pipeline and names the tests
that detect it (white box, pull-back, black-box decoy rank).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from radmark.errors import ModelError, UsageError
from radmark.marking.budget import (
    NORM_STD,
    enforce_psnr,
    project_l2,
    project_linf,
    psnr,
    round_levels,
)
from radmark.marking.methods import Budget, CarrierMark, MarkBatchResult, register_method
from radmark.marking.presets import PRESETS, MarkingParams, get_preset
from radmark.marking.views import random_views

if TYPE_CHECKING:
    import numpy as np

    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.models.network import LoadedModel

__all__ = ["PRESETS", "MarkingParams", "RadioactiveMethod", "get_preset", "mark_batch"]


def _check_inputs(
    images: torch.Tensor,
    labels: torch.Tensor,
    carriers: torch.Tensor,
    generator: torch.Generator,
) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise UsageError("images must be a uint8 tensor of shape [B, C, H, W]")
    b, c, h, w = images.shape
    if c not in (1, 3):
        raise UsageError(f"images must have 1 or 3 channels, got {c}")
    if b == 0 or h == 0 or w == 0:
        raise UsageError(f"images must be a non-empty batch, got shape {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (b,):
        raise UsageError(
            f"labels must be int64 of shape [{b}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if carriers.ndim != 2 or not carriers.is_floating_point() or carriers.shape[0] == 0:
        raise UsageError("carriers must be a float tensor of shape [K, d]")
    if labels.device != images.device or carriers.device != images.device:
        raise UsageError("images, labels and carriers must be on the same device")
    k = carriers.shape[0]
    if bool(((labels < 0) | (labels >= k)).any()):
        raise UsageError(f"labels must be class indices in [0, {k}) to select a carrier")
    if generator.device.type != images.device.type:
        raise UsageError(
            f"generator is on {generator.device.type} but images are on {images.device.type}"
        )


def mark_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    carriers: torch.Tensor,
    features: Callable[[torch.Tensor], torch.Tensor],
    params: MarkingParams,
    *,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
) -> MarkBatchResult:
    """Mark a batch: optimise x̃ so that φ(t(x̃)) moves along each image's class carrier.

    Args:
        images: uint8 [B, C, H, W], C ∈ {1, 3}, on the device to compute on. Not modified.
        labels: int64 [B] class indices; image i is pushed along ``carriers[labels[i]]``.
        carriers: float [K, d] unit rows (secret).
        features: φ, mapping float [B, C, H, W] in [0, 1] (the images' own channels) to [B, d];
            it adapts channels and normalises by itself (``LoadedModel.features``) and is in
            eval mode with frozen parameters (never put in train mode here).
        params: hyper-parameters (see :class:`MarkingParams` for units).
        generator: source of all augmentation randomness; must be on the images' device type.
            Same inputs and same generator state give bit-identical output on CPU (on CUDA,
            grid_sample's backward uses atomic adds, so runs agree only up to float noise).
        autocast_dtype: e.g. torch.bfloat16 to run φ under CUDA autocast; ignored on CPU, where
            everything is float32 for reproducibility.

    Returns:
        :class:`MarkBatchResult` with uint8 images within ⌊radius⌋ levels of the input, their PSNR,
        L∞ and the final cosine between feature shift and carrier.
    """
    if not isinstance(params, MarkingParams):
        raise UsageError("params must be a MarkingParams (see get_preset)")
    params._validate()
    _check_inputs(images, labels, carriers, generator)

    use_autocast = autocast_dtype is not None and images.device.type == "cuda"

    def phi(x01: torch.Tensor) -> torch.Tensor:
        ctx = (
            torch.autocast(device_type="cuda", dtype=autocast_dtype)
            if use_autocast
            else contextlib.nullcontext()
        )
        with ctx:
            out = features(x01)
        if out.ndim != 2 or out.shape[0] != x01.shape[0] or out.shape[1] != carriers.shape[1]:
            raise UsageError(
                f"features returned shape {tuple(out.shape)}, expected [{x01.shape[0]}, "
                f"{carriers.shape[1]}] to match the carriers"
            )
        return out.float()

    # inference_mode(False): a caller under inference_mode would otherwise give us tensors that
    # cannot be part of an autograd graph; enable_grad undoes a caller's no_grad.
    with torch.inference_mode(False), torch.enable_grad():
        x_lv = images.to(torch.float32)  # [B, C, H, W] levels, a copy: the input is never touched
        x01 = x_lv / 255.0
        u = carriers.to(torch.float32)[labels]  # [B, d]
        with torch.no_grad():
            f0 = phi(x01)  # reference features of the un-augmented original, [B, d]
        if not bool(torch.isfinite(f0).all()):
            # Finite weights can still overflow (issue #12: first conv weights ±3e38): every
            # gradient would be NaN and the "marked" images arbitrary. Refuse the marker.
            raise ModelError(
                "the marker's features are not finite (inf or NaN) on these images: its weights "
                "overflow; retrain it or choose another --marker (nothing was written)"
            )

        # z: perturbation in normalised pixel units, δ = z · NORM_STD in [0, 1] pixel values.
        z = torch.zeros_like(x01, requires_grad=True)
        if params.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam([z], lr=params.lr)
        else:
            opt = torch.optim.SGD([z], lr=params.lr)

        for step in range(1, params.steps + 1):
            x_adv = x01 + z * NORM_STD
            shift = (
                phi(random_views(x_adv, generator, params.crop_scale, params.flip)) - f0
            )  # [B, d]
            loss = (
                -(shift * u).sum()
                + params.lambda_img * z.square().sum()
                + params.lambda_ft * torch.linalg.vector_norm(shift, dim=1).sum()
            )
            # autograd.grad w.r.t. z only: φ's parameters never accumulate .grad.
            (grad,) = torch.autograd.grad(loss, [z])
            z.grad = grad
            opt.step()
            with torch.no_grad():
                x_new = project_linf(x01 + z * NORM_STD, x01, params.radius)
                if params.psnr_floor is not None:
                    x_new = project_l2(x_new, x01, params.psnr_floor)
                if params.round_every and step % params.round_every == 0:
                    x_new = round_levels(x_new * 255.0, x_lv, params.radius) / 255.0
                z.copy_((x_new - x01) / NORM_STD)

        with torch.no_grad():
            final_float = (x01 + z * NORM_STD) * 255.0
            finite = torch.isfinite(final_float).flatten(1).all(dim=1)  # [B], before rounding
            final_lv = round_levels(final_float, x_lv, params.radius)
            if params.psnr_floor is not None:
                final_lv = enforce_psnr(final_lv, x_lv, params.psnr_floor)
            marked = final_lv.to(torch.uint8)
            shift = phi(final_lv / 255.0) - f0
            cos = F.cosine_similarity(shift, u, dim=1, eps=1e-12).to(torch.float32)

    linf = (marked.to(torch.int16) - images.to(torch.int16)).abs().amax(dim=(1, 2, 3))
    return MarkBatchResult(
        images=marked,
        psnr=psnr(images, marked),
        linf=linf.to(torch.int64),
        feature_cos=cos,
        finite=finite,
    )


class _RadioactiveRun:
    """One run: the key's carriers for this marker, on the device (a secret: never printed)."""

    def __init__(
        self, carriers: np.ndarray, marker: LoadedModel, params: MarkingParams, device: str
    ) -> None:
        """carriers: float32 [C, d] unit rows (``keys/carriers.py``), a secret."""
        from radmark.keys.carriers import CARRIER_FORMAT, carriers_digest

        self._digest = {"format": CARRIER_FORMAT, "sha256": carriers_digest(carriers)}
        self._carriers = torch.from_numpy(carriers).to(device)
        self._features = marker.features
        self._params = params
        self._device = device
        self.budget = Budget(int(math.floor(params.radius)), params.psnr_floor)

    def mark(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sample_ids: list[str],
        *,
        generator: torch.Generator,
    ) -> MarkBatchResult:
        return mark_batch(
            images,
            labels,
            self._carriers,
            self._features,
            self._params,
            generator=generator,
            autocast_dtype=torch.bfloat16 if self._device.startswith("cuda") else None,
        )

    def private_data(self) -> list[bytes]:
        return []  # the carriers re-derive from the key: nothing to keep

    def record_fields(self, private: Sequence[str] = ()) -> dict[str, Any]:
        return {"carriers": dict(self._digest)}


class RadioactiveMethod:
    """The paper's method behind the marking-method seam (``marking/methods.py``)."""

    name = "radioactive"
    description = "per-class secret carriers in the marker's feature space (the paper)"
    tests: tuple[str, ...] = (
        "white_box_fisher",
        "white_box_zscore",
        "pullback_fisher",
        "black_box_rank",
    )
    presets: tuple[str, ...] = tuple(PRESETS)

    @property
    def decoy_kit(self) -> CarrierMark:
        """Decoy slots are marked exactly as the data was, with decoy carriers for true ones."""
        return mark_batch

    def params(self, preset: str, overrides: Mapping[str, Any]) -> MarkingParams:
        return get_preset(preset, **overrides)

    def params_from_record(self, data: Mapping[str, Any]) -> MarkingParams:
        return MarkingParams.from_dict(data)

    def params_to_record(self, params: MarkingParams) -> dict[str, Any]:
        return params.to_dict()

    def start(
        self,
        key: SecretKey,
        marker: LoadedModel,
        num_classes: int,
        params: MarkingParams,
        *,
        device: str,
    ) -> _RadioactiveRun:
        from radmark.keys.carriers import derive_carriers

        carriers = derive_carriers(key.carrier_seed(), marker.dim, num_classes, marker.identity)
        return _RadioactiveRun(carriers, marker, params, device)

    def check_key(self, record: MarkRecord, key: SecretKey) -> None:
        from radmark.keys.carriers import carriers_digest, derive_carriers

        u = derive_carriers(key.carrier_seed(), record.dim, record.num_classes, record.marker.id)
        record.check_carriers(carriers_digest(u))


register_method(RadioactiveMethod())
