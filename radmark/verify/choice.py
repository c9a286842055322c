"""The verification plan in practice: the plan ``radmark mark`` signs, and the tests ``verify`` runs.

What a plan is and how a run is compared with it is ``keys/plan.py``; this module decides the
tests. At marking (:func:`marking_plan`): the method's exact tests (the kit test only with a kit
built with the marking) or the owner's ``--plan-tests``, α, the clean probe set pinned by content
(``--plan-probe``) and the kit's parameters whenever the kit test is planned. At verification
(:func:`choose_tests`): for a record with a plan, the plan's tests; an option left unset follows
the plan, one that is set (``--pullback``/``--no-pullback``, ``--black-box``/``--no-black-box``)
is the user's choice, and the difference is a deviation :func:`~radmark.keys.plan.compare` names.
A planned kit test whose kit is not in the keystore does not run, and the deviation says why.
Records made before plans keep the option-driven choice: the tests their method names whose
needs (a probe, a kit) the options offer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from radmark.errors import UsageError
from radmark.keys.plan import DEFAULT_ALPHA, Plan, probe_digest
from radmark.keys.records import MarkRecord
from radmark.verify.pullback import PULLBACK
from radmark.verify.tests import get_test

NO_KIT = "no verification kit in the keystore"


def default_plan(method_tests: Sequence[str], *, kit: Mapping[str, int] | None,
                 probe_sha256: str | None = None, alpha: float = DEFAULT_ALPHA,
                 tests: Sequence[str] | None = None) -> Plan:  # fmt: skip
    """The plan of a marking run: the method's exact tests (the kit test only when ``kit`` is
    given) or ``tests``, α, and the clean probe set's digest when the owner pins one."""
    names = list(tests) if tests is not None else [
        t for t in method_tests
        if get_test(t).exact and ("kit" not in get_test(t).needs or kit is not None)
    ]  # fmt: skip
    unknown = [t for t in names if t not in method_tests]
    if unknown:
        raise UsageError(f"the plan names tests the method does not have: {', '.join(unknown)}")
    inexact = [t for t in names if not get_test(t).exact]
    if inexact:
        raise UsageError(
            f"the plan names tests that are not exact: {', '.join(inexact)} (they are shown "
            "for information and never enter a verdict)"
        )
    return Plan(tests=tuple(names), alpha=alpha, probe_sha256=probe_sha256, kit=kit)


def marking_plan(method: str, *, tests: str | None = None,
                 alpha: float = DEFAULT_ALPHA, probe: Sequence[str] | None = None,
                 kit: Mapping[str, int], kit_with_marking: bool) -> Plan:  # fmt: skip
    """The plan ``radmark mark`` signs into a record of ``method``, from the options as given.

    ``tests``: comma-separated test names (``--plan-tests``), or None for the default.
    ``probe``: the clean probe shards to pin (``--plan-probe``): their decoded content is hashed,
    so verification with the same images, however re-packed, follows the plan, and any other
    probe is a deviation. ``kit``: ``{"decoys", "per_class"}``, pinned whenever the plan names
    the kit test (built now with ``kit_with_marking``, or later by ``radmark kit build``, which
    then refuses other parameters): the true slot's draw depends on the number of decoys.
    """
    from radmark.marking.methods import get_method

    names = [t.strip() for t in tests.split(",") if t.strip()] if tests is not None else None
    if names is not None and not names:
        raise UsageError("--plan-tests names no test")
    pinned = None
    if probe:  # pre-registered before any suspect exists: verify checks the same content
        from radmark.data.arrays import load_probe

        pp = load_probe(probe)
        pinned = probe_digest(pp.images, pp.labels)
    method_tests = get_method(method).tests
    planned_kit = kit_with_marking or any(
        t in method_tests and "kit" in get_test(t).needs for t in names or ()
    )
    return default_plan(method_tests, kit=dict(kit) if planned_kit else None,
                        probe_sha256=pinned, alpha=alpha, tests=names)  # fmt: skip


@dataclass(frozen=True)
class Selection:
    """The tests to run for one record, and why planned ones will not (test name -> reason)."""

    names: tuple[str, ...]
    not_run: Mapping[str, str] = field(default_factory=dict)


def choose_tests(record: MarkRecord, plan: Plan | None, *, probe: bool, black_box: bool | None,
                 pullback: bool | None, has_kit: bool) -> Selection:  # fmt: skip
    """Which of ``record``'s method's tests run (see the module docstring).

    ``probe``: a probe set was given; ``black_box``/``pullback``: the options, None when unset;
    ``has_kit``: the keystore holds a verification kit for the record. Informative (inexact)
    tests run whenever what they need is offered; they never enter a verdict or a plan.
    """
    from radmark.marking.methods import get_method

    if plan is None:  # records made before plans: the options decide, as they always did
        offered = ({"probe"} if probe else set()) | ({"kit"} if black_box and has_kit else set())
        excluded = {PULLBACK} if pullback is False else set()
        legacy = planned_tests(record, offered=offered, excluded=excluded)
        missing = {  # --black-box asked for a kit this record does not have: reported, not fatal
            n: NO_KIT for n in get_method(record.method).tests
            if black_box and not has_kit and "kit" in get_test(n).needs
        }  # fmt: skip
        return Selection(tuple(legacy), missing)
    offered = ({"probe"} if probe else set()) | ({"kit"} if has_kit else set())
    names: list[str] = []
    not_run: dict[str, str] = {}
    for name in get_method(record.method).tests:
        test = get_test(name)
        if not test.exact:
            wanted = True
        elif name == PULLBACK and pullback is not None:
            wanted = pullback
        elif "kit" in test.needs and black_box is not None:
            wanted = black_box
        else:
            wanted = name in plan.tests
        if not wanted:
            continue
        if "kit" in test.needs and not has_kit:
            not_run[name] = NO_KIT
            continue
        if test.needs <= offered:
            names.append(name)
    return Selection(tuple(names), not_run)


def planned_tests(record: MarkRecord, *, offered: set[str], excluded: set[str]) -> list[str]:
    """The tests its method names whose needs are offered, less ``excluded`` (the choice for a
    record without a plan, and for the benchmark's direct calls).

    ``offered``: ``probe`` with --probe, ``kit`` with --black-box; ``excluded``: tests switched
    off by an option (--no-pullback).
    """
    from radmark.marking.methods import get_method

    return [
        name
        for name in get_method(record.method).tests
        if name not in excluded and get_test(name).needs <= offered
    ]
