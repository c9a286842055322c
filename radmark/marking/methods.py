"""The marking-method seam: what a way of marking images must provide, and the registry.

A marking method turns a batch of clean images into marked ones for one key, says what it adds to
the signed mark record, and names the tests (``radmark/verify/tests.py``) that detect it. The
shard pipeline (``marking/run.py``) knows nothing else about it, so adding a method is one module
that defines a :class:`MarkingMethod` and one :func:`register_method` call (timm's
``@register_model`` is the model).

Methods are looked up by the name a mark record stores (``method``; absent in records made before
the seam existed, which all used the paper's method, :data:`DEFAULT_METHOD`).

A method may also say how to mark along given per-class carriers (``decoy_kit``): the black-box
verification kit (``marking/kit.py``) marks held-out images once per carrier slot with it. A
method without one (``decoy_kit = None``) has no decoy kit, and ``--kit-probe`` / ``kit build``
are refused for it before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from radmark.errors import UsageError
from radmark.keys.records import DEFAULT_METHOD as DEFAULT_METHOD  # the registry's default

if TYPE_CHECKING:
    import torch

    from radmark.keys.keypair import SecretKey
    from radmark.keys.records import MarkRecord
    from radmark.models.network import LoadedModel

FeaturesFn = Callable[["torch.Tensor"], "torch.Tensor"]  # images [B, C, H, W] -> features [B, d]


@dataclass(frozen=True)
class Budget:
    """The imperceptibility budget a run promises for every image it returns (issue #12).

    linf_levels: max |x̃ − x| in integer pixel levels (the radioactive method: ⌊radius⌋).
    psnr_floor: per-image PSNR lower bound in dB, or None when the method has no L2 budget.

    The shard pipeline checks every marked image against it after every batch, independently of
    what the method reports, and refuses the whole shard (nothing written, no record) when one
    image is outside it: a broken marker must never wipe a dataset.
    """

    linf_levels: int
    psnr_floor: float | None = None


@dataclass(frozen=True)
class MarkBatchResult:
    """What marking one batch produced (all tensors on the input's device).

    images: uint8 [B, C, H, W], same C as the input (grayscale stays 1 channel).
    psnr: float64 [B], dB against the original uint8 image (inf where unchanged).
    linf: int64 [B], max |x̃ − x| in pixel levels.
    feature_cos: float32 [B], a method-defined quality number in [−1, 1] (the radioactive method:
        cosine of the marker's feature shift with the carrier); NaN where undefined.
    finite: bool [B], whether the method's float image was finite (no inf/NaN) before it was
        quantised to uint8; None if the method has no float stage. A False entry fails the run:
        quantising NaN gives arbitrary levels (nearly black images) that look like valid pixels.
    """

    images: torch.Tensor
    psnr: torch.Tensor
    linf: torch.Tensor
    feature_cos: torch.Tensor
    finite: torch.Tensor | None = None


class MethodRun(Protocol):
    """One marking run of a method with one key and one marker: holds the run's secrets.

    ``mark`` is called once per batch (images of one size); ``sample_ids`` are the samples'
    ``__key__`` strings, for methods whose per-image secrets derive from them. ``budget`` is the
    bound every returned image keeps (checked by the pipeline, see :class:`Budget`).
    """

    @property
    def budget(self) -> Budget: ...

    def mark(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sample_ids: list[str],
        *,
        generator: torch.Generator,
    ) -> MarkBatchResult: ...

    def private_data(self) -> list[bytes]:
        """What the method must keep private from the batches marked since the last call (e.g.
        every twin candidate), then forgets it; the pipeline stores each blob content-addressed
        and 0600 in the keystore after every shard, so a killed run keeps what it finished."""
        ...

    def record_fields(self, private: Sequence[str] = ()) -> dict[str, Any]:
        """``carriers`` (format + commitment, or None) and ``method_data`` for the record;
        ``private``: the keystore addresses of every private blob of the run, in shard order."""
        ...


class CarrierMark(Protocol):
    """Mark a batch along given per-class carriers: the step a decoy kit runs once per slot.

    images: uint8 [B, C, H, W]; labels: int64 [B]; carriers: float32 [num_classes, d] on the
    images' device (the true carriers in one slot, decoys in the others); features: the marker's
    differentiable feature map; params: the method's parameters from the mark record.
    """

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        carriers: torch.Tensor,
        features: FeaturesFn,
        params: Any,
        *,
        generator: torch.Generator,
    ) -> MarkBatchResult: ...


class MarkingMethod(Protocol):
    """A registered way of marking: parameters, the per-run state, and the tests that detect it.

    ``decoy_kit``: the method's mark step along given carriers, for the black-box decoy kit
    (``marking/kit.py``), or None when the method has no decoy kit (module docstring).
    """

    name: str
    description: str
    tests: tuple[str, ...]
    presets: tuple[str, ...]

    @property
    def decoy_kit(self) -> CarrierMark | None: ...

    def params(self, preset: str, overrides: Mapping[str, Any]) -> Any:
        """Validated parameters for ``preset`` with ``overrides`` (UsageError when invalid)."""
        ...

    def params_from_record(self, data: Mapping[str, Any]) -> Any:
        """The parameters a mark record stored (inverse of ``params_to_record``)."""
        ...

    def params_to_record(self, params: Any) -> dict[str, Any]: ...

    def start(
        self,
        key: SecretKey,
        marker: LoadedModel,
        num_classes: int,
        params: Any,
        *,
        device: str,
    ) -> MethodRun: ...

    def check_key(self, record: MarkRecord, key: SecretKey) -> None:
        """Refuse a key that does not derive what ``record`` committed to (IntegrityError)."""
        ...


METHODS: dict[str, MarkingMethod] = {}


def register_method(method: MarkingMethod) -> MarkingMethod:
    """Add ``method`` to the registry under ``method.name`` (one line per method module)."""
    if method.name in METHODS:
        raise ValueError(f"marking method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    # Importing a method module registers it; kept here so the registry is complete on first use.
    from radmark.marking import radioactive, twins  # noqa: F401


def get_method(name: str) -> MarkingMethod:
    """The registered method ``name``, or a UsageError listing the known ones."""
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(
            f"unknown marking method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None


def method_names() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def decoy_kit_step(name: str, what: str) -> CarrierMark:
    """The decoy-kit mark step of method ``name``, or a UsageError saying it has none.

    ``what`` names the request in the error (``--kit-probe``, ``mark record 1a2b…``).
    """
    step = get_method(name).decoy_kit
    if step is None:
        kits = [n for n in method_names() if METHODS[n].decoy_kit is not None]
        raise UsageError(
            f"{what}: the {name!r} marking method has no decoy kit (the black-box kit is for "
            f"{', '.join(kits) or 'no registered method'})"
        )
    return step
