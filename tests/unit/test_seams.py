"""The two seams of issue #13: a new marking method and a new test are each one module + one
registry line, and ``radmark mark`` / ``radmark verify`` pick them up with nothing else changed.

The method here is deliberately trivial (it raises one pixel by a keyed amount); what is tested is
the plumbing: registry lookup, the record's ``method`` field, the per-key commitment check, the
test planned from the method's ``tests`` and the combination of independent randomisations.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from radmark.errors import IntegrityError, UsageError
from radmark.keys.keypair import SecretKey
from radmark.keys.manage import load_secret_key
from radmark.keys.records import MarkRecord
from radmark.marking.methods import (
    METHODS,
    Budget,
    MarkBatchResult,
    get_method,
    register_method,
)
from radmark.marking.run import MarkOptions, mark_shards
from radmark.verify.run import verify_model
from radmark.verify.statistics import LN10
from radmark.verify.tests import TESTS, TestResult, combination_rule, combine, register_test
from tests.factories import make_key, make_marker, make_shards


class _PixelRun:
    budget = Budget(linf_levels=5, psnr_floor=None)

    def __init__(self, level: int) -> None:
        self.level = level
        self.budget = Budget(linf_levels=5)  # what the pipeline checks every batch against

    def mark(self, images: torch.Tensor, labels: torch.Tensor, sample_ids: list[str], *,
             generator: torch.Generator) -> MarkBatchResult:  # fmt: skip
        out = images.clone()
        out[:, :, 0, 0] = torch.clamp(out[:, :, 0, 0].to(torch.int16) + self.level, 0, 255).to(
            torch.uint8
        )
        b = images.shape[0]
        return MarkBatchResult(out, torch.full((b,), 60.0, dtype=torch.float64),
                               torch.ones(b, dtype=torch.int64), torch.full((b,), float("nan")))  # fmt: skip

    def private_data(self) -> list[bytes]:
        return []

    def record_fields(self, private: Sequence[str] = ()) -> dict[str, Any]:
        return {"carriers": None, "method_data": {"level_sha256": hashlib.sha256(
            str(self.level).encode()).hexdigest()}}  # fmt: skip


def _level(key: SecretKey) -> int:
    return 1 + key.selection_seed()[0] % 5


class PixelMethod:
    name = "test-pixel"
    description = "raise pixel (0, 0) by a keyed amount (a test of the seam, not a mark)"
    tests = ("test_pixel_coin",)
    presets = ("default",)
    decoy_kit = None  # no per-class carriers: no black-box decoy kit

    def params(self, preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        return {"name": preset, **overrides}

    def params_from_record(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return dict(data)

    def params_to_record(self, params: dict[str, Any]) -> dict[str, Any]:
        return dict(params)

    def start(self, key, marker, num_classes, params, *, device):  # noqa: ANN001
        return _PixelRun(_level(key))

    def check_key(self, record: MarkRecord, key: SecretKey) -> None:
        want = hashlib.sha256(str(_level(key)).encode()).hexdigest()
        if record.method_data.get("level_sha256") != want:
            raise IntegrityError("the key does not derive this record's level")


class CoinTest:
    """An exact test whose p-value is a keyed uniform draw (valid, powerless: a seam test)."""

    name = "test_pixel_coin"
    exact = True
    randomisation = "test-coin"
    description = "a keyed coin"
    needs: frozenset[str] = frozenset()

    def available(self, evidence, record) -> str | None:  # noqa: ANN001
        return None

    def run(self, evidence, record, key) -> TestResult:  # noqa: ANN001
        u = (int.from_bytes(key.carrier_seed()[:8], "big") + 1) / 2**64
        return TestResult(self.name, math.log(u), True, u, self.description, self.randomisation)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_method(PixelMethod())  # the one registry line of a method module
    register_test(CoinTest())  # the one registry line of a test module
    yield
    del METHODS["test-pixel"], TESTS["test_pixel_coin"]


def test_a_new_method_marks_and_its_test_verifies(tmp_path: Path) -> None:
    make_shards(tmp_path / "in", n=8, per_shard=8)
    marker = make_marker(tmp_path / "m.safetensors")
    fp = make_key(tmp_path / "ks")
    key, pub = load_secret_key(tmp_path / "ks", fp, lambda: None)
    res = mark_shards(
        [str(tmp_path / "in")], key=key, key_record=pub, keystore=tmp_path / "ks",
        out_dir=tmp_path / "out", marker_spec=str(marker),
        options=MarkOptions(fraction=1.0, method="test-pixel"),
    )  # fmt: skip
    assert res.method == "test-pixel" and res.marked == 8
    from radmark.keys.store import Keystore

    rec = Keystore.open(tmp_path / "ks").mark_record(res.record)
    assert rec.method == "test-pixel" and rec.carriers_sha256 is None
    # verify plans the method's own test: it needs neither a probe nor a kit
    out = verify_model(str(marker), keystore=tmp_path / "ks", probe=[], key_ref=res.record)
    (r,) = out.results
    assert set(r.tests) == {"test_pixel_coin"} and r.method == "test-pixel"
    # the method seam says it has no decoy kit: `kit build` refuses it by that flag, not by name
    from radmark.marking.kit import build_kit

    with pytest.raises(UsageError, match="'test-pixel' marking method has no decoy kit"):
        build_kit(store=Keystore.open(tmp_path / "ks"), record=rec, key=key,
                  probe=[str(tmp_path / "in")])  # fmt: skip


def test_a_decoy_kit_is_checked_with_the_options() -> None:
    """``--kit-probe`` for a method without a decoy kit fails the option check (before any work);
    the paper's method marks decoy slots with its own mark step, found through the registry."""
    from radmark.marking.options import KitRequest, check_options
    from radmark.marking.radioactive import mark_batch

    with pytest.raises(UsageError, match="--kit-probe: the 'test-pixel' marking method has no"):
        check_options(MarkOptions(method="test-pixel", kit=KitRequest(["nowhere"])))
    assert get_method("radioactive").decoy_kit is mark_batch
    assert get_method("twins").decoy_kit is None


