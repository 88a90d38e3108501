"""The plan's writers and caches, by hand (no model): who owns an exclusive field is recorded per (layer,
row), a second mitigation on the same layer and row is refused with a message naming both, other layers and
rows stay free; the edits' dtypes, the writers' refusals, the per-shape mask cache."""

from __future__ import annotations

import pytest
import torch
from plan_cases import L0, PADS, make_plan

from clearsight.kernels.plan import AttentionPlan, PlanConflictError, QueryRows, Segment, StatsRequest

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


def test_abs_bias_edits_share_a_row_only_with_the_same_query_rows():
    """PAI + PAINT on one row add up when they select the same query rows; other rows are refused, however
    small the earlier boost (here 0.1 on one segment of each of 4 heads)."""
    plan = make_plan()
    plan.add_abs_bias([1], [0], Segment.IMAGE, 0.1, QueryRows.LAST, owner="pai")
    plan.add_abs_bias([1], [0], Segment.IMAGE, 0.1, QueryRows.LAST, owner="paint")
    e = plan.edit(1)
    assert e.abs_bias[0, :, Segment.IMAGE].tolist() == pytest.approx([0.2] * 4)
    assert e.abs_from[0].item() == plan.prompt_len - 1 and e.abs_rows_from == plan.prompt_len - 1
    with pytest.raises(PlanConflictError, match="^'paint' selects different query rows than an earlier abs-bias "
                       "edit on layer 1$"):
        plan.add_abs_bias([1], [0], Segment.IMAGE, 0.1, QueryRows.ALL, owner="paint")
    plan.add_abs_bias([1], [1], Segment.IMAGE, 0.1, QueryRows.ALL, owner="paint")  # another row: its own rows
    assert e.abs_from.tolist() == [plan.prompt_len - 1, 0, 0] and e.abs_rows_from == 0


def test_concatenate_refuses_plans_that_do_not_align():
    with pytest.raises(ValueError, match=r"^concatenate: plans differ in \(layers, heads, keys\): \(3, 4, 12\) vs "
                       r"\(3, 4, 11\)$"):
        AttentionPlan.concatenate(make_plan(), make_plan(L=11))
    other = make_plan()
    other.stats = StatsRequest(segment_mass=True)
    with pytest.raises(ValueError, match="^concatenate: the plans record different statistics$"):
        AttentionPlan.concatenate(make_plan(), other)


def test_counterfactual_edit_holds_int64_codes_seeds_and_sources():
    """The dtypes the plan documents (``CounterfactualEdit``): the Triton backend passes them to its kernel as
    they are. Rows not written keep NONE, seed 0 and the identity source."""
    plan = make_plan()
    plan.set_counterfactual([1], [2], "shuffled", seed=5, owner="causalmm")
    cf = plan.edit(1).counterfactual
    assert (cf.kind.dtype, cf.seed.dtype, cf.source.dtype) == (torch.int64,) * 3
    assert cf.kind.tolist() == [0, 0, 3] and cf.seed.tolist() == [0, 0, 5]
    assert cf.source[:2].tolist() == [list(range(plan.prompt_len))] * 2
    assert plan.edit(1).counterfactual_kinds == frozenset({0, 3})


def test_per_head_values_of_a_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"^per-head values must be a scalar, \[H\] or \[rows, H\]; got \(1, 3\)$"):
        make_plan().add_bias([1], [0], Segment.IMAGE, torch.ones(3))  # 4 heads


def test_float_mask_follows_the_forward_shape():
    """One plan, a prefill then decode steps (the backends' shared additive mask is cached per shape): each
    call is the mask of its own shape, 0 where ``allowed`` and -inf elsewhere, with the sliding window."""
    plan = make_plan()
    for Lq, Lk, window in ((L0, L0, None), (L0, L0, None), (1, L0 + 1, None), (1, L0 + 2, None), (1, L0 + 2, 4),
                           (1, L0 + 2, 4), (1, L0 + 2, None)):
        allowed = plan.windowed(plan.allowed(Lq, Lk), window)
        want = torch.where(allowed, 0.0, float("-inf"))
        got = plan.float_mask(Lq, Lk, torch.float32, window)
        assert got.shape == (len(PADS), 1, Lq, Lk) and torch.equal(got, want), (Lq, Lk, window)
    half = plan.float_mask(1, L0 + 2, torch.bfloat16)  # the model's dtype, as sdpa wants it
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), plan.float_mask(1, L0 + 2, torch.float32))


def test_several_generated_queries_see_every_key_up_to_their_own():
    """Two generated tokens in one forward (queries L0 and L0 + 1): causal over the non-padding keys, whatever
    the prompt mask."""
    plan = make_plan()
    Lk = L0 + 2
    hand = torch.tensor([[[p <= j <= q for j in range(Lk)] for q in (L0, L0 + 1)] for p in PADS])
    assert torch.equal(plan.allowed(2, Lk)[:, 0], hand)


def test_stats_requests_by_hand():
    assert not StatsRequest().wants(0) and not StatsRequest(layers=frozenset({0})).wants(0)
    some = StatsRequest(segment_mass=True, layers=frozenset({1}))
    assert (some.wants(0), some.wants(1)) == (False, True)
    assert StatsRequest(last_row=True).wants(5)
