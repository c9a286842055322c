"""The exact black-box test: the true carrier's rank among decoys, from a suspect's outputs alone.

The verification kit (``marking/kit.py``) holds clean held-out images of every class marked once
per slot s = 0..K; slot π_c holds class c's true carrier, the others decoys drawn the same way, and
π_c is a keyed uniform draw written nowhere. At verification, per slot and class, a model's
response is its mean centred logit of class c over the kit's class-c images marked with that slot:

    T_c(s) = mean_{i: y_i = c} [z_c(x̃_{s,i}) − mean_j z_j(x̃_{s,i})]

Most of T's variation across slots is common to every model trained on the same kind of data, so
it is removed with a reference that is independent of the key: the marking network itself
(trained on clean data before the key existed). Per class, the suspect's T is regressed on the
marker's over the slots and the residual R_c(s) = (T_c(s) − mean) − b_c (T^ref_c(s) − mean) is the
score (b_c by least squares over all slots, a symmetric function of them). The class's rank is
r_c = 1 + #{s ≠ π_c : R_c(s) ≥ R_c(π_c)} (ties count against us).

Why it is exact: under H0 the slot carriers are i.i.d. whatever π is, so the suspect's and the
reference's responses are independent of π, and so is any score computed from them; π_c is
uniform, so the rank at π_c is uniform on {1..K+1} (or stochastically larger with ties) whatever
the model. The paired test across images with one decoy set (method.md, "Trap, measured") is
invalid because the images share the carrier draw; here the carrier draw is the unit. Classes use
disjoint draws, so ranks are independent across classes and are combined with their exact
discrete null (:func:`radmark.verify.statistics.rank_log_sf`); the floor is (K+1)^−C.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from radmark.errors import IntegrityError, ModelError
from radmark.verify.ranks import rank_log_sf
from radmark.verify.tests import TestResult, register_test

if TYPE_CHECKING:
    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.marking.kit import Kit
    from radmark.verify.evidence import Evidence

BLACK_BOX = "black_box_rank"


def slot_statistics(
    logits_fn: Callable[[Any], Any],
    kit: Kit,
    num_classes: int,
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """T [S, C]: mean centred logit of class c over the kit's class-c images marked with slot s."""
    import torch

    s, n = kit.marked.shape[:2]
    out = np.zeros((s, num_classes), dtype=np.float64)
    onehot = np.eye(num_classes, dtype=np.float64)[kit.labels]  # [N, C]
    counts = onehot.sum(axis=0)
    if np.any(counts == 0):
        raise IntegrityError("the kit has no image of some class")
    with torch.no_grad():
        for slot in range(s):
            chunks = []
            for i in range(0, n, batch_size):
                x = torch.from_numpy(kit.marked[slot, i : i + batch_size]).to(device)
                z = logits_fn(x.float().div_(255.0)).double()
                chunks.append((z - z.mean(dim=1, keepdim=True)).cpu().numpy())
            z = np.concatenate(chunks)
            if z.shape != (n, num_classes):
                raise ModelError(
                    f"the model gave outputs of shape {z.shape} on the kit, expected "
                    f"[{n}, {num_classes}]"
                )
            if not np.all(np.isfinite(z)):
                raise ModelError("the model produced non-finite logits on the kit images")
            out[slot] = (onehot * z).sum(axis=0) / counts
    return out


def residualise(stats: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per class (column): the slots' T minus its least-squares fit on the reference's T.

    Symmetric in the slots, and the reference never sees the key, so the residual is independent
    of the true slot under H0 (module docstring): the test stays exact for any reference.
    """
    y = stats - stats.mean(axis=0, keepdims=True)
    x = reference - reference.mean(axis=0, keepdims=True)
    xx = np.sum(x * x, axis=0)
    b = np.where(xx > 0, np.sum(x * y, axis=0) / np.where(xx > 0, xx, 1.0), 0.0)
    return y - b * x


def true_slot_ranks(stats: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Per class, 1 + the number of other slots scoring at least the true slot (ties against us)."""
    s, c = stats.shape
    true = stats[pi, np.arange(c)]
    return np.sum(stats >= true, axis=0).astype(np.int64)


def rank_result(ranks: np.ndarray, slots: int, description: str, randomisation: str,
                name: str) -> TestResult:  # fmt: skip
    """A TestResult from per-unit ranks uniform on 1..slots under H0 (exact combination)."""
    return TestResult(
        name=name,
        log_p=rank_log_sf(ranks, slots),
        exact=True,
        statistic=float(np.sum(np.log(ranks.astype(np.float64)))),
        description=description,
        randomisation=randomisation,
        units=tuple(float(r) for r in ranks),
        slots=slots,
    )


class BlackBoxRankTest:
    name = BLACK_BOX
    exact = True
    randomisation = "carriers"  # the true slot holds the true carriers: dependent on the others
    needs = frozenset({"kit"})
    description = "decoy rank per class, exact discrete combination (black box: outputs only)"

    def available(self, evidence: Evidence, record: MarkRecord) -> str | None:
        from radmark.marking.kit import kit_records

        if not kit_records(evidence.store, record):
            return (
                f"mark record {record.short} has no verification kit: run "
                f"`radmark kit build {record.short} --probe SHARDS`"
            )
        return None

    def run(self, evidence: Evidence, record: MarkRecord, key: SecretKey) -> TestResult:
        from radmark.marking.kit import true_slots

        kit_rec, kit = evidence.kit(record)
        if int(kit.labels.min()) < 0 or int(kit.labels.max()) >= record.num_classes:
            raise IntegrityError("the kit's labels do not match its mark record's classes")
        t, ref = evidence.kit_statistics(record)
        pi = true_slots(key, record.address, record.num_classes, kit.slots)
        ranks = true_slot_ranks(residualise(t, ref), pi)
        return rank_result(
            ranks,
            kit.slots,
            f"decoy rank among {kit.slots} carriers per class, exact discrete combination "
            "(black box: outputs only)",
            self.randomisation,
            self.name,
        )


register_test(BlackBoxRankTest())
