"""CausalMM: formulas by hand, LLM- and vision-level branches equal the counterfactual row alone,
own cache for the whole generation, gamma = 0, sampling, mixed batches, composition, errors."""

from __future__ import annotations

import pytest
import torch
from test_branch_common import forced_logits, make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.decoding.sampling import select_token
from clearsight.errors import InputError
from clearsight.mitigations import parse_mitigation
from clearsight.mitigations.causalmm import (
    CausalMM,
    causalmm_logits,
    counterfactual_vision_attention,
)

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=5, ignore_eos=True)
LOG: list[dict[str, torch.Tensor]] = []


class RecCausalMM(CausalMM):
    def combine(self, logits, step, ctx):
        LOG.append({k: v.clone() for k, v in logits.items()})
        return super().combine(logits, step, ctx)


@pytest.fixture(autouse=True)
def _clear():
    LOG.clear()


def test_formulas_and_cut_by_hand():
    main = torch.tensor([0.5, 0.35, 0.15]).log()
    cf_v = torch.tensor([1.0, 0.0, 3.0])
    cf_l = torch.tensor([0.0, 2.0, -1.0])
    got = causalmm_logits(main, [cf_l], gamma=1.0, epsilon=0.6)  # keep p >= 0.3: tokens 0, 1
    want = 2 * main - cf_l
    want[2] = float("-inf")
    torch.testing.assert_close(got, want)
    got = causalmm_logits(main, [cf_v, cf_l], gamma=0.5, epsilon=0.2)  # (1 + 2g) l - g l_v - g l_l, all kept
    torch.testing.assert_close(got, 2 * main - 0.5 * cf_v - 0.5 * cf_l)


def test_defaults():
    m = parse_mitigation("causalmm")
    assert (m.gamma, m.epsilon, m.level, m.llm_kind, m.vision_kind) == (1.0, 0.6, "llm", "random", "shuffled")


@pytest.mark.parametrize("kind", ["random", "uniform"])
def test_llm_branch_is_the_counterfactual_row_alone_every_step(kind):
    lvlm = tiny("tiny-llava")
    img = make_image(1)
    out = generate(lvlm, [{"prompt": PROMPT, "image": img}], [RecCausalMM(llm_kind=kind, layers=[1, 2], seed=4)],
                   decode=DECODE)[0]

    def edit(plan):
        for layer in (1, 2):
            plan.set_counterfactual([layer], [0], kind, 4 + layer, owner="test")

    cf = torch.stack([d["cf_llm"] for d in LOG])
    alone = forced_logits(lvlm, PROMPT, img, out.token_ids, plan_edit=edit)
    torch.testing.assert_close(cf, alone, atol=1e-4, rtol=1e-4)
    # the counterfactual acts at every step, not only the first (its own cache)
    mains = torch.stack([d["main"] for d in LOG])
    assert all(not torch.allclose(cf[t], mains[t], atol=1e-3) for t in range(len(LOG)))
    chosen = []
    for d in LOG:
        p = torch.softmax(d["main"], -1)
        c = 2 * d["main"] - d["cf_llm"]
        c[p < 0.6 * p.max()] = float("-inf")
        chosen.append(int(c.argmax()))
    assert chosen == out.token_ids


def test_vision_counterfactual_uniform_by_hand():
    lvlm = tiny("tiny-llava")
    attn = lvlm.adapter.vision_tower.encoder.layers[0].self_attn
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        got = counterfactual_vision_attention(attn, h, "uniform", 0)
        want = attn.out_proj(attn.v_proj(h).mean(1, keepdim=True)).expand(-1, 17, -1)  # every query: mean of v
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        real = attn(h)[0]
        perm = counterfactual_vision_attention(attn, h, "shuffled", 3)
        assert not torch.allclose(perm, real, atol=1e-4)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next"])
def test_vision_branch_is_the_row_alone(family):
    lvlm = tiny(family)
    img = make_image(2)
    out = generate(lvlm, [{"prompt": PROMPT, "image": img}],
                   [RecCausalMM(level="multimodal", vision_kind="shuffled", seed=1)], decode=DECODE)[0]

    def hook(attn, hidden, output):
        return counterfactual_vision_attention(attn, hidden, "shuffled", 1)

    with lvlm.adapter.hook_vision_feature_attention(hook):
        alone = forced_logits(lvlm, PROMPT, img, out.token_ids)
    torch.testing.assert_close(torch.stack([d["cf_vision"] for d in LOG]), alone, atol=1e-4, rtol=1e-4)
    chosen = [int(causalmm_logits(d["main"], [d["cf_vision"], d["cf_llm"]], 1.0, 0.6).argmax()) for d in LOG]
    assert chosen == out.token_ids


