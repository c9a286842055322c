from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from radmark.errors import UsageError
from radmark.keys.carriers import carriers_digest, derive_carriers, exact_ln
from radmark.keys.keypair import SecretKey

VECTORS = json.loads((Path(__file__).parents[2] / "keys" / "test-vectors.json").read_text())


def _demo() -> SecretKey:
    return SecretKey(bytes.fromhex(VECTORS["secret_hex"]))


@pytest.mark.parametrize("vec", VECTORS["carriers"], ids=lambda v: f"d{v['d']}-C{v['C']}")
def test_pinned_vectors(vec: dict) -> None:
    """A mark made today must verify forever: these bytes may never change."""
    key = _demo()
    assert hashlib.sha256(key.carrier_seed()).hexdigest() == VECTORS["carrier_seed_sha256"]
    c = derive_carriers(key.carrier_seed(), vec["d"], vec["C"], vec["marker"])
    assert c.dtype == np.float32 and c.shape == (vec["C"], vec["d"])
    assert carriers_digest(c) == vec["sha256_float32_le"]
    assert [float(x) for x in c[0, :4]] == vec["first_values"]


def test_deterministic_unit_norm_and_key_dependent() -> None:
    seed = _demo().carrier_seed()
    a = derive_carriers(seed, 512, 10, "m")
    b = derive_carriers(seed, 512, 10, "m")
    assert np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a.astype(np.float64), axis=1), 1.0, atol=1e-6)
    other = derive_carriers(SecretKey.generate().carrier_seed(), 512, 10, "m")
    assert np.max(np.abs(np.sum(a * other, axis=1))) < 0.3
    assert not np.array_equal(a, derive_carriers(seed, 512, 10, "another-marker"))
    assert not np.array_equal(a, derive_carriers(seed, 512, 11, "m")[:10])


def test_carriers_are_isotropic() -> None:
    c = derive_carriers(_demo().carrier_seed(), 8, 20000, "m").astype(np.float64)
    np.testing.assert_allclose(c.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(np.cov(c.T), np.eye(8) / 8, atol=0.01)


def test_series_log_is_accurate() -> None:
    x = np.random.default_rng(0).uniform(1e-300, 1.0, 100_000)
    np.testing.assert_allclose(exact_ln(x), np.log(x), rtol=2e-15)


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        derive_carriers(b"short", 512, 10, "m")
    with pytest.raises(UsageError):
        derive_carriers(b"x" * 32, 1, 10, "m")
