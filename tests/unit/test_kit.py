"""Verification kits (radmark/marking/kit.py) and the black-box decoy-rank test
(radmark/verify/black_box.py).

The null-calibration test runs the real pipeline (slot carriers from the key, marking of every
slot, the kit stored and its record signed, then the verdict's test through the verification
seam, ``verify.tests.score``) for hundreds of fresh keys against a model that never saw any of
them: the p-values must be super-uniform.
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
from radmark.keys.store import Keystore
from radmark.marking.kit import (
    decoy_carriers,
    mark_kit_images,
    slot_carriers,
    store_kit,
    true_slots,
)
from radmark.marking.radioactive import get_preset, mark_batch
from radmark.models import load_model, save_model
from radmark.models.network import LoadedModel
from radmark.verify.black_box import BLACK_BOX, rank_result, residualise, true_slot_ranks
from radmark.verify.evidence import Evidence, prepare
from radmark.verify.ranks import rank_log_sf
from radmark.verify.statistics import LN10
from radmark.verify.tests import TestResult, score
from tests.factories import fmnist, make_marker

MARKER_ID = "smallcnn@sha256:" + "ab" * 32
C, D = 10, 128


def _key(i: int) -> SecretKey:
    return SecretKey(hashlib.sha256(f"kit-test-{i}".encode()).digest())


def _record(
    key: SecretKey, d: int = D, c: int = C, marker: LoadedModel | None = None
) -> MarkRecord:
    """A schema-valid mark record committed to key's carriers (no marking done); made with
    ``marker`` (its identity and file) when given, else with a marker that exists nowhere."""
    ref = MarkerRef(MARKER_ID, "smallcnn", "smallcnn", "ab" * 32, d, None)
    if marker is not None:
        ref = MarkerRef(marker.identity, marker.name, marker.arch, marker.sha256, marker.dim,
                        marker.source)  # fmt: skip
    carriers = derive_carriers(key.carrier_seed(), ref.dim, c, ref.id)
    rec = key.public_record(created="2026-11-23T00:00:00Z")
    body = mark_record_body(
        key_fingerprint=rec.fingerprint,
        method="radioactive",
        marker=ref,
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


def black_box_test(evidence: Evidence, record: MarkRecord, key: SecretKey) -> TestResult:
    """The black-box test of one key, through the verification seam as verify runs it."""
    return score(evidence, record, key, [BLACK_BOX])[BLACK_BOX]


def kit_for(store: Keystore, key: SecretKey, record: MarkRecord, marker: LoadedModel,
            images: np.ndarray, labels: np.ndarray, params, decoys: int = 9) -> np.ndarray:  # fmt: skip
    """Mark ``record``'s kit for ``key`` (one per record) and store it with its signed kit record
    as ``kit build`` does; returns the true slots π [C]."""
    carriers, pi = slot_carriers(key, record, decoys)
    marked, _ = mark_kit_images(images, labels, carriers, marker.features, params, mark=mark_batch)
    store_kit(store, key, record, images, labels, marked,
              per_class=int(np.bincount(labels).min()), probe=["test"])  # fmt: skip
    return pi


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
    # the statistic's tie rule (the verdict's path is tested below through the seam)
    res = rank_result(true_slot_ranks(stats, np.array([2, 3, 1])), 5, "", "carriers", BLACK_BOX)
    assert [int(r) for r in res.units] == [1, 5, 2]
    assert res.slots == 5
    assert res.log10_p == pytest.approx(rank_log_sf(np.array([1, 5, 2]), 5) / LN10)


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory):
    """The marker, a clean suspect file (never saw any key) and two kit images per class."""
    root = tmp_path_factory.mktemp("kit-nets")
    marker = load_model(make_marker(root / "m.safetensors", seed=0))
    clean = make_marker(root / "clean.safetensors", seed=1)
    images, labels = fmnist(400, offset=1000)
    idx = np.concatenate([np.flatnonzero(labels == k)[:2] for k in range(C)])
    return marker, clean, images[idx][:, None], labels[idx]


@pytest.mark.slow
def test_null_calibration_over_200_keys(nets, tmp_path) -> None:
    """A model that never saw any key: P(p <= a) <= a (binomial 99.9% slack) at every level."""
    marker, clean, images, labels = nets
    params = get_preset("default", steps=2)
    store = Keystore.open(tmp_path / "ks", create=True)
    evidence = prepare(str(clean), store=store)  # key-independent: one for every key
    ps: list[float] = []
    raw: list[float] = []
    torch.set_num_threads(1)
    one = np.concatenate([np.flatnonzero(labels == c)[:1] for c in range(C)])
    images, labels = images[one], labels[one]
    for i in range(200):
        k = _key(1000 + i)
        rec = _record(k, marker=marker)
        pi = kit_for(store, k, rec, marker, images, labels, params)
        ps.append(black_box_test(evidence, rec, k).log10_p)  # the verdict's test
        t, _ref = evidence.kit_statistics(rec)  # and the raw statistic, without the reference
        raw.append(rank_log_sf(true_slot_ranks(t, pi), 10) / LN10)
    for lp in (ps, raw):  # the verify statistic (reference residual) and the raw one
        p = 10.0 ** np.array(lp)
        n = len(p)
        for a in (0.01, 0.05, 0.2, 0.5):
            frac = float(np.mean(p <= a))
            slack = 3.3 * np.sqrt(a * (1 - a) / n)
            assert frac <= a + slack, (a, frac)
        # Not degenerate: the p-values spread over (0, 1] (exact up to discreteness).
        assert np.mean(p <= 0.5) >= 0.3 and np.mean(p <= 0.2) >= 0.08


def test_power_on_a_model_that_reads_the_carriers(nets, tmp_path) -> None:
    """A suspect whose class-c logit is φ·u_c prefers the true carriers: ranks 1, floor reached."""
    marker, _clean, images, labels = nets
    k = _key(7)
    rec = _record(k, marker=marker)
    true = derive_carriers(k.carrier_seed(), marker.dim, C, marker.identity)
    reads = load_model(marker.source)  # the marker's features, its head replaced by the carriers
    with torch.no_grad():
        reads.head.linear.weight.copy_(torch.from_numpy(true))
        reads.head.linear.bias.zero_()
    save_model(reads.model, tmp_path / "reads.safetensors", arch="smallcnn", num_classes=C,
               mean=(0.5,), std=(0.25,))  # fmt: skip
    store = Keystore.open(tmp_path / "ks", create=True)
    carriers, pi = slot_carriers(k, rec, 9)
    params = get_preset("default", steps=20, radius=8)
    marked, psnr = mark_kit_images(images, labels, carriers, marker.features, params,
                                   mark=mark_batch)  # fmt: skip
    assert np.all(psnr > 30)
    store_kit(store, k, rec, images, labels, marked, per_class=2, probe=["test"])
    evidence = prepare(str(tmp_path / "reads.safetensors"), store=store)
    t, _ref = evidence.kit_statistics(rec)
    raw = rank_result(true_slot_ranks(t, pi), 10, "", "carriers", BLACK_BOX)  # the raw statistic
    assert sum(r == 1 for r in raw.units) >= 8, raw.units
    assert raw.log10_p < -6
    # The verdict's test (reference residual) keeps that evidence: the marker's head reads no u.
    adj = black_box_test(evidence, rec, k)
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
        images, labels, carriers, marker.features, get_preset("default", steps=3), mark=mark_batch
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
