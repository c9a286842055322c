"""Everything verification computes about a suspect that does not depend on a key.

:func:`prepare` loads the suspect (and the clean probe set, if any) once; :class:`Evidence` then
computes, on first use and once only, what the tests read: the suspect's penultimate features and
classifier, each marker's features and the least-squares alignment, the pull-back directions of
suspect and marker, and the suspect's and marker's responses on a record's verification kit.
Each test (``verify/tests.py``) scores one key against it, so testing 1 or 1,000 keys costs one
feature extraction, and the benchmark's null calibration runs exactly what ``radmark verify`` runs.
A test with key-independent work of its own caches it here with :meth:`Evidence.cached` (the twin
test's candidate scores, ``verify/twin_rank.py``), so a new test needs no edit of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from radmark.errors import InputError, ModelError

if TYPE_CHECKING:
    from radmark.data.arrays import Probe
    from radmark.keys.records import KitRecord, MarkRecord
    from radmark.keys.store import Keystore
    from radmark.marking.kit import Kit
    from radmark.models.network import LoadedModel
    from radmark.verify.alignment import Alignment

POOR_ALIGNMENT_R2 = 0.5
T = TypeVar("T")


@dataclass(frozen=True)
class EvidenceSettings:
    """Options that change what is computed (not which key is tested)."""

    device: str = "cpu"
    batch_size: int = 256
    center: bool = False  # alignment with an intercept
    pullback_limit: int = 2000  # probe images used by the pull-back test
    marker_spec: str | None = None  # where the marker is, if the record's source moved


@dataclass
class Evidence:
    """Key-independent quantities of one suspect, computed lazily and cached (module docstring).

    ``notes`` collects warnings (poor alignment, ...) as data for the report.
    """

    suspect: LoadedModel
    store: Keystore
    probe: Probe | None
    settings: EvidenceSettings = field(default_factory=EvidenceSettings)
    notes: list[str] = field(default_factory=list)
    #: told what is being computed (a probe batch's features, ...): the progress bar's text
    on_step: Callable[[str], None] | None = field(default=None, repr=False)
    _cache: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def cached(self, key: tuple[Any, ...], make: Callable[[], T]) -> T:
        """``make()``, computed on the first call with ``key`` only (key-independent work).

        ``key`` names the quantity and what it depends on, e.g. ``("twin-scores", record
        address)``; tests use their own first element so that keys never collide.
        """
        if key not in self._cache:
            self._cache[key] = make()
        return cast("T", self._cache[key])

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ------------------------------------------------------------------ models
    def marker(self, record: MarkRecord) -> LoadedModel:
        """The record's marking network, loaded once per identity, its hash checked."""
        from radmark.models.identity import load_marker

        s = self.settings
        return self.cached(
            ("marker", record.marker.id),
            lambda: load_marker(record.marker, s.marker_spec, s.device, record=record.short),
        )

    # ------------------------------------------------------------------ white box
    def require_probe(self, what: str) -> Probe:
        if self.probe is None:
            raise InputError(f"{what} needs --probe SHARDS (clean images, never marked)")
        return self.probe

    def suspect_features(self) -> np.ndarray:
        """float64 [N, d_s]: the suspect's penultimate features on the probe set."""
        probe = self.require_probe("the white-box test")
        return self.cached(("features", "suspect"), lambda: self._features(self.suspect, probe))

    def marker_features(self, record: MarkRecord) -> np.ndarray:
        probe = self.require_probe("the white-box test")
        marker = self.marker(record)
        return self.cached(("features", record.marker.id), lambda: self._features(marker, probe))

    def _features(self, model: LoadedModel, probe: Probe) -> np.ndarray:
        import torch

        out = []
        b = self.settings.batch_size
        with torch.no_grad():
            n = probe.images.shape[0]
            for i in range(0, n, b):
                x = torch.from_numpy(probe.images[i : i + b]).to(self.settings.device)
                out.append(model.features(x.float().div_(255.0)).double().cpu().numpy())
                if self.on_step is not None:
                    self.on_step(f"{model.arch} features, {min(i + b, n)}/{n} probe images")
        feats = np.concatenate(out)
        if not np.all(np.isfinite(feats)):
            raise ModelError(f"{model.source} produced non-finite features on the probe set")
        return feats

    def alignment(self, record: MarkRecord) -> Alignment:
        """Least squares from the record's marker features to the suspect's (paper, step 3)."""
        from radmark.verify.alignment import fit_alignment

        def make() -> Alignment:
            probe = self.require_probe("the white-box test")
            d = record.dim
            n = int(probe.images.shape[0])
            if n - (1 if self.settings.center else 0) <= d:
                raise InputError(
                    f"probe {probe.source} has {n} images but the marker's features have d={d}: "
                    f"the alignment needs well above d clean images (say {10 * d})"
                )
            al = fit_alignment(
                self.marker_features(record), self.suspect_features(), center=self.settings.center
            )
            if al.warning:
                self.note(al.warning)
            if al.r2 < POOR_ALIGNMENT_R2:
                self.note(
                    f"alignment R² = {al.r2:.3g} is poor: the white-box test stays exact but has "
                    "little power for this model (the pull-back test needs no alignment)"
                )
            return al

        return self.cached(("alignment", record.marker.id), make)

    def mapped_rows(self, record: MarkRecord) -> np.ndarray:
        """The suspect's class rows in the marker's space, unit norm, [C, d] (white-box test).

        Fitted leave-class-out when the probe is labelled (``alignment.crossfit_rows``), so that
        marked images that reach the probe unseen by the guard (re-encoded, say) cannot bias
        the test; with an unlabelled probe, the one full fit, and a note saying so.
        """
        from radmark.verify.alignment import crossfit_rows, map_classifier

        def make() -> np.ndarray:
            al = self.alignment(record)  # quality checks and R², also for the report
            labels = self.require_probe("the white-box test").labels
            if labels is None:
                self.note(
                    "probe unlabelled: the white-box alignment is one fit on the whole probe, "
                    "which images marked with the key under test would bias (docs/method.md)"
                )
                return map_classifier(self.suspect_weight(), al)
            return crossfit_rows(
                self.suspect_weight(), self.marker_features(record), self.suspect_features(),
                labels, center=self.settings.center,
            )  # fmt: skip

        return self.cached(("mapped-rows", record.marker.id), make)

    def suspect_weight(self) -> np.ndarray:
        """The suspect's classifier weight, float64 [C, d_s]."""
        return self.cached(("weight",), lambda: self.suspect.weight().numpy())

    def pullback(self, record: MarkRecord) -> tuple[np.ndarray, np.ndarray, bool]:
        """Pull-back directions of the suspect and of the marker (reference), [C, d] each, and
        whether they are class-conditional (labelled probe) or all-image."""
        from radmark.verify.pullback import pullback_directions

        def make() -> tuple[np.ndarray, np.ndarray, bool]:
            probe = self.require_probe("the pull-back test")
            c = record.num_classes
            images, labels = probe.balanced_subset(c, self.settings.pullback_limit)
            marker = self.marker(record)
            v = pullback_directions(
                self.suspect.logits, marker.features, images, c, labels=labels,
                device=self.settings.device,
            )  # fmt: skip
            v_ref = pullback_directions(
                marker.logits, marker.features, images, c, labels=labels,
                device=self.settings.device,
            )  # fmt: skip
            return v, v_ref, labels is not None

        return self.cached(("pullback", record.marker.id, record.num_classes), make)

    # ------------------------------------------------------------------ black box
    def kit(self, record: MarkRecord) -> tuple[KitRecord, Kit]:
        """The record's verification kit (its first), hash-checked."""
        from radmark.marking.kit import first_kit, load_kit

        return self.cached(("kit", record.address), lambda: load_kit(self.store, first_kit(
            self.store, record)))  # fmt: skip

    def kit_statistics(self, record: MarkRecord) -> tuple[np.ndarray, np.ndarray]:
        """T [S, C] of the suspect and of the marker (the reference) on the record's kit."""
        from radmark.verify.black_box import slot_statistics

        def make() -> tuple[np.ndarray, np.ndarray]:
            _rec, kit = self.kit(record)
            c = record.num_classes
            s = self.settings
            t = slot_statistics(self.suspect.logits, kit, c, device=s.device,
                                batch_size=s.batch_size)  # fmt: skip
            ref = slot_statistics(self.marker(record).logits, kit, c, device=s.device,
                                  batch_size=s.batch_size)  # fmt: skip
            return t, ref

        return self.cached(("kit-stats", record.address), make)


def prepare(
    model_spec: str,
    *,
    store: Keystore,
    probe: Sequence[str] = (),
    probe_limit: int | None = None,
    arch: str | None = None,
    head: str | None = None,
    settings: EvidenceSettings = EvidenceSettings(),
) -> Evidence:
    """Load the suspect and the probe set: the key-independent half of verification."""
    from radmark.data.arrays import load_probe
    from radmark.models import load_model

    suspect = load_model(model_spec, arch=arch, head=head, device=settings.device)
    probe_set = load_probe(probe, limit=probe_limit) if probe else None
    return Evidence(suspect=suspect, store=store, probe=probe_set, settings=settings)