def test_zero_weight_and_seeded_sampling():
    lvlm = tiny("tiny-qwen2-vl")
    req = {"prompt": PROMPT, "image": make_image(3)}
    base = generate(lvlm, [req], decode=DECODE)[0].token_ids
    assert generate(lvlm, [req], ["causalmm:gamma=0"], decode=DECODE)[0].token_ids == base
    sampled = DecodeSpec(max_new_tokens=5, ignore_eos=True, do_sample=True, seed=6)
    base = generate(lvlm, [req], decode=sampled)[0].token_ids
    assert generate(lvlm, [req], ["causalmm:gamma=0,epsilon=0"], decode=sampled)[0].token_ids == base
    out = generate(lvlm, [req], [RecCausalMM(gamma=2.0, epsilon=0.0)], decode=sampled)[0]
    gen = torch.Generator().manual_seed(6)
    assert [select_token(3 * d["main"] - 2 * d["cf_llm"], sampled, gen) for d in LOG] == out.token_ids


def test_mixed_batch_equals_solo_with_padding():
    lvlm = tiny("tiny-llava-next")
    reqs = [
        {"prompt": "is there a red circle?", "image": make_image(4), "mitigations": ["causalmm:llm_kind=random"]},
        {"prompt": "describe the image please in detail with the color", "image": make_image(5),
         "mitigations": ["causalmm:level=multimodal,llm_kind=shuffled,gamma=2"]},
        {"prompt": "what", "image": make_image(6), "mitigations": ["causalmm:level=vision", "vcd:alpha=0.5"]},
        {"prompt": PROMPT, "image": make_image(7), "mitigations": []},
    ]
    decode = DecodeSpec(max_new_tokens=3, ignore_eos=True)
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=decode)]
    solo = [generate(lvlm, [r], decode=decode)[0].token_ids for r in reqs]
    assert batched == solo


def test_impossible_combinations_fail_clearly():
    with pytest.raises(InputError, match="CLIP-style vision tower"):
        generate(tiny("tiny-qwen2-vl"), [{"prompt": PROMPT, "image": make_image(1)}], ["causalmm:level=vision"],
                 decode=DECODE)
    with pytest.raises(InputError, match="causalmm needs an image"):
        generate(tiny("tiny-llava"), [{"prompt": PROMPT}], ["causalmm"], decode=DECODE)
    with pytest.raises(InputError, match="out of range"):
        generate(tiny("tiny-llava"), [{"prompt": PROMPT, "image": make_image(1)}], ["causalmm:layers=9"],
                 decode=DECODE)


def test_whole_map_counterfactual_is_uniform_over_every_prompt_key():
    from mithelp import spy_attention

    from clearsight.kernels.plan import PlanConflictError
    from clearsight.mitigations import parse_mitigations

    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(3)}
    with spy_attention(lvlm, [1]) as spy:
        generate(lvlm, [req], ["causalmm:llm_kind=uniform,llm_scope=all"], decode=DecodeSpec(max_new_tokens=2))
    prefill, decode = spy.calls[1][0], spy.calls[1][1]
    # row 1 is the counterfactual row (no padding: both rows have the same prompt); uniform over all the keys
    # a query may see, i.e. the running mean of the values; the main row (0) is untouched
    v = prefill.v[1].double()  # [H, L, D]
    L = v.shape[1]
    want = (v.cumsum(1) / torch.arange(1, L + 1, dtype=torch.float64).view(1, -1, 1)).transpose(0, 1)
    torch.testing.assert_close(prefill.out[1].double(), want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(prefill.out[0].double(), want, atol=1e-3)
    # decode: the prompt keys share the prompt mass uniformly, the generated key keeps its own weight
    q, k, vd = decode.q[1, :, -1].double(), decode.k[1].double(), decode.v[1].double()
    a = torch.softmax((q.unsqueeze(1) @ k.transpose(-1, -2)).squeeze(1) * decode.scale, -1)  # [H, Lk]
    prompt_mass = a[:, :L].sum(-1, keepdim=True)
    w = torch.cat([prompt_mass.expand(-1, L) / L, a[:, L:]], -1)
    torch.testing.assert_close(decode.out[1, -1].double(), (w.unsqueeze(1) @ vd).squeeze(1), atol=2e-5, rtol=1e-4)
    with pytest.raises(PlanConflictError, match="causalmm:llm_scope=all relabels.*var"):
        parse_mitigations(["causalmm:llm_scope=all", "var"])
    assert len(parse_mitigations(["causalmm", "var"])) == 2
