"""Twin marks (radmark/marking/twins.py) and their exact rank test (radmark/verify/twin_rank.py)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from radmark.errors import IntegrityError, UsageError
from radmark.keys.keypair import SecretKey
from radmark.keys.records import MarkerRef, MarkRecord, mark_record_body
from radmark.keys.store import Keystore
from radmark.marking.methods import get_method
from radmark.marking.twins import (
    TwinParams,
    kit_bytes,
    make_candidates,
    published_index,
    read_kit,
    shared_views,
    twin_kits,
)
from radmark.models import load_model
from radmark.models.network import LoadedModel
from radmark.verify.evidence import prepare
from radmark.verify.ranks import rank_log_sf
from radmark.verify.tests import score
from radmark.verify.twin_rank import TWIN_RANK, published_ranks
from tests.factories import fmnist, make_marker


def _key(i: int) -> SecretKey:
    return SecretKey(hashlib.sha256(f"twin-{i}".encode()).digest())


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(make_marker(tmp_path_factory.mktemp("twin") / "m.safetensors")))


def _twins_record(store: Keystore, marker: LoadedModel, kits: list[str],
                  method_data: dict | None = None) -> MarkRecord:  # fmt: skip
    """A signed twins mark record committing to the private twin ``kits`` (no marking done)."""
    owner = _key(0)
    pub = owner.public_record(created="2026-11-23T00:00:00Z")
    store.put(pub.signed)
    run = get_method("twins").start(owner, marker, 10, TwinParams(), device="cpu")
    body = mark_record_body(
        key_fingerprint=pub.fingerprint, method="twins",
        marker=MarkerRef(marker.identity, marker.name, marker.arch, marker.sha256, marker.dim,
                         marker.source),
        num_classes=10, carriers=None, params=TwinParams().to_dict(), fraction=1.0,
        selection_rule="test", label_field="cls", counts={"images": 0, "marked": 0, "skipped": 0},
        shards=[], method_data=method_data or run.record_fields(kits)["method_data"],
    )  # fmt: skip
    return store.mark_record(store.put(owner.sign(body)))


def test_twin_kits_are_read_through_one_checked_accessor(marker, tmp_path) -> None:
    store = Keystore.open(tmp_path / "ks", create=True)
    addr = store.put_kit(kit_bytes(["a/1"], np.array([3]), np.zeros((1, 2, 1, 8, 8), np.uint8)))
    assert twin_kits(_twins_record(store, marker, [addr])) == [addr]
    for bad in ({"twin_kits": "ab" * 32}, {"twin_kits": [addr, 7]}, {"twin_kits": ["../x"]}):
        with pytest.raises(IntegrityError, match="twin_kits must be a list of SHA-256"):
            twin_kits(_twins_record(store, marker, [], method_data=bad))


def test_published_index_is_uniform_independent_and_keyed() -> None:
    ids = [f"data-000000.tar/{i:08d}" for i in range(6000)]
    for m in (2, 3, 7):
        idx = published_index(_key(0).twin_seed(), ids, m)
        assert stats.chisquare(np.bincount(idx, minlength=m)).pvalue > 1e-3
        assert np.array_equal(idx, published_index(_key(0).twin_seed(), ids, m))
        assert not np.array_equal(idx, published_index(_key(1).twin_seed(), ids, m))
    two = published_index(_key(0).twin_seed(), ids, 2)  # no serial dependence between images
    assert abs(np.corrcoef(two[:-1], two[1:])[0, 1]) < 0.05


@pytest.mark.parametrize("mode", ["pm", "noise", "dir"])
def test_candidates_respect_the_budget_and_differ(marker, mode: str) -> None:
    images, _ = fmnist(6)
    x = torch.from_numpy(images[:, None])
    m = 4 if mode == "dir" else 2
    p = TwinParams(mode=mode, candidates=m, steps=3)
    c = make_candidates(x, marker.features, p, torch.Generator().manual_seed(0))
    assert c.shape == (m, 6, 1, 28, 28) and c.dtype == torch.uint8
    d = c.to(torch.int16) - x.to(torch.int16).unsqueeze(0)
    assert int(d.abs().max()) <= 8
    mse = d.double().square().flatten(2).mean(2)
    assert bool((10 * torch.log10(255.0**2 / mse.clamp_min(1e-12)) >= 42.0 - 1e-9).all())
    assert all(not torch.equal(c[0, b], c[1, b]) for b in range(6))
    again = make_candidates(x, marker.features, p, torch.Generator().manual_seed(0))
    assert torch.equal(c, again)  # deterministic on the CPU: a resumed run marks alike


def test_twin_params_are_validated() -> None:
    with pytest.raises(UsageError, match="exactly 2"):
        TwinParams(mode="pm", candidates=3)
    with pytest.raises(UsageError, match="psnr_floor"):
        TwinParams(psnr_floor=10.0)
    assert TwinParams.from_dict(TwinParams().to_dict()) == TwinParams()


def test_kit_round_trip_and_tamper() -> None:
    ids = ["a/1", "a/2"]
    cands = np.random.default_rng(0).integers(0, 256, (2, 2, 1, 8, 8), dtype=np.uint8)
    blob = kit_bytes(ids, np.array([3, 4]), cands)
    i, y, c = read_kit(blob, "kit")
    assert i == ids and y.tolist() == [3, 4] and np.array_equal(c, cands)
    with pytest.raises(IntegrityError):
        read_kit(blob[:-5], "kit")


def test_shared_views_treat_all_candidates_alike() -> None:
    x = torch.rand(1, 5, 1, 12, 12).expand(3, 5, 1, 12, 12).contiguous()
    v = shared_views(x, torch.Generator().manual_seed(1), 4)
    assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])


def test_ranks_count_ties_against_the_owner() -> None:
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert published_ranks(scores, np.array([0, 0, 1])).tolist() == [1, 2, 2]


def test_null_calibration_fixed_scores_fresh_keys(marker, tmp_path) -> None:
    """A model that never saw the published candidates: over 1000 keys, P(p <= a) <= a.

    Through the verification seam, as verify runs it: the twin kit in a keystore, the record
    committing to it, the suspect's marker-residualised scores computed once (key-independent)
    and every fresh key scored by ``score``.
    """
    images, labels = fmnist(60, offset=500)
    x = torch.from_numpy(images[:, None])
    cands = make_candidates(
        x, marker.features, TwinParams(steps=2), torch.Generator().manual_seed(3)
    )
    ids = [f"s/{i}" for i in range(60)]
    store = Keystore.open(tmp_path / "ks", create=True)
    addr = store.put_kit(kit_bytes(ids, labels, cands.permute(1, 0, 2, 3, 4).numpy()))
    record = _twins_record(store, marker, [addr])
    evidence = prepare(str(make_marker(tmp_path / "clean.safetensors", seed=1)), store=store)
    p = np.array([np.exp(score(evidence, record, _key(100 + k), [TWIN_RANK])[TWIN_RANK].log_p)
                  for k in range(1000)])  # fmt: skip
    for a in (0.01, 0.05, 0.2, 0.5):
        assert np.mean(p <= a) <= a + 3.3 * np.sqrt(a * (1 - a) / 1000), a
    assert np.mean(p <= 0.5) > 0.3  # not degenerate


def test_power_when_the_model_prefers_the_published_twin() -> None:
    rng = np.random.default_rng(0)
    n = 600
    ids = [f"s/{i}" for i in range(n)]
    pub = published_index(_key(9).twin_seed(), ids, 2)
    scores = rng.normal(size=(n, 2))
    scores[np.arange(n), pub] += 0.35  # about 60% wins, the target at 600 images
    ranks = published_ranks(scores, pub)
    wins = int(np.sum(ranks == 1))
    lp = rank_log_sf(ranks, 2)
    assert lp == pytest.approx(stats.binom.logsf(wins - 1, n, 0.5), abs=1e-9)  # the sign test
    assert wins > 330 and lp / np.log(10) < -2


def test_high_loss_keep_marks_only_the_hardest_half(marker) -> None:
    """keep = 0.5: the half of the batch with the highest marker loss gets twins, the rest stay
    byte-identical and out of the kit; which half does not depend on the key."""
    from radmark.marking.twins import PRESETS

    images, labels = fmnist(8, offset=40)
    x, y = torch.from_numpy(images[:, None]), torch.from_numpy(labels)
    ids = [f"s/{i}" for i in range(8)]
    outs = []
    for k in (1, 2):
        params = replace(PRESETS["hiloss"], steps=2)
        run = get_method("twins").start(_key(k), marker, 10, params, device="cpu")
        res = run.mark(x, y, ids, generator=torch.Generator().manual_seed(0))
        changed = (res.images != x).flatten(1).any(1)
        assert int(changed.sum()) == 4
        (blob,) = run.private_data()
        kit_ids, _, cands = read_kit(blob, "kit")
        assert len(kit_ids) == 4 and cands.shape[:2] == (4, 2)
        outs.append(changed)
    assert torch.equal(outs[0], outs[1])
    z = marker.logits(x.float() / 255.0)
    loss = torch.nn.functional.cross_entropy(z, y, reduction="none")
    assert set(torch.argsort(loss, descending=True)[:4].tolist()) == set(
        torch.nonzero(outs[0]).flatten().tolist())  # fmt: skip


def test_residual_scores_keep_the_null(marker) -> None:
    """The residual statistic itself (``twin_rank.residualise``, ranked and combined by hand, not
    the verdict's path, which the test above runs through ``score``) stays exact even when the
    suspect's scores are mostly the reference's: over 1000 keys, valid."""
    from radmark.verify.twin_rank import residualise

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(80, 2))
    own = 2.0 * ref + 0.3 * rng.normal(size=(80, 2))
    res = residualise(own, ref)
    np.testing.assert_allclose(np.sum((res - res.mean(1, keepdims=True)) * (ref - ref.mean(
        1, keepdims=True))), 0.0, atol=1e-9)  # fmt: skip
    ids = [f"s/{i}" for i in range(80)]
    p = np.array([np.exp(rank_log_sf(published_ranks(
        res, published_index(_key(500 + k).twin_seed(), ids, 2)), 2)) for k in range(1000)])  # fmt: skip
    for a in (0.01, 0.05, 0.2):
        assert np.mean(p <= a) <= a + 3.3 * np.sqrt(a * (1 - a) / 1000), a
