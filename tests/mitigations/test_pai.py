"""PAI: attention boost vs a plain-torch Eq. 5, guidance vs Eq. 7, zero strength, batches, families."""

from __future__ import annotations

import pytest
import torch
from mithelp import FAMILIES, causal, make_image, plain_attention, spy_attention, tiny

from clearsight import DecodeSpec, generate
from clearsight.mitigations import parse_mitigation
from clearsight.mitigations.pai import guided_logits

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_boost_matches_plain_torch_prefill_and_decode(family):
    lvlm = tiny(family)
    req = {"prompt": PROMPT, "image": make_image(1)}
    with spy_attention(lvlm, [1, 2, 3]) as spy:
        generate(lvlm, [req], ["pai:alpha=0.5,gamma=1"], decode=DECODE)
    layout = lvlm.adapter.row_layouts(lvlm.adapter.encode([lvlm.adapter.chat_prompt(PROMPT, True)], [req["image"]]))[0]
    s, e = layout.image_spans[0]
    for layer in (1, 2, 3):
        for t, c in enumerate(spy.calls[layer]):
            Lq, Lk = c.q.shape[2], c.k.shape[2]
            boosted = layer >= 2

            def boost(sc, Lq=Lq, boosted=boosted):  # Eq. 5 on the predicting row, image keys only
                sc = sc.clone()
                if boosted:
                    sc[:, -1, s:e] = sc[:, -1, s:e] + 0.5 * sc[:, -1, s:e].abs()
                return sc

            want = plain_attention(c.q[0], c.k[0], c.v[0], c.scale, causal(Lq, Lk), score_fn=boost)
            torch.testing.assert_close(c.out[0], want, atol=2e-5, rtol=1e-4, msg=f"layer {layer} call {t}")
    assert len(spy.calls[2]) == DECODE.max_new_tokens  # prefill + 3 decode steps


def test_guidance_formula_and_cut():
    main = torch.tensor([2.0, 1.0, -3.0, 0.5])
    noimg = torch.tensor([0.0, 2.0, 1.0, 0.0])
    lp, lu = torch.log_softmax(main, -1), torch.log_softmax(noimg, -1)
    want = 1.1 * lp - 0.1 * lu
    p = lp.exp()
    want[p < 0.1 * p.max()] = float("-inf")
    torch.testing.assert_close(guided_logits(main, noimg, 1.1, 0.1), want)


def test_guidance_branch_drives_tokens():
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(2)}
    log = []
    from clearsight.mitigations.pai import PAI

    class Rec(PAI):
        def combine(self, logits, step, ctx):
            log.append((logits["main"].clone(), logits["noimg"].clone()))
            return super().combine(logits, step, ctx)

    out = generate(lvlm, [req], [Rec(alpha=0.0, gamma=3.0, cut=0.0)], decode=DECODE)[0]
    chosen = [int(torch.argmax(3 * torch.log_softmax(m, -1) - 2 * torch.log_softmax(u, -1))) for m, u in log]
    assert chosen == out.token_ids


def test_zero_strength_is_unmitigated():
    for family in FAMILIES:
        lvlm = tiny(family)
        req = {"prompt": PROMPT, "image": make_image(3)}
        base = generate(lvlm, [req], decode=DECODE)[0].token_ids
        assert generate(lvlm, [req], ["pai:alpha=0,gamma=1"], decode=DECODE)[0].token_ids == base


def test_mixed_batch_equals_solo():
    lvlm = tiny("tiny-llava-next")
    reqs = [
        {"prompt": PROMPT, "image": make_image(4), "mitigations": ["pai:alpha=0.6"]},
        {"prompt": "describe the image please", "image": make_image(5), "mitigations": []},
        {"prompt": "is there a red circle?", "image": make_image(6), "mitigations": ["pai:alpha=0.3,gamma=1"]},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    assert batched == [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]


def test_parsing_and_layers():
    m = parse_mitigation("pai:alpha=0.4,layers=2|3,gamma=1")
    assert m.alpha == 0.4 and m.layers == [2, 3] and m.gamma == 1.0
    lvlm = tiny("tiny-llava")
    with pytest.raises(ValueError, match="out of range"):
        generate(lvlm, [{"prompt": PROMPT, "image": make_image(0)}], ["pai:layers=9"], decode=DECODE)


def test_guidance_keeps_removed_tokens_removed():
    """A token an earlier combiner set to -inf stays -inf (no NaN, even at gamma = 0); by hand."""
    main = torch.tensor([2.0, float("-inf"), 1.0])
    noimg = torch.tensor([0.0, 1.0, 2.0])
    got = guided_logits(main, noimg, 0.0, 0.0)
    lu = torch.log_softmax(noimg, -1)
    torch.testing.assert_close(got, torch.tensor([lu[0].item(), float("-inf"), lu[2].item()]))


@pytest.mark.parametrize("spec", ["pai", "vhr"])
def test_text_only_request_adds_no_row_and_keeps_its_tokens(spec):
    """Without an image PAI's guidance and VHR's measurement have nothing to contrast: no extra row runs and
    the tokens are the unmitigated ones (PAI's boost has no image keys to boost)."""
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT}
    base = generate(lvlm, [req], decode=DECODE)[0].token_ids
    with spy_attention(lvlm, [0]) as spy:
        out = generate(lvlm, [req], [spec], decode=DECODE)[0].token_ids
    assert out == base
    assert {c.q.shape[0] for c in spy.calls[0]} == {1}  # batch of one row at every forward
