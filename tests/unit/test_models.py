"""Model registry, safe loading and head resolution.

Everything runs on CPU with random-init weights: nothing here may download anything.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import socket
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from radmark.errors import ModelError, UsageError
from radmark.models import (
    ARCH_REGISTRY,
    IMAGENET_MEAN,
    LoadedModel,
    build_model,
    load_model,
    resolve_head,
    save_model,
)

torch.set_num_threads(1)

#: Archs whose full-size files (> 100M parameters, ~0.5 GB) are too slow to round-trip in a unit
#: test; their head resolution is still checked.
_HUGE = {"vgg11_bn", "vgg16"}


def _input(arch: str, batch: int = 2, size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    if arch == "vit_b_16":  # fixed 224x224 positional embedding
        return torch.rand(1, 3, 224, 224)
    return torch.rand(batch, 3, size, size)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _smallcnn(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return build_model("smallcnn", num_classes).eval()


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if a == "vit_b_16" else a for a in ARCH_REGISTRY],
)
def test_arch_head_and_round_trip(arch: str, tmp_path: Path) -> None:
    small_stem = arch.startswith("resnet")
    torch.manual_seed(0)
    model = build_model(arch, 5, small_stem=small_stem).eval()
    head = resolve_head(model)
    assert isinstance(head.linear, nn.Linear) and head.linear.out_features == 5
    assert model.get_submodule(head.name) is head.linear
    x = _input(arch)
    with torch.no_grad():
        logits = model(x)
        feats = head.features(x)
        assert feats.shape == (x.shape[0], head.linear.in_features)
        torch.testing.assert_close(head.linear(feats), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), logits)  # resolving changed nothing
    if arch in _HUGE:
        return

    path = tmp_path / f"{arch}.safetensors"
    digest = save_model(model, path, arch=arch, num_classes=5, small_stem=small_stem)
    assert digest == _sha(path)
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temp file left
    loaded = load_model(str(path))
    assert loaded.arch == arch and loaded.metadata["radmark.arch"] == arch
    assert loaded.metadata["radmark.small_stem"] == ("1" if small_stem else "0")
    assert loaded.sha256 == digest and loaded.source == str(path)
    assert loaded.num_classes == 5 and loaded.dim == head.linear.in_features
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.mean == IMAGENET_MEAN
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), logits, rtol=1e-5, atol=1e-5)
        mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
        std = torch.tensor(loaded.std).view(1, 3, 1, 1)
        torch.testing.assert_close(loaded.features(x), head.features((x - mean) / std))
    w = loaded.weight()
    assert w.dtype == torch.float64 and w.shape == (5, loaded.dim)


def test_registry_errors() -> None:
    with pytest.raises(UsageError, match="resnet18"):
        build_model("resnet1000", 10)
    with pytest.raises(UsageError, match="small"):
        build_model("vgg16", 10, small_stem=True)
    with pytest.raises(UsageError):
        build_model("smallcnn", 0)
    gray = build_model("smallcnn", 4, in_chans=1).eval()
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    gray_resnet = build_model("resnet18", 4, in_chans=1).eval()
    assert gray_resnet(torch.rand(1, 1, 32, 32)).shape == (1, 4)


def test_recognise_without_metadata(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=7).eval()
    path = tmp_path / "bare.safetensors"
    save_file(_plain_state(ref), str(path))
    loaded = load_model(path)
    assert loaded.arch == "resnet18" and loaded.num_classes == 7 and loaded.dim == 512
    assert loaded.metadata == {}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x))

    # the CIFAR-style stem is told apart from the ImageNet one by conv1's shape
    stem = build_model("resnet18", 7, small_stem=True).eval()
    save_file(_plain_state(stem), str(tmp_path / "stem.safetensors"))
    loaded_stem = load_model(tmp_path / "stem.safetensors")
    assert loaded_stem.arch == "resnet18" and isinstance(loaded_stem.model.maxpool, nn.Identity)

    small = _smallcnn(3)
    save_file(_plain_state(small), str(tmp_path / "small.safetensors"))
    loaded_small = load_model(tmp_path / "small.safetensors")
    assert loaded_small.arch == "smallcnn" and loaded_small.num_classes == 3
    assert loaded_small.dim == 128

    # a torch.save checkpoint wrapped in {"state_dict": ...}, loaded with weights_only=True
    torch.save({"state_dict": _plain_state(small), "epoch": 3}, tmp_path / "ckpt.pt")
    assert load_model(tmp_path / "ckpt.pt").arch == "smallcnn"

    # an explicit --arch is honoured, a wrong one is refused with the offending keys
    assert load_model(tmp_path / "small.safetensors", arch="smallcnn").arch == "smallcnn"
    with pytest.raises(ModelError, match="check --arch"):
        load_model(tmp_path / "small.safetensors", arch="resnet18")
    with pytest.raises(UsageError):
        load_model(tmp_path / "small.safetensors", arch="alexnet")

    # nothing known: refuse and say what to type
    save_file({"a.weight": torch.zeros(3, 4)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelError, match="could not recognise.*--arch"):
        load_model(tmp_path / "odd.safetensors")


def test_metadata_arch_wins_over_conflicting_flag(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(_smallcnn(3), path, arch="smallcnn", num_classes=3)
    with pytest.raises(ModelError, match="drop --arch"):
        load_model(path, arch="resnet18")
    with pytest.raises(UsageError):
        save_model(_smallcnn(3), tmp_path / "x.safetensors", arch="resnet18", num_classes=3)
    with pytest.raises(UsageError, match="reserved"):
        save_model(
            _smallcnn(3),
            tmp_path / "y.safetensors",
            arch="smallcnn",
            num_classes=3,
            extra={"radmark.arch": "vgg16"},
        )


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_stripped(prefix: str, tmp_path: Path) -> None:
    model = _smallcnn(3)
    path = tmp_path / "wrapped.safetensors"
    save_file(_plain_state(model, prefix), str(path))
    loaded = load_model(path)
    assert loaded.arch == "smallcnn"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_strict_loading_refuses_mismatches(tmp_path: Path) -> None:
    meta = {"radmark.arch": "smallcnn"}
    state = _plain_state(_smallcnn(3))
    wrong = dict(state)
    wrong["features.4.weight"] = torch.zeros(64, 16, 3, 3)
    save_file(wrong, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ModelError, match=r"features\.4\.weight"):
        load_model(tmp_path / "shape.safetensors")

    missing = {k: v for k, v in state.items() if k != "features.1.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ModelError, match=r"missing features\.1\.weight"):
        load_model(tmp_path / "missing.safetensors")

    extra = {**state, "spare.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=meta)
    with pytest.raises(ModelError, match=r"unexpected spare\.weight"):
        load_model(tmp_path / "extra.safetensors")
    # without metadata the same file is not recognised as anything
    save_file(extra, str(tmp_path / "extra_bare.safetensors"))
    with pytest.raises(ModelError, match="could not recognise"):
        load_model(tmp_path / "extra_bare.safetensors")


def test_nonfinite_weights_refused(tmp_path: Path) -> None:
    for bad_value in (float("nan"), float("inf")):
        state = _plain_state(_smallcnn(3))
        state["features.5.bias"][7] = bad_value
        path = tmp_path / "nan.safetensors"
        save_file(state, str(path))
        with pytest.raises(ModelError, match=r"features\.5\.bias"):
            load_model(path)


@pytest.mark.parametrize("length", [2**62, 150 * 1024 * 1024, 10_000])
def test_absurd_safetensors_header_refused_quickly(length: int, tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b'{"a": 1}' + b"\0" * 64)
    start = time.perf_counter()
    with pytest.raises(ModelError, match="header"):
        load_model(path)
    assert time.perf_counter() - start < 1.0


def test_corrupt_safetensors_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    with pytest.raises(ModelError):
        load_model(path)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ModelError):
        load_model(tmp_path / "short.safetensors")


class _Evil:
    """Unpickling this creates a file: the stand-in for arbitrary code execution."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_malicious_pickle_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = _plain_state(_smallcnn(3))
    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        path = tmp_path / f"evil{suffix}"
        torch.save({"state_dict": weights, "payload": _Evil(marker)}, path)
        with pytest.raises(ModelError, match="refusing to unpickle.*safetensors"):
            load_model(path)
        assert not marker.exists()
    # the payload is real: an unsafe load would have run it (so this test can fail)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="torchvision:resnet18"):
        load_model("resnet18")
    with pytest.raises(ModelError, match="directory"):
        load_model(tmp_path)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_torchvision_offline_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.perf_counter()
    with pytest.raises(ModelError, match="offline") as info:
        load_model("torchvision:resnet18")
    assert time.perf_counter() - start < 5.0
    message = info.value.diagnostics()
    assert "resnet18-f37072fd.pth" in message and "checkpoints" in message
    assert ".safetensors" in message
    with pytest.raises(ModelError, match="no pretrained"):
        load_model("torchvision:not_a_model")


