"""The plan's writers, by hand (no model): who owns an exclusive field is recorded per (layer, row), a second
mitigation on the same layer and row is refused with a message naming both, other layers and rows stay free."""

from __future__ import annotations

import pytest
from plan_cases import make_plan

from clearsight.kernels.plan import PlanConflictError, QueryRows

WRITERS = {
    "segments": lambda plan, layer, rows, owner: plan.set_segments(layer, rows, plan.segment[rows], owner),
    "redistribution": lambda plan, layer, rows, owner: plan.set_redistribute(
        [layer], rows, p_move=0.5, rho=0.2, min_image_mass=0.1, query_rows=QueryRows.ALL, owner=owner),
    "counterfactual": lambda plan, layer, rows, owner: plan.set_counterfactual([layer], rows, "uniform", 1, owner),
}


@pytest.mark.parametrize("what", sorted(WRITERS))
def test_exclusive_fields_are_owned_per_layer_and_row(what):
    write, plan = WRITERS[what], make_plan()
    write(plan, 1, [1], "a")
    assert plan.owner(what, 1, 1) == "a"
    assert plan.owner(what, 2, 1) is None and plan.owner(what, 1, 0) is None
    write(plan, 1, [0], "b")  # another row of the same layer
    write(plan, 2, [1], "b")  # the same row on another layer
    write(plan, 1, [1], "a")  # the owner again
    assert (plan.owner(what, 1, 0), plan.owner(what, 2, 1), plan.owner(what, 1, 1)) == ("b", "b", "a")
    with pytest.raises(PlanConflictError, match=rf"^'b' and 'a' both set the attention {what} \(layer 1, row 1\); "
                       "they cannot be combined in one request: drop one of them$"):
        write(plan, 1, [1, 2], "b")
