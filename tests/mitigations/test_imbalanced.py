"""Imbalanced-attention fix / PAINT: selection, per-head boosts and attention vs plain torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mithelp import causal, make_image, plain_attention, spy_attention, tiny

from clearsight import DecodeSpec, generate
from clearsight.errors import InputError
from clearsight.kernels.plan import PlanConflictError
from clearsight.mitigations.imbalanced import Imbalanced, head_alphas, select_tokens

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=4, ignore_eos=True)


def test_selection_by_hand():
    local_scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.95, 0.7, 0.05, 0.6])
    summary_scores = torch.tensor([1.0, 1.1, 0.9, 1.0, 9.0, 1.05, 0.95, 1.0])  # patch 4 is an IQR outlier
    local, summary, spatial = select_tokens(local_scores, summary_scores, 0.5, 0.25)
    assert summary.tolist() == [4]
    assert local.tolist() == [1, 3, 5]  # top 4 of 8 = {4, 1, 3, 5}, minus the summary token 4
    assert spatial.tolist() == [0, 7]  # 2 of 8 spread evenly


def test_head_alphas_rule():
    got = head_alphas(torch.tensor([0.3, 0.1, 0.5, 0.2]), 0.7, 0.5)
    # ranks 2, 0, 3, 1 -> 0.7 * (1 + 0.5 * (2 r / 3 - 1))
    want = [0.7 * (1 + 0.5 * (2 * r / 3 - 1)) for r in (2, 0, 3, 1)]
    torch.testing.assert_close(got, torch.tensor(want))
    assert float(got.mean()) == pytest.approx(0.7)


def _plain_selection(lvlm, image):
    enc = lvlm.adapter.encode([lvlm.adapter.chat_prompt(PROMPT, True)], [image])
    pix = enc["pixel_values"]
    pix = pix[:, 0] if pix.ndim == 5 else pix
    atts = lvlm.adapter.vision_attentions(pix)
    loc = atts[0][0, :, 0, 1:].sum(0).numpy()
    summ = atts[-2][0, :, 0, 1:].sum(0).numpy()
    q1, q3 = np.percentile(summ, 25), np.percentile(summ, 75)
    summary = set(np.nonzero(summ > q3 + 1.5 * (q3 - q1))[0].tolist())
    local = set(np.argsort(-loc, kind="stable")[: int(len(loc) * 0.25)].tolist()) - summary
    return enc, local, summary


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next"])
def test_boost_matches_plain_torch(family):
    lvlm = tiny(family)
    image = make_image(1)
    req = {"prompt": PROMPT, "image": image}
    enc, local, summary = _plain_selection(lvlm, image)
    (s, e), = lvlm.adapter.row_layouts(enc)[0].image_spans
    # head sensitivity by hand: image mass of each head at the last prompt row, unmitigated run
    with spy_attention(lvlm, [2, 3]) as base:
        generate(lvlm, [req], decode=DecodeSpec(max_new_tokens=1))
    alphas = {}
    for layer in (2, 3):
        c = base.calls[layer][0]
        L = c.q.shape[2]
        a = torch.softmax((c.q[0] @ c.k[0].transpose(-1, -2) * c.scale).masked_fill(~causal(L, L), -torch.inf), -1)
        mass = a[:, -1, s:e].sum(-1)
        order = sorted(range(4), key=lambda h: float(mass[h]))
        alphas[layer] = [0.7 * (1 + 0.5 * (2 * order.index(h) / 3 - 1)) for h in range(4)]
    ctxs = []

    class Keep(Imbalanced):
        def apply(self, ctx):
            ctxs.append(ctx)
            super().apply(ctx)

    with spy_attention(lvlm, [1, 2, 3]) as spy:
        generate(lvlm, [req], [Keep()], decode=DECODE)
    st = ctxs[0].state["imbalanced"]
    assert set(st["local"]) == local and set(st["summary"]) == summary and len(local) > 0
    for layer in (1, 2, 3):
        assert len(spy.calls[layer]) == 1 + DECODE.max_new_tokens  # the unedited probe prefill, then the generation
        for c in spy.calls[layer][1:]:
            Lq, Lk = c.q.shape[2], c.k.shape[2]

            def boost(sc, layer=layer):
                sc = sc.clone()
                if layer >= 2:
                    for j in local:
                        sc[:, -1, s + j] += torch.tensor(alphas[layer], dtype=sc.dtype) * sc[:, -1, s + j].abs()
                    for j in summary:
                        sc[:, -1, s + j] += 0.4 * sc[:, -1, s + j].abs()
                return sc

            want = plain_attention(c.q[0], c.k[0], c.v[0], c.scale, causal(Lq, Lk), score_fn=boost)
            torch.testing.assert_close(c.out[0], want, atol=3e-5, rtol=1e-4)


def test_zero_strength_batch_families_conflicts():
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(2)}
    base = generate(lvlm, [req], decode=DECODE)[0].token_ids
    assert generate(lvlm, [req], ["imbalanced:alpha=0,beta=0"], decode=DECODE)[0].token_ids == base
    reqs = [
        {"prompt": PROMPT, "image": make_image(3), "mitigations": ["imbalanced"]},
        {"prompt": "describe the image please", "image": make_image(4), "mitigations": ["pai"]},
        {"prompt": "is there a red circle?", "image": make_image(5),
         "mitigations": ["imbalanced:head_spread=0,spatial_ratio=0.1,beta=0.3"]},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    assert batched == [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    with pytest.raises(InputError, match="CLS"):
        generate(tiny("tiny-qwen2-vl"), [req], ["imbalanced"], decode=DECODE)
    with pytest.raises(PlanConflictError, match="'imbalanced' and 'var' cannot be combined in one request: both "
                                                "set the attention segments"):
        generate(lvlm, [req], ["imbalanced", "var:sink_dims=5,tau=1,layers=2"], decode=DECODE)


def test_summary_layer_feature_is_the_models_feature_layer():
    lvlm = tiny("tiny-llava")
    got: dict = {}

    class Rec(Imbalanced):
        def apply(self, ctx):
            super().apply(ctx)
            got[self.summary_layer] = ctx.state["imbalanced"]["summary"]

    req = {"prompt": "what is in the picture?", "image": make_image(8)}
    one = DecodeSpec(max_new_tokens=1)
    cfg = lvlm.model.config
    before = cfg.vision_feature_layer
    assert lvlm.adapter.vision_feature_attention_index == before == -2
    try:
        for layer in (-2, -1):
            cfg.vision_feature_layer = layer  # the selection reads it; the forward itself is not compared here
            generate(lvlm, [req], [Rec(head_spread=0, summary_layer="feature")], decode=one)
            generate(lvlm, [req], [Rec(head_spread=0, summary_layer=layer)], decode=one)
            assert got["feature"] == got[layer]
            feature = got.pop("feature")
            got[f"feature{layer}"] = feature
        cfg.vision_feature_layer = 1  # hidden_states[1] is the first layer's output: attentions[0]
        assert lvlm.adapter.vision_feature_attention_index == 0
    finally:
        cfg.vision_feature_layer = before
