"""Secret-label key images ("Data Taggants", Bouaziz et al., ICLR 2025, arXiv 2410.09101): core.

Pure functions the library can port. The owner's secret seed gives K key images and, independently,
K secret labels ℓ_k uniform on 0..C−1. Training images *of class ℓ_k* (clean label: labels are never
changed) get an imperceptible perturbation crafted by gradient matching (Witches' Brew, Geiping et
al. 2021) so that a model trained on them predicts ℓ_k on key image k. The test ranks ℓ_k in the
suspect's output on key k and combines the K ranks exactly (``radmark.stats.rank_log_sf``).

Why the test is exact: under H0 the suspect never trained on images perturbed for these keys, so
its score vectors s_k (one per key image, whatever the model and however the images were made)
are independent of the labels, which come from their own SHAKE-256 stream with rejection sampling.
Conditional on the model and the key images, ℓ_1..ℓ_K are then i.i.d. uniform on 0..C−1, so the
ranks r_k = 1 + #{c ≠ ℓ_k : s_k[c] ≥ s_k[ℓ_k]} are independent and each uniform on 1..C when there
are no ties, stochastically larger when there are (ties count against us). Nothing about the model
(calibration, a constant prediction on every key, OOD behaviour) can break this; the only
requirement is that the test-time scoring (views, score type) is fixed before looking at labels.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from radmark.marker import _crop_flip
from radmark.marking import _enforce_psnr, _project, _project_l2, _round_levels, psnr

DOMAIN = b"radmark/taggants/v1"
FAMILIES = ("smooth", "hf", "pattern")


# ------------------------------------------------------------------------------------------------
# Key material (deterministic from the secret seed; independent streams per purpose)
# ------------------------------------------------------------------------------------------------


def _stream(seed_bytes: bytes, purpose: str, n: int) -> bytes:
    """n bytes of SHAKE-256(DOMAIN ‖ len ‖ purpose ‖ seed). Different purposes give streams that
    are independent in the random-oracle model; SHAKE output of length n is a prefix of any longer
    output, so a draw never depends on how many bytes were requested."""
    tag = purpose.encode()
    h = hashlib.shake_256(DOMAIN + len(tag).to_bytes(2, "big") + tag + seed_bytes)
    return h.digest(n)


def _uniforms(seed_bytes: bytes, purpose: str, n: int) -> np.ndarray:
    """n floats in [0, 1) from 53-bit integers of the stream (exact, platform independent)."""
    raw = np.frombuffer(_stream(seed_bytes, purpose, 8 * n), dtype=">u8").astype(np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def key_labels(seed_bytes: bytes, K: int, num_classes: int) -> np.ndarray:
    """int64 [K] secret labels, i.i.d. uniform on 0..num_classes−1.

    32-bit words of the ``labels`` stream, rejection-sampled (a word v is used only if
    v < 2^32 − (2^32 mod C), then ℓ = v mod C), so labels are exactly uniform for any C, not only
    powers of 2. Integer arithmetic only: the same seed gives the same labels everywhere.
    """
    if K < 1 or not (2 <= num_classes < 2**32):
        raise ValueError("need K >= 1 and 2 <= num_classes < 2^32")
    limit = 2**32 - (2**32 % num_classes)
    out: list[int] = []
    n = 4 * (K + 16)
    while len(out) < K:
        words = np.frombuffer(_stream(seed_bytes, "labels", n), dtype=">u4")
        out = [int(v) % num_classes for v in words if int(v) < limit][:K]
        n *= 2
    return np.asarray(out, dtype=np.int64)


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation (align-corners) as a matrix."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.floor(pos).astype(int).clip(0, n_in - 1)
    hi = (lo + 1).clip(0, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1.0 - w
    m[np.arange(n_out), hi] += w
    return m


def key_images(
    seed_bytes: bytes, K: int, shape: Sequence[int], family: str = "smooth", cells: int = 7
) -> np.ndarray:
    """uint8 [K, C, H, W] out-of-distribution key images from the ``images/<family>`` stream.

    Families: ``smooth``: a cells×cells grid of uniform values, bilinearly upsampled to H×W and
    stretched to the full 0..255 range (low-frequency noise, survives crops/flips); ``hf``: i.i.d.
    uniform bytes per pixel (high-frequency noise); ``pattern``: binary (0/255) thresholded sum of
    three random sinusoidal gratings (1–5 cycles per image, random orientation and phase).
    The images are independent of :func:`key_labels` (different stream). Float steps (smooth,
    pattern) are deterministic for a given numpy/libm; the owner should store the uint8 images
    (or their hash) with the key. Their exact values never affect the validity of the test.
    """
    c, h, w = (int(v) for v in shape)
    if family == "hf":
        raw = _stream(seed_bytes, "images/hf", K * c * h * w)
        return np.frombuffer(raw, dtype=np.uint8).reshape(K, c, h, w).copy()
    if family == "smooth":
        u = _uniforms(seed_bytes, "images/smooth", K * c * cells * cells).reshape(
            K, c, cells, cells
        )
        mh, mw = _bilinear_matrix(h, cells), _bilinear_matrix(w, cells)
        up = np.einsum("hi,kcij,wj->kchw", mh, u, mw)
        lo = up.min(axis=(2, 3), keepdims=True)
        hi = up.max(axis=(2, 3), keepdims=True)
        return np.rint(255.0 * (up - lo) / np.maximum(hi - lo, 1e-12)).astype(np.uint8)
    if family == "pattern":
        u = _uniforms(seed_bytes, "images/pattern", K * c * 3 * 3).reshape(K, c, 3, 3)
        yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
        freq = 1.0 + 4.0 * u[..., 0]
        theta = math.pi * u[..., 1]
        phase = 2 * math.pi * u[..., 2]
        arg = (
            2
            * math.pi
            * freq[..., None, None]
            * (np.cos(theta)[..., None, None] * xx + np.sin(theta)[..., None, None] * yy)
            + phase[..., None, None]
        )
        s = np.sin(arg).sum(axis=2)  # [K, C, H, W]
        return np.where(s > 0, 255, 0).astype(np.uint8)
    raise ValueError(f"unknown key family {family!r}; use one of {FAMILIES}")


def assign_poisons(
    seed_bytes: bytes, train_labels: np.ndarray, key_lab: np.ndarray, per_key: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the training set, key index of each) for ``per_key`` images of class ℓ_k per
    key, without replacement. A class's images are shared out among its keys; if a class has
    fewer than per_key × (its keys) images, each of its keys gets an equal share. The choice uses
    its own stream (it only has to be disjoint, not secret)."""
    u = _uniforms(seed_bytes, "assignment", len(train_labels))
    idx_all, key_all = [], []
    for c in np.unique(key_lab):
        keys = np.flatnonzero(key_lab == c)
        pool = np.flatnonzero(train_labels == c)
        pool = pool[np.argsort(u[pool], kind="stable")]
        n = min(per_key, len(pool) // len(keys))
        for j, k in enumerate(keys):
            sel = pool[j * n : (j + 1) * n]
            idx_all.append(sel)
            key_all.append(np.full(len(sel), k))
    return np.concatenate(idx_all), np.concatenate(key_all)


# ------------------------------------------------------------------------------------------------
# Crafting: clean-label gradient matching
# ------------------------------------------------------------------------------------------------


@dataclass
class CraftParams:
    """Units: pixel levels out of 255 for ``linf`` and ``lr``; dB for ``psnr_floor``.

    steps: signed-Adam steps; lr decays ×0.1 at 3/8, 5/8, 7/8 of the steps (Witches' Brew).
    restarts: independent random starts; per key, the start with the lowest final loss is kept.
    linf: L∞ cap in levels; psnr_floor: per-image L2 budget (None = L∞ only).
    augment: apply the training recipe's random crop (pad 4, reflect) + flip to the perturbed images
        at every step (differentiable). key_views: augmented views of the key averaged into its
        target gradient (1 = the plain key image).
    """

    steps: int = 250
    lr: float = 1.0
    restarts: int = 1
    linf: float = 16.0
    psnr_floor: float | None = 42.0
    augment: bool = True
    key_views: int = 8
    init: float = 0.5  # initial δ uniform in ±init levels
    retrain_every: int = 0  # Sleeper Agent: retrain surrogates on the current poisons (0 = never)


def _norm(model_tuple):
    model, mean, std = model_tuple[:3]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return model, m, s


def _target_grads(surrogates, key01, key_lab, views, gen):
    """Per surrogate, per key: the flattened gradient of CE(f(view(key)), ℓ) averaged over views."""
    out = []
    for sur in surrogates:
        model, m, s = _norm(sur)
        m, s = m.to(key01.device), s.to(key01.device)
        params = [p for p in model.parameters() if p.requires_grad]
        gs = []
        for k in range(key01.shape[0]):
            x = key01[k : k + 1].expand(views, -1, -1, -1)
            if views > 1:
                x = torch.cat([key01[k : k + 1], _crop_flip(x[1:], gen)], 0)
            y = torch.full((views,), int(key_lab[k]), device=key01.device)
            loss = F.cross_entropy(model((x - m) / s), y)
            g = torch.autograd.grad(loss, params)
            gs.append(torch.cat([t.flatten() for t in g]).detach())
        out.append(torch.stack(gs))
    return out  # list over surrogates of [K, P]


def craft(
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    key_imgs: torch.Tensor,
    key_lab: torch.Tensor,
    assignment: torch.Tensor,
    surrogates: Sequence,
    params: CraftParams,
    generator: torch.Generator,
    log: Callable[[str], None] | None = None,
    retrain: Callable[[torch.Tensor], Sequence] | None = None,
) -> dict:
    """Perturb the poison images so their training gradient points where key k's gradient does.

    images_uint8: uint8 [B, C, H, W], the images to perturb (all of class key_lab[assignment[i]]).
    labels: int64 [B], their true labels (unchanged: clean label).
    key_imgs: uint8 [K, C, H, W]; key_lab: int64 [K]; assignment: int64 [B] key index per image.
    surrogates: sequence of (model, mean, std) in eval mode, trained on clean data; the loss is the
        mean over surrogates of 1 − cos(∇θ Σ_{i∈k} CE(f(t(x̃_i)), y_i), ∇θ CE(f(key_k), ℓ_k)),
        summed over keys (each key's group matched separately).
    retrain: if given with params.retrain_every > 0, called every retrain_every steps with the
        current poisons (uint8 [B, C, H, W], rounded) and returns fresh surrogates trained from
        scratch on the dataset with them swapped in (Sleeper Agent); target gradients are then
        recomputed on the new surrogates.
    Returns dict(images=uint8 [B, C, H, W], psnr=float64 [B] dB, linf=int [B] levels,
    loss=float [K] final matching loss per key, seconds, image_steps).
    """
    t0 = time.perf_counter()
    dev = images_uint8.device
    x_lv = images_uint8.float()
    x01 = x_lv / 255.0
    k_count = key_imgs.shape[0]
    tg = _target_grads(
        surrogates, key_imgs.float().div(255.0), key_lab, params.key_views, generator
    )
    groups = [torch.nonzero(assignment == k).flatten() for k in range(k_count)]
    normed = [_norm(s) for s in surrogates]
    normed = [(m, a.to(dev), b.to(dev)) for m, a, b in normed]
    plist = [[p for p in m.parameters() if p.requires_grad] for m, _, _ in normed]
    best = x01.clone()
    best_loss = torch.full((k_count,), float("inf"))
    image_steps = 0
    for restart in range(params.restarts):
        init = (torch.rand(x01.shape, generator=generator, device=dev) * 2 - 1) * params.init
        delta = (init / 255.0).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=params.lr / 255.0)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, [params.steps * 3 // 8, params.steps * 5 // 8, params.steps * 7 // 8], 0.1
        )
        last = torch.zeros(k_count)
        for step in range(params.steps):
            if (
                retrain is not None
                and params.retrain_every
                and step
                and step % params.retrain_every == 0
            ):
                with torch.no_grad():
                    cur = _round_levels((x01 + delta) * 255.0, x_lv, params.linf).to(torch.uint8)
                surrogates = list(retrain(cur))
                tg = _target_grads(
                    surrogates, key_imgs.float().div(255.0), key_lab, params.key_views, generator
                )
                normed = [_norm(s) for s in surrogates]
                normed = [(m, a.to(dev), b.to(dev)) for m, a, b in normed]
                plist = [[p for p in m.parameters() if p.requires_grad] for m, _, _ in normed]
                if log:
                    log(f"step {step}: surrogates retrained on the current poisons")
            grad = torch.zeros_like(delta)
            xa = x01 + delta
            for k, g_idx in enumerate(groups):
                if g_idx.numel() == 0:
                    continue
                xk = xa[g_idx]
                if params.augment:
                    xk = _crop_flip(xk, generator)
                yk = labels[g_idx]
                lk = 0.0
                for si, (model, m, s) in enumerate(normed):
                    loss = F.cross_entropy(model((xk - m) / s), yk, reduction="sum")
                    gp = torch.autograd.grad(loss, plist[si], create_graph=True)
                    gp = torch.cat([t.flatten() for t in gp])
                    lk = lk + 1 - F.cosine_similarity(gp, tg[si][k], dim=0)
                lk = lk / len(normed)
                (gd,) = torch.autograd.grad(lk, delta)
                grad += gd
                last[k] = float(lk.detach())
                image_steps += g_idx.numel() * len(normed)
            delta.grad = grad.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                xn = _project(x01 + delta, x01, params.linf)
                if params.psnr_floor is not None:
                    xn = _project_l2(xn, x01, params.psnr_floor + 0.2)
                delta.copy_(xn - x01)
            if log and (step % 50 == 0 or step == params.steps - 1):
                log(f"restart {restart} step {step} loss {float(last.mean()):.4f}")
        with torch.no_grad():
            cand = x01 + delta
            for k, g_idx in enumerate(groups):
                if g_idx.numel() and last[k] < best_loss[k]:
                    best_loss[k] = last[k]
                    best[g_idx] = cand[g_idx]
    with torch.no_grad():
        out = _round_levels(best * 255.0, x_lv, params.linf)
        if params.psnr_floor is not None:
            out = _enforce_psnr(out, x_lv, params.psnr_floor)
        out = out.to(torch.uint8)
    linf = (out.to(torch.int16) - images_uint8.to(torch.int16)).abs().amax(dim=(1, 2, 3))
    return dict(
        images=out,
        psnr=psnr(images_uint8.cpu(), out.cpu()).numpy(),
        linf=linf.cpu().numpy(),
        loss=best_loss.numpy(),
        seconds=time.perf_counter() - t0,
        image_steps=image_steps,
        params=asdict(params),
    )


