"""Differentiable random views: the training augmentations a mark must survive.

A data user trains with random crops and flips, so marks are optimised through a random
differentiable resized crop (+ flip) drawn afresh per image per step. Implemented with one affine
sampling grid and bilinear ``grid_sample`` so gradients flow back to the pixels, and with all
randomness drawn from a ``torch.Generator`` so marking is reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Images with a side below this many pixels are never marked: a random resized crop of a few
#: pixels is no augmentation at all, and small CNN markers cannot take them (smallcnn pools
#: three times: 8 px is its minimum). Such a sample is copied byte-identical, whether or not
#: the secret draw selected it, and counted as skipped (issue #12: they were a crash).
MIN_MARK_SIDE = 8

#: Aspect-ratio range (width / height of the crop) of the random resized crop, log-uniform. Close
#: to 1, like torchvision's RandomResizedCrop default, which suspects are likely to train with.
_ASPECT_RANGE: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def random_views(
    x: torch.Tensor,
    generator: torch.Generator,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    flip: bool = True,
) -> torch.Tensor:
    """Differentiable random resized crop (+ optional flip) of each image, back to H×W.

    x: float [B, C, H, W] in [0, 1]. Per image: area fraction a ~ U(crop_scale), aspect ratio
    log-uniform in _ASPECT_RANGE ∩ [a, 1/a] (both sides fit), centre uniform over the valid
    positions, horizontal flip with p = 0.5 if ``flip``. Implemented as one affine sampling
    grid and bilinear grid_sample so gradients flow back to x. All randomness comes from
    ``generator`` (four draws of [B] per call, in a fixed order) so runs are reproducible.
    """
    b = x.shape[0]
    dev, dt = x.device, x.dtype
    u = torch.rand(4, b, generator=generator, device=generator.device).to(device=dev, dtype=dt)
    lo, hi = crop_scale
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
    if flip:
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
