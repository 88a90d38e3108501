"""Every plan feature, reference and torch backends vs the float64 loop oracle (oracle.py).

Tolerance: 2e-5 absolute on outputs of unit-scale values (float32 backends vs float64 oracle).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from oracle import oracle_attention
from plan_cases import L0, PADS, D, make_plan, make_qkv

from clearsight.kernels.context import use_plan
from clearsight.kernels.plan import Counterfactual, PlanConflictError, QueryRows, Segment
from clearsight.kernels.reference import reference_attention
from clearsight.kernels.torch_backend import torch_attention

BACKENDS = {"reference": reference_attention, "torch": torch_attention}
ATOL = 2e-5


def _bias(plan):
    plan.add_bias([1], [0, 2], Segment.IMAGE, torch.tensor([0.5, -0.3, 1.0, 0.0]))
    plan.add_bias([1], [1], Segment.TEXT, 0.7)


def _abs_last(plan):
    plan.add_abs_bias([1], [0, 1], Segment.IMAGE, 0.4, QueryRows.LAST, owner="pai")


def _abs_all(plan):
    plan.add_abs_bias([1], [1, 2], Segment.IMAGE_SINK, torch.tensor([0.2, 0.5, 0.1, 0.9]), QueryRows.ALL, "x")


def _redistribute(plan):
    plan.set_redistribute([1], [0, 1, 2], p_move=0.6, rho=0.3, min_image_mass=0.1,
                          query_rows=QueryRows.AFTER_IMAGE, owner="var")


def _redistribute_partial(plan):
    # row 1 untouched, row 2 with a strict head test that some heads fail
    plan.set_redistribute([1], [0], p_move=1.0, rho=0.0, min_image_mass=0.0, query_rows="all", owner="var")
    plan.set_redistribute([1], [2], p_move=0.3, rho=0.6, min_image_mass=0.3, query_rows="all", owner="var")


def _head_scale(plan):
    plan.scale_heads(1, [0, 2], torch.tensor([2.0, 1.0, 0.5, 3.0]))


def _segments(plan):
    seg = plan.segment[1].clone()
    seg[PADS[1] + 5] = Segment.IMAGE_SINK
    plan.set_segments(1, [1], seg, owner="var")
    _redistribute(plan)


def _mask(plan):
    # concentric-style ranks inside the image block of row 0, image queries see later text in row 2
    rank = torch.arange(L0).clone()
    rank[2:8] = torch.tensor([2, 2, 3, 3, 2, 2])
    limit = rank.clone()
    plan.set_mask([0], rank.unsqueeze(0), limit.unsqueeze(0), owner="cca")
    limit2 = torch.arange(L0).clone()
    p = PADS[2]
    limit2[p + 2 : p + 8] = L0 - 1
    plan.set_mask([2], torch.arange(L0).unsqueeze(0), limit2.unsqueeze(0), owner="cca")


def _aki(plan):
    """AKI's modality-mutual mask (mma_tables) on rows 0 and 2: image queries causal among the image, plus the
    question after it (up to the last two tokens, the assistant marker); row 1 keeps the causal mask."""
    from clearsight.mitigations.mma import mma_tables

    L0 = plan.prompt_len
    rows = [0, 2]
    tables = [mma_tables(plan.layouts[b].image_spans, L0 - 2, L0) for b in rows]
    rank, limit, lo2, hi2 = (torch.stack(t) for t in zip(*tables))
    plan.set_mask(rows, rank, limit, owner="mma", q_lo2=lo2, q_hi2=hi2)


def aki_hand_mask(L0: int, Lq: int, Lk: int) -> torch.Tensor:
    """[B, Lq, Lk] the mask of ``_aki`` written out by hand: key j >= pad, and j <= i, or (rows 0 and 2) i an
    image query (pad+2 <= i < pad+8) and j a question token after the image (pad+8 <= j < L0-2); padding
    query rows see themselves only."""
    out = torch.zeros(len(PADS), Lq, Lk, dtype=torch.bool)
    for b, p in enumerate(PADS):
        for qi in range(Lk - Lq, Lk):
            for j in range(Lk):
                if qi < p:
                    ok = j == qi
                else:
                    mutual = b != 1 and p + 2 <= qi < p + 8 and p + 8 <= j < L0 - 2
                    ok = j >= p and (j <= qi or mutual)
                out[b, qi - (Lk - Lq), j] = ok
    return out


def masked_softmax_attention(q, k, v, allowed, scale) -> torch.Tensor:
    """Plain attention in float64 under a boolean mask [B, Lq, Lk]: -> [B, Lq, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    a = torch.softmax(s.masked_fill(~allowed.unsqueeze(1), float("-inf")), -1)
    return (a @ v).transpose(1, 2)


def _counterfactual(kind):
    def f(plan):
        plan.set_counterfactual([1], [0, 2], kind, seed=7, owner="causalmm")
    return f


def _counterfactual_mixed(plan):
    """Joined CausalMM requests, each row its own kind on the same layer (uniform, shuffled, reversed): each
    row's distribution is chosen among the others' (a single kind takes a shortcut)."""
    for row, kind in enumerate(("uniform", "shuffled", "reversed")):
        plan.set_counterfactual([1], [row], kind, seed=7 + row, owner="causalmm")


def _combined(plan):
    _bias(plan)
    _abs_last(plan)
    _redistribute(plan)
    _head_scale(plan)
    _mask(plan)


FEATURES = {
    "empty": lambda plan: plan.add_bias([0], [0], Segment.TEXT, 0.0),  # edits another layer only
    "bias": _bias,
    "abs_bias_last": _abs_last,
    "abs_bias_all": _abs_all,
    "redistribute": _redistribute,
    "redistribute_partial": _redistribute_partial,
    "head_scale": _head_scale,
    "segments": _segments,
    "mask": _mask,
    "aki_mask": _aki,
    **{f"counterfactual_{k.name.lower()}": _counterfactual(k) for k in Counterfactual if k},
    "counterfactual_mixed": _counterfactual_mixed,
    "combined": _combined,
}


def _run(fn, module, plan, q, k, v):
    mask = plan.allowed(q.shape[2], k.shape[2])
    with use_plan(plan):
        out, weights = fn(module, q, k, v, mask, scaling=D**-0.5)
    assert weights is None
    return out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_backend_matches_formula(backend, feature, phase, module):
    plan = make_plan()
    FEATURES[feature](plan)
    Lk = L0 if phase == "prefill" else L0 + 3
    Lq = L0 if phase == "prefill" else 1
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=zlib.crc32(feature.encode()) % 1000)
    out = _run(BACKENDS[backend], module, plan, q, k, v)
    expect = oracle_attention(q, k, v, plan, layer=1, scale=D**-0.5)
    assert out.shape == expect.shape
    valid = torch.ones(len(PADS), Lq, dtype=torch.bool)
    if phase == "prefill":  # padding query rows are never read
        for b, p in enumerate(PADS):
            valid[b, :p] = False
    diff = (out.double() - expect).abs()[valid]
    assert diff.max().item() < ATOL, f"{backend}/{feature}/{phase}: max diff {diff.max().item():.2e}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("feature", ["empty", "combined", "counterfactual_random"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_sliding_window_matches_formula(backend, feature, phase, module):
    """A sliding-window layer (``sliding_window`` from the model, 4 keys here: shorter than the image block):
    the plan's edits over the window's keys only, as the oracle's loop writes it."""
    plan = make_plan()
    FEATURES[feature](plan)
    Lq, Lk = (L0, L0) if phase == "prefill" else (1, L0 + 3)
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=5)
    hf_mask = plan.windowed(plan.allowed(Lq, Lk), 4)  # transformers' mask of a sliding layer has the window too
    with use_plan(plan):
        out, _ = BACKENDS[backend](module, q, k, v, hf_mask, scaling=D**-0.5, sliding_window=4)
    expect = oracle_attention(q, k, v, plan, layer=1, scale=D**-0.5, window=4)
    unwindowed = oracle_attention(q, k, v, plan, layer=1, scale=D**-0.5)
    valid = torch.ones(len(PADS), Lq, dtype=torch.bool)
    if phase == "prefill":
        for b, p in enumerate(PADS):
            valid[b, :p] = False
    assert (out.double() - expect).abs()[valid].max().item() < ATOL
    assert (unwindowed - expect).abs()[valid].max().item() > 1e-2  # the window matters in this case


