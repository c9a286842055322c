"""The twin test: the rank of the published candidate among each marked image's M twins.

The suspect's score of a candidate is its margin of the image's true label (logit of the label
minus the largest other logit) on the candidate as published (one plain view: measured better than
averaging training-style views, bench/experiments/README.md), residualised on the marking
network's own scores: per record, score − β·score_marker with β fitted by least squares on the
within-image-centred scores of every candidate. The marker never saw the key, and β uses the
candidates in generation order, never the published index, so the residual keeps the test exact;
it removes what any model trained on this data says about how an image's twins differ.
A model trained on the published candidate fits it better than its unpublished twins; a model
that never saw it cannot tell which one was published. Per image, the rank of the published
candidate (1 = best; ties against the owner) is uniform on 1..M under H0 (``marking/twins.py``
says why), independently across images; the N ranks are combined with their exact discrete null
(``verify/ranks.py``; for M = 2 it is the binomial sign test). The scores do not depend on the key,
so they are computed once per record (:func:`twin_scores`, cached in ``Evidence``) and every key
reuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from radmark.errors import KeystoreError, ModelError
from radmark.verify.black_box import rank_result
from radmark.verify.tests import TestResult, register_test

if TYPE_CHECKING:
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.verify.evidence import Evidence

TWIN_RANK = "twin_rank"
VIEWS = 0  # a single plain view (the published candidate as stored)


def candidate_scores(
    logits: Callable[[Any], Any],
    candidates: np.ndarray,
    labels: np.ndarray,
    *,
    views: int = VIEWS,
    pad: int = 4,
    device: str = "cpu",
    batch: int = 512,
) -> np.ndarray:
    """Margins of the true label, float64 [N, M], averaged over ``views`` shared random views.

    candidates: uint8 [N, M, C, H, W]; labels: int64 [N]. The views are drawn from a fixed seed:
    scores are a deterministic function of the suspect and the candidates.
    """
    import torch

    from radmark.marking.twins import shared_views

    n, m = candidates.shape[:2]
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = np.zeros((n, m), dtype=np.float64)
    with torch.no_grad():
        for s in range(0, n, max(1, batch // m)):
            x = torch.from_numpy(candidates[s : s + batch // m]).to(device)  # [b, M, C, H, W]
            b = x.shape[0]
            y = torch.from_numpy(labels[s : s + b]).to(device).view(b, 1, 1).expand(b, m, 1)
            acc = torch.zeros((b, m), dtype=torch.float64, device=device)
            for _ in range(max(views, 1)):
                xv = x.permute(1, 0, 2, 3, 4).float().div(255.0)
                if views > 0:
                    xv = shared_views(xv, gen, pad)
                z = logits(xv.reshape(m * b, *x.shape[2:])).double().view(m, b, -1)
                z = z.permute(1, 0, 2)  # [b, M, classes]
                if not bool(torch.isfinite(z).all()):
                    raise ModelError("the model produced non-finite logits on the twin candidates")
                zy = z.gather(2, y).squeeze(2)
                other = z.scatter(2, y, float("-inf")).amax(2)
                acc += zy - other
            out[s : s + b] = (acc / max(views, 1)).cpu().numpy()
    return out


def residualise(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """scores − β·reference, β by least squares on within-image-centred scores ([N, M] each).

    Symmetric in each image's candidates and blind to which was published: exactness is kept.
    """
    s = scores - scores.mean(axis=1, keepdims=True)
    r = reference - reference.mean(axis=1, keepdims=True)
    rr = float(np.sum(r * r))
    beta = float(np.sum(s * r)) / rr if rr > 0 else 0.0
    return scores - beta * reference


def published_ranks(scores: np.ndarray, published: np.ndarray) -> np.ndarray:
    """Per image, 1 + the number of other candidates scoring at least the published one."""
    pub = scores[np.arange(scores.shape[0]), published]
    return np.sum(scores >= pub[:, None], axis=1).astype(np.int64)


class TwinRankTest:
    name = TWIN_RANK
    exact = True
    randomisation = "twins"
    description = "rank of the published twin among each marked image's candidates"
    needs: frozenset[str] = frozenset()

    def available(self, evidence: Evidence, record: MarkRecord) -> str | None:
        from radmark.marking.twins import twin_kits

        if not twin_kits(record):
            return f"mark record {record.short} has no twin kit"
        return None

    def run(self, evidence: Evidence, record: MarkRecord, key: SecretKey) -> TestResult:
        from radmark.marking.twins import published_index

        ids, scores = twin_scores(evidence, record)
        m = scores.shape[1]
        ranks = published_ranks(scores, published_index(key.twin_seed(), ids, m))
        res = rank_result(ranks, m, f"rank of the published twin among {m} candidates, "
                          f"{len(ranks)} images, exact", self.randomisation, self.name)  # fmt: skip
        wins = float(np.mean(ranks == 1))
        return replace(res, extra={"win_rate": wins, "images": float(len(ranks))})


def twin_scores(evidence: Evidence, record: MarkRecord) -> tuple[list[str], np.ndarray]:
    """The suspect's score of every twin candidate of ``record``, residualised on the marker's:
    ids [N], float64 [N, M]. Key-independent, so computed once per record and suspect."""

    def make() -> tuple[list[str], np.ndarray]:
        ids, labels, cands = load_twin_kits(evidence, record)
        dev = evidence.settings.device
        own = candidate_scores(evidence.suspect.logits, cands, labels, device=dev)
        ref = candidate_scores(evidence.marker(record).logits, cands, labels, device=dev)
        return ids, residualise(own, ref)

    return evidence.cached(("twin-scores", record.address), make)


def load_twin_kits(
    evidence: Evidence, record: MarkRecord
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every private twin kit of ``record``, hash-checked: ids, labels [N], candidates [N, M, ...]."""
    from radmark.marking.twins import read_kit, twin_kits

    ids: list[str] = []
    labels, cands = [], []
    for addr in twin_kits(record):
        try:
            blob = evidence.store.read_kit(addr)
        except KeystoreError:
            raise KeystoreError(
                f"keystore {evidence.store.root} is missing twin kit {addr[:16]} of mark "
                f"record {record.short}: copy it from the marking machine's keystore"
            ) from None
        i, y, c = read_kit(blob, f"twin kit {addr[:16]}")
        ids += i
        labels.append(y)
        cands.append(c)
    if len({c.shape[1:] for c in cands}) > 1:
        raise ModelError("twin kits of one record hold images of several sizes; test them apart")
    return ids, np.concatenate(labels), np.concatenate(cands)


register_test(TwinRankTest())
