"""Verification kits (radmark/marking/kit.py) and the black-box decoy-rank test
(radmark/verify/black_box.py).

The null-calibration test runs the real pipeline (slot carriers from the key, marking of every
slot, the suspect's outputs, ranks, exact combination) for hundreds of fresh keys against a
model that never saw any of them: the p-values must be super-uniform.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from radmark.canonical import canonical_json
from radmark.errors import IntegrityError
from radmark.keys.carriers import CARRIER_FORMAT, carriers_digest, derive_carriers
from radmark.keys.keypair import SecretKey
from radmark.keys.records import MarkerRef, MarkRecord, mark_record_body
from radmark.marking.kit import Kit, decoy_carriers, mark_kit_images, slot_carriers, true_slots
from radmark.marking.radioactive import get_preset
from radmark.models import build_model, load_model
from radmark.verify.black_box import (
    BLACK_BOX,
    rank_result,
    residualise,
    slot_statistics,
    true_slot_ranks,
)
from radmark.verify.ranks import rank_log_sf
from radmark.verify.statistics import LN10
from tests.factories import fmnist, make_marker

MARKER_ID = "smallcnn@sha256:" + "ab" * 32
C, D = 10, 128


def _key(i: int) -> SecretKey:
    return SecretKey(hashlib.sha256(f"kit-test-{i}".encode()).digest())


def _record(key: SecretKey, d: int = D, c: int = C) -> MarkRecord:
    """A schema-valid mark record committed to key's carriers (no marking done)."""
    carriers = derive_carriers(key.carrier_seed(), d, c, MARKER_ID)
    rec = key.public_record(created="2026-11-23T00:00:00Z")
    body = mark_record_body(
        key_fingerprint=rec.fingerprint,
        method="radioactive",
        marker=MarkerRef(MARKER_ID, "smallcnn", "smallcnn", "ab" * 32, d, None),
        num_classes=c,
        carriers={"format": CARRIER_FORMAT, "sha256": carriers_digest(carriers)},
        params=get_preset("default").to_dict(),
        fraction=1.0,
        selection_rule="test",
        label_field="cls",
        counts={"images": 0, "marked": 0, "skipped": 0},
        shards=[],
    )
    signed = key.sign(body)
    return MarkRecord.from_signed(signed, hashlib.sha256(canonical_json(signed)).hexdigest(), rec)


def black_box_test(stats: np.ndarray, pi: np.ndarray):  # -> TestResult
    """The black-box test's ranks and exact combination, as verify computes them."""
    return rank_result(true_slot_ranks(stats, pi), stats.shape[0], "", "carriers", BLACK_BOX)


def test_true_slots_are_deterministic_in_range_and_key_dependent() -> None:
    k = _key(0)
    a = true_slots(k, "ab" * 32, C, 40)
    assert np.array_equal(a, true_slots(k, "ab" * 32, C, 40))
    assert a.min() >= 0 and a.max() < 40
    assert not np.array_equal(a, true_slots(_key(1), "ab" * 32, C, 40))
    assert not np.array_equal(a, true_slots(k, "cd" * 32, C, 40))


def test_true_slots_are_uniform_over_keys() -> None:
    slots = 7
    counts = np.bincount(
        np.concatenate([true_slots(_key(i), "ab" * 32, 5, slots) for i in range(1400)]),
        minlength=slots,
    )
    from scipy import stats

    assert stats.chisquare(counts).pvalue > 1e-3, counts


def test_slot_carriers_hold_the_true_carrier_at_its_slot_and_fresh_decoys_elsewhere() -> None:
    k = _key(2)
    rec = _record(k)
    carriers, pi = slot_carriers(k, rec, 9)
    true = derive_carriers(k.carrier_seed(), D, C, MARKER_ID)
    assert carriers.shape == (10, C, D) and carriers.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(carriers, axis=2), 1.0, atol=1e-5)
    for c in range(C):
        assert np.array_equal(carriers[pi[c], c], true[c])
        others = np.delete(carriers[:, c], pi[c], axis=0)
        assert not any(np.array_equal(o, true[c]) for o in others)
        assert len({o.tobytes() for o in others}) == 9
    # Decoys derive from the key and never equal the true carriers.
    d0 = decoy_carriers(k, 0, D, C, MARKER_ID)
    assert np.array_equal(d0, decoy_carriers(k, 0, D, C, MARKER_ID))
    assert not np.array_equal(d0, true)
    again, pi2 = slot_carriers(k, rec, 9)
    assert np.array_equal(again, carriers) and np.array_equal(pi, pi2)


def test_slot_carriers_refuse_a_key_that_does_not_match_the_commitment() -> None:
    rec = _record(_key(3))
    with pytest.raises(IntegrityError, match="carriers committed"):
        slot_carriers(_key(4), rec, 4)


def test_black_box_ranks_count_ties_against_the_owner() -> None:
    stats = np.zeros((5, 3))
    stats[2, 0] = 1.0  # class 0: true slot 2 is the unique maximum -> rank 1
    stats[:, 1] = 0.5  # class 1: all tied -> rank 5 (worst)
    stats[:, 2] = [2.0, 1.0, -1.0, -1.0, -1.0]  # class 2: one decoy above true slot 1 -> rank 2
    res = black_box_test(stats, np.array([2, 3, 1]))
    assert [int(r) for r in res.units] == [1, 5, 2]
    assert res.slots == 5
    assert res.log10_p == pytest.approx(rank_log_sf(np.array([1, 5, 2]), 5) / LN10)


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("kit-nets")
    marker = load_model(make_marker(root / "m.safetensors", seed=0))
    torch.manual_seed(1)
    clean_model = build_model("smallcnn", C, in_chans=1).eval()
    images, labels = fmnist(400, offset=1000)
    idx = np.concatenate([np.flatnonzero(labels == k)[:2] for k in range(C)])
    return marker, clean_model, images[idx][:, None], labels[idx]


