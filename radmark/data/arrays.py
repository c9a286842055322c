"""Labelled image tensors from WebDataset shards, for the jobs that need a whole split in memory
(training a marker, the clean probe set of verification, the benchmark's suspects).

Marking itself streams shard by shard (mark.py); this module is for the small splits
(probe sets of a few thousand images, Fashion-MNIST-sized training sets).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from radmark.data.images import decode_image, parse_label
from radmark.data.samples import Sample
from radmark.data.sources import expand_shards, iter_samples
from radmark.errors import InputError, ShardError


@dataclass(frozen=True)
class LabelledImages:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    keys: list[str]  # "shard-name/__key__" for each image
    num_classes_seen: int  # 1 + max label

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _decoded(specs: Sequence[str], limit: int | None) -> Iterator[tuple[str, Sample, np.ndarray]]:
    """(shard, sample, image [H, W, C]) for every sample, all images of one size, at most ``limit``."""
    shape: tuple[int, ...] | None = None
    n = 0
    for url in expand_shards(specs):
        for sample in iter_samples(url):
            ext = sample.image_ext()
            if ext is None:
                raise ShardError(url, "sample has no image member", sample=sample.key)
            img = decode_image(sample.get(ext) or b"", shard=url, key=sample.key)
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise ShardError(
                    url,
                    f"image is {img.shape[1]}x{img.shape[0]}x{img.shape[2]} but earlier ones are "
                    f"{shape[1]}x{shape[0]}x{shape[2]}; this command needs images of one size",
                    sample=sample.key,
                )
            yield url, sample, img
            n += 1
            if limit is not None and n >= limit:
                return


def _stack(imgs: list[np.ndarray], specs: Sequence[str]) -> np.ndarray:
    if not imgs:
        raise InputError("no images found in " + ", ".join(specs))
    return np.stack(imgs).transpose(0, 3, 1, 2).copy()


def load_labelled_images(
    specs: Sequence[str],
    *,
    label_field: str = "cls",
    num_classes: int | None = None,
    limit: int | None = None,
) -> LabelledImages:
    """Decode every image of ``specs`` (all of one size and channel count) with its label."""
    imgs: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    for url, sample, img in _decoded(specs, limit):
        labels.append(parse_label(sample, shard=url, field=label_field, num_classes=num_classes))
        imgs.append(img)
        keys.append(f"{url}/{sample.key}")
    arr = _stack(imgs, specs)
    lab = np.asarray(labels, dtype=np.int64)
    return LabelledImages(arr, lab, keys, int(lab.max()) + 1)


def load_images(specs: Sequence[str], *, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Images only (uint8 [N, C, H, W], one size) and their keys: probe sets need no labels."""
    imgs: list[np.ndarray] = []
    keys: list[str] = []
    for url, sample, img in _decoded(specs, limit):
        imgs.append(img)
        keys.append(f"{url}/{sample.key}")
    return _stack(imgs, specs), keys


@dataclass(frozen=True)
class Probe:
    """A clean probe set for verification: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]
    when every sample has a valid label (the pull-back test uses them), else None."""

    images: np.ndarray
    labels: np.ndarray | None
    keys: list[str]
    source: str = ""  # the shard specs, for messages

    def balanced_subset(self, num_classes: int, limit: int) -> tuple[np.ndarray, np.ndarray | None]:
        """At most ``limit`` images, class-balanced and deterministic (the first per class).

        Labels are dropped (all-image gradients) when some class has no probe image.
        """
        images, labels = self.images, self.labels
        if images.shape[0] > limit:
            if labels is not None:
                per = max(1, limit // num_classes)
                idx = np.sort(
                    np.concatenate([np.flatnonzero(labels == k)[:per] for k in range(num_classes)])
                )
                images, labels = images[idx], labels[idx]
            else:
                images = images[:limit]
        if labels is not None and any(not np.any(labels == k) for k in range(num_classes)):
            labels = None
        return images, labels


def load_probe(
    specs: Sequence[str], *, limit: int | None = None, label_field: str = "cls"
) -> Probe:
    """Probe images in one pass, with labels when every sample has a valid one.

    A probe set need not be labelled; the label member is read only where present, so a missing
    or malformed label means "unlabelled", never a second decoding pass.
    """
    imgs: list[np.ndarray] = []
    labels: list[int] | None = []
    keys: list[str] = []
    for url, sample, img in _decoded(specs, limit):
        imgs.append(img)
        keys.append(f"{url}/{sample.key}")
        if labels is not None:
            try:
                labels.append(parse_label(sample, shard=url, field=label_field))
            except ShardError:
                labels = None
    lab = np.asarray(labels, dtype=np.int64) if labels is not None else None
    return Probe(_stack(imgs, specs), lab, keys, ", ".join(specs))
