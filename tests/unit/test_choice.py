"""Which tests ``verify`` runs (radmark/verify/choice.py, issue #17): the plan's, unless an option
is set; options alone for records made before plans; and the plan ``mark`` signs."""

from __future__ import annotations

from pathlib import Path

import pytest

from radmark.errors import UsageError
from radmark.keys.plan import Plan, probe_digest
from radmark.verify.choice import NO_KIT, choose_tests, marking_plan
from tests.factories import make_marker, make_record, make_shards

WB, Z, PB, BB = "white_box_fisher", "white_box_zscore", "pullback_fisher", "black_box_rank"
ALL = Plan(tests=(WB, PB, BB), kit={"decoys": 2, "per_class": 1})


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory):  # -> MarkRecord (radioactive)
    root = tmp_path_factory.mktemp("planning")
    return make_record(root / "ks", make_marker(root / "m.safetensors"))


@pytest.mark.parametrize(
    ("plan", "options", "names", "not_run"),
    [
        # no plan (records made before plans): the options, as they always were
        (None, {}, (WB, Z, PB), {}),
        (None, {"pullback": False}, (WB, Z), {}),
        (None, {"black_box": True}, (WB, Z, PB, BB), {}),
        (None, {"probe": False, "black_box": True}, (BB,), {}),
        # a plan: its tests; an unset option follows it, a set one is the user's choice
        (Plan(tests=(WB,)), {}, (WB, Z), {}),
        (Plan(tests=(WB,)), {"pullback": True}, (WB, Z, PB), {}),
        (Plan(tests=(WB, PB)), {"pullback": False}, (WB, Z), {}),
        (Plan(tests=(WB, PB)), {"black_box": True}, (WB, Z, PB, BB), {}),
        (ALL, {}, (WB, Z, PB, BB), {}),
        (ALL, {"black_box": False}, (WB, Z, PB), {}),
        (ALL, {"has_kit": False}, (WB, Z, PB), {BB: NO_KIT}),
        (ALL, {"probe": False}, (BB,), {}),
        (Plan(tests=(PB,)), {}, (Z, PB), {}),
    ],
)
def test_the_plan_decides_unless_an_option_is_set(record, plan, options, names, not_run) -> None:  # noqa: ANN001
    kw = {"probe": True, "black_box": None, "pullback": None, "has_kit": True, **options}
    sel = choose_tests(record, plan, **kw)
    assert sel.names == names and dict(sel.not_run) == not_run


def test_the_marking_plan(tmp_path: Path) -> None:
    kit = {"decoys": 3, "per_class": 2}
    plan = marking_plan("radioactive", kit=kit, kit_with_marking=False)
    assert plan.tests == (WB, PB) and plan.kit is None and plan.probe_sha256 is None
    assert marking_plan("radioactive", kit=kit, kit_with_marking=True).tests == (WB, PB, BB)
    assert marking_plan("radioactive", kit=kit, kit_with_marking=True).kit == kit
    # the kit test planned for a kit built later: its parameters are pinned all the same
    later = marking_plan("radioactive", tests=f" {WB}, {BB} ", kit=kit, kit_with_marking=False)
    assert later.tests == (WB, BB) and later.kit == kit
    make_shards(tmp_path / "probe", n=20, per_shard=20, with_json=False)
    pinned = marking_plan("radioactive", probe=[str(tmp_path / "probe")], alpha=0.01, kit=kit,
                          kit_with_marking=False)  # fmt: skip
    from radmark.data.arrays import load_probe

    pp = load_probe([str(tmp_path / "probe")])
    assert pinned.probe_sha256 == probe_digest(pp.images, pp.labels) and pinned.alpha == 0.01
    for tests, needle in ((Z, "not exact"), ("nope", "does not have"), (" , ", "names no test")):
        with pytest.raises(UsageError, match=needle):
            marking_plan("radioactive", tests=tests, kit=kit, kit_with_marking=False)
