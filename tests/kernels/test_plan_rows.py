"""The plan's row operations (select_rows, pad_left, trim_left, concatenate, extend_prompt) against the plan
they came from: a row's attention output is the same after the operation (issue 22; these are what the
generation loop does when requests leave, join and are compacted). Every plan feature of test_backends, torch
backend, no model: fast enough for the mutation run of kernels/plan.py (scripts/mutation.py, module plan)."""

from __future__ import annotations

import pytest
import torch
from plan_cases import L0, PADS, D, make_plan, make_qkv
from test_backends import FEATURES

from clearsight.kernels.context import use_plan
from clearsight.kernels.plan import AttentionPlan, PlanConflictError, default_position_ids
from clearsight.kernels.torch_backend import torch_attention

ATOL = 1e-5


def _out(module, plan, q, k, v):
    with use_plan(plan):
        out, _ = torch_attention(module, q, k, v, plan.allowed(q.shape[2], k.shape[2]), scaling=D**-0.5)
    return out  # [B, Lq, H, D]


def _valid(pads, Lq):
    """Query rows that are not padding (padding rows are never read)."""
    ok = torch.ones(len(pads), Lq, dtype=torch.bool)
    for b, p in enumerate(pads):
        ok[b, :p] = False
    return ok


def _edited(feature):
    plan = make_plan()
    FEATURES[feature](plan)
    return plan


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_select_rows_keeps_each_rows_output(feature, module):
    plan = _edited(feature)
    q, k, v = make_qkv(len(PADS), L0, L0, seed=1)
    full = _out(module, plan, q, k, v)
    keep = [2, 0]
    plan.select_rows(keep)
    assert plan.batch == 2 and [lay.pad for lay in plan.layouts] == [PADS[i] for i in keep]
    got = _out(module, plan, q[keep], k[keep], v[keep])
    ok = _valid([PADS[i] for i in keep], L0)
    assert (got - full[keep]).abs()[ok].max() < ATOL


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_pad_left_then_trim_left_keep_the_output(feature, module):
    n = 2
    plan = _edited(feature)
    q, k, v = make_qkv(len(PADS), L0, L0, seed=2)
    base = _out(module, plan, q, k, v)
    noise = make_qkv(len(PADS), n, n, seed=3)  # what padding keys hold must not matter
    qp, kp, vp = (torch.cat([a, b], 2) for a, b in zip(noise, (q, k, v)))
    plan.pad_left(n)
    assert plan.prompt_len == L0 + n and plan.pad.tolist() == [p + n for p in PADS]
    # each row's layout moves with its keys (make_plan: the image at pad + 2 .. pad + 8)
    assert [(lay.pad, lay.image_spans, lay.grids) for lay in plan.layouts] == [
        (p + n, ((p + n + 2, p + n + 8),), ((2, 3),)) for p in PADS]
    padded = _out(module, plan, qp, kp, vp)
    ok = _valid(PADS, L0)
    assert (padded[:, n:] - base).abs()[ok].max() < ATOL
    plan.trim_left(n)
    assert plan.prompt_len == L0 and plan.pad.tolist() == list(PADS)
    assert [(lay.pad, lay.image_spans) for lay in plan.layouts] == [(p, ((p + 2, p + 8),)) for p in PADS]
    assert (_out(module, plan, q, k, v) - base).abs()[ok].max() < ATOL
    with pytest.raises(ValueError, match="only leading padding"):
        plan.trim_left(min(PADS) + 1)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_concatenate_keeps_both_sides_rows(feature, module):
    """A plan with the feature joined with an unedited plan (and the other way round)."""
    edited, plain = _edited(feature), make_plan()
    qa, ka, va = make_qkv(len(PADS), L0, L0, seed=4)
    qb, kb, vb = make_qkv(len(PADS), L0, L0, seed=5)
    out_a, out_b = _out(module, edited, qa, ka, va), _out(module, plain, qb, kb, vb)
    ok = _valid(PADS + PADS, L0)
    for first, second, expect in ((edited, plain, (out_a, out_b)), (plain, edited, (out_b, out_a))):
        joined = AttentionPlan.concatenate(first, second)
        assert joined.batch == 2 * len(PADS)
        q, k, v = ((torch.cat([a, b]) if first is edited else torch.cat([b, a])) for a, b in
                   ((qa, qb), (ka, kb), (va, vb)))
        got = _out(module, joined, q, k, v)
        assert (got - torch.cat(expect)).abs()[ok].max() < ATOL


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_extend_prompt_changes_nothing_a_query_sees(feature, module):
    """Generated keys turned into prompt columns: a decode step attends exactly as before."""
    plan = _edited(feature)
    Lk = L0 + 3
    q, k, v = make_qkv(len(PADS), 1, Lk, seed=6)
    before = _out(module, plan, q, k, v)
    plan.extend_prompt(Lk)
    assert plan.prompt_len == Lk
    assert (_out(module, plan, q, k, v) - before).abs().max() < ATOL
    with pytest.raises(ValueError, match="shorter than the prompt"):
        plan.extend_prompt(L0)


