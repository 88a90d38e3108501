"""Single-pass edits compose with branch methods: every branch row that receives edits gets them (from its
own layout and hidden states), rows without an image get no image edits, zero strength gives the branch
method alone, mixed batches equal solo runs, and impossible combinations fail naming both methods."""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal

import pytest
import torch
from tinyworld import make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.kernels.plan import PlanConflictError, Segment, default_position_ids
from clearsight.mitigations import Branch, Mitigation, RequestContext
from clearsight.mitigations.cca import CCA
from clearsight.mitigations.imbalanced import Imbalanced
from clearsight.mitigations.mma import MMA
from clearsight.mitigations.pai import PAI
from clearsight.mitigations.var import VAR
from clearsight.mitigations.vhr import VHR, select_heads

torch.set_num_threads(2)
PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=3, ignore_eos=True)
ONE = DecodeSpec(max_new_tokens=1, ignore_eos=True)  # the loop drops no row: the plan keeps every prefill row
TAU = 6.0  # hidden size 64: |x_d / rms(x)| <= 8


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CCA / MMA on a stock checkpoint warn
        yield


def _req(seed: int = 1) -> dict:
    return {"prompt": PROMPT, "image": make_image(seed)}


def _span(lvlm) -> tuple[int, int]:
    """Image span of PROMPT + one image, unpadded."""
    enc = lvlm.adapter.encode([lvlm.adapter.chat_prompt(PROMPT, True)], [make_image(1)])
    return lvlm.adapter.row_layouts(enc)[0].image_spans[0]


def _tokens(lvlm, mits, req=None, decode=DECODE) -> list[int]:
    return generate(lvlm, [req or _req()], mits, decode=decode)[0].token_ids


def _recording(cls, store: list, hook: str = "apply"):
    """A subclass that keeps (ctx, rows at that moment) when ``hook`` (apply / install) runs."""

    def rec(self, ctx):
        store.append((ctx, dict(ctx.rows)))
        return getattr(cls, hook)(self, ctx)

    return type(f"Rec{cls.__name__}", (cls,), {hook: rec})


@contextlib.contextmanager
def planted(lvlm, per_row: dict[int, list[int]] | None = None, from_end: list[int] | None = None, dim: int = 5):
    """Massive activations in dimension ``dim`` of the residual stream entering layer 1 at prefill:
    ``per_row``: batch row -> token indices; ``from_end``: offsets from the end, in every row (batch-invariant)."""
    def fn(layer, x):
        if layer != 1 or x.shape[1] == 1:
            return None
        x = x.clone()
        for row, toks in (per_row or {}).items():
            x[row, toks, dim] = 1000.0
        for off in [o for o in from_end or [] if o <= x.shape[1]]:
            x[:, x.shape[1] - off, dim] = 1000.0
        return x

    h = lvlm.adapter.hook_layer_inputs(fn)
    try:
        yield
    finally:
        h.remove()


def test_edit_rows_follow_receives_edits():
    rows = {"main": 0, "vcd.noised": 1, "vhr.noimg": 2, "other.row": 3}
    ctx = RequestContext(lvlm=None, request=None, index=0, rows=rows, layouts=[], plan=None,  # type: ignore[arg-type]
                         decode=None, image="scene.png")  # type: ignore[arg-type]
    assert ctx.edit_rows == [0, 1, 2, 3]  # no specs known: every row receives edits
    ctx.branch_specs.update({"vcd.noised": Branch("noised"), "vhr.noimg": VHR().branches(ctx)[0]})
    assert ctx.branch_specs["vhr.noimg"].receives_edits is False
    assert ctx.edit_rows == [0, 1, 3] and list(ctx.edit_names) == ["main", "vcd.noised", "other.row"]


class Probe(Mitigation):
    """A branch method with a measurement row (receives_edits=False) and an ordinary row."""

    name: Literal["probe_rows"] = "probe_rows"
    kind = "branch"

    def branches(self, ctx):
        return [Branch("measure", receives_edits=False), Branch("edited")]


