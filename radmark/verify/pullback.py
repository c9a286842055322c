"""A white-box statistic without least squares: the suspect's input gradients pulled back
through the marker (an idea listed in the method notes, measured here).

For each class k, g_k(x) = ∇_x logit_k(x) is the pixel direction that most raises the suspect's
score for k at a clean probe image x. Pushing it forward through the marker's Jacobian,
J_φ(x)·g_k(x) ∈ R^d, says which marker-feature direction the suspect's class-k score responds to.
A model trained on images marked along u_k responds to pixel changes that move φ along u_k, so

    v_k = Σ_x J_φ(x) · g_k(x)        (clean probe images x, by default those of class k)

should lean toward u_k. v_k is computed from the suspect, the marker and clean probe images only,
never from the carriers, so under H0 (model independent of the key) cos(v_k, u_k) has exactly the
null of the paper's test: the cosine of a fixed vector with a uniform random direction in R^d,
independent across classes (independent carriers). Fisher over classes is therefore exact.
Unlike the paper's test it needs no feature alignment, so it also works when the suspect's
penultimate layer is unrelated to the marker's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from radmark.errors import InputError, ModelError
from radmark.verify.tests import TestResult, register_test

if TYPE_CHECKING:
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.verify.evidence import Evidence

PULLBACK = "pullback_fisher"


def pullback_directions(
    suspect_logits: Callable[[Any], Any],
    marker_features: Callable[[Any], Any],
    images: np.ndarray,
    num_classes: int,
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """v_k for every class: float64 [C, d], unit rows.

    suspect_logits: images float [B, C_in, H, W] in [0, 1] → logits [B, C].
    marker_features: same images → features [B, d] (differentiable, forward-mode friendly).
    images: uint8 [N, C_in, H, W], clean probe images; labels: int [N] or None.
    With labels (the default in verify), v_k sums over the probe images of class k the gradient
    of the suspect's margin logit_k − logsumexp(other logits): the marked training images of
    class k are where the suspect could learn u_k, and the margin ignores what all classes
    share. Measured on the small Fashion-MNIST toy (100% marked, from-scratch smallcnn): combined
    log10 p −2.4 with labels and margin vs −1.5 for all images and raw logits (control −0.8 / −0.2).
    Without labels, every image contributes the raw logit_k gradient for every k.
    """
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.func's import warns about torch.jit internals
        warnings.simplefilter("ignore", FutureWarning)
        from torch.func import jvp

    if labels is not None:
        labels = np.asarray(labels)
        missing = [k for k in range(num_classes) if not np.any(labels == k)]
        if missing:
            raise InputError(
                f"the probe set has no image of class {missing[0]}: the pull-back "
                "test needs labelled probe images of every class"
            )
    rows: list[np.ndarray] = [np.zeros(0)] * num_classes
    for k in range(num_classes) if labels is not None else [None]:
        subset = images if k is None else images[labels == k]
        for i in range(0, subset.shape[0], batch_size):
            x = torch.from_numpy(subset[i : i + batch_size]).to(device).float().div_(255.0)
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = suspect_logits(xg)
                if logits.ndim != 2 or logits.shape[1] != num_classes:
                    raise ModelError(
                        f"the model outputs {tuple(logits.shape[1:])} logits, the mark has "
                        f"{num_classes} classes"
                    )
                targets = range(num_classes) if k is None else [k]
                for j in targets:
                    if k is None:
                        objective = logits[:, j]
                    else:
                        others = torch.cat([logits[:, :j], logits[:, j + 1 :]], dim=1)
                        objective = logits[:, j] - others.logsumexp(dim=1)
                    (g,) = torch.autograd.grad(objective.sum(), xg, retain_graph=True)
                    with warnings.catch_warnings():  # its first call loads jit decompositions
                        warnings.simplefilter("ignore", FutureWarning)
                        _, tangent = jvp(marker_features, (x,), (g,))  # type: ignore[misc]
                    part = tangent.detach().double().sum(dim=0).cpu().numpy()
                    rows[j] = part if rows[j].size == 0 else rows[j] + part
    v = np.stack(rows)
    if not np.all(np.isfinite(v)):
        raise ModelError("the model's input gradients are not finite on the probe set")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ModelError("the model's class scores do not depend on its input (zero gradients)")
    return v / norms


def residual_cosines(v: np.ndarray, v_ref: np.ndarray, carriers: np.ndarray) -> np.ndarray:
    """Per class, cos(P_k v_k, P_k u_k) with P_k removing the reference's own direction v_ref_k.

    v, v_ref: float [C, d] pull-back directions of the suspect and of a model that never saw the
    key (the marker itself); carriers: [C, d]. Much of v_k is what any model trained on this data
    does for class k (shared with v_ref_k) and is noise for the test; removing it leaves the part
    that can carry the mark. Exact: P_k depends only on the marker and clean probe images, so under
    H0 P_k u_k / ‖P_k u_k‖ is uniform on the unit sphere of a (d−1)-dimensional space and the
    cosine has the usual null with d−1 in place of d. A class whose residual vanishes (the
    suspect *is* the reference) gets cosine −1: p = 1, no evidence.
    """
    u = carriers.astype(np.float64)
    out = np.empty(v.shape[0])
    for k in range(v.shape[0]):
        r = v_ref[k] / max(float(np.linalg.norm(v_ref[k])), 1e-300)
        a = v[k] - (v[k] @ r) * r
        b = u[k] - (u[k] @ r) * r
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na <= 1e-9 * max(float(np.linalg.norm(v[k])), 1e-300) or nb == 0.0:
            out[k] = -1.0
        else:
            out[k] = float(np.clip(a @ b / (na * nb), -1.0, 1.0))
    return out


class PullbackTest:
    """Fisher over cos(P_k v_k, P_k u_k), the marker's own direction removed (exact, null in d−1)."""

    name = PULLBACK
    exact = True
    randomisation = "carriers"
    needs = frozenset({"probe"})
    description = (
        "Fisher over cos(J_φ·∇logit, u_k), the marker's own direction removed "
        "(white box, no alignment)"
    )

    def available(self, evidence: Evidence, record: MarkRecord) -> str | None:
        return None if evidence.probe is not None else "it needs --probe (clean images)"

    def run(self, evidence: Evidence, record: MarkRecord, key: SecretKey) -> TestResult:
        from radmark.verify.white_box import carriers_for, fisher_cosine_test

        v, v_ref, labelled = evidence.pullback(record)
        how = "class-conditional margin" if labelled else "all-image logit"
        return fisher_cosine_test(
            self.name,
            residual_cosines(v, v_ref, carriers_for(record, key)),
            record.dim - 1,
            f"Fisher over cos(J_φ·∇logit, u_k), {how} gradients, the marker's own direction "
            "removed (white box, no alignment)",
        )


register_test(PullbackTest())