# ------------------------------------------------------------------------------------------------
# Test
# ------------------------------------------------------------------------------------------------


def key_scores(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    key_imgs: torch.Tensor,
    A: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Scores [K, C] per score type, averaged over A views (view 0 = the key itself, the others
    random crop pad-4 + flip drawn from a generator seeded by ``seed``, fixed in advance).

    ``logit``: mean logits; ``prob``: mean softmax; ``logprob``: mean log-softmax. For A = 1 all
    three rank labels identically (margins too: ℓ's margin over the best other label is > 0 iff
    it ranks first), so the score type only matters through the average over views.
    """
    gen = torch.Generator().manual_seed(seed)
    x = key_imgs.float().div(255.0)
    outs = []
    with torch.no_grad():
        for a in range(A):
            xa = x if a == 0 else _crop_flip(x, gen)
            outs.append(logits_fn(xa).float().cpu())
    z = torch.stack(outs)  # [A, K, C]
    return {
        "logit": z.mean(0).numpy(),
        "prob": z.softmax(-1).mean(0).numpy(),
        "logprob": z.log_softmax(-1).mean(0).numpy(),
    }


def ranks_from_scores(scores: np.ndarray, key_lab: np.ndarray) -> np.ndarray:
    """int [K]: r_k = 1 + #{c ≠ ℓ_k : s_k[c] ≥ s_k[ℓ_k]}; uniform on 1..C under H0 (see module
    docstring), ties against us."""
    s = np.asarray(scores, dtype=np.float64)
    own = s[np.arange(len(key_lab)), key_lab]
    return (s >= own[:, None]).sum(axis=1)  # counts ℓ_k itself once: 1 + #{others ≥}


def key_ranks(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    key_imgs: torch.Tensor,
    key_lab: np.ndarray,
    augment: bool = True,
    A: int = 16,
    score: str = "logit",
    seed: int = 0,
) -> np.ndarray:
    """int [K] ranks of the secret labels in the suspect's (view-averaged) scores on the keys.

    logits_fn: float [K, C, H, W] in [0, 1] → logits [K, num_classes] (normalisation inside).
    Combine with ``radmark.stats.rank_log_sf(ranks, slots=num_classes)`` (exact).
    """
    sc = key_scores(logits_fn, key_imgs, A if augment else 1, seed)[score]
    return ranks_from_scores(sc, np.asarray(key_lab))