def test_measurement_rows_receive_no_edits():
    lvlm = tiny("tiny-llava")
    got: list = []
    generate(lvlm, [_req()], [_recording(PAI, got)(gamma=1.0), Probe()], decode=ONE)
    ctx, rows = got[0]
    # the decoding loop must fill branch_specs: without them every row would receive the edits (edit_rows)
    assert set(ctx.branch_specs) == {"probe_rows.measure", "probe_rows.edited"}
    assert list(ctx.edit_names) == ["main", "probe_rows.edited"]
    ab = ctx.plan.layer_edit(2).abs_bias
    assert float(ab[rows["probe_rows.edited"], 0, Segment.IMAGE]) == pytest.approx(0.2)
    assert float(ab[rows["probe_rows.measure"]].abs().sum()) == 0.0


def test_pai_and_vcd():
    lvlm = tiny("tiny-llava")
    got: list = []
    generate(lvlm, [_req()], [_recording(PAI, got)(), "vcd"], decode=ONE)
    ctx, rows = got[0]
    for layer in (2, 3):
        e = ctx.plan.layer_edit(layer)
        for name in ("main", "vcd.noised"):  # the noised branch is boosted like the main row
            assert e.abs_bias[rows[name], :, Segment.IMAGE].tolist() == [pytest.approx(0.2)] * 4
            assert e.abs_bias[rows[name], :, Segment.IMAGE_SINK].tolist() == [pytest.approx(0.2)] * 4
            assert int(e.abs_from[rows[name]]) == ctx.plan.prompt_len - 1
        assert float(e.abs_bias[rows["pai.noimg"]].abs().sum()) == 0.0  # no image: no boost
    assert ctx.plan.layer_edit(1) is None
    assert _tokens(lvlm, ["pai:alpha=0,gamma=1", "vcd"]) == _tokens(lvlm, ["vcd"])


def test_var_and_vcd_detect_sinks_per_row():
    lvlm = tiny("tiny-llava")
    s, _ = _span(lvlm)
    got: list = []
    spec = _recording(VAR, got, "install")(tau=TAU, sink_dims=[5], layers=[1, 2], rho=0.0, min_image_mass=0.0)
    # rows: main 0, vcd.noised 1 (same length, no padding); each row gets its own image sink
    with planted(lvlm, per_row={0: [0, s + 1], 1: [0, s + 4]}):
        generate(lvlm, [_req()], [spec, "vcd"], decode=ONE)
    ctx, rows = got[0]
    assert rows == {"main": 0, "vcd.noised": 1}
    state = ctx.state["var"]
    assert state["sinks"][1] == [0, s + 1] and state["branch_sinks"]["vcd.noised"][1] == [0, s + 4]
    e = ctx.plan.layer_edit(1)
    assert int(e.segment[0, s + 1]) == Segment.IMAGE_SINK and int(e.segment[0, s + 4]) == Segment.IMAGE
    assert int(e.segment[1, s + 4]) == Segment.IMAGE_SINK and int(e.segment[1, s + 1]) == Segment.IMAGE
    assert int(e.segment[1, 0]) == Segment.TEXT_SINK
    assert e.redistribute.p_move.tolist() == [pytest.approx(0.6)] * 2
    assert e.redistribute.rows_from.tolist() == [ctx.layouts[0].image_end, ctx.layouts[1].image_end]
    # the residual stream carries the planted activations on to layer 2: each row keeps its own sinks there
    assert state["sinks"][2] == [0, s + 1] and state["branch_sinks"]["vcd.noised"][2] == [0, s + 4]


def test_var_and_m3id_leave_the_no_image_row_alone():
    lvlm = tiny("tiny-llava")
    s, _ = _span(lvlm)
    got: list = []
    spec = _recording(VAR, got, "install")(tau=TAU, sink_dims=[5], layers=[1], rho=0.0, min_image_mass=0.0)
    with planted(lvlm, per_row={0: [0, s + 1], 1: [0, s + 1]}):  # row 1: m3id's no-image row (padded)
        generate(lvlm, [_req()], [spec, "m3id"], decode=ONE)
        assert _tokens(lvlm, ["var:p=0,sink_dims=5,tau=6", "m3id:lam=0.5"]) == _tokens(lvlm, ["m3id:lam=0.5"])
    ctx, rows = got[0]
    noimg = rows["m3id.noimg"]
    assert not ctx.layouts[noimg].image_spans and "branch_sinks" not in ctx.state["var"]
    e = ctx.plan.layer_edit(1)
    assert int(e.segment[rows["main"], s + 1]) == Segment.IMAGE_SINK
    assert torch.equal(e.segment[noimg], ctx.plan.segment[noimg])
    assert float(e.redistribute.p_move[noimg]) == 0.0 and float(e.redistribute.p_move[rows["main"]]) > 0


