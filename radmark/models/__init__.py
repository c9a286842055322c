"""Networks: the architecture registry, safe loading and saving, heads, training.

Importing this package imports torch and torchvision (CPU-safe) but never CUDA-only code, and
never touches the network.
"""

from radmark.models.files import canonical_safetensors, read_safetensors_header, save_model
from radmark.models.heads import Head, resolve_head
from radmark.models.loading import load_model
from radmark.models.network import IMAGENET_MEAN, IMAGENET_STD, LoadedModel
from radmark.models.registry import ARCH_REGISTRY, SlimResNet, SmallCNN, arch_names, build_model

__all__ = [
    "ARCH_REGISTRY",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Head",
    "LoadedModel",
    "SlimResNet",
    "SmallCNN",
    "arch_names",
    "build_model",
    "canonical_safetensors",
    "load_model",
    "read_safetensors_header",
    "resolve_head",
    "save_model",
]
