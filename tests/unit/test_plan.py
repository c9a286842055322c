"""The verification plan (radmark/keys/plan.py, issue #17): deviations are found and named."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from radmark.errors import UsageError
from radmark.keys.plan import UNPINNED_PROBE, Conduct, Plan, compare, probe_digest

PLAN = Plan(tests=("white_box_fisher", "pullback_fisher"), alpha=1e-3, probe_sha256="ab" * 32)


def _run(**kw: object) -> Conduct:
    base = dict(tests=PLAN.tests, alpha=1e-3, probe_sha256="ab" * 32, center=False,
                probe_limit=None, pullback_limit=2000, head=None)  # fmt: skip
    return Conduct(**{**base, **kw})  # type: ignore[arg-type]


def test_the_plan_followed() -> None:
    status = compare(PLAN, _run())
    assert status.registered and status.followed and "pre-registered" in status.label


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tests": ("white_box_fisher",)}, "planned tests not run: pullback_fisher"),
        ({"tests": (*PLAN.tests, "black_box_rank")}, "tests not in the plan: black_box_rank"),
        ({"alpha": 0.05}, "alpha 0.05"),
        ({"probe_sha256": "cd" * 32}, "another probe set"),
        ({"center": True}, "center True"),
        ({"probe_limit": 500}, "probe-limit 500"),
        ({"head": "fc"}, "head fc"),
        ({"kit": {"decoys": 9, "per_class": 10}}, "a kit with {'decoys': 9, 'per_class': 10}"),
        (
            {"tests": ("white_box_fisher",), "not_run": {"pullback_fisher": "why"}},
            "planned tests not run: pullback_fisher (why)",
        ),
    ],
)
def test_every_deviation_is_named(change: dict, needle: str) -> None:
    plan = replace(PLAN, kit={"decoys": 39, "per_class": 10})
    status = compare(plan, _run(**change))
    assert status.registered and not status.followed
    assert any(needle in d for d in status.deviations), status.deviations
    assert status.label.startswith("EXPLORATORY")


def test_a_probe_the_plan_left_free_is_a_deviation() -> None:
    """Issue #17: with no probe pinned, any probe set would "follow" the plan, so probe
    shopping would go unnoticed; a run that used a probe is exploratory, one that used none is
    not (nothing was chosen)."""
    free = replace(PLAN, probe_sha256=None)
    status = compare(free, _run(probe_sha256="cd" * 32))
    assert status.deviations == (UNPINNED_PROBE,) and "--plan-probe" in status.label
    assert compare(free, _run(probe_sha256=None)).followed
    kit_only = replace(PLAN, tests=("black_box_rank",))  # the kit alone: no probe was used
    assert compare(kit_only, _run(tests=("black_box_rank",), probe_sha256=None)).followed


def test_no_plan_is_exploratory() -> None:
    status = compare(None, _run())
    assert not status.registered and not status.followed and "predates" in status.label


def test_record_round_trip_and_validation() -> None:
    plan = Plan(tests=("twin_rank",), alpha=1e-4, kit={"decoys": 39, "per_class": 10})
    assert Plan.from_record(plan.to_record()) == plan
    with pytest.raises(UsageError):
        Plan(tests=())
    with pytest.raises(UsageError):
        Plan(tests=("x",), alpha=1.5)


def test_probe_digest_is_content_not_files() -> None:
    x = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    y = np.array([0, 1])
    d = probe_digest(x, y)
    assert d == probe_digest(x.copy(), y.copy())
    x2 = x.copy()
    x2[0, 0, 0, 0] ^= 1
    assert probe_digest(x2, y) != d and probe_digest(x, np.array([1, 0])) != d
    assert probe_digest(x, None) != d
