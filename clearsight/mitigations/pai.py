"""PAI: "Paying More Attention to Image" (Liu, Zheng, Chen, ECCV 2024; code LALBJ/PAI).

Two parts, both training-free:

1. Attention boost (paper Sec. 4.2, Eq. 5): in layers 2..L-1, all heads, on the query row that
   predicts the next token (the last prompt row at prefill, every generated row after), every
   image key's pre-softmax score becomes ``s_j + alpha * |s_j|`` (alpha = 0.2 in the README). Written
   as the plan's score-dependent ``abs_bias`` on the image segments (IMAGE and IMAGE_SINK, so VAR's
   per-layer sink relabelling does not hide image keys from the boost).
2. Image-guided logit refinement (paper Sec. 4.3, Eq. 7): a text-only branch (the same prompt with
   no image, no boost) runs in the same batched forward; per step
   ``logits = gamma * log p_img + (1 - gamma) * log p_noimg`` with gamma = 1.1 (README; argparse says
   2), keeping only tokens with ``p_img >= cut * max p_img`` (cut = 0.1). gamma = 1 needs no branch.

Composition: the boost is written for every row of the request that receives edits (the main row
and the branch rows of other mitigations, ``RequestContext.edit_rows``) and carries an image, each
with its own padding and image span; rows without an image (PAI's own text-only row, M3ID's) get
nothing.

alpha = 0 and gamma = 1 write nothing: the tokens are exactly the unmitigated ones.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field

from clearsight.errors import InputError
from clearsight.kernels.plan import QueryRows, Segment
from clearsight.mitigations._branch_common import cut as apply_cut
from clearsight.mitigations._branch_common import plausible, weighted_sum
from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.registry import register

NOIMG = "noimg"


def _one_or_many(v: Any) -> Any:
    """CLI ``layers=3`` arrives as "3", ``layers=2|3`` as a list: both become lists."""
    if isinstance(v, int | str) and not isinstance(v, bool):
        return [v]
    return v


# a list of layer indices, or None for the method's default layers (shared by the attention-edit methods)
LayerList = Annotated[list[int] | None, BeforeValidator(_one_or_many)]


def boost_layers(layers: list[int] | None, num_layers: int, start: int = 2) -> list[int]:
    """The paper's layers 2..L-1 (``start_layer=2, end_layer=32`` for 32 layers), or the user's list."""
    if layers is None:
        return list(range(min(start, num_layers), num_layers))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise InputError(f"layers {bad} out of range: the language model has {num_layers} layers (0..{num_layers - 1})")
    return sorted(set(layers))


def image_rows(ctx: RequestContext) -> list[int]:
    """The request's rows that receive single-pass edits and carry an image (main row first)."""
    return [row for row in ctx.edit_rows if ctx.layouts[row].image_spans]


def guided_logits(main: torch.Tensor, noimg: torch.Tensor, gamma: float, cut: float) -> torch.Tensor:
    """PAI Eq. 7: gamma * log p_img + (1 - gamma) * log p_noimg, tokens with p_img < cut * max p_img removed."""
    lp_img = torch.log_softmax(main.float(), -1)
    lp_txt = torch.log_softmax(noimg.float(), -1)
    # weighted_sum keeps tokens an earlier combiner removed at -inf (gamma * -inf would be NaN at gamma = 0)
    return apply_cut(weighted_sum(lp_img, [(1.0 - gamma, lp_txt)], gamma), plausible(main, cut))


@register
class PAI(Mitigation):
    name: Literal["pai"] = "pai"
    summary = "PAI (Liu et al. 2024): boost image-key scores s += alpha|s| on the predicting row + text-only guidance"
    kind = "plan"
    first_plan_layer = 2  # default layers 2..L-1
    abs_bias_rows = QueryRows.LAST

    alpha: float = Field(0.2, ge=0.0, description="attention boost: s += alpha*|s| on image keys (0 = off)")
    gamma: float = Field(1.1, ge=0.0, description="guidance: gamma*log p_img + (1-gamma)*log p_noimg (1 = no branch)")
    cut: float = Field(0.1, ge=0.0, le=1.0, description="plausibility cut of the guidance: keep p_img >= cut*max")
    layers: LayerList = Field(None, description="boosted layers (default 2..L-1, the paper's 2..31)")

    def edits_plan(self) -> bool:
        return self.alpha != 0.0

    def branches(self, ctx: RequestContext) -> list[Branch]:
        # guidance contrasts with the image: a request without one would only duplicate its main row
        return [Branch(NOIMG, image=None)] if self.gamma != 1.0 and ctx.image is not None else []

    def apply(self, ctx: RequestContext) -> None:
        if self.alpha == 0.0:
            return
        layers = boost_layers(self.layers, ctx.plan.num_layers)
        rows = image_rows(ctx)
        if not rows:
            return
        for seg in (Segment.IMAGE, Segment.IMAGE_SINK):
            ctx.plan.add_abs_bias(layers, rows, seg, self.alpha, QueryRows.LAST, owner=self.name)

    def combine(self, logits: dict[str, torch.Tensor], step: int, ctx: RequestContext) -> torch.Tensor | None:
        if NOIMG not in logits:
            return None
        return guided_logits(logits[MAIN], logits[NOIMG], self.gamma, self.cut)
