"""Shared pieces of the branch-method tests (AGLA, CausalMM, VCD, M3ID) and tests of the shared helpers.

``forced_logits`` runs one row alone, outside the decoding loop: the prompt (with an optionally
transformed image and an optional plan edit) followed by the tokens a generation chose, in one
forward; its next-token logits at each generated position are what that row gives "alone".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from mithelp import make_image, tiny  # noqa: F401  (re-exported for the branch tests)

from clearsight.kernels.context import use_plan
from clearsight.kernels.plan import AttentionPlan
from clearsight.mitigations._branch_common import contrast, cut, plausible, weighted_sum


def forced_logits(
    lvlm,
    prompt: str,
    image,
    tokens: list[int],
    pixel_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    plan_edit: Callable[[AttentionPlan], None] | None = None,
) -> torch.Tensor:
    """[len(tokens), V]: next-token logits of one row given ``tokens[:t]``, t = 0..len-1 (LLaVA families)."""
    ad = lvlm.adapter
    batch = ad.encode([ad.chat_prompt(prompt, image is not None)], [image])
    if pixel_transform is not None:
        batch["pixel_values"] = pixel_transform(batch["pixel_values"])
    L0 = batch["input_ids"].shape[1]
    extra = torch.tensor([tokens[:-1]], dtype=torch.long).view(1, -1)
    batch["input_ids"] = torch.cat([batch["input_ids"], extra], 1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    plan = None
    if plan_edit is not None:
        layouts = ad.row_layouts(batch)
        plan = AttentionPlan(num_layers=ad.num_layers, num_heads=ad.num_heads, segment=ad.segments(batch),
                             layouts=layouts)
        plan_edit(plan)
    with torch.inference_mode(), use_plan(plan):
        out = lvlm.model(**batch, use_cache=False)
    return out.logits[0, L0 - 1:].float()


def test_plausibility_cut_keeps_exactly_the_tokens_above_beta_max():
    # probabilities 0.4, 0.3, 0.2, 0.1 (logits = log p): with beta = 0.5 the cut is 0.2
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    main = p.log() + 3.0  # a constant shift changes nothing
    assert plausible(main, 0.5).tolist() == [True, True, True, False]
    assert plausible(main, 0.6).tolist() == [True, True, False, False]
    assert plausible(main, 0.74).tolist() == [True, True, False, False]
    assert plausible(main, 0.76).tolist() == [True, False, False, False]
    assert plausible(main, 1.0).tolist() == [True, False, False, False]
    assert plausible(main, 0.0).all()
    # tokens an earlier combiner removed are never kept
    removed = main.clone()
    removed[1] = float("-inf")
    assert plausible(removed, 0.0).tolist() == [True, False, True, True]
    out = cut(torch.tensor([1.0, 2.0, 3.0, 4.0]), plausible(main, 0.6))
    assert out.tolist() == [1.0, 2.0, float("-inf"), float("-inf")]


def test_contrast_and_weighted_sum_by_hand():
    main = torch.tensor([1.0, -2.0, 0.5])
    other = torch.tensor([0.0, 1.0, 2.0])
    assert contrast(main, other, 1.0).tolist() == [2.0, -5.0, -1.0]  # 2 l - l'
    assert contrast(main, other, 0.0).tolist() == main.tolist()
    got = weighted_sum(main, [(-0.5, other), (2.0, other)], 3.0)
    assert got.tolist() == [3.0, -4.5, 4.5]
    # -inf in main stays -inf even with a zero weight (no NaN)
    main[1] = float("-inf")
    got = weighted_sum(main, [(0.0, other)], 0.0)
    assert got[1] == float("-inf") and not torch.isnan(got).any()


def test_forced_logits_match_the_loop_without_mitigation():
    from clearsight import DecodeSpec, generate

    lvlm = tiny("tiny-llava")
    img = make_image(11)
    log: list[torch.Tensor] = []
    from clearsight.mitigations import Mitigation

    class Rec(Mitigation):
        name: str = "rec"

        def combine(self, logits, step, ctx):
            log.append(logits["main"].clone())
            return None

    out = generate(lvlm, [{"prompt": "what is here?", "image": img}], [Rec()],
                   decode=DecodeSpec(max_new_tokens=4, ignore_eos=True))[0]
    forced = forced_logits(lvlm, "what is here?", img, out.token_ids)
    torch.testing.assert_close(torch.stack(log), forced, atol=1e-4, rtol=1e-4)
