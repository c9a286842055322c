"""The verification plan: which tests, at which α, on which probe, fixed before any suspect exists.

Every single verification is valid, but choosing the best of several is not: re-running with
another ``--probe``, ``--center``, ``--probe-limit``, ``--head``, another set of tests or a kit
rebuilt with other decoys, and reporting the smallest p-value, is a test no exact null covers. So
the owner commits to a plan when marking; it is signed into the mark record (``plan``, read and
written through this module), and ``radmark verify`` follows it by default. Any deviation is allowed but reported, per result and in
the JSON, as *exploratory*: its verdict is not pre-registered. Records made before plans existed
have none and are reported as such.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from radmark.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

PLAN_VERSION = 1
DEFAULT_ALPHA = 1e-3
DEFAULT_PULLBACK_LIMIT = 2000
#: The deviation of a run that used a probe set the plan left free: any probe would have "followed"
#: it, so choosing among probe sets would go unnoticed.
UNPINNED_PROBE = "the plan pins no probe set: mark with --plan-probe to pre-register one"


@dataclass(frozen=True)
class Plan:
    """What the owner committed to at marking time.

    ``probe_limit`` and ``head`` None: the defaults (no limit, the head found automatically).
    ``probe_sha256`` None: no probe set pinned, so a run that uses a probe is exploratory (the
    choice among probe sets would be free). ``kit`` None: no kit parameters pinned.
    """

    tests: tuple[str, ...]
    alpha: float = DEFAULT_ALPHA
    probe_sha256: str | None = None
    center: bool = False
    probe_limit: int | None = None
    pullback_limit: int = DEFAULT_PULLBACK_LIMIT
    head: str | None = None
    kit: Mapping[str, int] | None = None  # {"decoys": K, "per_class": n} of the one kit

    def __post_init__(self) -> None:
        if not self.tests:
            raise UsageError("a verification plan needs at least one test")
        if not (isinstance(self.alpha, float) and 0.0 < self.alpha < 1.0):
            raise UsageError(f"the plan's alpha must be in (0, 1), got {self.alpha!r}")

    def to_record(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "tests": list(self.tests),
            "alpha": self.alpha,
            "probe_sha256": self.probe_sha256,
            "center": self.center,
            "probe_limit": self.probe_limit,
            "pullback_limit": self.pullback_limit,
            "head": self.head,
            "kit": dict(self.kit) if self.kit is not None else None,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Plan:
        """The plan a record signed (its schema was checked when the keystore opened)."""
        try:
            kit = data.get("kit")
            return cls(
                tests=tuple(str(t) for t in data["tests"]),
                alpha=float(data["alpha"]),
                probe_sha256=data.get("probe_sha256"),
                center=bool(data.get("center", False)),
                probe_limit=data.get("probe_limit"),
                pullback_limit=int(data.get("pullback_limit", DEFAULT_PULLBACK_LIMIT)),
                head=data.get("head"),
                kit={"decoys": int(kit["decoys"]), "per_class": int(kit["per_class"])}
                if kit is not None else None,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"the mark record's verification plan is malformed ({exc})") from None


@dataclass(frozen=True)
class Conduct:
    """How one verification was actually run, in the terms of a :class:`Plan`.

    ``tests``: the exact tests that ran; ``probe_sha256``: the digest of the probe set when a
    test that uses it ran (None otherwise: a probe nothing used cannot have been chosen for it).
    """

    tests: tuple[str, ...]
    alpha: float
    probe_sha256: str | None
    center: bool
    probe_limit: int | None
    pullback_limit: int
    head: str | None
    kit: Mapping[str, int] | None = None  # the parameters of the kit used (always the first)
    not_run: Mapping[str, str] = field(default_factory=dict)  # planned test -> why it did not run


@dataclass(frozen=True)
class PlanStatus:
    """Whether a result followed its record's plan; ``deviations`` say how it did not."""

    registered: bool
    deviations: tuple[str, ...] = field(default_factory=tuple)

    @property
    def followed(self) -> bool:
        return self.registered and not self.deviations

    @property
    def label(self) -> str:
        if not self.registered:
            return "no plan registered (the record predates plans): exploratory"
        if self.followed:
            return "followed the plan signed at marking (pre-registered)"
        return "EXPLORATORY: deviates from the plan signed at marking: " + "; ".join(
            self.deviations
        )


def compare(plan: Plan | None, run: Conduct) -> PlanStatus:
    """The deviations of ``run`` from ``plan`` (every difference counts, in either direction)."""
    if plan is None:
        return PlanStatus(registered=False)
    out: list[str] = []
    missing = [t + (f" ({run.not_run[t]})" if t in run.not_run else "")
               for t in plan.tests if t not in run.tests]  # fmt: skip
    extra = [t for t in run.tests if t not in plan.tests]
    if missing:
        out.append(f"planned tests not run: {', '.join(missing)}")
    if extra:
        out.append(f"tests not in the plan: {', '.join(extra)}")
    if not math.isclose(plan.alpha, run.alpha, rel_tol=1e-12):
        out.append(f"alpha {run.alpha:g} instead of {plan.alpha:g}")
    if run.probe_sha256 is not None and plan.probe_sha256 is None:
        out.append(UNPINNED_PROBE)
    elif run.probe_sha256 is not None and run.probe_sha256 != plan.probe_sha256:
        out.append("another probe set than the one the plan pinned")
    for name in ("center", "probe_limit", "pullback_limit", "head"):
        a, b = getattr(plan, name), getattr(run, name)
        if a != b and not (name == "pullback_limit" and "pullback_fisher" not in run.tests):
            out.append(f"{name.replace('_', '-')} {b} instead of {a}")
    if run.kit is not None and plan.kit is not None and dict(plan.kit) != dict(run.kit):
        out.append(f"a kit with {dict(run.kit)} instead of the planned {dict(plan.kit)}")
    return PlanStatus(registered=True, deviations=tuple(out))


def probe_digest(images: np.ndarray, labels: np.ndarray | None) -> str:
    """SHA-256 of a probe set's decoded content (pixels, shape, labels), not of its files, so
    re-packing the same images is the same probe and any other image is not."""
    h = hashlib.sha256(b"radmark/v1/probe|")
    h.update(",".join(str(v) for v in images.shape).encode() + b"|")
    h.update(images.tobytes())
    h.update(b"|labels|" + (labels.astype("<i8").tobytes() if labels is not None else b"none"))
    return h.hexdigest()
