"""AGLA: Eq. 7 + cut by hand, the mask construction, the attention and CLIP matchers, branch = augmented
view alone, alpha = 0, sampling, mixed and composed batches, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_branch_common import forced_logits, make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.decoding.sampling import select_token
from clearsight.errors import InputError
from clearsight.kernels.plan import StatsRequest
from clearsight.mitigations import parse_mitigation
from clearsight.mitigations.agla import AGLA, agla_logits
from clearsight.mitigations.agla_matchers import (
    AttentionMatcher,
    ClipMatcher,
    Match,
    augmented_view,
    center_crop_box,
    relevance_mask,
)

PROMPT = "is there a red circle?"
DECODE = DecodeSpec(max_new_tokens=5, ignore_eos=True)
LOG: list[tuple[torch.Tensor, torch.Tensor]] = []
VIEWS: list[Image.Image] = []


class RecAGLA(AGLA):
    def branches(self, ctx):
        out = super().branches(ctx)
        VIEWS.append(ctx.state["agla"]["view"])
        return out

    def combine(self, logits, step, ctx):
        LOG.append((logits["main"].clone(), logits["aug"].clone()))
        return super().combine(logits, step, ctx)


@pytest.fixture(autouse=True)
def _clear():
    LOG.clear()
    VIEWS.clear()


def test_formula_and_cut_by_hand():
    main = torch.tensor([0.45, 0.3, 0.2, 0.05]).log()
    aug = torch.tensor([0.0, 1.0, 4.0, 9.0])
    want = main + 2 * aug
    want[2:] = float("-inf")  # p = 0.2, 0.05 < 0.5 * 0.45
    torch.testing.assert_close(agla_logits(main, aug, 2.0, 0.5), want)
    assert int(agla_logits(main, aug, 2.0, 0.5).argmax()) == 1  # the augmented view moves the choice
    torch.testing.assert_close(agla_logits(main, aug, 0.5, 0.0), main + 0.5 * aug)


def test_defaults_and_errors():
    m = parse_mitigation("agla")
    assert (m.alpha, m.beta, m.matcher, m.mask_ratio) == (2.0, 0.5, "auto", None)
    with pytest.raises(InputError, match="unknown matcher"):
        parse_mitigation("agla:matcher=blip")
    with pytest.raises(InputError, match="needs clip_path"):
        generate(tiny("tiny-llava"), [{"prompt": PROMPT, "image": make_image(1)}], ["agla:matcher=clip"],
                 decode=DECODE)
    with pytest.raises(InputError, match="agla needs an image"):
        generate(tiny("tiny-llava"), [{"prompt": PROMPT}], ["agla"], decode=DECODE)


def test_mask_blacks_out_exactly_the_least_relevant_share():
    rel = 6.0 - torch.arange(4.0).view(-1, 1) - torch.arange(4.0).view(1, -1)  # the top-left is relevant
    mask = relevance_mask(rel, (40, 40), ratio=0.25, sigma=0.0)
    assert int(mask.sum()) == 400  # 25 % of 1600 pixels
    assert not mask[:20, :20].any() and mask[-8:, -8:].all()  # far from the corner goes black
    assert int(relevance_mask(rel, (40, 40), ratio=0.25).sum()) == 400  # smoothed: the same count
    assert not relevance_mask(rel, (40, 40), ratio=0.0).any()
    img = Image.fromarray(np.full((50, 40, 3), 200, dtype=np.uint8))
    out = np.array(augmented_view(img, Match(rel, 0.5, box=(0, 5, 40, 45)), ratio=0.25))
    assert (out[:5] == 200).all() and (out[45:] == 200).all()  # outside the box: untouched
    black = (out[5:45] == 0).all(-1)
    assert black.sum() == 400 and not black[:20, :20].any()


def test_center_crop_box():
    class P:
        do_center_crop = True
        size = {"shortest_edge": 32}
        crop_size = {"height": 32, "width": 32}

    assert center_crop_box(P(), Image.new("RGB", (40, 50))) == (0, 5, 40, 45)
    P.do_center_crop = False
    assert center_crop_box(P(), Image.new("RGB", (40, 50))) is None


def test_attention_matcher_reads_the_last_prompt_row():
    lvlm = tiny("tiny-llava")
    img = make_image(2)
    m = AttentionMatcher([1, 2]).match(lvlm, img, PROMPT)
    res = generate(lvlm, [{"prompt": PROMPT, "image": img}], decode=DecodeSpec(max_new_tokens=1),
                   stats=StatsRequest(last_row=True))[0]
    lay = res.stats["layout"]
    s, e = lay.image_spans[0][0] - lay.pad, lay.image_spans[0][1] - lay.pad
    rows = (res.stats["last_row"][1][0] + res.stats["last_row"][2][0]) / 2  # [H, Lk]
    torch.testing.assert_close(m.relevance, rows[:, s:e].mean(0).view(4, 4))
    assert m.similarity == pytest.approx(float(rows[:, s:e].sum(-1).mean()))
    assert 0.0 < m.similarity < 1.0


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_branch_is_the_augmented_view_alone(family):
    lvlm = tiny(family)
    img = make_image(3)
    out = generate(lvlm, [{"prompt": PROMPT, "image": img}], [RecAGLA(mask_ratio=0.4)], decode=DECODE)[0]
    view = VIEWS[0]
    black = (np.array(view) == 0).all(-1).mean()
    assert 0.3 < black < 0.5
    chosen = [int(agla_logits(m, a, 2.0, 0.5).argmax()) for m, a in LOG]
    assert chosen == out.token_ids
    if family == "tiny-llava":
        aug = torch.stack([a for _, a in LOG])
        torch.testing.assert_close(aug, forced_logits(lvlm, PROMPT, view, out.token_ids), atol=1e-4, rtol=1e-4)
    else:  # M-RoPE: compare the first step with the augmented view as the main row of its own request
        n = len(LOG)
        generate(lvlm, [{"prompt": PROMPT, "image": view}], [RecAGLA(alpha=0.0, beta=0.0)],
                 decode=DecodeSpec(max_new_tokens=1))
        torch.testing.assert_close(LOG[0][1], LOG[n][0], atol=1e-4, rtol=1e-4)


def test_zero_weight_and_seeded_sampling():
    lvlm = tiny("tiny-llava-next")
    req = {"prompt": PROMPT, "image": make_image(4)}
    base = generate(lvlm, [req], decode=DECODE)[0].token_ids
    assert generate(lvlm, [req], ["agla:alpha=0"], decode=DECODE)[0].token_ids == base
    sampled = DecodeSpec(max_new_tokens=5, ignore_eos=True, do_sample=True, seed=3)
    base = generate(lvlm, [req], decode=sampled)[0].token_ids
    assert generate(lvlm, [req], ["agla:alpha=0,beta=0"], decode=sampled)[0].token_ids == base
    out = generate(lvlm, [req], [RecAGLA(beta=0.0)], decode=sampled)[0]
    gen = torch.Generator().manual_seed(3)
    assert [select_token(m + 2 * a, sampled, gen) for m, a in LOG] == out.token_ids


def test_mixed_and_composed_batch_equals_solo():
    lvlm = tiny("tiny-llava")
    reqs = [
        {"prompt": PROMPT, "image": make_image(5), "mitigations": ["agla"]},
        {"prompt": "describe the image please", "image": make_image(6), "mitigations": ["agla:mask_ratio=0.3",
                                                                                         "vcd", "m3id:lam=0.5"]},
        {"prompt": "what", "image": make_image(7), "mitigations": ["causalmm:level=multimodal", "agla:alpha=1"]},
        {"prompt": "what color", "mitigations": []},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    assert batched == solo


def test_clip_matcher_from_a_local_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from clearsight.models.builtin import _llava_tokenizer

    tok = _llava_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    m = ClipMatcher(str(tmp_path)).match(None, make_image(8), PROMPT)
    assert m.relevance.shape == (4, 4) and 0.0 <= m.similarity <= 1.0 and m.box == (0, 5, 40, 45)
    lvlm = tiny("tiny-llava")
    out = generate(lvlm, [{"prompt": PROMPT, "image": make_image(8)}], [f"agla:clip_path={tmp_path}"],
                   decode=DECODE)[0]
    assert len(out.token_ids) == DECODE.max_new_tokens
    with pytest.raises(InputError, match="not a folder"):
        ClipMatcher(str(tmp_path / "missing")).match(None, make_image(8), PROMPT)


def test_attention_matcher_layers_out_of_range():
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError, match="out of range"):
        AttentionMatcher([99]).match(lvlm, make_image(2), PROMPT)
