from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from radmark.errors import ModelError
from radmark.keys.carriers import derive_carriers
from radmark.keys.keypair import SecretKey
from radmark.models import build_model
from radmark.verify.pullback import pullback_directions, residual_cosines
from radmark.verify.statistics import fisher_log_sf, log_cosine_sf


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    marker = build_model("smallcnn", 10, in_chans=1).eval()
    suspect = build_model("smallcnn", 10, in_chans=1).eval()
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 16, 16), dtype=np.uint8)
    return marker, suspect, images


def _phi(marker):
    head = marker.fc if hasattr(marker, "fc") else None
    assert head is not None

    def f(x):
        captured = {}
        h = head.register_forward_hook(lambda m, i, o: captured.setdefault("z", i[0]))
        try:
            marker(x)
        finally:
            h.remove()
        return captured["z"]

    return f


def test_directions_are_unit_and_deterministic(nets) -> None:
    marker, suspect, images = nets
    v1 = pullback_directions(suspect, _phi(marker), images, 10, batch_size=16)
    v2 = pullback_directions(suspect, _phi(marker), images, 10, batch_size=40)
    assert v1.shape == (10, 128)
    np.testing.assert_allclose(np.linalg.norm(v1, axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(v1, v2, atol=1e-6)  # batching does not change the sum


def test_null_calibration_over_1000_keys(nets) -> None:
    """A model independent of the key: combined p-values uniform, ~1% below 0.01."""
    marker, suspect, images = nets
    v = pullback_directions(suspect, _phi(marker), images, 10)
    ps = []
    for i in range(1000):  # fixed distinct keys: deterministic, so CI cannot flake
        key = SecretKey(i.to_bytes(32, "big"))
        u = derive_carriers(key.carrier_seed(), 128, 10, "m").astype(np.float64)
        ps.append(math.exp(fisher_log_sf(log_cosine_sf(np.sum(v * u, axis=1), 128))))
    ps = np.array(ps)
    assert st.kstest(ps, "uniform").pvalue > 0.01
    assert np.sum(ps < 0.01) <= st.binom.ppf(0.999, 1000, 0.01)


def test_residual_cosines_null_over_1000_keys(nets) -> None:
    """With the reference's direction removed the null is the cosine in d − 1 dimensions."""
    marker, suspect, images = nets
    v = pullback_directions(suspect, _phi(marker), images, 10)
    v_ref = pullback_directions(marker, _phi(marker), images, 10)
    ps = []
    for i in range(1000):
        key = SecretKey(i.to_bytes(32, "big"))
        u = derive_carriers(key.carrier_seed(), 128, 10, "m")
        ps.append(math.exp(fisher_log_sf(log_cosine_sf(residual_cosines(v, v_ref, u), 127))))
    ps = np.array(ps)
    assert st.kstest(ps, "uniform").pvalue > 0.01
    assert np.sum(ps < 0.01) <= st.binom.ppf(0.999, 1000, 0.01)


def test_residual_cosines_remove_the_reference_and_keep_the_mark() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(10, 64))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    ref = rng.normal(size=(10, 64))
    v = 5.0 * ref + 0.5 * u  # a big shared component and a small mark
    plain = np.sum(v * u, axis=1) / np.linalg.norm(v, axis=1)
    res = residual_cosines(v, ref, u)
    assert np.all(res > plain) and np.all(res > 0.5)
    # the suspect is the reference: no direction left, no evidence (p = 1)
    assert np.all(residual_cosines(ref, ref, u) == -1.0)


def test_detects_a_model_that_reads_the_carriers(nets) -> None:
    """logit_k = u_k·φ(x): the pulled-back gradient is J Jᵀ u_k, which leans toward u_k."""
    marker, _, images = nets
    u = torch.from_numpy(derive_carriers(b"\x07" * 32, 128, 10, "m"))
    phi = _phi(marker)
    v = pullback_directions(lambda x: phi(x) @ u.T, phi, images, 10)
    cos = np.sum(v * u.double().numpy(), axis=1)
    assert np.all(cos > 0.1)
    assert fisher_log_sf(log_cosine_sf(cos, 128)) / math.log(10) < -10


def test_wrong_number_of_classes_refused(nets) -> None:
    marker, suspect, images = nets
    with pytest.raises(ModelError, match="logits"):
        pullback_directions(suspect, _phi(marker), images, 7)


def test_class_conditional_margin_variant(nets) -> None:
    marker, suspect, images = nets
    labels = np.arange(len(images)) % 10
    phi = _phi(marker)
    v = pullback_directions(suspect, phi, images, 10, labels=labels)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-9)
    ps = []
    for i in range(300):
        u = derive_carriers(SecretKey(i.to_bytes(32, "big")).carrier_seed(), 128, 10, "m")
        ps.append(math.exp(fisher_log_sf(log_cosine_sf(np.sum(v * u, axis=1), 128))))
    assert st.kstest(ps, "uniform").pvalue > 0.01
    u = torch.from_numpy(derive_carriers(b"\x07" * 32, 128, 10, "m"))
    v = pullback_directions(lambda x: phi(x) @ u.T, phi, images, 10, labels=labels)
    cos = np.sum(v * u.double().numpy(), axis=1)
    assert fisher_log_sf(log_cosine_sf(cos, 128)) / math.log(10) < -10
    from radmark.errors import InputError

    with pytest.raises(InputError, match="no image of class"):
        pullback_directions(suspect, phi, images, 10, labels=np.zeros(len(images), int))
