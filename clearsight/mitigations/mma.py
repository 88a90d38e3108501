"""Modality-mutual attention (AKI: Wang, Wang, Suzuki, Kobayashi, "Seeing is Understanding", ICML 2026;
code sony/aki).

Prefill only (paper Sec. 3.2, Fig. 2): image queries may also attend the question tokens that follow
the image, up to but excluding the assistant marker; everything else is causal, decode unchanged.
Needs a checkpoint trained (SFT) with this mask; applying it to another one warns clearly (same
rule as CCA: ``mma:trained=true`` or ``clearsight_trained_with=['mma']`` in the model config).

AKI's mask exactly, through the plan's rank mask with a second interval per query (plan step 4): every
key keeps its position as rank and every query its causal limit, and each image query also gets the
interval [end of the image, question end - 1], the question tokens after the image. So image->image stays
causal, image queries see the question, text queries are causal. With several images in one prompt the
interval starts after the last image (AKI is single-image).

The question ends at the chat template's assistant marker: the tokens the template adds for
``add_generation_prompt`` (`` ASSISTANT:`` for LLaVA-1.5, ``<|im_start|>assistant\n`` for ChatML,
``<|assistant|>\n`` for phi-3.5) stay hidden; end-of-turn tokens before the marker (``<|im_end|>``,
``<|end|>``) stay visible, as in AKI's mask.

Composition: the mask is written for every row of the request that receives edits
(``RequestContext.edit_rows``: the main row and other mitigations' branch rows) from that row's own
image span; rows without an image keep the causal mask. A branch with another prompt
(``Branch.prompt``) is assumed to end with the same assistant marker (INTER's ``prompt_removal=all`` rows
do not: their last tokens are then treated as the marker). Not combinable with CCA (both
own the prompt mask): refused with a ``PlanConflictError`` naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from clearsight.errors import InputError
from clearsight.mitigations.base import Mitigation, RequestContext
from clearsight.mitigations.cca import untrained_reason, warn_untrained
from clearsight.mitigations.pai import image_rows
from clearsight.mitigations.registry import register

_SENTINEL = "qqqsentinelqqq"


def marker_tokens(ctx: RequestContext) -> int:
    """Number of tokens of the assistant marker the chat template appends (``add_generation_prompt``): the
    tokens of the full prompt that end after the user turn (tokenizer offsets; a token straddling the
    boundary, as LLaVA's `` ASSISTANT`` with its space, belongs to the marker)."""
    adapter = ctx.lvlm.adapter
    full = adapter.chat_prompt(_SENTINEL, has_image=False)
    turn = adapter.chat_prompt(_SENTINEL, has_image=False, add_generation_prompt=False)
    if full == turn:
        return 0
    tok = adapter.tokenizer
    if full.startswith(turn) and getattr(tok, "is_fast", False):
        offsets = tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return sum(1 for _, end in offsets if end > len(turn))
    n_full, n_turn = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in (full, turn))
    return max(n_full - n_turn, 0)


def mma_tables(image_spans, question_end: int, length: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_rank, q_limit, q_lo2, q_hi2) [length] of one row: causal ranks and limits; image queries also see
    the keys from the end of the (last) image up to ``question_end`` (exclusive)."""
    rank = torch.arange(length)
    limit = rank.clone()
    lo2 = torch.zeros(length, dtype=torch.long)
    hi2 = torch.full((length,), -1, dtype=torch.long)
    if image_spans:
        after = max(e for _, e in image_spans)
        for s, e in image_spans:
            lo2[s:e] = after
            hi2[s:e] = question_end - 1
    return rank, limit, lo2, hi2


@register
class MMA(Mitigation):
    name: Literal["mma"] = "mma"
    summary = "modality-mutual attention (AKI, Wang et al.): image queries also see the question (needs MMA SFT)"
    kind = "plan"
    plan_fields = {"mask": "lets image queries see the question"}

    trained: bool = Field(False, description="assert the checkpoint was trained with MMA (silences the warning)")

    def cannot_act_on(self, config: Mapping[str, Any]) -> str | None:
        return untrained_reason("mma", self.trained, config)

    def apply(self, ctx: RequestContext) -> None:
        if not ctx.lvlm.adapter.causal_image_tokens:
            raise InputError(f"mma is not supported for {ctx.lvlm.adapter.family}: its image tokens attend to their "
                             "whole image at prefill, a prompt mask that the modality-mutual mask would replace")
        warn_untrained(ctx, "mma", "modality-mutual attention", "Sony/AKI-4B-phi-3.5-mini", self.trained)
        rows = image_rows(ctx)  # rows without an image keep the causal mask
        if not rows:
            return
        L0 = ctx.plan.prompt_len
        question_end = L0 - marker_tokens(ctx)  # left padding: every row's prompt ends at L0 with the marker
        tables = [mma_tables(ctx.layouts[row].image_spans, question_end, L0) for row in rows]
        rank, limit, lo2, hi2 = (torch.stack(t) for t in zip(*tables))
        ctx.plan.set_mask(rows, rank, limit, owner=self.name, q_lo2=lo2, q_hi2=hi2)
