"""INTER: the combiner against a plain-torch evaluation of the formula, the four rows against the same rows
run alone, k = none + no cut = unmitigated, the prompt-removal modes, mixed batches, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from test_branch_common import forced_logits, make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.errors import InputError
from clearsight.mitigations import parse_mitigation
from clearsight.mitigations.inter import INTER, inter_logits, template_parts, uniform_noise

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=4, ignore_eos=True)
LOG: list[dict[str, torch.Tensor]] = []


class RecINTER(INTER):
    """INTER that records the logits it combines."""

    def combine(self, logits, step, ctx):
        LOG.append({k: v.clone() for k, v in logits.items()})
        return super().combine(logits, step, ctx)


@pytest.fixture(autouse=True)
def _clear():
    LOG.clear()


# four hand-made logit vectors over a 5-token vocabulary
FULL = torch.tensor([2.0, 1.5, 0.0, -1.0, 1.9])
NOIMG = torch.tensor([1.0, 2.0, 0.5, 0.0, 0.0])
NOPROMPT = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
NEITHER = torch.tensor([0.0, 1.0, 3.0, -2.0, 1.0])


def plain(full, a, b, c, k, beta):
    """The formula in plain torch: I, its unbiased variance over the vocabulary, the gate, the cut."""
    i = full - a - b + c
    var = ((i - i.mean()) ** 2).sum() / (i.numel() - 1)
    z = full + i if (k is not None and var >= k) else full.clone()
    p = torch.softmax(full, -1)
    z[p < beta * p.max()] = float("-inf")
    return z, float(var)


def test_combined_logits_against_the_formula_gate_on_and_off():
    # by hand: I = [0.5, 0.0, 2.0, -3.5, 2.4], mean 0.28, squared deviations sum to 21.868: variance 5.467
    i = torch.tensor([0.5, 0.0, 2.0, -3.5, 2.4])
    _, var = plain(FULL, NOIMG, NOPROMPT, NEITHER, 0.0, 0.0)
    assert abs(var - 5.467) < 1e-4
    on = inter_logits(FULL, NOIMG, NOPROMPT, NEITHER, k=5.0, beta=0.0)
    torch.testing.assert_close(on, FULL + i)  # gate open: 5.467 >= 5
    off = inter_logits(FULL, NOIMG, NOPROMPT, NEITHER, k=6.0, beta=0.0)
    torch.testing.assert_close(off, FULL)  # gate closed: 5.467 < 6
    for k in (0.0, 1.0, 5.0, 6.0, None):
        for beta in (0.0, 0.1, 0.5):
            want, _ = plain(FULL, NOIMG, NOPROMPT, NEITHER, k, beta)
            torch.testing.assert_close(inter_logits(FULL, NOIMG, NOPROMPT, NEITHER, k=k, beta=beta), want)
    # beta = 0.5 removes the tokens with p < 0.5 max p: z = 0.0 and -1.0 (e^0, e^-1 < e^2 / 2 = 3.69; e^1.5 = 4.48 kept)
    cut = inter_logits(FULL, NOIMG, NOPROMPT, NEITHER, k=5.0, beta=0.5)
    assert torch.isinf(cut).tolist() == [False, False, True, True, False]


def test_tokens_an_earlier_combiner_removed_stay_removed_and_leave_the_variance():
    full = FULL.clone()
    full[2] = float("-inf")
    got = inter_logits(full, NOIMG, NOPROMPT, NEITHER, k=0.0, beta=0.0)
    i = FULL - NOIMG - NOPROMPT + NEITHER
    want = FULL + i
    want[2] = float("-inf")
    torch.testing.assert_close(got, want)
    keep = torch.tensor([0, 1, 3, 4])
    var = float(i[keep].var())
    assert torch.equal(inter_logits(full, NOIMG, NOPROMPT, NEITHER, k=var + 1e-4, beta=0.0), full)


def test_defaults_and_parsing():
    m = parse_mitigation("inter")
    assert (m.k, m.beta, m.prompt_removal, m.seed) == (1.0, 0.1, "question", 0)
    assert parse_mitigation("inter:k=none,beta=0").k is None
    with pytest.raises(InputError, match="k"):
        parse_mitigation("inter:k=-1")
    with pytest.raises(InputError, match="prompt_removal"):
        parse_mitigation("inter:prompt_removal=everything")


def test_template_parts_by_family():
    assert template_parts(tiny("tiny-llava").adapter) == ("<image>\n", " ASSISTANT:")
    slot, suffix = template_parts(tiny("tiny-qwen2-vl").adapter)
    assert slot == "<|vision_start|><|image_pad|><|vision_end|>"
    assert suffix == "<|im_end|>\n<|im_start|>assistant\n"


def test_the_four_rows_are_those_variants_run_alone_and_drive_the_tokens():
    lvlm = tiny("tiny-llava")
    img = make_image(1)
    out = generate(lvlm, [{"prompt": PROMPT, "image": img}], [RecINTER(k=0.0, seed=3)], decode=DECODE)[0]
    rows = {name: torch.stack([entry[name] for entry in LOG]) for name in LOG[0]}
    noise = functools.partial(uniform_noise, seed=3)
    tol = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(rows["main"], forced_logits(lvlm, PROMPT, img, out.token_ids), **tol)
    torch.testing.assert_close(rows["noimg"], forced_logits(lvlm, PROMPT, img, out.token_ids, noise), **tol)
    torch.testing.assert_close(rows["noprompt"], forced_logits(lvlm, "", img, out.token_ids), **tol)
    torch.testing.assert_close(rows["neither"], forced_logits(lvlm, "", img, out.token_ids, noise), **tol)
    assert not torch.allclose(rows["main"], rows["noimg"], atol=1e-3)
    assert not torch.allclose(rows["main"], rows["noprompt"], atol=1e-3)
    chosen = []
    for e in LOG:  # the formula by hand; k = 0 opens the gate at every step
        i = e["main"] - e["noimg"] - e["noprompt"] + e["neither"]
        z = e["main"] + i
        p = torch.softmax(e["main"], -1)
        z[p < 0.1 * p.max()] = float("-inf")
        chosen.append(int(z.argmax()))
    assert chosen == out.token_ids


def test_prompt_removal_all_feeds_only_the_image_slot():
    lvlm = tiny("tiny-llava")
    img = make_image(2)
    generate(lvlm, [{"prompt": PROMPT, "image": img}], [RecINTER(prompt_removal="all")], decode=DECODE)
    ad = lvlm.adapter
    batch = ad.encode(["<image>\n"], [img])  # the slot alone: BOS + the image tokens + the newline
    with torch.inference_mode():
        alone = lvlm.model(**batch, use_cache=False).logits[0, -1].float()
    torch.testing.assert_close(LOG[0]["noprompt"], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_no_gate_and_no_cut_is_unmitigated(family):
    lvlm = tiny(family)
    req = {"prompt": PROMPT, "image": make_image(3)}
    base = generate(lvlm, [req], decode=DECODE)[0].token_ids
    assert generate(lvlm, [req], ["inter:k=none,beta=0"], decode=DECODE)[0].token_ids == base
    assert generate(lvlm, [req], ["inter:k=none"], decode=DECODE)[0].token_ids == base  # greedy: the cut keeps it
    sampled = DecodeSpec(max_new_tokens=4, ignore_eos=True, do_sample=True, seed=2)
    base = generate(lvlm, [req], decode=sampled)[0].token_ids
    assert generate(lvlm, [req], ["inter:k=none,beta=0,prompt_removal=template"], decode=sampled)[0].token_ids == base


def test_mixed_batch_equals_solo():
    lvlm = tiny("tiny-llava-next")
    reqs = [
        {"prompt": PROMPT, "image": make_image(4), "mitigations": ["inter:k=0"]},
        {"prompt": "describe the image please", "image": make_image(5), "mitigations": []},
        {"prompt": "is there a red circle?", "image": make_image(6), "mitigations": ["inter:k=0,prompt_removal=all"]},
        {"prompt": "what color is it", "mitigations": []},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    assert batched == solo


def test_text_only_request_fails_clearly():
    with pytest.raises(InputError, match="inter needs an image"):
        generate(tiny("tiny-llava"), [{"prompt": PROMPT}], ["inter"], decode=DECODE)


def test_composes_with_plan_edits_and_other_combiners():
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(7)}
    spec = RecINTER(k=0.0)
    out = generate(lvlm, [req], ["vcd:alpha=1", spec], decode=DecodeSpec(max_new_tokens=2, ignore_eos=True))[0]
    assert len(out.token_ids) == 2
    # INTER follows VCD: its "main" is VCD's combination (the cut's -inf tokens included), its rows its own
    assert torch.isinf(LOG[0]["main"]).any() and set(LOG[0]) == {"main", "noimg", "noprompt", "neither"}
    assert len(generate(lvlm, [req], ["pai:alpha=0.5,gamma=1", "inter"], decode=DECODE)[0].token_ids) == 4
