"""A white-box statistic without least squares: the suspect's input gradients pulled back
through the marker (an idea listed in the method notes, measured here).

For each class k, g_k(x) = ∇_x logit_k(x) is the pixel direction that most raises the suspect's
score for k at a clean probe image x. Pushing it forward through the marker's Jacobian,
J_φ(x)·g_k(x) ∈ R^d, says which marker-feature direction the suspect's class-k score responds to.
A model trained on images marked along u_k responds to pixel changes that move φ along u_k, so

    v_k = Σ_x J_φ(x) · g_k(x)        (probe images x, clean)

should lean toward u_k. v_k is computed from the suspect, the marker and clean probe images only,
never from the carriers, so under H0 (model independent of the key) cos(v_k, u_k) has exactly the
null of the paper's test: the cosine of a fixed vector with a uniform random direction in R^d,
independent across classes (independent carriers). Fisher over classes is therefore exact.
Unlike the paper's test it needs no feature alignment, so it also works when the suspect's
penultimate layer is unrelated to the marker's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ModelError


def pullback_directions(
    suspect_logits: Callable[[Any], Any],
    marker_features: Callable[[Any], Any],
    images: np.ndarray,
    num_classes: int,
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """v_k for every class: float64 [C, d].

    suspect_logits: images float [B, C_in, H, W] in [0, 1] → logits [B, C].
    marker_features: same images → features [B, d] (differentiable, forward-mode friendly).
    images: uint8 [N, C_in, H, W], clean probe images.
    Cost: C backward passes of the suspect and C forward-mode passes of the marker per batch.
    """
    import torch
    from torch.func import jvp

    total: torch.Tensor | None = None
    for i in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).float().div_(255.0)
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = suspect_logits(xg)
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise ModelError(
                    f"the model outputs {tuple(logits.shape[1:])} logits, the mark has {num_classes} classes"
                )
            rows = []
            for k in range(num_classes):
                (g,) = torch.autograd.grad(logits[:, k].sum(), xg, retain_graph=k < num_classes - 1)
                _, tangent = jvp(marker_features, (x,), (g,))
                rows.append(tangent.detach().double().sum(dim=0))
        batch_sum = torch.stack(rows)
        total = batch_sum if total is None else total + batch_sum
    assert total is not None
    v = total.cpu().numpy()
    if not np.all(np.isfinite(v)):
        raise ModelError("the model's input gradients are not finite on the probe set")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ModelError("the model's class scores do not depend on its input (zero gradients)")
    return v / norms


def loaded_logits(model: Any) -> Callable[[Any], Any]:
    """Logits of a :class:`~radmark.models.LoadedModel` on images in [0, 1] (grayscale adapted)."""
    import torch

    def fn(x: Any) -> Any:
        if model.in_chans == 1 and x.shape[1] == 3:
            x = x[:, :1]
        elif model.in_chans == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(model.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(model.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return model.model((x - mean) / std)

    return fn
