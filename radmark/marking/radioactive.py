"""The marking step: nudge each image of class c along its secret carrier u_c in φ's feature space.

This module is a pure function on tensors (no file I/O, no keys, no shards): callers hand it a batch
of uint8 images, their labels, the carrier matrix and a feature extractor φ, and get back the marked
uint8 images with per-image quality numbers. Everything else (which samples to mark, writing PNGs,
mark records) lives elsewhere.

Objective (Sablayrolles et al., ICML 2020), summed over the images of the batch::

    L(x̃) = −(φ(t(x̃)) − φ(x))ᵀ u_c  +  λ_img ‖x̃ − x‖²  +  λ_ft ‖φ(t(x̃)) − φ(x)‖

where t is a random differentiable augmentation (random resized crop + horizontal flip, drawn afresh
per image per step) so that the mark survives the training augmentations of whoever uses the data,
and φ(x) is computed once on the un-augmented original.

Units (one convention for the whole module):

- Images enter and leave as uint8 pixel *levels* 0..255; φ sees float pixel values in [0, 1].
- The optimised variable is the perturbation in *normalised pixel units*: z = δ / NORM_STD where
  δ is the change in [0, 1] pixel values and ``NORM_STD`` = 0.226 is the mean ImageNet channel std.
  This is (up to the per-channel std) the unit the official code optimises in, so the paper's
  learning rates and λ_img keep their published values. ``lr`` is in these units per step and
  λ_img weighs ‖z‖² = ‖δ‖² / NORM_STD².
- ``radius`` is an L∞ bound in pixel levels (out of 255). The final output is rounded to integer
  levels (round to nearest, not truncation) and never leaves the integer ball of radius
  ⌊radius⌋ levels, so L∞ ≤ radius holds exactly and PSNR ≥ 20·log10(255 / radius) dB.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from radmark.errors import UsageError

__all__ = [
    "NORM_STD",
    "PRESETS",
    "MarkBatchResult",
    "MarkingParams",
    "get_preset",
    "mark_batch",
    "psnr",
]

#: Reference std (mean of ImageNet's 0.229, 0.224, 0.225) that defines normalised pixel units.
NORM_STD: float = 0.226

#: Aspect-ratio range (width / height of the crop) of the random resized crop, log-uniform. Close
#: to 1, like torchvision's RandomResizedCrop default, which suspects are likely to train with.
_ASPECT_RANGE: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MarkingParams:
    """Hyper-parameters of one marking run; recorded verbatim in mark records.

    Attributes:
        name: preset name or a free label, for the record.
        steps: optimisation steps per batch (> 0).
        optimizer: ``"adam"`` or ``"sgd"`` (plain SGD, no momentum, as in the paper's README).
        lr: learning rate in normalised pixel units (δ / NORM_STD) per step.
        lambda_ft: weight of the unsquared feature-shift norm ‖φ(t(x̃)) − φ(x)‖ (feature units).
        lambda_img: weight of the squared image change ‖x̃ − x‖² measured in normalised pixel units,
            i.e. ‖δ‖² / NORM_STD² with δ in [0, 1] pixel values (the official code's unit).
        radius: L∞ radius in pixel levels out of 255 (e.g. 10.0 for the paper's 10/255); ≥ 1
            because the output is integer levels. The output stays within ⌊radius⌋ levels.
        crop_scale: (min, max) area fraction of the random resized crop, 0 < min ≤ max ≤ 1;
            (1.0, 1.0) disables cropping.
        flip: whether t flips horizontally with probability 0.5.
        round_every: round x̃ to integer levels every N steps (0 = only at the end); rounding
            during optimisation lets the optimiser compensate for the quantisation.
        psnr_floor: if set, a per-image L2 budget: after every step δ is projected onto the ball
            where PSNR ≥ psnr_floor dB, and the final integer image is shrunk until it holds.
            With a looser L∞ ``radius`` this spends the same image energy where φ is most
            sensitive instead of spreading it evenly (for a linear φ the best L2-bounded move
            along u beats the best L∞-bounded one of equal PSNR by √N‖g‖₂/‖g‖₁ ≥ 1).
    """

    name: str
    steps: int
    optimizer: str
    lr: float
    lambda_ft: float
    lambda_img: float
    radius: float
    crop_scale: tuple[float, float]
    flip: bool
    round_every: int
    psnr_floor: float | None = None

    def __post_init__(self) -> None:
        # Normalise JSON-shaped input (lists, ints) so equal parameters compare and hash equal.
        try:
            lo, hi = (float(v) for v in self.crop_scale)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"crop_scale must be a pair of numbers, got {self.crop_scale!r}"
            ) from exc
        object.__setattr__(self, "crop_scale", (lo, hi))
        if isinstance(self.optimizer, str):
            object.__setattr__(self, "optimizer", self.optimizer.lower())
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UsageError("marking parameters need a non-empty name")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise UsageError(f"steps must be a positive integer, got {self.steps!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise UsageError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(_OPTIMIZERS)}"
            )
        if not _finite(self.lr) or self.lr <= 0:
            raise UsageError(f"lr must be a positive finite number, got {self.lr!r}")
        for label, value in (("lambda_ft", self.lambda_ft), ("lambda_img", self.lambda_img)):
            if not _finite(value) or value < 0:
                raise UsageError(f"{label} must be a finite number >= 0, got {value!r}")
        if not _finite(self.radius) or not 1.0 <= self.radius <= 255.0:
            raise UsageError(
                f"radius is in pixel levels out of 255 and must be in [1, 255], got {self.radius!r}"
                " (the output is integer levels, so a radius below 1 level cannot mark anything)"
            )
        lo, hi = self.crop_scale
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi <= 1.0):
            raise UsageError(
                f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale!r}"
            )
        if not isinstance(self.flip, bool):
            raise UsageError(f"flip must be true or false, got {self.flip!r}")
        if (
            isinstance(self.round_every, bool)
            or not isinstance(self.round_every, int)
            or self.round_every < 0
        ):
            raise UsageError(f"round_every must be an integer >= 0, got {self.round_every!r}")
        if self.psnr_floor is not None and (
            not _finite(self.psnr_floor) or not 20.0 <= self.psnr_floor <= 80.0
        ):
            raise UsageError(f"psnr_floor must be in [20, 80] dB, got {self.psnr_floor!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of all fields (crop_scale as a list), plus the unit reference NORM_STD."""
        out = asdict(self)
        out["crop_scale"] = list(self.crop_scale)
        if out["psnr_floor"] is None:  # absent = no L2 budget: records made before it existed
            del out["psnr_floor"]
        out["norm_std"] = NORM_STD
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MarkingParams:
        """Inverse of :meth:`to_dict`; rejects unknown keys and a different unit reference."""
        names = {f.name for f in fields(cls)}
        extra = set(data) - names - {"norm_std"}
        if extra:
            raise UsageError(f"unknown marking parameter(s): {', '.join(sorted(extra))}")
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = names - optional - set(data)
        if missing:
            raise UsageError(f"missing marking parameter(s): {', '.join(sorted(missing))}")
        if "norm_std" in data and data["norm_std"] != NORM_STD:
            raise UsageError(
                f"marking parameters use norm_std {data['norm_std']!r}, "
                f"this version uses {NORM_STD}"
            )
        return cls(**{k: data[k] for k in names if k in data})


PRESETS: dict[str, MarkingParams] = {
    # The official README's ImageNet settings: 90 steps of plain SGD, lr 1.0 and λ_img 0.0005 in
    # normalised pixel units, λ_ft 0.01, L∞ 10/255 (PSNR ≥ 28.1 dB). Rounding only at the end:
    # with plain SGD, periodic rounding snaps every sub-half-level move back to the original
    # (measured on a small net: no pixel changed at all with round_every=10).
    "paper": MarkingParams(
        name="paper",
        steps=90,
        optimizer="sgd",
        lr=1.0,
        lambda_ft=0.01,
        lambda_img=0.0005,
        radius=10.0,
        crop_scale=(0.5, 1.0),
        flip=True,
        round_every=0,
    ),
    # Imperceptible by construction: L∞ ≤ 2/255 guarantees PSNR ≥ 42.1 dB. Adam lr 0.01 in
    # normalised units (≈ 0.58 levels per step). To be re-tuned on the benchmark.
    "default": MarkingParams(
        name="default",
        steps=100,
        optimizer="adam",
        lr=0.01,
        lambda_ft=0.01,
        lambda_img=0.0005,
        radius=2.0,
        crop_scale=(0.5, 1.0),
        flip=True,
        round_every=0,
    ),
    # The same image energy as a PSNR of 42 dB (the paper's level), spent where the marker is most
    # sensitive: a per-image L2 budget (PSNR >= 42 dB guaranteed per image) with a looser L∞ cap.
    "psnr42": MarkingParams(
        name="psnr42",
        steps=100,
        optimizer="adam",
        lr=0.01,
        lambda_ft=0.01,
        lambda_img=0.0,
        radius=8.0,
        crop_scale=(0.5, 1.0),
        flip=True,
        round_every=0,
        psnr_floor=42.0,
    ),
}


def get_preset(name: str, **overrides: Any) -> MarkingParams:
    """Return preset ``name`` with fields replaced by ``overrides`` (validated again).

    Overriding any field without also giving ``name`` renames the result ``"<preset>+custom"`` so
    records never claim a preset whose values they do not use.
    """
    if name not in PRESETS:
        raise UsageError(f"unknown marking preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(MarkingParams)}
    unknown = set(overrides) - known
    if unknown:
        raise UsageError(f"unknown marking parameter(s): {', '.join(sorted(unknown))}")
    base = PRESETS[name]
    if overrides and "name" not in overrides:
        changed = {k for k, v in overrides.items() if getattr(base, k) != v}
        if changed:
            overrides = {**overrides, "name": f"{name}+custom"}
    return replace(base, **overrides)


@dataclass(frozen=True)
class MarkBatchResult:
    """Output of :func:`mark_batch` (all tensors on the input's device).

    Attributes:
        images: uint8 [B, C, H, W], same C as the input (grayscale stays 1 channel).
        psnr: float64 [B], dB against the original uint8 image (inf where unchanged).
        linf: int64 [B], max |x̃ − x| in pixel levels.
        feature_cos: float32 [B], cosine between φ(x̃) − φ(x) (un-augmented view, final rounded
            image) and the image's carrier; 0 where the features did not move.
    """

    images: torch.Tensor
    psnr: torch.Tensor
    linf: torch.Tensor
    feature_cos: torch.Tensor


def psnr(orig: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, float64 [B], between two uint8 [B, C, H, W] batches; inf if equal.

    Computed in float64 on integer levels so it is exact enough to compare with the L∞ bound.
    """
    if orig.shape != marked.shape or orig.ndim != 4:
        raise UsageError(
            "psnr needs two [B, C, H, W] batches of the same shape, "
            f"got {tuple(orig.shape)} and {tuple(marked.shape)}"
        )
    diff = orig.to(torch.float64) - marked.to(torch.float64)
    mse = diff.square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 gives +inf, by IEEE division


def _round_levels(x_levels: torch.Tensor, orig_levels: torch.Tensor, radius: float) -> torch.Tensor:
    """Round float pixel levels to integers, keeping them in the L∞ ball and in [0, 255].

    x_levels, orig_levels: float [B, C, H, W] in levels (orig is integer-valued). Rounds to nearest
    (torch.round, half to even) rather than truncating: truncation biases every pixel down and
    erodes the mark (a bug of the official export). The clamp to ⌊radius⌋ keeps L∞ ≤ radius even
    for a fractional radius, where rounding could otherwise step one level outside.
    """
    r = float(math.floor(radius))
    rounded = torch.round(x_levels)
    rounded = torch.minimum(torch.maximum(rounded, orig_levels - r), orig_levels + r)
    return rounded.clamp(0.0, 255.0)


def _project(x_new: torch.Tensor, x01: torch.Tensor, radius: float) -> torch.Tensor:
    """Project onto the L∞ ball of ``radius`` levels around x01, then onto the valid range.

    x_new, x01: float [B, C, H, W] pixel values in [0, 1] (x_new may be outside). Done after every
    step so the optimiser works inside the constraint set instead of relying on the final clamp.
    """
    r = radius / 255.0
    return torch.minimum(torch.maximum(x_new, x01 - r), x01 + r).clamp(0.0, 1.0)


def _project_l2(x_new: torch.Tensor, x01: torch.Tensor, psnr_floor: float) -> torch.Tensor:
    """Shrink each image's δ = x_new − x01 onto the L2 ball where PSNR ≥ psnr_floor.

    Scaling δ by a factor ≤ 1 keeps the L∞ ball and the [0, 1] range (a convex combination of
    two points inside both), so it composes with :func:`_project`.
    """
    delta = x_new - x01
    n = delta[0].numel()
    max_norm = 10.0 ** (-psnr_floor / 20.0) * math.sqrt(n)  # rmse bound in [0, 1] units × √N
    norm = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-12)
    scale = (max_norm / norm).clamp(max=1.0).view(-1, 1, 1, 1)
    return x01 + delta * scale


def _enforce_psnr(
    marked_lv: torch.Tensor, orig_lv: torch.Tensor, psnr_floor: float
) -> torch.Tensor:
    """Integer images whose PSNR is ≥ psnr_floor exactly: shrink violators until they comply.

    Rounding can push an image just past the budget; truncating 0.95·δ strictly lowers every
    non-zero |δ|, so the loop ends (at worst at δ = 0).
    """
    n = marked_lv[0].numel()
    max_sse = n * (255.0**2) * 10.0 ** (-psnr_floor / 10.0)
    out = marked_lv.clone()
    while True:
        delta = out.to(torch.float64) - orig_lv.to(torch.float64)
        bad = delta.square().flatten(1).sum(dim=1) > max_sse
        if not bool(bad.any()):
            return out
        out[bad] = (orig_lv.to(torch.float64)[bad] + torch.trunc(delta[bad] * 0.95)).to(out.dtype)


def _random_views(
    x: torch.Tensor, params: MarkingParams, generator: torch.Generator
) -> torch.Tensor:
    """Differentiable random resized crop (+ optional flip) of each image, back to H×W.

    x: float [B, C, H, W] in [0, 1]. Per image: area fraction a ~ U(crop_scale), aspect ratio
    log-uniform in _ASPECT_RANGE ∩ [a, 1/a] (both sides fit), centre uniform over the valid
    positions, horizontal flip with p = 0.5 if ``params.flip``. Implemented as one affine sampling
    grid and bilinear grid_sample so gradients flow back to x. All randomness comes from
    ``generator`` (four draws of [B] per call, in a fixed order) so runs are reproducible.
    """
    b = x.shape[0]
    dev, dt = x.device, x.dtype
    u = torch.rand(4, b, generator=generator, device=generator.device).to(device=dev, dtype=dt)
    lo, hi = params.crop_scale
    area = lo + (hi - lo) * u[0]
    # Aspect limited to [area, 1/area] so that both crop sides fit in the image (area 1 → square).
    log_area = torch.log(area)
    log_lo = torch.clamp(log_area, min=math.log(_ASPECT_RANGE[0]))
    log_hi = torch.clamp(-log_area, max=math.log(_ASPECT_RANGE[1]))
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    # Half-extents in affine_grid's normalised coordinates ([-1, 1] spans the whole image).
    sx = torch.sqrt(area * aspect).clamp(max=1.0)
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    tx = (1.0 - sx) * (2.0 * u[2] - 1.0)
    ty = (1.0 - sy) * (2.0 * u[3] - 1.0)
    if params.flip:
        coin = torch.rand(b, generator=generator, device=generator.device).to(device=dev)
        sign = torch.where(coin < 0.5, -1.0, 1.0).to(dt)
    else:
        sign = torch.ones(b, device=dev, dtype=dt)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [torch.stack([sx * sign, zero, tx], dim=1), torch.stack([zero, sy, ty], dim=1)], dim=1
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    """Replicate a 1-channel batch to 3 channels for φ; 3-channel input is returned as is."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


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
        features: φ, mapping float [B, 3, H, W] in [0, 1] to [B, d]; it normalises by itself, is in
            eval mode with frozen parameters (never put in train mode here). Grayscale input is
            replicated to 3 channels only for this call; δ keeps the input's channel count.
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
            out = features(_as_rgb(x01))
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

        # z: perturbation in normalised pixel units, δ = z · NORM_STD in [0, 1] pixel values.
        z = torch.zeros_like(x01, requires_grad=True)
        if params.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam([z], lr=params.lr)
        else:
            opt = torch.optim.SGD([z], lr=params.lr)

        for step in range(1, params.steps + 1):
            x_adv = x01 + z * NORM_STD
            shift = phi(_random_views(x_adv, params, generator)) - f0  # [B, d]
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
                x_new = _project(x01 + z * NORM_STD, x01, params.radius)
                if params.psnr_floor is not None:
                    x_new = _project_l2(x_new, x01, params.psnr_floor)
                if params.round_every and step % params.round_every == 0:
                    x_new = _round_levels(x_new * 255.0, x_lv, params.radius) / 255.0
                z.copy_((x_new - x01) / NORM_STD)

        with torch.no_grad():
            final_lv = _round_levels((x01 + z * NORM_STD) * 255.0, x_lv, params.radius)
            if params.psnr_floor is not None:
                final_lv = _enforce_psnr(final_lv, x_lv, params.psnr_floor)
            marked = final_lv.to(torch.uint8)
            shift = phi(final_lv / 255.0) - f0
            cos = F.cosine_similarity(shift, u, dim=1, eps=1e-12).to(torch.float32)

    linf = (marked.to(torch.int16) - images.to(torch.int16)).abs().amax(dim=(1, 2, 3))
    return MarkBatchResult(
        images=marked,
        psnr=psnr(images, marked),
        linf=linf.to(torch.int64),
        feature_cos=cos,
    )
