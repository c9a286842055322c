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
    from radmark.models.loaded import LoadedModel


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
    run's first shard (``where``); an empty batch checks nothing.
    """
    import torch

    if images.shape[0] == 0:
        return
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    try:
        with torch.no_grad():
            feats = marker.features(x.to(marker.device))
    except (RuntimeError, ValueError):
        return  # images this marker cannot take (too small...): the run reports them per sample
    if not bool(torch.isfinite(feats).all()):
        raise ModelError(
            f"marker {marker.name}: its features are not finite (inf or NaN) on the first images "
            f"of {where}; its weights overflow, so it cannot mark anything: retrain it or choose "
            "another --marker"
        )