def test_edits_change_output(module):
    """Guard against an oracle and backends that both ignore the plan."""
    q, k, v = make_qkv(len(PADS), L0, L0)
    base = _run(torch_attention, module, make_plan(), q, k, v)
    for name, fn in FEATURES.items():
        if name == "empty":
            continue
        plan = make_plan()
        fn(plan)
        out = _run(torch_attention, module, plan, q, k, v)
        assert (out - base).abs().max() > 1e-3, name


def test_redistribution_preserves_mass_and_moves_fraction(module):
    plan = make_plan()
    plan.set_redistribute([1], [0, 1, 2], p_move=0.6, rho=0.0, min_image_mass=0.0, query_rows="all", owner="var")
    plan.stats.segment_mass = True
    q, k, v = make_qkv(len(PADS), L0, L0, seed=3)
    _run(reference_attention, module, plan, q, k, v)
    after = plan.stats_out.segment_mass[1][0]
    base = make_plan()
    base.stats.segment_mass = True
    _run(reference_attention, module, base, q, k, v)
    before = base.stats_out.segment_mass[1][0]
    for b, p in enumerate(PADS):
        sink_before = before[b, :, p:, Segment.IMAGE_SINK] + before[b, :, p:, Segment.TEXT_SINK]
        sink_after = after[b, :, p:, Segment.IMAGE_SINK] + after[b, :, p:, Segment.TEXT_SINK]
        torch.testing.assert_close(after[b, :, p:].sum(-1), torch.ones_like(sink_after))  # row mass kept
        rows = before[b, :, p:, Segment.IMAGE] > 0
        torch.testing.assert_close(sink_after[rows], 0.4 * sink_before[rows])  # exactly 60 % moved
        gained = after[b, :, p:, Segment.IMAGE] - before[b, :, p:, Segment.IMAGE]
        torch.testing.assert_close(gained[rows], 0.6 * sink_before[rows])


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_torch_stats_match_reference(phase, module):
    plan_r, plan_t = make_plan(), make_plan()
    for plan in (plan_r, plan_t):
        _combined(plan)
        plan.stats.segment_mass = True
        plan.stats.last_row = True
    Lk = L0 if phase == "prefill" else L0 + 2
    Lq = L0 if phase == "prefill" else 1
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=5)
    _run(reference_attention, module, plan_r, q, k, v)
    _run(torch_attention, module, plan_t, q, k, v)
    for b, p in enumerate(PADS):
        start = p if phase == "prefill" else 0
        torch.testing.assert_close(plan_t.stats_out.segment_mass[1][0][b, :, start:],
                                   plan_r.stats_out.segment_mass[1][0][b, :, start:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plan_t.stats_out.last_row[1][0], plan_r.stats_out.last_row[1][0], atol=1e-6, rtol=1e-5)


def test_unedited_layer_is_stock_sdpa(module):
    """A layer the plan does not touch returns exactly what transformers' SDPA returns."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = make_plan()
    plan.add_bias([0], [0], Segment.IMAGE, 1.0)
    q, k, v = make_qkv(len(PADS), L0, L0)
    mask = plan.allowed(L0, L0)
    stock, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D**-0.5)
    assert torch.equal(_run(torch_attention, module, plan, q, k, v), stock)


def test_conflicting_masks_rejected():
    plan = make_plan()
    _mask(plan)
    with pytest.raises(PlanConflictError, match="'mma' and 'cca' both set the attention mask"):
        plan.set_mask([0], torch.arange(L0).unsqueeze(0), torch.arange(L0).unsqueeze(0), owner="mma")


def test_layer_out_of_range():
    with pytest.raises(ValueError, match="layer 5 out of range"):
        make_plan().add_bias([5], [0], Segment.IMAGE, 1.0)


def test_uniform_hash_is_uniform():
    from clearsight.kernels.plan import uniform_hash

    u = uniform_hash(torch.tensor(3), torch.arange(4).view(-1, 1), torch.tensor(0), torch.arange(5000).view(1, -1))
    assert 0 < u.min() and u.max() <= 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    assert len(set(u.flatten().tolist())) > 19000  # no short cycles


@pytest.mark.parametrize("kind", ["random", "shuffled"])
def test_counterfactual_draws_do_not_depend_on_padding(kind, module):
    """The same row, left-padded by 0 or by 3, gets the same counterfactual attention."""
    outs = []
    for pad in (0, 3):
        plan = make_plan(pads=(pad,), L=L0)
        plan.set_counterfactual([1], [0], kind, seed=5, owner="causalmm")
        q, k, v = make_qkv(1, L0 - 3, L0 - 3, seed=9)
        zeros = torch.zeros(1, q.shape[1], 3, q.shape[3]), torch.zeros(1, k.shape[1], 3, k.shape[3])
        q = torch.cat([zeros[0], q], 2) if pad else torch.cat([q, zeros[0]], 2)
        k = torch.cat([zeros[1], k], 2) if pad else torch.cat([k, zeros[1]], 2)
        v = torch.cat([zeros[1], v], 2) if pad else torch.cat([v, zeros[1]], 2)
        out = _run(reference_attention, module, plan, q, k, v)
        outs.append(out[:, 3:] if pad else out[:, : L0 - 3])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("batched_draws", [True, False])
def test_counterfactuals_on_every_layer_of_one_forward(backend, phase, batched_draws, module, monkeypatch):
    """Several layers, seeds and kinds in one forward, one layer with its own segments: the per-forward grid
    and the random draws (batched over layers, or one layer at a time as at a long prefill) give each layer
    exactly its own counterfactual (oracle per layer)."""
    from types import SimpleNamespace

    from plan_cases import NUM_LAYERS

    import clearsight.kernels.plan as plan_module

    if not batched_draws:
        monkeypatch.setattr(plan_module, "_BATCHED_DRAWS_MAX", 0)

    plan = make_plan()
    plan.set_counterfactual([0], [0, 2], "random", seed=3, owner="causalmm")
    plan.set_counterfactual([1], [0], "random", seed=11, owner="causalmm")
    plan.set_counterfactual([1], [1], "uniform", seed=0, owner="causalmm")  # two kinds in one layer
    plan.set_counterfactual([2], [1, 2], "random", seed=11, owner="causalmm")
    seg = plan.segment[0].clone()
    seg[PADS[0] + 9] = Segment.IMAGE  # layer 1's own segments: one more image key in row 0 (its grid is its own)
    plan.set_segments(1, [0], seg, owner="var")
    Lk = L0 if phase == "prefill" else L0 + 3
    Lq = L0 if phase == "prefill" else 1
    for layer in range(NUM_LAYERS):
        q, k, v = make_qkv(len(PADS), Lq, Lk, seed=layer)
        out = _run(BACKENDS[backend], SimpleNamespace(**{**vars(module), "layer_idx": layer}), plan, q, k, v)
        expect = oracle_attention(q, k, v, plan, layer=layer, scale=D**-0.5)
        diff = (out.double() - expect).abs()
        for b, p in enumerate(PADS):
            if phase == "prefill":
                diff[b, :p] = 0  # padding query rows are never read
        assert diff.max().item() < ATOL, f"layer {layer}: max diff {diff.max().item():.2e}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("phase", ["prefill", "decode", "prompt_and_generated"])
def test_aki_mask_equals_the_hand_built_mask(backend, phase, module):
    """prompt_and_generated: one forward over the prompt and 3 generated tokens (the generated queries have
    no second interval)."""
    plan = make_plan()
    _aki(plan)
    Lq, Lk = {"prefill": (L0, L0), "decode": (1, L0 + 3), "prompt_and_generated": (L0 + 3, L0 + 3)}[phase]
    hand = aki_hand_mask(L0, Lq, Lk)
    assert torch.equal(plan.allowed(Lq, Lk)[:, 0], hand)
    if phase == "prefill":  # the second interval is there: an image query sees the question, not the next image key
        p = PADS[0]
        assert hand[0, p + 2, L0 - 3] and not hand[0, p + 2, p + 3] and not hand[1, PADS[1] + 2, L0 - 3]
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=5)
    out = _run(BACKENDS[backend], module, plan, q, k, v)
    want = masked_softmax_attention(q, k, v, hand, D**-0.5)
    valid = torch.ones(len(PADS), Lq, dtype=torch.bool)
    if phase != "decode":
        for b, p in enumerate(PADS):
            valid[b, :p] = False
    assert (out.double() - want).abs()[valid].max().item() < ATOL