def test_torchvision_uses_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()  # random stand-in for the ImageNet weights
    torch.save(ref.state_dict(), cache / "resnet18-f37072fd.pth")
    loaded = load_model("torchvision:resnet18")
    assert loaded.name == "torchvision:resnet18" and loaded.arch == "resnet18"
    assert loaded.sha256 == _sha(cache / "resnet18-f37072fd.pth")
    assert loaded.num_classes == 1000 and loaded.dim == 512
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x))


def test_timm_without_timm_is_a_clear_error() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match="timm"):
            load_model("timm:resnet18.a1_in1k")
    else:
        pytest.skip("timm is installed; the missing-package path cannot be exercised")


def test_head_override() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(2, 3, 2, 2)
    with pytest.raises(ModelError, match="--head"):
        resolve_head(model)  # no known head name
    head = resolve_head(model, "3")
    assert head.name == "3" and head.linear is model[3]
    with torch.no_grad():
        torch.testing.assert_close(head.linear(head.features(x)), model(x))
        inner = resolve_head(model, "1")
        assert inner.features(x).shape == (2, 12)  # the input of the earlier Linear
        torch.testing.assert_close(inner.features(x), x.flatten(1))
    assert not model[1]._forward_pre_hooks and not model[3]._forward_pre_hooks
    with pytest.raises(ModelError, match="not nn.Linear"):
        resolve_head(model, "2")
    with pytest.raises(ModelError, match="no module named"):
        resolve_head(model, "classifier.9")

    resnet = build_model("resnet18", 4, small_stem=True).eval()
    assert resolve_head(resnet, "fc").linear is resnet.fc
    with pytest.raises(ModelError):
        resolve_head(resnet, "layer4")