def _logits(model):
    def fn(x):
        return model((x[:, :1] - 0.5) / 0.25)

    return fn


@pytest.mark.slow
def test_null_calibration_over_200_keys(nets) -> None:
    """A model that never saw any key: P(p <= a) <= a (binomial 99.9% slack) at every level."""
    marker, clean_model, images, labels = nets
    params = get_preset("default", steps=2)
    ref = marker.logits  # the verify-time reference: the marker's own logits
    ps: list[float] = []
    raw: list[float] = []
    torch.set_num_threads(1)
    one = np.concatenate([np.flatnonzero(labels == c)[:1] for c in range(C)])
    images, labels = images[one], labels[one]
    for i in range(200):
        k = _key(1000 + i)
        carriers, pi = slot_carriers(k, _record(k), 9)
        marked, _ = mark_kit_images(images, labels, carriers, marker.features, params)
        kit = Kit(address="", clean=images, labels=labels, marked=marked)
        t = residualise(slot_statistics(_logits(clean_model), kit, C), slot_statistics(ref, kit, C))
        ps.append(black_box_test(t, pi).log10_p)
        raw.append(black_box_test(slot_statistics(_logits(clean_model), kit, C), pi).log10_p)
    for lp in (ps, raw):  # the verify statistic (reference residual) and the raw one
        p = 10.0 ** np.array(lp)
        n = len(p)
        for a in (0.01, 0.05, 0.2, 0.5):
            frac = float(np.mean(p <= a))
            slack = 3.3 * np.sqrt(a * (1 - a) / n)
            assert frac <= a + slack, (a, frac)
        # Not degenerate: the p-values spread over (0, 1] (exact up to discreteness).
        assert np.mean(p <= 0.5) >= 0.3 and np.mean(p <= 0.2) >= 0.08


def test_power_on_a_model_that_reads_the_carriers(nets) -> None:
    """A suspect whose class-c logit is φ·u_c prefers the true carriers: ranks 1, floor reached."""
    marker, _clean, images, labels = nets
    k = _key(7)
    carriers, pi = slot_carriers(k, _record(k), 9)
    true = derive_carriers(k.carrier_seed(), D, C, MARKER_ID)
    w = torch.from_numpy(true)
    marked, psnr = mark_kit_images(
        images, labels, carriers, marker.features, get_preset("default", steps=20, radius=8)
    )
    assert np.all(psnr > 30)
    kit = Kit(address="", clean=images, labels=labels, marked=marked)

    def reads(x):
        return marker.features(x) @ w.T

    res = black_box_test(slot_statistics(reads, kit, C), pi)
    assert sum(r == 1 for r in res.units) >= 8, res.units
    assert res.log10_p < -6
    # The reference residual keeps that evidence (the marker's own head does not read u).
    adj = black_box_test(
        residualise(slot_statistics(reads, kit, C), slot_statistics(marker.logits, kit, C)),
        pi,
    )
    assert adj.log10_p < -6, adj.units


def test_residualise_is_symmetric_in_the_slots_and_removes_the_reference() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(12, 4))
    own = rng.normal(size=(12, 4))
    t = 3.0 * ref + 0.1 * own
    r = residualise(t, ref)
    perm = rng.permutation(12)
    np.testing.assert_allclose(residualise(t[perm], ref[perm]), r[perm], atol=1e-12)
    np.testing.assert_allclose(np.sum(r * (ref - ref.mean(0)), axis=0), 0.0, atol=1e-9)
    assert np.allclose(residualise(t, np.zeros_like(ref)), t - t.mean(0))


def test_marking_is_the_same_function_for_every_slot(nets) -> None:
    """Two slots with the same carriers give the same bytes: only the carrier differs."""
    marker, _clean, images, labels = nets
    k = _key(8)
    carriers, _ = slot_carriers(k, _record(k), 2)
    carriers[1] = carriers[0]
    marked, _ = mark_kit_images(
        images, labels, carriers, marker.features, get_preset("default", steps=3)
    )
    assert np.array_equal(marked[0], marked[1])
    assert not np.array_equal(marked[0], marked[2])


def test_pinned_kit_vectors() -> None:
    """A kit built today must verify in every later version: decoys and true slots are pinned."""
    import json
    from pathlib import Path

    vectors = json.loads((Path(__file__).parents[2] / "keys" / "test-vectors.json").read_text())
    key = SecretKey(bytes.fromhex(vectors["secret_hex"]))
    kit = vectors["kit"]
    assert hashlib.sha256(key.decoy_seed()).hexdigest() == kit["decoy_seed_sha256"]
    assert hashlib.sha256(key.kit_slot_seed()).hexdigest() == kit["kit_slot_seed_sha256"]
    for v in kit["decoy_carriers"]:
        arr = decoy_carriers(key, v["j"], v["d"], v["C"], v["marker"])
        digest = hashlib.sha256(np.ascontiguousarray(arr, "<f4").tobytes()).hexdigest()
        assert digest == v["sha256_float32_le"]
    for v in kit["true_slots"]:
        assert true_slots(key, v["record"], v["C"], v["slots"]).tolist() == v["pi"]
