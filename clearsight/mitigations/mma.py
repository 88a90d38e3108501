"""Modality-mutual attention (AKI: Wang, Wang, Suzuki, Kobayashi, "Seeing is Understanding", ICML 2026;
code sony/aki).

Prefill only (paper Sec. 3.2, Fig. 2): image queries may also attend the question tokens that follow
the image, up to but excluding the assistant marker; everything else is causal, decode unchanged.
Needs a checkpoint trained (SFT) with this mask; applying it to another one warns clearly (same
rule as CCA: ``mma:trained=true`` or ``clearsight_trained_with=['mma']`` in the model config).

Through the plan's rank/limit mask (key j visible to query i iff rank[j] <= limit[i]) the image
queries' limit is raised to the last question token. Deviation from AKI, stated plainly: a
rank/limit mask can only express nested visibility sets, so an image query then also sees the
image tokens after it (AKI keeps image->image causal). The exact AKI mask needs a two-interval
mask in the plan; until then this is the closest expressible form, as design.md describes it.

The question is found from the chat template: the tokens after the image, minus the template's
generation suffix (e.g. `` ASSISTANT:`` or ``<|im_end|>\\n<|im_start|>assistant\\n``).

Composition: the mask is written for every row of the request that receives edits
(``RequestContext.edit_rows``: the main row and other mitigations' branch rows) from that row's own
image span; rows without an image keep the causal mask. A branch with another prompt
(``Branch.prompt``) is assumed to end with the same template suffix. Not combinable with CCA (both
own the prompt mask): refused with a ``PlanConflictError`` naming both.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clearsight.mitigations.base import Mitigation, RequestContext
from clearsight.mitigations.cca import warn_untrained
from clearsight.mitigations.pai import image_rows
from clearsight.mitigations.registry import register

_SENTINEL = "qqqsentinelqqq"


def suffix_tokens(ctx: RequestContext) -> int:
    """Number of tokens the chat template adds after the user's text (the assistant marker and so on)."""
    adapter = ctx.lvlm.adapter
    text = adapter.chat_prompt(_SENTINEL, has_image=False)
    suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    if not suffix:
        return 0
    return len(adapter.tokenizer(suffix, add_special_tokens=False)["input_ids"])


def mma_tables(image_spans, question_end: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_rank, q_limit) [length] of one row: image queries see up to ``question_end`` (exclusive)."""
    rank = torch.arange(length)
    limit = rank.clone()
    for s, e in image_spans:
        limit[s:e] = torch.clamp(torch.tensor(question_end - 1), min=e - 1)
    return rank, limit


@register
class MMA(Mitigation):
    name: Literal["mma"] = "mma"
    summary = "modality-mutual attention (AKI, Wang et al.): image queries also see the question (needs MMA SFT)"
    kind = "plan"
    plan_fields = {"mask": "lets image queries see the question"}

    trained: bool = Field(False, description="assert the checkpoint was trained with MMA (silences the warning)")

    def apply(self, ctx: RequestContext) -> None:
        warn_untrained(ctx, "mma", "modality-mutual attention", "Sony/AKI-4B-phi-3.5-mini", self.trained)
        rows = image_rows(ctx)  # rows without an image keep the causal mask
        if not rows:
            return
        L0 = ctx.plan.prompt_len
        question_end = L0 - suffix_tokens(ctx)  # left padding: every row's prompt ends at L0 with the same suffix
        tables = [mma_tables(ctx.layouts[row].image_spans, question_end, L0) for row in rows]
        rank, limit = (torch.stack(t) for t in zip(*tables))
        ctx.plan.set_mask(rows, rank, limit, owner=self.name)
