"""M3ID: time-dependent weight and confidence gate by hand, branch = no-image row alone, lam = 0,
greedy and seeded sampling, mixed batches."""

from __future__ import annotations

import math

import pytest
import torch
from test_branch_common import forced_logits, make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.decoding.sampling import select_token
from clearsight.errors import InputError
from clearsight.mitigations import parse_mitigation
from clearsight.mitigations.m3id import M3ID, m3id_logits, m3id_weight

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=5, ignore_eos=True)
LOG: list[tuple[int, torch.Tensor, torch.Tensor]] = []


class RecM3ID(M3ID):
    def combine(self, logits, step, ctx):
        LOG.append((step, logits["main"].clone(), logits["noimg"].clone()))
        return super().combine(logits, step, ctx)


@pytest.fixture(autouse=True)
def _clear():
    LOG.clear()


def test_weight_and_gate_by_hand():
    # g_t = exp(-lam t); weight (1 - g_t) / g_t
    for t in (1, 5, 40):
        g = math.exp(-0.1 * t)
        assert m3id_weight(t, 0.1) == pytest.approx((1 - g) / g)
    assert m3id_weight(40, 0.1, max_weight=2.0) == 2.0
    assert m3id_weight(7, 0.0) == 0.0
    unsure = torch.tensor([0.5, 0.3, 0.2]).log()  # max p = 0.5 < 0.9: combined
    noimg = torch.tensor([1.0, 0.0, 2.0])
    w = math.exp(0.1 * 3) - 1
    torch.testing.assert_close(m3id_logits(unsure, noimg, 3, 0.1, 0.9), unsure + w * (unsure - noimg))
    sure = torch.tensor([0.95, 0.03, 0.02]).log()  # max p = 0.95 >= 0.9: untouched
    assert torch.equal(m3id_logits(sure, noimg, 3, 0.1, 0.9), sure)
    assert not torch.equal(m3id_logits(sure, noimg, 3, 0.1, 0.96), sure)


def test_defaults():
    m = parse_mitigation("m3id")
    assert (m.lam, m.threshold, m.max_weight) == (0.02, 0.9, None)


def test_branch_is_the_text_only_row_alone_and_drives_tokens():
    lvlm = tiny("tiny-llava")
    img = make_image(1)
    out = generate(lvlm, [{"prompt": PROMPT, "image": img}], [RecM3ID(lam=0.5, threshold=1.0)], decode=DECODE)[0]
    noimg = torch.stack([u for _, _, u in LOG])
    torch.testing.assert_close(noimg, forced_logits(lvlm, PROMPT, None, out.token_ids), atol=1e-4, rtol=1e-4)
    chosen = []
    for step, m, u in LOG:
        w = math.exp(0.5 * (step + 1)) - 1  # the first generated token is t = 1
        chosen.append(int((m + w * (m - u)).argmax()))
    assert [s for s, _, _ in LOG] == list(range(DECODE.max_new_tokens))
    assert chosen == out.token_ids
    base = generate(lvlm, [{"prompt": PROMPT, "image": img}], decode=DECODE)[0].token_ids
    assert base != out.token_ids  # the contrast changed something


def test_seeded_sampling():
    lvlm = tiny("tiny-llava")
    decode = DecodeSpec(max_new_tokens=5, ignore_eos=True, do_sample=True, seed=9)
    req = {"prompt": PROMPT, "image": make_image(2)}
    out = generate(lvlm, [req], [RecM3ID(lam=0.3, threshold=0.5)], decode=decode)[0]
    gen = torch.Generator().manual_seed(9)
    chosen = []
    for step, m, u in LOG:
        w = math.exp(0.3 * (step + 1)) - 1
        combined = m if float(torch.softmax(m, -1).max()) >= 0.5 else m + w * (m - u)
        chosen.append(select_token(combined, decode, gen))
    assert chosen == out.token_ids
    assert generate(lvlm, [req], ["m3id:lam=0.3,threshold=0.5"], decode=decode)[0].token_ids == out.token_ids


@pytest.mark.parametrize("family", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_zero_lambda_is_unmitigated(family):
    lvlm = tiny(family)
    req = {"prompt": PROMPT, "image": make_image(3)}
    for decode in (DECODE, DecodeSpec(max_new_tokens=5, ignore_eos=True, do_sample=True, seed=1)):
        base = generate(lvlm, [req], decode=decode)[0].token_ids
        assert generate(lvlm, [req], ["m3id:lam=0"], decode=decode)[0].token_ids == base


def test_mixed_batch_equals_solo():
    lvlm = tiny("tiny-qwen2-vl")
    reqs = [
        {"prompt": PROMPT, "image": make_image(4), "mitigations": ["m3id:lam=0.4,threshold=1"]},
        {"prompt": "describe the image please", "image": make_image(5), "mitigations": []},
        {"prompt": "is there a red circle?", "image": make_image(6), "mitigations": ["m3id:lam=1"]},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    assert batched == solo


def test_text_only_request_fails_clearly():
    with pytest.raises(InputError, match="m3id needs an image"):
        generate(tiny("tiny-llava"), [{"prompt": PROMPT}], ["m3id"], decode=DECODE)