def _hand_vhr(lvlm, req, alpha: float = 2.0) -> list[int]:
    """VHR + VCD by hand: VCD alone plus a head hook that measures against a separate no-image request and
    reinforces the main row *and* the noised row (rows 0 and 1; row 2 is the no-image request)."""
    chosen: dict[int, torch.Tensor] = {}

    def by_hand(layer, x):
        if layer not in (1, 2, 3):
            return None
        if x.shape[1] > 1:
            chosen[layer] = select_heads(x[0, -1], x[2, -1], alpha)[1].to(x.dtype)
        out = x.clone()
        out[:2] = out[:2] * chosen[layer].view(1, 1, -1, 1)
        return out

    with lvlm.adapter.hook_head_outputs(by_hand):
        return generate(lvlm, [{**req, "mitigations": ["vcd"]}, {"prompt": req["prompt"]}], decode=DECODE)[0].token_ids


def test_vhr_and_vcd():
    lvlm = tiny("tiny-llava")
    req = _req(2)
    got: list = []
    generate(lvlm, [req], [_recording(VHR, got, "install")(), "vcd"], decode=ONE)
    ctx, rows = got[0]
    for layer in (1, 2, 3):
        scale = ctx.state["vhr"][layer]["scale"]
        hs = ctx.plan.layer_edit(layer).head_scale
        assert hs[rows["main"]].tolist() == scale.tolist() and hs[rows["vcd.noised"]].tolist() == scale.tolist()
        assert hs[rows["vhr.noimg"]].tolist() == [1.0] * 4  # the measurement row is never reinforced
    assert _tokens(lvlm, ["vhr", "vcd"], req) == _hand_vhr(lvlm, req)
    assert _tokens(lvlm, ["vhr:alpha=1", "vcd"], req) == _tokens(lvlm, ["vcd"], req)


def test_vhr_and_m3id_scale_the_no_image_branch():
    lvlm = tiny("tiny-qwen2-vl")
    got: list = []
    generate(lvlm, [_req(3)], [_recording(VHR, got, "install")(text_pass="probe"), "m3id"], decode=ONE)
    ctx, rows = got[0]
    layer = max(ctx.state["vhr"])
    hs = ctx.plan.layer_edit(layer).head_scale
    assert hs[rows["m3id.noimg"]].tolist() == ctx.state["vhr"][layer]["scale"].tolist() != [1.0] * 4


def test_cca_and_mma_with_branches():
    lvlm = tiny("tiny-llava")
    got: list = []
    generate(lvlm, [_req()], [_recording(CCA, got)(), "vcd", "m3id"], decode=ONE)
    ctx, rows = got[0]
    plan, main, noised, noimg = ctx.plan, rows["main"], rows["vcd.noised"], rows["m3id.noimg"]
    assert not torch.equal(plan.position_ids[main], default_position_ids(plan.pad, plan.prompt_len)[main])
    assert torch.equal(plan.position_ids[noised], plan.position_ids[main])  # same layout: same tables
    assert torch.equal(plan.k_rank[noised], plan.k_rank[main]) and torch.equal(plan.q_limit[noised], plan.q_limit[main])
    assert torch.equal(plan.position_ids[noimg], default_position_ids(plan.pad, plan.prompt_len)[noimg])
    assert plan.k_rank[noimg].tolist() == list(range(plan.prompt_len)) == plan.q_limit[noimg].tolist()
    got.clear()
    generate(lvlm, [_req()], [_recording(MMA, got)(), "m3id", "vcd"], decode=ONE)
    ctx, rows = got[0]
    plan = ctx.plan
    assert (plan.q_hi2[rows["main"]] >= 0).any()  # image queries' second interval (the question)
    assert torch.equal(plan.q_hi2[rows["vcd.noised"]], plan.q_hi2[rows["main"]])
    assert (plan.q_hi2[rows["m3id.noimg"]] < 0).all()  # no image: causal, no second interval
    assert torch.equal(plan.q_limit[rows["m3id.noimg"]], plan.k_rank[rows["m3id.noimg"]])
    with pytest.raises(PlanConflictError, match="'cca' and 'mma' cannot be combined in one request: both set "
                                                "the attention mask"):
        generate(lvlm, [_req()], ["cca", "vcd", "mma"], decode=ONE)


