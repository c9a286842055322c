"""Twin marks: per-image randomised decoys, so evidence grows with the number of marked images.

For every selected image x the run derives M candidate versions x + δ_1..δ_M, each imperceptible
(per-image PSNR ≥ ``psnr_floor`` dB, L∞ ≤ ``linf`` levels, integer levels) and pushed apart in the
marking network φ's feature space (Huang, Gong & Reiter, CCS 2024, do this at L∞ 10/255). A keyed
uniform draw (:func:`published_index`, HMAC with the key's twin seed) picks which candidate is
published; the owner keeps all M privately in the keystore. The test (``verify/twin_rank.py``)
scores a suspect on every candidate and ranks the published one among its M.

Modes: ``pm`` (M = 2: x ± δ, δ maximising ‖φ(t(x+δ)) − φ(t(x−δ))‖ under a shared random
augmentation t, the most distinguishable pair for a network), ``dir`` (candidate m pushes φ along
its own random direction plus a term pushing the candidates apart) and ``noise`` (random ± pixel
noise at the same budget: the baseline without a marker).

Why the test is exact whatever the model: the candidates are computed before, and independently
of, the keyed draw (from the image, the marker and a generator seeded from public data), and the
draw is uniform and independent across images. Under H0 the suspect's scores are a fixed function
of the candidates, so each published index is uniform on 0..M−1 and independent of them: the rank
of the published candidate is uniform on 1..M (stochastically larger with ties), independently
across images. Units: images are uint8 levels [B, C, H, W]; δ is optimised in levels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radmark.errors import IntegrityError, UsageError
from radmark.keys.draws import uniform_index
from radmark.marking.budget import psnr
from radmark.marking.methods import Budget, MarkBatchResult, register_method

if TYPE_CHECKING:
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.models.network import LoadedModel

MODES = ("pm", "dir", "noise")
TWIN_KIT_FORMAT = "radmark-twin-kit-v1"
TWIN_KITS = "twin_kits"  # the record's method_data field: written and read only here
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TwinParams:
    """How the candidates of an image are made (recorded verbatim in the mark record)."""

    name: str = "default"
    mode: str = "pm"
    candidates: int = 2
    steps: int = 20
    lr: float = 1.0  # Adam step, in levels
    psnr_floor: float = 42.0
    linf: float = 8.0
    lambda_sep: float = 1.0
    pad: int = 4  # translation range of the shared augmentation (the suspect's crop)
    keep: float = 1.0  # of each batch's selected images, this share with the highest marker loss
    #                    gets twins; the rest are left unchanged (atypical images are memorised more)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"twin mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not isinstance(self.candidates, int) or not 2 <= self.candidates <= 64:
            raise UsageError("twin candidates must be an integer in [2, 64]")
        if self.mode == "pm" and self.candidates != 2:
            raise UsageError("twin mode 'pm' makes exactly 2 candidates (x + δ, x − δ)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError("twin steps must be a positive integer")
        if not (math.isfinite(self.psnr_floor) and 20.0 <= self.psnr_floor <= 80.0):
            raise UsageError(f"twin psnr_floor must be in [20, 80] dB, got {self.psnr_floor!r}")
        if not (math.isfinite(self.linf) and 1.0 <= self.linf <= 255.0):
            raise UsageError(f"twin linf must be in [1, 255] levels, got {self.linf!r}")
        if not (math.isfinite(self.lr) and self.lr > 0) or self.lambda_sep < 0 or self.pad < 0:
            raise UsageError("twin lr must be > 0, lambda_sep >= 0 and pad >= 0")
        if not (math.isfinite(self.keep) and 0.0 < self.keep <= 1.0):
            raise UsageError(f"twin keep must be in (0, 1], got {self.keep!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TwinParams:
        names = {f.name for f in fields(cls)}
        extra = set(data) - names
        if extra:
            raise UsageError(f"unknown twin parameter(s): {', '.join(sorted(extra))}")
        return cls(**dict(data))


PRESETS: dict[str, TwinParams] = {
    "default": TwinParams(),
    "hiloss": TwinParams(name="hiloss", keep=0.5),
    "dir4": TwinParams(name="dir4", mode="dir", candidates=4),
    "noise": TwinParams(name="noise", mode="noise"),
}


# ------------------------------------------------------------------------------ candidates


def shared_views(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random translation (reflect pad) + flip, the same draw for all M candidates of an image.

    x: float [M, B, C, H, W]; differentiable in x. Draws dx, dy, flip [B] from ``generator``.
    """
    import torch.nn.functional as F

    m, b, c, h, w = x.shape
    dev = x.device
    xs = x.permute(1, 0, 2, 3, 4).reshape(b, m * c, h, w)
    xp = F.pad(xs, (pad, pad, pad, pad), mode="reflect") if pad else xs
    g = generator.device
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=g).to(dev)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=g).to(dev)
    flip = (torch.rand(b, generator=generator, device=g) < 0.5).to(dev)
    rows = dy.view(b, 1) + torch.arange(h, device=dev).view(1, h)
    cols = dx.view(b, 1) + torch.arange(w, device=dev).view(1, w)
    out = xp[torch.arange(b, device=dev).view(b, 1, 1), :, rows.view(b, h, 1), cols.view(b, 1, w)]
    out = out.permute(0, 3, 1, 2)
    out = torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
    return out.reshape(b, m, c, h, w).permute(1, 0, 2, 3, 4)