# ---------------------------------------------------------------- position ids (CCA), by hand
# two rows of 10 keys, left-padded by 0 and 2; row 1 gets CCA-like positions (image tokens sharing one)
POS_PADS, POS_L = (0, 2), 10
DEFAULT0 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
DEFAULT1 = [1, 1, 0, 1, 2, 3, 4, 5, 6, 7]  # transformers' generate: padding positions are 1
CUSTOM = [1, 1, 0, 1, 2, 2, 2, 3, 4, 5]


def _positions_plan() -> AttentionPlan:
    plan = make_plan(POS_PADS, POS_L)
    plan.set_position_ids([1], torch.tensor([CUSTOM]), owner="cca")
    return plan


def test_position_ids_default_after_padding_and_owned_per_row():
    assert default_position_ids(torch.tensor([0, 2]), 4).tolist() == [[0, 1, 2, 3], [1, 1, 0, 1]]
    plan = _positions_plan()
    assert plan.position_ids.tolist() == [DEFAULT0, CUSTOM]
    assert plan.owner("position ids", -1, 1) == "cca" and plan.owner("position ids", -1, 0) is None
    with pytest.raises(PlanConflictError, match=r"^'other' and 'cca' both set the attention position ids \(row 1\); "
                       "they cannot be combined in one request: drop one of them$"):
        plan.set_position_ids([1], torch.tensor([DEFAULT1]), owner="other")
    plan.set_position_ids([0], torch.tensor([DEFAULT0[::-1]]), owner="other")  # another row: allowed
    assert plan.position_ids.tolist() == [DEFAULT0[::-1], CUSTOM]


def test_row_operations_carry_each_rows_position_ids():
    plan = _positions_plan()
    plan.select_rows([1, 0])
    assert plan.position_ids.tolist() == [CUSTOM, DEFAULT0]
    plan.pad_left(2)  # new padding keys get position 1
    assert plan.position_ids.tolist() == [[1, 1, *CUSTOM], [1, 1, *DEFAULT0]]
    plan.trim_left(2)
    assert plan.position_ids.tolist() == [CUSTOM, DEFAULT0]
    plan.extend_prompt(POS_L + 3)  # generated keys continue each row's last position
    assert plan.position_ids.tolist() == [[*CUSTOM, 6, 7, 8], [*DEFAULT0, 10, 11, 12]]


def test_concatenate_gives_the_unedited_side_its_default_positions():
    plain = make_plan(POS_PADS, POS_L)
    assert AttentionPlan.concatenate(plain, make_plan(POS_PADS, POS_L)).position_ids is None
    assert AttentionPlan.concatenate(_positions_plan(), plain).position_ids.tolist() == [
        DEFAULT0, CUSTOM, DEFAULT0, DEFAULT1]
    joined = AttentionPlan.concatenate(plain, _positions_plan())
    assert joined.position_ids.tolist() == [DEFAULT0, DEFAULT1, DEFAULT0, CUSTOM]
    assert joined.owner("position ids", -1, 3) == "cca" and joined.owner("position ids", -1, 1) is None
