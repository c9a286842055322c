"""Marking networks by identity: carriers are bound to ``<name>@sha256:<weights hash>``.

A mark can only be verified against the very network that made it, so every place that needs a
record's marker (verification, kit building) loads it through :func:`load_marker`, which checks
the loaded weights' identity against the record and says what to type when the file moved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from radmark.errors import ModelError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from radmark.keys.records import MarkerRef
    from radmark.models.network import LoadedModel


def marker_identity(name: str, sha256: str) -> str:
    """The string carriers are bound to: ``<name>@sha256:<hex>``."""
    return f"{name}@sha256:{sha256}"


def load_marker(
    ref: MarkerRef, spec: str | None, device: str, *, record: str = "the mark record"
) -> LoadedModel:
    """The marker ``ref`` names, from ``spec`` (``--marker``) or the record's own source.

    Refuses a network whose identity differs from the one the record was made with: carriers
    derived for another network would make every p-value meaningless.
    """
    from radmark.models.loading import load_model

    where = spec or ref.source
    if not where:
        raise UsageError(f"{record} does not say where its marker is: pass --marker FILE")
    try:
        marker = load_model(where, device=device)
    except ModelError as exc:
        if spec is not None:
            raise
        raise ModelError(
            f"the marker recorded in {record}: {exc.message}; pass --marker FILE if it moved"
        ) from None
    if marker.identity != ref.id:
        raise ModelError(
            f"marker {where} is {marker.identity}, but the mark was made with {ref.id}"
        )
    return marker


def check_features_finite(marker: LoadedModel, images: np.ndarray, where: str) -> None:
    """Refuse a marker whose features on real images are not finite (issue #12).

    Weights can all be finite and still overflow (first conv weights of ±3e38): marking would
    then follow NaN gradients and write arbitrary pixels. ``images``: uint8 [B, H, W, C] from the
    run's first shard (``where``), of one size, none under the run's minimum marking side
    (``marking/pipeline.py::first_images``).

    The check is skipped, without an error, when there is nothing it can use: an empty batch (no
    image of the first samples qualifies, e.g. a shard of tiny images, which the run copies
    unmarked), or images of a size this marker cannot take (ModelError from
    ``LoadedModel.check_input_size``, or a RuntimeError/ValueError from the forward pass). No
    synthetic input stands in: what matters is the features of the images it will mark. The run
    still protects: an image the marker cannot take fails the run with its own line when marked,
    and after every batch each output must be finite and within the budget (``MethodRun.budget``)
    before anything is written.
    """
    import torch

    if images.shape[0] == 0:
        return
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    try:
        with torch.no_grad():
            feats = marker.features(x.to(marker.device))
    except (ModelError, RuntimeError, ValueError):
        return  # images this marker cannot take (too small...): the run reports them per sample
    if not bool(torch.isfinite(feats).all()):
        raise ModelError(
            f"marker {marker.name}: its features are not finite (inf or NaN) on the first images "
            f"of {where}; its weights overflow, so it cannot mark anything: retrain it or choose "
            "another --marker"
        )
