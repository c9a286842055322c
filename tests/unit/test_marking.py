"""Unit tests for radmark.marking.radioactive: the marking step as a pure tensor function.

Everything runs on CPU with a tiny random conv net as φ (d = 32) and 16×16 images, single thread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from radmark.errors import UsageError
from radmark.marking.budget import NORM_STD, project_linf, psnr, round_levels
from radmark.marking.methods import MarkBatchResult
from radmark.marking.radioactive import PRESETS, MarkingParams, get_preset, mark_batch
from radmark.marking.views import random_views

torch.set_num_threads(1)

D = 32
B = 8
H = W = 16


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, D, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return _tiny_net()


def _images(channels: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, channels, H, W), dtype=torch.uint8, generator=g)


def _carriers(k: int = 2, seed: int = 2) -> torch.Tensor:
    """K orthonormal rows (so "toward u_0" and "toward u_1" are distinguishable)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, k, generator=g))
    return q.T.contiguous().to(torch.float32)


def _labels() -> torch.Tensor:
    return torch.tensor([0, 1] * (B // 2), dtype=torch.int64)


def _gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fast(**overrides: object) -> MarkingParams:
    return get_preset("default", **{"steps": 10, **overrides})


def _crop_flip(params: MarkingParams) -> tuple[tuple[float, float], bool]:
    return params.crop_scale, params.flip


def _run(
    net: Callable[[torch.Tensor], torch.Tensor],
    params: MarkingParams,
    *,
    channels: int = 3,
    seed: int = 3,
    carriers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MarkBatchResult]:
    imgs = _images(channels)
    car = _carriers() if carriers is None else carriers
    res = mark_batch(imgs, _labels(), car, net, params, generator=_gen(seed))
    return imgs, res


def _shift(net: nn.Module, orig: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """φ(x̃) − φ(x) on the un-augmented images, [B, d]."""
    with torch.no_grad():
        return net(marked.float() / 255.0) - net(orig.float() / 255.0)


# --- shapes, dtypes, channels ---------------------------------------------------------------


def test_shapes_and_dtypes(net: nn.Module) -> None:
    imgs, res = _run(net, _fast())
    assert res.images.shape == imgs.shape and res.images.dtype == torch.uint8
    assert res.psnr.shape == (B,) and res.psnr.dtype == torch.float64
    assert res.linf.shape == (B,) and res.linf.dtype == torch.int64
    assert res.feature_cos.shape == (B,) and res.feature_cos.dtype == torch.float32
    assert not res.images.equal(imgs), "nothing was marked"


def test_grayscale_stays_one_channel_and_phi_sees_it_as_is(net: nn.Module) -> None:
    # Channels are adapted once, by the loaded model (LoadedModel.features), never here.
    seen: list[tuple[int, ...]] = []

    def phi(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return net(x.expand(-1, 3, -1, -1))

    imgs, res = _run(phi, _fast(), channels=1)
    assert res.images.shape == (B, 1, H, W)
    assert not res.images.equal(imgs)
    assert seen and all(s == (B, 1, H, W) for s in seen)


# --- imperceptibility and rounding ------------------------------------------------------------


def test_default_preset_respects_linf_and_psnr_bound(net: nn.Module) -> None:
    params = get_preset("default", steps=20)
    imgs, res = _run(net, params)
    diff = (res.images.to(torch.int64) - imgs.to(torch.int64)).abs()
    assert int(diff.max()) <= params.radius
    assert int(diff.max()) >= 1
    bound = 20.0 * math.log10(255.0 / params.radius)
    assert bound == pytest.approx(42.1, abs=0.05)
    assert bool((res.psnr >= bound).all())
    # The reported numbers match an independent computation.
    assert res.linf.equal(diff.amax(dim=(1, 2, 3)))
    mse = diff.double().square().mean(dim=(1, 2, 3))
    assert torch.allclose(res.psnr, 10.0 * torch.log10(255.0**2 / mse))


def test_fractional_radius_keeps_linf_below_it(net: nn.Module) -> None:
    params = _fast(radius=2.5, lr=0.1)
    imgs, res = _run(net, params)
    assert int(res.linf.max()) == 2  # ⌊2.5⌋: rounding must not step outside the ball


def test_round_levels_rounds_to_nearest_not_truncates() -> None:
    orig = torch.full((1, 1, 1, 5), 100.0)
    x = torch.tensor([[[[100.7, 100.3, 99.6, 103.9, 96.2]]]])
    out = round_levels(x, orig, radius=3.0)
    # 100.7 → 101 (truncation would give 100), 99.6 → 100, ±3.9/3.8 clamp to the ±3 ball.
    assert out.flatten().tolist() == [101.0, 100.0, 100.0, 103.0, 97.0]


def test_round_levels_clamps_to_valid_range() -> None:
    orig = torch.tensor([[[[0.0, 255.0]]]])
    x = torch.tensor([[[[-1.6, 256.4]]]])
    assert round_levels(x, orig, radius=5.0).flatten().tolist() == [0.0, 255.0]


def test_project_onto_linf_ball_and_valid_range() -> None:
    x01 = torch.tensor([[[[0.5, 0.5, 0.0, 1.0]]]])
    x_new = torch.tensor([[[[0.6, 0.495, -0.005, 1.02]]]])
    out = project_linf(x_new, x01, radius=2.0)
    expected = torch.tensor([[[[0.5 + 2 / 255, 0.495, 0.0, 1.0]]]])
    assert torch.allclose(out, expected, atol=1e-7)


def test_periodic_rounding_still_marks(net: nn.Module) -> None:
    imgs, res = _run(net, _fast(round_every=3))
    assert not res.images.equal(imgs)
    assert int(res.linf.max()) <= 2


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_is_bit_identical_and_other_seed_differs(net: nn.Module) -> None:
    params = _fast()
    _, a = _run(net, params, seed=11)
    _, b = _run(net, params, seed=11)
    _, c = _run(net, params, seed=12)
    assert a.images.equal(b.images)
    assert a.feature_cos.equal(b.feature_cos)
    assert not a.images.equal(c.images)


# --- the mark does what it is for -------------------------------------------------------------


def test_features_move_toward_the_carrier(net: nn.Module) -> None:
    params = get_preset("default", steps=20)
    car = _carriers()
    imgs, res = _run(net, params, carriers=car)
    assert float(res.feature_cos.mean()) > 0.1
    shift = _shift(net, imgs, res.images)
    u = car[_labels()]
    cos_true = torch.nn.functional.cosine_similarity(shift, u, dim=1)
    # The reported cosine is the cosine of the un-augmented, final rounded image.
    assert torch.allclose(cos_true, res.feature_cos, atol=1e-5)
    g = torch.Generator().manual_seed(99)
    for _ in range(5):
        v = torch.randn(D, generator=g)
        cos_rand = torch.nn.functional.cosine_similarity(shift, v.expand_as(shift), dim=1)
        assert float(cos_true.mean()) > float(cos_rand.mean()) + 0.1


def test_each_image_uses_its_own_class_carrier(net: nn.Module) -> None:
    car = _carriers()
    labels = _labels()
    own_u = car[labels]  # [B, d]: each image's own class carrier
    params = get_preset("default", steps=20)
    imgs, res = _run(net, params, carriers=car)
    shift = _shift(net, imgs, res.images)
    cos = nn.functional.normalize(shift, dim=1) @ car.T  # [B, 2]: cosine with u_0 and u_1
    idx = torch.arange(B)
    for k in (0, 1):
        sel = labels == k
        # Class-k images move toward u_k more than toward the other class's carrier.
        assert float(cos[sel, k].mean()) > float(cos[sel, 1 - k].mean()) + 0.05
    # Paired check, free of any direction all images share: with the carriers swapped, every
    # class's images move less toward their original carrier.
    _, swapped = _run(net, params, carriers=car.flip(0))
    shift_s = _shift(net, imgs, swapped.images)
    gain = nn.functional.cosine_similarity(shift, own_u, dim=1) - nn.functional.cosine_similarity(
        shift_s, own_u, dim=1
    )
    for k in (0, 1):
        assert float(gain[labels == k].mean()) > 0.05
    assert float((cos[idx, labels] > cos[idx, 1 - labels]).float().mean()) >= 0.75


def test_without_augmentation_no_nan_and_marks(net: nn.Module) -> None:
    imgs, res = _run(net, _fast(crop_scale=(1.0, 1.0), flip=False))
    assert not res.images.equal(imgs)
    assert bool(torch.isfinite(res.feature_cos).all())
    assert float(res.feature_cos.mean()) > 0.1


def test_paper_preset_marks_within_its_radius(net: nn.Module) -> None:
    params = get_preset("paper")  # 90 plain SGD steps: the tiny net's gradients are small
    imgs, res = _run(net, params)
    assert not res.images.equal(imgs)
    assert int(res.linf.max()) <= 10


# --- side effects -----------------------------------------------------------------------------


def test_input_not_modified_and_params_untouched() -> None:
    net = _tiny_net(5).requires_grad_(True)  # even a careless caller's trainable net
    before = [p.detach().clone() for p in net.parameters()]
    imgs = _images()
    copy = imgs.clone()
    mark_batch(imgs, _labels(), _carriers(), net, _fast(), generator=_gen())
    assert imgs.equal(copy)
    assert not net.training
    for p, q in zip(net.parameters(), before, strict=True):
        assert p.grad is None
        assert p.equal(q)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_works_under_callers_grad_disabled(net: nn.Module, mode: str) -> None:
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        imgs = _images()
        res = mark_batch(imgs, _labels(), _carriers(), net, _fast(), generator=_gen())
    assert not res.images.equal(imgs)
    _, ref = _run(net, _fast())
    assert res.images.equal(ref.images)


# --- augmentation -----------------------------------------------------------------------------


def test_views_identity_without_crop_and_flip() -> None:
    x = torch.rand(4, 3, H, W, generator=_gen(7))
    params = _fast(crop_scale=(1.0, 1.0), flip=False)
    assert torch.allclose(random_views(x, _gen(), *_crop_flip(params)), x, atol=1e-5)


def test_views_flip_is_random_per_image() -> None:
    x = torch.rand(16, 1, H, W, generator=_gen(7))
    out = random_views(x, _gen(), (1.0, 1.0), True)
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x, strict=True)]
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def test_views_crop_zooms_in() -> None:
    # A horizontal ramp: a crop of area ≤ 0.5 spans a narrower range of values than the image.
    ramp = torch.linspace(0, 1, W).expand(4, 1, H, W).contiguous()
    out = random_views(ramp, _gen(), (0.25, 0.5), False)
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert bool((span < 0.9).all())
    grad_ramp = ramp.clone().requires_grad_(True)
    random_views(grad_ramp, _gen(), *_crop_flip(_fast())).sum().backward()
    assert grad_ramp.grad is not None and float(grad_ramp.grad.abs().sum()) > 0


# --- parameters -------------------------------------------------------------------------------


def test_presets_values() -> None:
    paper = PRESETS["paper"]
    assert (paper.steps, paper.optimizer, paper.lr) == (90, "sgd", 1.0)
    assert (paper.lambda_ft, paper.lambda_img, paper.radius) == (0.01, 0.0005, 10.0)
    default = PRESETS["default"]
    assert (default.steps, default.optimizer, default.radius) == (100, "adam", 2.0)
    assert default.flip and default.crop_scale[0] < 1.0
    assert abs(NORM_STD - 0.226) < 1e-12


def test_to_dict_is_json_and_round_trips() -> None:
    params = get_preset("default", crop_scale=[0.6, 0.9])
    assert params.crop_scale == (0.6, 0.9)
    data = json.loads(json.dumps(params.to_dict()))
    assert MarkingParams.from_dict(data) == params
    assert params.name == "default+custom"
    assert get_preset("default", steps=100).name == "default"  # no real change, no rename


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 2.5},
        {"radius": 0.0},
        {"radius": -2.0},
        {"radius": 0.5},
        {"radius": float("nan")},
        {"optimizer": "rmsprop"},
        {"lr": 0.0},
        {"lambda_ft": -1.0},
        {"lambda_img": float("inf")},
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.9, 0.5)},
        {"crop_scale": (0.5, 1.5)},
        {"round_every": -1},
        {"flip": "yes"},
        {"bogus": 1},
    ],
)
def test_invalid_params_raise_usage_error(overrides: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        get_preset("default", **overrides)


def test_unknown_preset_raises() -> None:
    with pytest.raises(UsageError):
        get_preset("nope")


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    data = PRESETS["paper"].to_dict()
    with pytest.raises(UsageError):
        MarkingParams.from_dict({**data, "extra": 1})
    data.pop("steps")
    with pytest.raises(UsageError):
        MarkingParams.from_dict(data)


def test_invalid_inputs_raise_usage_error(net: nn.Module) -> None:
    imgs, labels, car, p = _images(), _labels(), _carriers(), _fast(steps=1)
    bad_calls = [
        (imgs.float(), labels, car, net),  # not uint8
        (imgs[:, :2], labels, car, net),  # 2 channels
        (imgs, labels.int(), car, net),  # labels not int64
        (imgs, labels + 1, car, net),  # label 2 has no carrier
        (imgs, labels[:4], car, net),  # wrong length
        (imgs, labels, car[:, :16], net),  # carrier dim ≠ feature dim
    ]
    for args in bad_calls:
        with pytest.raises(UsageError):
            mark_batch(*args, p, generator=_gen())


# --- psnr helper ------------------------------------------------------------------------------


def test_psnr_helper() -> None:
    a = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 2  # mse = 4 / 4 = 1
    out = psnr(a, b)
    assert out.dtype == torch.float64
    assert out[0].item() == pytest.approx(20.0 * math.log10(255.0))
    assert math.isinf(out[1].item()) and out[1].item() > 0


# --- the per-image PSNR budget (psnr_floor) -------------------------------------------------


def test_psnr_floor_holds_per_image_and_spends_the_budget(net: nn.Module) -> None:
    params = get_preset("psnr42", steps=20)
    imgs, res = _run(net, params)
    diff = (res.images.to(torch.int64) - imgs.to(torch.int64)).abs()
    assert int(diff.max()) <= params.radius
    assert bool((res.psnr >= 42.0).all()), res.psnr
    assert float(res.psnr.min()) < 43.0  # the budget is used, not wasted
    assert int(diff.max()) > 2  # energy concentrated beyond the default's L∞ of 2


def test_enforce_psnr_shrinks_only_violators_and_terminates() -> None:
    from radmark.marking.budget import enforce_psnr

    orig = torch.full((3, 1, 8, 8), 100.0)
    marked = orig.clone()
    marked[0] += 8.0  # PSNR 30.1 dB: must shrink
    marked[1, 0, 0, 0] += 1.0  # PSNR 66 dB: untouched
    marked[2] -= torch.arange(64.0).view(8, 8) % 9  # mixed signs and sizes
    out = enforce_psnr(marked, orig, 42.0)
    mse = (out - orig).double().square().mean(dim=(1, 2, 3))
    assert bool((10 * torch.log10(255.0**2 / mse.clamp_min(1e-300)) >= 42.0).all())
    assert torch.equal(out[1], marked[1])
    assert torch.equal(out, torch.round(out))
    assert bool(((out - orig).abs() <= (marked - orig).abs()).all())


def test_project_l2_keeps_linf_and_range() -> None:
    from radmark.marking.budget import project_l2

    x01 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_new = (
        x01 + 0.03 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ).clamp(0, 1)
    out = project_l2(x_new, x01, 42.0)
    rmse = (out - x01).square().mean(dim=(1, 2, 3)).sqrt()
    assert bool((rmse <= 10 ** (-42 / 20) * (1 + 1e-5)).all())  # float32
    assert bool(((out - x01).abs() <= (x_new - x01).abs() + 1e-12).all())
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_psnr_floor_round_trips_and_old_records_still_load() -> None:
    p = PRESETS["psnr42"]
    assert MarkingParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    old = PRESETS["default"].to_dict()
    assert "psnr_floor" not in old  # records of presets without a budget are unchanged
    assert MarkingParams.from_dict(old).psnr_floor is None


@pytest.mark.parametrize("bad", [10.0, 99.0, float("nan"), "42"])
def test_invalid_psnr_floor_raises(bad: object) -> None:
    with pytest.raises(UsageError):
        get_preset("default", psnr_floor=bad)
