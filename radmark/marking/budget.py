"""The imperceptibility budget every marking method works in, and its bookkeeping.

Units (one convention for every method):

- Images enter and leave as uint8 pixel *levels* 0..255; networks see float pixels in [0, 1].
- Optimised perturbations are in *normalised pixel units*: z = δ / NORM_STD where δ is the change
  in [0, 1] pixel values and ``NORM_STD`` = 0.226 is the mean ImageNet channel std. This is (up to
  the per-channel std) the unit the official radioactive-data code optimises in, so the paper's
  learning rates and λ_img keep their published values.
- ``radius`` is an L∞ bound in pixel levels (out of 255). Final outputs are rounded to integer
  levels (round to nearest, not truncation) and never leave the integer ball of radius
  ⌊radius⌋ levels, so L∞ ≤ radius holds exactly and PSNR ≥ 20·log10(255 / radius) dB.
- ``psnr_floor`` (optional) is a per-image L2 budget: PSNR ≥ psnr_floor dB, exactly, after
  rounding.
"""

from __future__ import annotations

import math

import torch

from radmark.errors import UsageError

#: Reference std (mean of ImageNet's 0.229, 0.224, 0.225) that defines normalised pixel units.
NORM_STD: float = 0.226


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


def round_levels(x_levels: torch.Tensor, orig_levels: torch.Tensor, radius: float) -> torch.Tensor:
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


def project_linf(x_new: torch.Tensor, x01: torch.Tensor, radius: float) -> torch.Tensor:
    """Project onto the L∞ ball of ``radius`` levels around x01, then onto the valid range.

    x_new, x01: float [B, C, H, W] pixel values in [0, 1] (x_new may be outside). Done after every
    step so the optimiser works inside the constraint set instead of relying on the final clamp.
    """
    r = radius / 255.0
    return torch.minimum(torch.maximum(x_new, x01 - r), x01 + r).clamp(0.0, 1.0)


def project_l2(x_new: torch.Tensor, x01: torch.Tensor, psnr_floor: float) -> torch.Tensor:
    """Shrink each image's δ = x_new − x01 onto the L2 ball where PSNR ≥ psnr_floor.

    Scaling δ by a factor ≤ 1 keeps the L∞ ball and the [0, 1] range (a convex combination of
    two points inside both), so it composes with :func:`project_linf`.
    """
    delta = x_new - x01
    n = delta[0].numel()
    max_norm = 10.0 ** (-psnr_floor / 20.0) * math.sqrt(n)  # rmse bound in [0, 1] units × √N
    norm = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-12)
    scale = (max_norm / norm).clamp(max=1.0).view(-1, 1, 1, 1)
    return x01 + delta * scale


def enforce_psnr(marked_lv: torch.Tensor, orig_lv: torch.Tensor, psnr_floor: float) -> torch.Tensor:
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
