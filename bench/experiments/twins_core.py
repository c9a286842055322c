"""Twin marks (issue #15, part 1): per-image randomised decoys with an exact rank test.

For every selected image x (label y) the owner derives M candidate perturbations x + δ_m, each
imperceptible (per-image PSNR ≥ ``psnr_floor`` dB, L∞ ≤ ``linf`` levels, integer levels). A keyed
uniform draw (:func:`published_index`) picks which candidate goes into the published dataset; the
owner keeps the others. To test a suspect model, score it on all M candidates of every marked image
(:func:`score_candidates`), take the rank of the published candidate among its M and combine the N
ranks with their exact null (:func:`twin_test`).

Why the test is exact whatever the model: the candidates are computed *before* (and independently
of) the keyed draw, and the draw is a uniform index per image from HMAC-SHA256(secret, image id),
independent across images. Under H0 (the model never trained on the published candidates, or the
key is not the one used) the model and every score it gives are fixed functions of the candidates
and of data that does not depend on the secret, so each published index is uniform on 0..M−1 and
independent of the scores: the rank of the published candidate among the M scores is uniform on
1..M (stochastically larger with ties, which count against detection), independently across
images. The null of the sum of ranks (or the number of wins for M = 2: Binomial(N, 1/2)) is then
known exactly. Anything that does not look at the published index may enter the score: training
style augmentations, a reference model's scores, a regression coefficient fitted on the candidates
in their generation order.

Units: images are uint8 pixel levels 0..255, [B, C, H, W]; the optimised perturbation is in levels;
feature and logit functions take float images in [0, 1] (they normalise by themselves).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Augmentation shared by all candidates of an image
# ------------------------------------------------------------------------------------------------


def crop_flip_shared(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The training recipe's augmentation, the same draw for all M candidates of each image.

    x: float [M, B, C, H, W]. Per image b: a translation by (dx, dy) ∈ [−pad, pad]² with reflect
    padding and a horizontal flip with p = 1/2, identical for x[0, b], ..., x[M−1, b] (the draw is
    per image, not per candidate, so the candidates are compared on equal terms). Differentiable in
    x (padding, indexing and flips only). Draw order: dx [B], dy [B], flip [B] from ``generator``.
    """
    m, b, c, h, w = x.shape
    xs = x.permute(1, 0, 2, 3, 4).reshape(b, m * c, h, w)
    xp = F.pad(xs, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = dy.view(b, 1) + torch.arange(h).view(1, h)
    cols = dx.view(b, 1) + torch.arange(w).view(1, w)
    out = xp[torch.arange(b).view(b, 1, 1), :, rows.view(b, h, 1), cols.view(b, 1, w)]
    out = out.permute(0, 3, 1, 2)  # [B, M*C, H, W]
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
    return out.reshape(b, m, c, h, w).permute(1, 0, 2, 3, 4)


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwinParams:
    """How the M candidates of an image are made.

    Attributes:
        mode: ``"pm_feat"`` (M = 2: x ± δ, δ maximises ‖φ(t(x+δ)) − φ(t(x−δ))‖ for a shared random
            augmentation t), ``"dir"`` (x + δ_m pushes φ along a random unit direction v_m drawn per
            image and candidate, plus ``lambda_sep`` × the mean pairwise feature distance),
            ``"adv"`` (x + δ_m raises the marker's cross-entropy on label y, plus ``lambda_sep`` ×
            the mean pairwise feature distance; needs ``head`` and ``labels``), ``"noise"``
            (random Gaussian δ, ± for M = 2, independent draws for M > 2; no network).
        steps: optimisation steps (Adam on δ in levels); ignored for ``"noise"``.
        lr: Adam learning rate in levels per step.
        psnr_floor: per-image PSNR floor in dB (an L2 ball, projected after every step and
            enforced exactly after rounding).
        linf: L∞ cap in pixel levels (integer output stays within ⌊linf⌋ levels).
        mask: where δ may be non-zero: ``"all"``; ``"fg"`` pixels with 8 ≤ x ≤ 247 (both signs
            stay inside [0, 255], i.e. the garment, not the black background); ``"bg"`` pixels
            with x < 8.
        lambda_sep: weight of the pairwise separation term (``"dir"`` and ``"adv"``).
        pad: translation range of the marking augmentation (the suspect's recipe: pad 4 + flip).
    """

    mode: str = "pm_feat"
    steps: int = 20
    lr: float = 1.0
    psnr_floor: float = 42.0
    linf: float = 8.0
    mask: str = "all"
    lambda_sep: float = 1.0
    pad: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def _l2_max(psnr_floor: float, n: int) -> float:
    """Largest ‖δ‖₂ in levels with PSNR ≥ psnr_floor over n pixel values."""
    return 255.0 * 10.0 ** (-psnr_floor / 20.0) * math.sqrt(n)


def _project(
    delta: torch.Tensor, x_lv: torch.Tensor, p: TwinParams, mask: torch.Tensor, pm: bool = False
):
    """δ [M', B, C, H, W] levels → inside the mask, the L∞ cap, [0, 255] and the PSNR L2 ball.

    pm=True: δ is the free half of a ± pair; the range clamp is applied to each sign when the
    candidates are formed, and δ is scaled so that the larger of ‖clip(x+δ)−x‖, ‖clip(x−δ)−x‖ fits
    the L2 ball (a few fixed-point rounds; the exact floor is enforced after rounding).
    """
    delta = (delta * mask).clamp(-p.linf, p.linf)
    n = x_lv[0, 0].numel()
    l2 = _l2_max(p.psnr_floor, n)
    if not pm:
        delta = (x_lv + delta).clamp(0.0, 255.0) - x_lv
        norm = torch.linalg.vector_norm(delta.flatten(2), dim=2).clamp_min(1e-12)  # [M, B]
        scale = (l2 / norm).clamp(max=1.0)
        return delta * scale.view(*scale.shape, 1, 1, 1)
    for _ in range(4):
        up = (x_lv + delta).clamp(0.0, 255.0) - x_lv
        dn = (x_lv - delta).clamp(0.0, 255.0) - x_lv
        norm = torch.maximum(
            torch.linalg.vector_norm(up.flatten(2), dim=2),
            torch.linalg.vector_norm(dn.flatten(2), dim=2),
        ).clamp_min(1e-12)
        scale = (l2 / norm).clamp(max=1.0)
        delta = delta * scale.view(*scale.shape, 1, 1, 1)
    return delta


def _round(x_lv: torch.Tensor, delta: torch.Tensor, p: TwinParams) -> torch.Tensor:
    r = float(math.floor(p.linf))
    out = torch.round(x_lv + delta)
    return torch.minimum(torch.maximum(out, x_lv - r), x_lv + r).clamp(0.0, 255.0)


def _finalise(x_lv: torch.Tensor, delta: torch.Tensor, p: TwinParams) -> torch.Tensor:
    """Integer candidates uint8 [M, B, C, H, W] with PSNR ≥ floor and L∞ ≤ ⌊linf⌋ exactly.

    Rounding to integer levels zeroes every |δ| < 0.5 or overshoots the floor; δ is therefore scaled by
    the largest factor s ∈ [0.3, 4] (per candidate, 12 bisection steps) for which the rounded
    candidate still meets the floor, then any violator is shrunk (0.95·δ, truncated) until it
    complies. (For ± twins this means the twin that loses pixels to the [0, 255] clamp is scaled up
    on its other pixels: the pair stays a function of the image and δ only.)
    """
    n = x_lv[0, 0].numel()
    max_sse = n * 255.0**2 * 10.0 ** (-p.psnr_floor / 10.0)

    def ok(scale):
        d = _round(x_lv, delta * scale.view(*scale.shape, 1, 1, 1), p) - x_lv
        return d.square().flatten(2).sum(2) <= max_sse  # [M, B]

    lo = torch.full(delta.shape[:2], 0.3)
    hi = torch.full(delta.shape[:2], 4.0)
    for _ in range(12):
        mid = (lo + hi) / 2
        good = ok(mid)
        lo = torch.where(good, mid, lo)
        hi = torch.where(good, hi, mid)
    out = _round(x_lv, delta * lo.view(*lo.shape, 1, 1, 1), p).double()
    x64 = x_lv.double().expand_as(out).clone()
    while True:
        d = out - x64
        bad = d.square().flatten(2).sum(2) > max_sse  # [M, B]
        if not bool(bad.any()):
            return out.to(torch.uint8)
        out[bad] = x64[bad] + torch.trunc(d[bad] * 0.95)


def _pairwise_mean_dist(f: torch.Tensor) -> torch.Tensor:
    """f [M, B, d] → [B] mean over pairs m < m' of ‖f_m − f_m'‖."""
    m = f.shape[0]
    tot = 0.0
    for i in range(m):
        for j in range(i + 1, m):
            tot = tot + torch.linalg.vector_norm(f[i] - f[j], dim=1)
    return tot / (m * (m - 1) / 2)


def make_candidates(
    images: torch.Tensor,
    features_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    M: int,
    params: TwinParams,
    generator: torch.Generator,
    *,
    labels: torch.Tensor | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M candidate versions of each image, computed without knowing which will be published.

    Args:
        images: uint8 [B, C, H, W] pixel levels.
        features_fn: φ, float [K, C, H, W] in [0, 1] → [K, d], eval mode, frozen (None for noise).
        M: candidates per image (2 for ``pm_feat``; any ≥ 2 otherwise).
        params: :class:`TwinParams`.
        generator: CPU generator for initialisation, directions and augmentations (the *candidate*
            seed; it must not be the publishing key's stream).
        labels: int64 [B], needed by ``"adv"``.
        head: features → logits, needed by ``"adv"``.

    Returns:
        (candidates uint8 [M, B, C, H, W], psnr float64 [M, B] in dB against the original).
    """
    p = params
    x_lv = images.to(torch.float32).unsqueeze(0)  # [1, B, C, H, W]
    b = images.shape[0]
    if p.mask == "all":
        mask = torch.ones_like(x_lv)
    elif p.mask == "fg":
        mask = ((x_lv >= 8) & (x_lv <= 247)).float()
    elif p.mask == "bg":
        mask = (x_lv < 8).float()
    else:
        raise ValueError(p.mask)
    if p.mode == "pm_feat" and M != 2:
        raise ValueError("pm_feat makes M = 2 twins")

    def expand(d):  # the M perturbations: ± for pm modes
        return torch.stack([d[0], -d[0]]) if p.mode == "pm_feat" else d

    if p.mode == "noise":
        g = torch.randn((1 if M == 2 else M, *images.shape), generator=generator)
        g = g * mask
        # scale up so that the L∞ cap, not the initial norm, limits; then project onto the budget
        g = g * (
            2.0
            * _l2_max(p.psnr_floor, x_lv[0, 0].numel())
            / torch.linalg.vector_norm(g.flatten(2), dim=2).clamp_min(1e-12)
        ).view(g.shape[0], b, 1, 1, 1)
        g = _project(g, x_lv, p, mask, pm=(M == 2))
        d = torch.cat([g, -g]) if M == 2 else g
        cands = _finalise(x_lv, d, p)
        return cands, _psnr(images, cands)

    n_free = 1 if p.mode == "pm_feat" else M
    init = torch.randn((n_free, *images.shape), generator=generator) * mask
    init = init * (
        0.5
        * _l2_max(p.psnr_floor, x_lv[0, 0].numel())
        / torch.linalg.vector_norm(init.flatten(2), dim=2).clamp_min(1e-12)
    ).view(n_free, b, 1, 1, 1)
    delta = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=p.lr)
    with torch.no_grad():
        d_feat = features_fn(x_lv[0, :1] / 255.0).shape[1]
    if p.mode == "dir":
        v = torch.randn((M, b, d_feat), generator=generator)
        v = v / torch.linalg.vector_norm(v, dim=2, keepdim=True)
    for _ in range(p.steps):
        d_all = expand(delta)
        xc = (x_lv + d_all).clamp(0.0, 255.0) / 255.0  # [M, B, C, H, W]
        # the original rides along (same augmentation t) as the reference point of "dir"
        xc = torch.cat([x_lv / 255.0, xc]) if p.mode == "dir" else xc
        xa = crop_flip_shared(xc, generator, p.pad)
        f = features_fn(xa.reshape(xa.shape[0] * b, *images.shape[1:])).view(xa.shape[0], b, d_feat)
        if p.mode == "dir":
            fref, f = f[0], f[1:]
        if p.mode == "pm_feat":
            obj = torch.linalg.vector_norm(f[0] - f[1], dim=1).sum()
        elif p.mode == "dir":
            obj = ((f - fref.unsqueeze(0)) * v).sum() + p.lambda_sep * _pairwise_mean_dist(f).sum()
        elif p.mode == "adv":
            logits = head(f.reshape(M * b, d_feat))
            ce = F.cross_entropy(logits, labels.repeat(M), reduction="sum")
            obj = ce + p.lambda_sep * _pairwise_mean_dist(f).sum()
        else:
            raise ValueError(p.mode)
        (g,) = torch.autograd.grad(-obj, [delta])
        delta.grad = g
        opt.step()
        with torch.no_grad():
            delta.copy_(_project(delta, x_lv, p, mask, pm=(p.mode == "pm_feat")))
    with torch.no_grad():
        cands = _finalise(x_lv, expand(delta.detach()), p)
    return cands, _psnr(images, cands)


def _psnr(images: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    d = cands.double() - images.double().unsqueeze(0)
    mse = d.square().flatten(2).mean(2)
    return 10.0 * torch.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------
# Keyed publication
# ------------------------------------------------------------------------------------------------


def published_index(seed_bytes: bytes, sample_ids, M: int) -> np.ndarray:
    """The published candidate of each image: a keyed uniform draw on 0..M−1, int64 [N].

    u = HMAC-SHA256(seed_bytes, b"radmark/twins/publish/v1" ‖ id (8 bytes big-endian) ‖ counter),
    first 8 bytes as an unsigned integer; accepted if u < ⌊2⁶⁴ / M⌋·M (rejection sampling, so the
    index u mod M is exactly uniform for any M), else the counter is incremented. HMAC with a secret
    key is a PRF: without the key the indices are indistinguishable from i.i.d. uniform, and they
    depend on nothing but the key and the image id, not on the candidates or any model.
    """
    limit = (2**64 // M) * M
    out = np.empty(len(sample_ids), dtype=np.int64)
    for i, sid in enumerate(sample_ids):
        ctr = 0
        while True:
            msg = b"radmark/twins/publish/v1" + int(sid).to_bytes(8, "big") + ctr.to_bytes(4, "big")
            u = int.from_bytes(hmac.new(seed_bytes, msg, hashlib.sha256).digest()[:8], "big")
            if u < limit:
                out[i] = u % M
                break
            ctr += 1
    return out


# ------------------------------------------------------------------------------------------------
# Scoring and the test
# ------------------------------------------------------------------------------------------------

SCORE_KINDS = ("neg_loss", "margin", "logit")


@torch.no_grad()
def score_all_kinds(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    candidates: torch.Tensor,
    labels: torch.Tensor,
    A: int,
    generator: torch.Generator | None,
    *,
    pad: int = 4,
    batch: int = 1024,
) -> dict[str, torch.Tensor]:
    """Like :func:`score_candidates` for every kind at once: {kind: float [M, N]}.

    A = 0 means a single un-augmented view; A ≥ 1 averages over A shared crop+flip draws.
    """
    m, n = candidates.shape[:2]
    acc = {k: torch.zeros(m, n, dtype=torch.float64) for k in SCORE_KINDS}
    views = max(A, 1)
    for _ in range(views):
        for s in range(0, n, batch):
            xb = candidates[:, s : s + batch].float() / 255.0  # [M, b, C, H, W]
            if A >= 1:
                xb = crop_flip_shared(xb, generator, pad)
            bsz = xb.shape[1]
            z = logits_fn(xb.reshape(m * bsz, *xb.shape[2:])).double().view(m, bsz, -1)
            y = labels[s : s + batch].view(1, bsz, 1).expand(m, bsz, 1)
            zy = z.gather(2, y).squeeze(2)
            other = z.scatter(2, y, float("-inf")).amax(2)
            acc["neg_loss"][:, s : s + batch] += zy - torch.logsumexp(z, 2)
            acc["margin"][:, s : s + batch] += zy - other
            acc["logit"][:, s : s + batch] += zy
    return {k: v / views for k, v in acc.items()}


def score_candidates(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    candidates: torch.Tensor,
    labels: torch.Tensor,
    augment: bool,
    A: int,
    generator: torch.Generator | None,
    kind: str = "margin",
) -> torch.Tensor:
    """Suspect's score of every candidate, higher = "more fitted": float64 [M, N].

    Args:
        logits_fn: float [K, C, H, W] in [0, 1] → logits [K, classes] (normalises by itself).
        candidates: uint8 [M, N, C, H, W].
        labels: int64 [N], the image's label y (the same for all its candidates).
        augment: average over A shared crop (pad 4, reflect) + flip draws, the same draws for all
            M candidates of an image; False: one un-augmented view.
        kind: ``"neg_loss"`` (−cross-entropy, nats), ``"margin"`` (logit_y − max other logit) or
            ``"logit"`` (logit_y).
    The score may depend on anything except the published index (that keeps the test exact).
    """
    return score_all_kinds(logits_fn, candidates, labels, A if augment else 0, generator)[kind]


def residualise(scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """scores − β·ref_scores, β fitted by least squares on within-image centred scores.

    Both [M, N]. β uses the candidates in generation order and never the published index, so the
    test stays exact; it removes what a clean reference model (e.g. the marker) predicts about how
    the candidates of an image differ for any model.
    """
    s = scores - scores.mean(0, keepdim=True)
    r = ref_scores - ref_scores.mean(0, keepdim=True)
    beta = float((s * r).sum() / (r * r).sum().clamp_min(1e-30))
    return scores - beta * ref_scores


def twin_test(scores, published) -> tuple[np.ndarray, float]:
    """Ranks of the published candidates and the exact log10 p-value of their combination.

    scores: [M, N] (higher = more fitted); published: int [N] in 0..M−1.
    rank_i = 1 + #{m ≠ published_i : scores[m, i] ≥ scores[published_i, i]} (ties count against).
    Under H0 rank_i is uniform on 1..M (or stochastically larger with ties), independent over i.
    M = 2: the number of wins W = #{rank = 1} is Binomial(N, 1/2); p = P(W ≥ w_obs), exact.
    M > 2: S = Σ_i ⌈ln rank_i / h⌉·h with its exact lattice null (radmark.stats.rank_log_sf).
    Returns (ranks int64 [N], log10 p).
    """
    from scipy.stats import binom

    s = np.asarray(scores, dtype=np.float64)
    pub = np.asarray(published, dtype=np.int64)
    m, n = s.shape
    sp = s[pub, np.arange(n)]
    ranks = 1 + (s >= sp[None, :]).sum(0) - 1  # the published one itself counts once
    if m == 2:
        wins = int((ranks == 1).sum())
        return ranks, float(binom.logsf(wins - 1, n, 0.5) / math.log(10))
    from radmark.stats import rank_log_sf

    return ranks, float(rank_log_sf(ranks, m) / math.log(10))


def top1_log10p(ranks: np.ndarray, M: int) -> float:
    """Secondary M > 2 statistic: #{rank = 1} ~ Binomial(N, 1/M) under H0; exact log10 p."""
    from scipy.stats import binom

    w = int((np.asarray(ranks) == 1).sum())
    return float(binom.logsf(w - 1, len(ranks), 1.0 / M) / math.log(10))