def test_head_override_through_load_model(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(_smallcnn(3), path, arch="smallcnn", num_classes=3)
    assert load_model(path, head="fc").head.name == "fc"
    with pytest.raises(ModelError, match="not nn.Linear"):
        load_model(path, head="features.0")


def test_features_grayscale_and_differentiable(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(_smallcnn(3), path, arch="smallcnn", num_classes=3)
    loaded: LoadedModel = load_model(path)
    gray = torch.rand(2, 1, 32, 32, requires_grad=True)
    feats = loaded.features(gray)
    assert feats.shape == (2, 128) and feats.dtype == torch.float32
    feats.sum().backward()
    assert gray.grad is not None and gray.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.features(gray.detach()), loaded.features(gray.detach().expand(-1, 3, -1, -1))
        )
        rgb = torch.rand(2, 3, 32, 32)
        mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
        std = torch.tensor(loaded.std).view(1, 3, 1, 1)
        logits = loaded.head.linear(loaded.features(rgb))
        torch.testing.assert_close(logits, loaded.model((rgb - mean) / std))
    with pytest.raises(UsageError):
        loaded.features(torch.rand(2, 4, 32, 32))
    # parameters stay frozen: marking must never update the marker
    assert all(p.grad is None for p in loaded.model.parameters())


def test_densenet_legacy_key_names(tmp_path: Path) -> None:
    """torchvision's published DenseNet files say "norm.1" where the module is "norm1"."""
    torch.manual_seed(0)
    model = build_model("densenet121", 4).eval()
    legacy = {}
    for key, value in _plain_state(model).items():
        for old, new in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1")):
            if ".denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{new}.")
        legacy[key] = value
    assert any(".norm.1." in k for k in legacy)
    save_file(legacy, str(tmp_path / "dn.safetensors"))
    loaded = load_model(tmp_path / "dn.safetensors")
    assert loaded.arch == "densenet121"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_save_model_is_byte_reproducible(tmp_path) -> None:
    """A marker's identity is its file's SHA-256: the same weights must give the same bytes
    (safetensors itself writes its metadata in hash-map order, different on every call)."""
    import torch

    from radmark.models import build_model, load_model, save_model

    torch.manual_seed(0)
    model = build_model("smallcnn", 10, in_chans=1)
    extra = {f"k{i}": str(i) for i in range(8)}
    digests = {
        save_model(
            model,
            tmp_path / f"m{i}.safetensors",
            arch="smallcnn",
            num_classes=10,
            mean=(0.5,),
            std=(0.25,),
            extra=extra,
        )
        for i in range(4)
    }
    assert len(digests) == 1
    assert len({(tmp_path / f"m{i}.safetensors").read_bytes() for i in range(4)}) == 1
    loaded = load_model(str(tmp_path / "m0.safetensors"))
    assert loaded.sha256 == digests.pop() and loaded.metadata["k3"] == "3"