def _l2_max(p: TwinParams, n: int) -> float:
    """The largest ‖δ‖₂ in levels with PSNR ≥ psnr_floor over n pixel values."""
    return 255.0 * 10.0 ** (-p.psnr_floor / 20.0) * math.sqrt(n)


def _project(delta: torch.Tensor, x: torch.Tensor, p: TwinParams, pm: bool) -> torch.Tensor:
    """δ [M', B, C, H, W] → inside the L∞ cap, the valid range and the PSNR L2 ball.

    ``pm``: δ is the free half of a ± pair; it is scaled so that the larger of the two clipped
    moves fits the ball.
    """
    delta = delta.clamp(-p.linf, p.linf)
    l2 = _l2_max(p, x[0, 0].numel())
    for _ in range(4 if pm else 1):
        up = (x + delta).clamp(0.0, 255.0) - x
        norm = torch.linalg.vector_norm(up.flatten(2), dim=2)
        if pm:
            dn = (x - delta).clamp(0.0, 255.0) - x
            norm = torch.maximum(norm, torch.linalg.vector_norm(dn.flatten(2), dim=2))
        else:
            delta = up
        scale = (l2 / norm.clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale.view(*scale.shape, 1, 1, 1)
    return delta


def _finalise(x: torch.Tensor, delta: torch.Tensor, p: TwinParams) -> torch.Tensor:
    """Integer candidates uint8 [M, B, C, H, W], PSNR ≥ floor and L∞ ≤ ⌊linf⌋ exactly.

    Rounding zeroes every |δ| < 0.5 or overshoots the floor, so δ is scaled by the largest factor in
    [0.3, 4] (bisection, per candidate) whose rounded candidate meets the floor; any violator left
    is shrunk (0.95·δ, truncated) until it complies.
    """
    r = float(math.floor(p.linf))
    max_sse = x[0, 0].numel() * 255.0**2 * 10.0 ** (-p.psnr_floor / 10.0)

    def rounded(scale: torch.Tensor) -> torch.Tensor:
        out = torch.round(x + delta * scale.view(*scale.shape, 1, 1, 1))
        return torch.minimum(torch.maximum(out, x - r), x + r).clamp(0.0, 255.0)

    lo = torch.full(delta.shape[:2], 0.3, device=x.device)
    hi = torch.full(delta.shape[:2], 4.0, device=x.device)
    for _ in range(12):
        mid = (lo + hi) / 2
        good = (rounded(mid) - x).square().flatten(2).sum(2) <= max_sse
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    out = rounded(lo).double()
    x64 = x.double().expand_as(out).clone()
    while True:
        d = out - x64
        bad = d.square().flatten(2).sum(2) > max_sse
        if not bool(bad.any()):
            return out.to(torch.uint8)
        out[bad] = x64[bad] + torch.trunc(d[bad] * 0.95)


def make_candidates(
    images: torch.Tensor,
    features: Callable[[torch.Tensor], torch.Tensor] | None,
    p: TwinParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """The M candidates of each image, computed without knowing which will be published.

    images: uint8 [B, C, H, W] on the device to compute on; features: φ (float [K, C, H, W] in
    [0, 1] → [K, d], eval mode; None for ``noise``); generator: the run's generator (seeded from
    public data, never from the publishing key). Returns uint8 [M, B, C, H, W].
    """
    m = p.candidates
    x = images.to(torch.float32).unsqueeze(0)
    b = images.shape[0]
    n = x[0, 0].numel()
    gdev = generator.device
    pm = p.mode == "pm"
    n_free = 1 if (pm or (p.mode == "noise" and m == 2)) else m

    def expand(d: torch.Tensor) -> torch.Tensor:
        return torch.cat([d, -d]) if n_free == 1 else d

    init = torch.randn((n_free, *images.shape), generator=generator, device=gdev).to(x.device)
    norm = torch.linalg.vector_norm(init.flatten(2), dim=2).clamp_min(1e-12)
    if p.mode == "noise":  # scale up so that the L∞ cap, not the start, limits; then project
        delta = init * (2.0 * _l2_max(p, n) / norm).view(n_free, b, 1, 1, 1)
        return _finalise(x, expand(_project(delta, x, p, pm=n_free == 1)), p)
    if features is None:
        raise UsageError(f"twin mode {p.mode!r} needs a marking network")
    delta = (init * (0.5 * _l2_max(p, n) / norm).view(n_free, b, 1, 1, 1)).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=p.lr)
    with torch.no_grad():
        d_feat = features(x[0, :1] / 255.0).shape[1]
    v = None
    if p.mode == "dir":
        v = torch.randn((m, b, d_feat), generator=generator, device=gdev).to(x.device)
        v = v / torch.linalg.vector_norm(v, dim=2, keepdim=True)
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(p.steps):
            xc = (x + expand(delta)).clamp(0.0, 255.0) / 255.0
            if p.mode == "dir":  # the original rides along, under the same view
                xc = torch.cat([x / 255.0, xc])
            xa = shared_views(xc, generator, p.pad)
            f = features(xa.reshape(xa.shape[0] * b, *images.shape[1:])).view(xa.shape[0], b, -1)
            if p.mode == "pm":
                obj = torch.linalg.vector_norm(f[0] - f[1], dim=1).sum()
            else:
                ref, f = f[0], f[1:]
                sep = sum(
                    torch.linalg.vector_norm(f[i] - f[j], dim=1)
                    for i in range(m)
                    for j in range(i + 1, m)
                ) / (m * (m - 1) / 2)
                assert v is not None
                obj = ((f - ref.unsqueeze(0)) * v).sum() + p.lambda_sep * sep.sum()
            (grad,) = torch.autograd.grad(-obj, [delta])
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                delta.copy_(_project(delta, x, p, pm=n_free == 1))
    with torch.no_grad():
        return _finalise(x, expand(delta.detach()), p)


# ------------------------------------------------------------------------------ publication


def published_index(seed: bytes, sample_ids: Sequence[str], m: int) -> np.ndarray:
    """The published candidate of each image: a keyed uniform draw on 0..m−1, int64 [N].

    ``keys/draws.py``'s keyed draw with the message "radmark/v1/twin|<id>|<counter>".
    Sample ids must be unique within a record (the pipeline uses ``shard/__key__``): two images
    sharing an id would share their draw, and the combination assumes independent units.
    """
    draws = [uniform_index(seed, f"radmark/v1/twin|{sid}|", m) for sid in sample_ids]
    return np.array(draws, dtype=np.int64)


# ------------------------------------------------------------------------------ the twin kit


def kit_bytes(ids: list[str], labels: np.ndarray, candidates: np.ndarray) -> bytes:
    """The private twin kit of one part of a run: every candidate of every marked image.

    ids [N] (``shard/__key__``), labels int64 [N], candidates uint8 [N, M, C, H, W] (one image
    size per part). Canonical safetensors, so equal content is an equal content address.
    """
    from safetensors.numpy import save

    from radmark.models import canonical_safetensors

    meta = {"format": TWIN_KIT_FORMAT, "ids": json.dumps(ids)}
    return canonical_safetensors(
        save(
            {
                "labels": np.ascontiguousarray(labels),
                "candidates": np.ascontiguousarray(candidates),
            },
            metadata=meta,
        )  # fmt: skip
    )


def read_kit(blob: bytes, where: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, labels int64 [N], candidates uint8 [N, M, C, H, W]) of a twin kit, checked."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        t = load(blob)
        n_head = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n_head]).get("__metadata__", {})
        ids = json.loads(meta.get("ids", "null"))
        labels, cands = t["labels"], t["candidates"]
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where}: not a valid twin kit ({exc})") from None
    if (meta.get("format") != TWIN_KIT_FORMAT or not isinstance(ids, list)
            or cands.dtype != np.uint8 or cands.ndim != 5 or labels.shape != (len(ids),)
            or cands.shape[0] != len(ids)):  # fmt: skip
        raise IntegrityError(f"{where}: malformed twin kit")
    return [str(i) for i in ids], labels.astype(np.int64), cands