def test_imbalanced_with_branches_and_refusals():
    lvlm = tiny("tiny-llava")
    got: list = []
    generate(lvlm, [_req()], [_recording(Imbalanced, got)(head_spread=0.0), "m3id", "vcd"], decode=ONE)
    ctx, rows = got[0]
    main, noised, noimg = rows["main"], rows["vcd.noised"], rows["m3id.noimg"]
    assert set(ctx.state["imbalanced"]["rows"]) == {"main", "vcd.noised"}
    pm, pn = ctx.layouts[main].pad, ctx.layouts[noised].pad
    for layer in (2, 3):
        e = ctx.plan.layer_edit(layer)
        assert torch.equal(e.segment[noised, pn:], e.segment[main, pm:])  # the same selection, own padding
        assert int((e.segment[main] == Segment.IMAGE).sum()) > 0
        assert torch.equal(e.abs_bias[noised], e.abs_bias[main])
        assert torch.equal(e.segment[noimg], ctx.plan.segment[noimg]) and float(e.abs_bias[noimg].abs().sum()) == 0
    assert _tokens(lvlm, ["imbalanced:alpha=0,beta=0", "vcd"]) == _tokens(lvlm, ["vcd"])
    with pytest.raises(PlanConflictError, match="'imbalanced' and 'causalmm' cannot be combined in one request: "
                                                "causalmm sets the attention counterfactual"):
        generate(lvlm, [_req()], ["imbalanced:head_spread=0", "causalmm"], decode=ONE)
    with pytest.raises(PlanConflictError, match="'causalmm' and 'imbalanced' cannot be combined"):
        generate(lvlm, [_req()], ["causalmm:layers=2", "imbalanced:head_spread=0"], decode=ONE)
    assert len(_tokens(lvlm, ["causalmm:layers=1", "imbalanced:head_spread=0,layers=2|3"], decode=ONE)) == 1
    # VAR and the fix both own the segments: refused before anything runs, with or without sinks in the prompt
    with pytest.raises(PlanConflictError, match="'imbalanced' and 'var' cannot be combined in one request: both set "
                                                "the attention segments"):
        generate(lvlm, [_req()], ["imbalanced:head_spread=0", "var:sink_dims=5,tau=7.9,layers=2"], decode=ONE)


def test_mixed_batch_equals_solo():
    lvlm = tiny("tiny-llava")
    s, _ = _span(lvlm)
    L0 = lvlm.adapter.encode([lvlm.adapter.chat_prompt(PROMPT, True)], [make_image(1)])["input_ids"].shape[1]
    var = "var:sink_dims=5,tau=6,rho=0,min_image_mass=0,layers=1|2"
    reqs = [  # the same prompt everywhere: the planted offsets from the end hit the same tokens in every row
        {**_req(5), "mitigations": ["pai", "vcd"]},
        {**_req(6), "mitigations": [var, "m3id:lam=0.5"]},
        {**_req(7), "mitigations": []},
        {**_req(8), "mitigations": ["vhr", "vcd:alpha=0.5"]},
        {**_req(9), "mitigations": ["cca", "vcd", "pai:gamma=1"]},
        {**_req(10), "mitigations": ["imbalanced:head_spread=0", "m3id", var.replace("tau=6", "p=0")]},
        {**_req(11), "mitigations": [var, "vcd", "vhr:text_pass=probe"]},
    ]
    with planted(lvlm, from_end=[L0 - (s + 1), L0 - (s + 4)]):
        batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
        solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    assert batched == solo