# --------------------------------------------------------------------------------------------
# issue #12: inputs too small for a network, training options


def test_images_too_small_for_the_network_are_a_model_error(tmp_path: Path) -> None:
    """smallcnn pools three times: 7×7 was a RuntimeError deep in torch (exit 1, later 3)."""
    path = tmp_path / "m.safetensors"
    save_model(_smallcnn(3), path, arch="smallcnn", num_classes=3)
    loaded: LoadedModel = load_model(path)
    for side in (1, 3, 7):
        with pytest.raises(ModelError, match=f"cannot take {side}x{side} images"):
            loaded.features(torch.rand(2, 1, side, side))
        with pytest.raises(ModelError, match="too small"):
            loaded.logits(torch.rand(1, 3, side, side))
    assert loaded.features(torch.rand(2, 1, 8, 8)).shape == (2, 128)  # the minimum works
    assert (8, 8) in loaded._sizes_ok  # checked once per size


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": -2}, "--batch-size"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": -1.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"lr": float("inf")}, "--lr"),
    ],  # fmt: skip
)
def test_training_options_are_checked(kwargs: dict, needle: str) -> None:
    import numpy as np

    from radmark.models.training import train_classifier

    images = np.zeros((4, 1, 16, 16), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1])
    args = {"arch": "smallcnn", "num_classes": 2, "epochs": 1, **kwargs}
    with pytest.raises(UsageError, match=needle):
        train_classifier(images, labels, **args)


def test_training_on_images_too_small_for_the_arch() -> None:
    import numpy as np

    from radmark.models.training import train_classifier

    images = np.zeros((4, 1, 5, 5), dtype=np.uint8)
    with pytest.raises(ModelError, match="smallcnn cannot take 5x5 images"):
        train_classifier(images, np.array([0, 1, 0, 1]), arch="smallcnn", num_classes=2, epochs=1)


def test_train_marker_refuses_an_existing_out_before_reading_anything(tmp_path: Path) -> None:
    from radmark.fsutil import TargetExistsError
    from radmark.models.training import train_marker

    out = tmp_path / "marker.safetensors"
    out.write_bytes(b"a marker that mark records bind by hash")
    with pytest.raises(TargetExistsError, match="--force"):
        train_marker([str(tmp_path / "no-such-shards")], out, arch="smallcnn")
    assert out.read_bytes() == b"a marker that mark records bind by hash"