class _TwinsRun:
    def __init__(self, key: SecretKey, marker: LoadedModel, params: TwinParams, device: str):
        self._seed = key.twin_seed()
        self._marker = marker
        self._features = marker.features
        self._p = params
        self._device = device
        self._parts: list[tuple[list[str], np.ndarray, np.ndarray]] = []

    @property
    def budget(self) -> Budget:
        return Budget(linf_levels=int(math.floor(self._p.linf)), psnr_floor=self._p.psnr_floor)

    def mark(self, images: torch.Tensor, labels: torch.Tensor, sample_ids: list[str], *,
             generator: torch.Generator) -> MarkBatchResult:  # fmt: skip
        b = images.shape[0]
        kept = self._kept(images, labels)  # bool [B]: which images get twins
        feats = None if self._p.mode == "noise" else self._features
        cands = make_candidates(images, feats, self._p, generator)  # [M, B, C, H, W]
        pub = torch.from_numpy(published_index(self._seed, sample_ids, self._p.candidates))
        out = cands[pub.to(cands.device), torch.arange(b, device=cands.device)]
        out = torch.where(kept.view(b, 1, 1, 1).to(out.device), out, images)
        idx = np.flatnonzero(kept.cpu().numpy())
        if idx.size:
            self._parts.append(([sample_ids[i] for i in idx],
                                labels.cpu().numpy().astype(np.int64)[idx],
                                cands.permute(1, 0, 2, 3, 4).cpu().numpy()[idx]))  # fmt: skip
        linf = (out.to(torch.int16) - images.to(torch.int16)).abs().amax(dim=(1, 2, 3))
        return MarkBatchResult(out, psnr(images, out), linf.to(torch.int64),
                               torch.full((b,), float("nan"), device=out.device))  # fmt: skip

    def _kept(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The ``keep`` share of the batch with the highest marker loss (all when keep = 1).

        A function of the images and the marker only, never of the publication draw: exact.
        """
        b = images.shape[0]
        if self._p.keep >= 1.0:
            return torch.ones(b, dtype=torch.bool)
        with torch.no_grad():
            z = self._marker.logits(images.float().div(255.0)).float()
            loss = torch.nn.functional.cross_entropy(z, labels.to(z.device), reduction="none")
        n = max(1, math.ceil(self._p.keep * b))
        kept = torch.zeros(b, dtype=torch.bool)
        kept[torch.argsort(loss.cpu(), descending=True, stable=True)[:n]] = True
        return kept

    def private_data(self) -> list[bytes]:
        """The twin kits accumulated since the last call (one per image size), then forgets them."""
        groups: dict[tuple[int, ...], list[tuple[list[str], np.ndarray, np.ndarray]]] = {}
        for part in self._parts:
            groups.setdefault(part[2].shape[1:], []).append(part)
        self._parts = []
        return [
            kit_bytes(
                [i for p in ps for i in p[0]],
                np.concatenate([p[1] for p in ps]),
                np.concatenate([p[2] for p in ps]),
            )  # fmt: skip
            for ps in groups.values()
        ]

    def record_fields(self, private: Sequence[str] = ()) -> dict[str, Any]:
        """No carriers; ``method_data.twin_kits`` commits to the private kits by address."""
        return {"carriers": None, "method_data": {TWIN_KITS: list(private)}}


def twin_kits(record: MarkRecord) -> list[str]:
    """The keystore addresses (hex, shard order) of the private twin kits ``record`` commits to.

    The one reader of ``method_data.twin_kits``; a record whose field is not a list of SHA-256
    hex addresses is refused (IntegrityError), and a record without it has no kit ([]).
    """
    value = record.method_data.get(TWIN_KITS, [])
    if not isinstance(value, list) or not all(
        isinstance(a, str) and _HEX64.fullmatch(a) for a in value
    ):
        raise IntegrityError(
            f"mark record {record.short}: method_data.{TWIN_KITS} must be a list of SHA-256 hex "
            "addresses"
        )
    return list(value)


class TwinsMethod:
    """Twin marks behind the marking-method seam (``marking/methods.py``)."""

    name = "twins"
    description = "per-image twin candidates, one published by a keyed draw (exact rank test)"
    tests: tuple[str, ...] = ("twin_rank",)
    presets: tuple[str, ...] = tuple(PRESETS)
    decoy_kit = None  # the twins are their own kit: no per-class carriers to swap for decoys

    def params(self, preset: str, overrides: Mapping[str, Any]) -> TwinParams:
        if preset not in PRESETS:
            raise UsageError(f"unknown twin preset {preset!r}; choose one of {', '.join(PRESETS)}")
        known = {f.name for f in fields(TwinParams)}
        allowed = {k: v for k, v in overrides.items() if k in known}
        if set(overrides) - known:
            raise UsageError(
                f"twin marks take no {', '.join(sorted(set(overrides) - known))} parameter"
            )
        base = PRESETS[preset]
        if allowed and "name" not in allowed:
            allowed["name"] = f"{preset}+custom"
        return replace(base, **allowed)

    def params_from_record(self, data: Mapping[str, Any]) -> TwinParams:
        return TwinParams.from_dict(data)

    def params_to_record(self, params: TwinParams) -> dict[str, Any]:
        return params.to_dict()

    def start(self, key: SecretKey, marker: LoadedModel, num_classes: int, params: TwinParams,
              *, device: str) -> _TwinsRun:  # fmt: skip
        return _TwinsRun(key, marker, params, device)

    def check_key(self, record: MarkRecord, key: SecretKey) -> None:
        """The signature already binds the record to its key; nothing else to commit to."""
        if not key.matches(record.key):
            raise IntegrityError(f"the key given is not the key of mark record {record.short}")


register_method(TwinsMethod())