def test_unknown_method_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown marking method 'nope'.*radioactive"):
        get_method("nope")


def _result(name: str, randomisation: str, p: float) -> TestResult:
    return TestResult(name, math.log(p), True, 0.0, "", randomisation)


def test_combine_bonferroni_within_a_randomisation_fisher_across() -> None:
    same = [_result("a", "carriers", 0.01), _result("b", "carriers", 0.2)]
    assert combine(same) == pytest.approx(math.log(0.02))
    assert "Bonferroni" in combination_rule(same)
    mixed = [*same, _result("c", "twins", 0.03)]
    fisher = stats.combine_pvalues([0.02, 0.03], method="fisher").pvalue
    assert combine(mixed) == pytest.approx(math.log(fisher))
    assert "Fisher over 2 independent randomisations" in combination_rule(mixed)
    inexact = TestResult("z", math.log(1e-9), False, 0.0, "", "carriers")
    assert combine([*same, inexact]) == pytest.approx(math.log(0.02))
    with pytest.raises(UsageError, match="no exact test"):
        combine([inexact])


def test_combination_null_calibration() -> None:
    """Two dependent tests sharing one randomisation plus one independent: valid (P(p<=a)<=a)."""
    rng = np.random.default_rng(0)
    n = 20000
    p_out = np.empty(n)
    for i in range(n):
        u1 = rng.uniform()
        u2 = min(1.0, u1 * rng.uniform(0.5, 2.0))  # dependent on u1, still uniform-ish
        u2 = rng.uniform() if i % 2 else u1  # half the time identical (worst dependence)
        u3 = rng.uniform()
        tests = [_result("a", "r1", u1), _result("b", "r1", u2), _result("c", "r2", u3)]
        p_out[i] = math.exp(combine(tests))
    for a in (0.001, 0.01, 0.05, 0.2):
        assert np.mean(p_out <= a) <= a + 3.3 * math.sqrt(a * (1 - a) / n), a
    assert LN10 > 0
