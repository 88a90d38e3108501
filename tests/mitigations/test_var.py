"""VAR: sink detection and redistribution vs a plain-torch Eq. 2-6 on hand-made massive activations."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from mithelp import FAMILIES, causal, make_image, plain_attention, spy_attention, tiny

from clearsight import DecodeSpec, generate
from clearsight.kernels.plan import StatsRequest
from clearsight.mitigations.var import VAR, calibrate_sink_dims, find_sink_dims

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=4, ignore_eos=True)
TAU = 6.0  # hidden size 64: |x_d / rms(x)| <= sqrt(64) = 8, so the paper's 20 cannot be reached
PLANT = {5: [0, 8], 17: [3]}  # dim -> token indices (no padding in these runs): a text sink and two image sinks


@contextlib.contextmanager
def massive(lvlm, at_layer: int = 1):
    """Plant massive activations (Sun et al. 2024) in the residual stream entering ``at_layer`` at prefill."""
    def fn(layer, x):
        if layer != at_layer or x.shape[1] == 1:
            return None
        x = x.clone()
        for d, toks in PLANT.items():
            x[:, toks, d] = 1000.0
        return x

    h = lvlm.adapter.hook_layer_inputs(fn)
    try:
        yield
    finally:
        h.remove()


def _inputs(lvlm, layers):
    got: dict[int, torch.Tensor] = {}

    def fn(layer, x):
        if layer in layers and x.shape[1] > 1:
            got[layer] = x[0].detach().clone()

    return got, lvlm.adapter.hook_layer_inputs(fn)


def _plain_var(a, seg_img, sink, rows_from, p, rho, min_mass):
    """Eq. 4-6 written out per (head, query row): a [H, Lq, Lk] probabilities -> edited probabilities."""
    a = a.clone()
    H, Lq, Lk = a.shape
    for h in range(H):
        for i in range(Lq):
            qi = Lk - Lq + i
            if qi < rows_from:
                continue
            row = a[h, i]
            s_img = float(row[seg_img].sum())
            s_ns = float(row[seg_img & ~sink].sum())
            s_sink = float(row[sink].sum())
            if s_img < min_mass or s_ns < rho * s_img or s_ns <= 0:
                continue
            omega = p * s_sink
            new = row.clone()
            new[sink] = row[sink] * (1 - p)
            ns = seg_img & ~sink
            new[ns] = row[ns] + omega * row[ns] / s_ns
            a[h, i] = new
    return a


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_detection_and_redistribution_match_plain_torch(family):
    lvlm = tiny(family)
    req = {"prompt": PROMPT, "image": make_image(1)}
    enc = lvlm.adapter.encode([lvlm.adapter.chat_prompt(PROMPT, True)], [req["image"]])
    (s, e), = lvlm.adapter.row_layouts(enc)[0].image_spans
    PLANT[17] = [s + 1]
    PLANT[5] = [0, s + 4]
    layers = [1, 2]
    spec = VAR(p=0.7, rho=0.3, min_image_mass=0.1, tau=TAU, sink_dims=[5, 17], layers=layers)
    with massive(lvlm):
        inputs, h = _inputs(lvlm, layers)
        try:
            with spy_attention(lvlm, layers) as spy:
                generate(lvlm, [req], [spec], decode=DECODE)
        finally:
            h.remove()
    edited_rows = 0
    for layer in layers:
        x = inputs[layer].double()
        phi = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()[:, [5, 17]].amax(-1)  # Eq. 2
        sink_prompt = phi > TAU
        assert sorted(torch.nonzero(sink_prompt).flatten().tolist()) == sorted([0, s + 1, s + 4])
        for c in spy.calls[layer]:
            Lq, Lk = c.q.shape[2], c.k.shape[2]
            sink = torch.zeros(Lk, dtype=torch.bool)
            sink[: len(sink_prompt)] = sink_prompt
            img = torch.zeros(Lk, dtype=torch.bool)
            img[s:e] = True
            before = []

            def edit(a, before=before, img=img, sink=sink):
                before.append(a.clone())
                return _plain_var(a, img, sink, e, 0.7, 0.3, 0.1)

            want = plain_attention(c.q[0], c.k[0], c.v[0], c.scale, causal(Lq, Lk), prob_fn=edit)
            torch.testing.assert_close(c.out[0], want, atol=3e-5, rtol=1e-4)
            after = _plain_var(before[0], img, sink, e, 0.7, 0.3, 0.1)
            edited_rows += int((after - before[0]).abs().amax(-1).gt(1e-9).sum())
    assert edited_rows > 10  # the test exercised the redistribution, prefill and decode


def test_row_mass_and_moved_fraction_on_captured_statistics():
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(2)}
    s, e = 2, 18
    PLANT[17] = [s + 1]
    PLANT[5] = [0, s + 4]
    spec = VAR(p=0.6, rho=0.0, min_image_mass=0.0, tau=TAU, sink_dims=[5, 17], layers=[1])
    with massive(lvlm), spy_attention(lvlm, [1]) as spy:
        res = generate(lvlm, [req], [spec], decode=DECODE, stats=StatsRequest(segment_mass=True, layers=frozenset({1})))
    m = res[0].stats["segment_mass"][1]  # [H, Lq_total, S] after the edit: TEXT, IMAGE, IMAGE_SINK, TEXT_SINK
    torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5, rtol=0)  # row mass preserved
    # the unedited masses of the same rows, from the captured q/k (plain torch)
    sink = torch.zeros(64, dtype=torch.bool)
    sink[[0, s + 1, s + 4]] = True
    rows = []
    for c in spy.calls[1]:
        Lq, Lk = c.q.shape[2], c.k.shape[2]
        sc = (c.q[0].double() @ c.k[0].double().transpose(-1, -2) * c.scale).masked_fill(~causal(Lq, Lk), -math.inf)
        a = torch.softmax(sc, -1)
        sk = sink[:Lk]
        sink_mass = a[..., sk].sum(-1)
        rows.append(sink_mass)
    before_sink = torch.cat(rows, 1).float()  # [H, Lq_total]
    after_sink = m[..., 2] + m[..., 3]
    selected = torch.zeros_like(before_sink, dtype=torch.bool)
    selected[:, e:] = True  # rho = 0, min mass 0: every row after the image (all have image mass)
    torch.testing.assert_close(after_sink[selected], 0.4 * before_sink[selected], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after_sink[~selected], before_sink[~selected], atol=1e-5, rtol=1e-4)
    assert float(before_sink[selected].max()) > 0.05  # a real amount of sink mass was moved


def test_calibration_finds_planted_dims_and_on_the_fly_matches_explicit():
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(3)}
    PLANT[17] = [3]
    PLANT[5] = [0, 6]
    with massive(lvlm):
        cal = calibrate_sink_dims(lvlm, [req], tau=TAU)
        assert sorted(cal.dims) == [5, 17] and "var:sink_dims=" in cal.report()
        with pytest.warns(UserWarning, match=r"calibrated on this prompt at layer 2: \["):
            auto = generate(lvlm, [req], [VAR(tau=TAU, rho=0.0, min_image_mass=0.0)], decode=DECODE)[0]
        explicit = generate(lvlm, [req], [VAR(tau=TAU, rho=0.0, min_image_mass=0.0, sink_dims=cal.dims)],
                            decode=DECODE)[0]
        base = generate(lvlm, [req], decode=DECODE)[0]
    assert auto.token_ids == explicit.token_ids
    assert calibrate_sink_dims(lvlm, [req], tau=TAU).dims == []  # nothing planted: nothing found
    assert find_sink_dims([torch.randn(30, 64)], tau=TAU)[0] == []
    # the calibrated dims do something: redistributing their sink mass changes the tokens
    assert auto.token_ids != base.token_ids


def test_zero_strength_p_semantics_and_families():
    PLANT[17] = [3]
    PLANT[5] = [0, 6]
    for family in FAMILIES:
        lvlm = tiny(family)
        req = {"prompt": PROMPT, "image": make_image(4)}
        with massive(lvlm):
            base = generate(lvlm, [req], decode=DECODE)[0].token_ids
            assert generate(lvlm, [req], ["var:p=0,sink_dims=5|17,tau=6"], decode=DECODE)[0].token_ids == base
            assert generate(lvlm, [req], ["var:p=1,p_semantics=code,sink_dims=5|17,tau=6"],
                            decode=DECODE)[0].token_ids == base
            paper = generate(lvlm, [req], ["var:p=0.6,sink_dims=5|17,tau=6,rho=0,min_image_mass=0,layers=1|2"],
                             decode=DECODE)[0].token_ids
            # the released code's head test uses the complement of rho: code rho = 1 is paper rho = 0
            code = generate(lvlm, [req], ["var:p=0.4,p_semantics=code,sink_dims=5|17,tau=6,rho=1,min_image_mass=0,"
                                          "layers=1|2"], decode=DECODE)[0].token_ids
            assert paper == code
            assert paper != base  # the equality above is not two no-ops


def test_code_semantics_head_test_uses_the_complement_of_rho():
    assert VAR(rho=0.3).rho_test == 0.3
    assert VAR(rho=0.3, p_semantics="code").rho_test == 0.7
    assert VAR(p_semantics="code").rho_test == VAR().rho_test == 0.5  # the defaults read the same


def test_mixed_batch_equals_solo():
    lvlm = tiny("tiny-llava")
    PLANT[17] = [3]
    PLANT[5] = [0, 6]
    reqs = [  # same prompt length: the planted positions are the same in every row
        {"prompt": PROMPT, "image": make_image(5), "mitigations": ["var:sink_dims=5|17,tau=6,rho=0,layers=1|2"]},
        {"prompt": PROMPT, "image": make_image(6), "mitigations": []},
        {"prompt": PROMPT, "image": make_image(7), "mitigations": ["var:sink_dims=5|17,tau=6,p=0.9,layers=1|2",
                                                                    "vhr"]},
    ]
    with massive(lvlm):
        batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
        assert batched == [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
