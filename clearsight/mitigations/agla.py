"""AGLA: Assembly of Global and Local Attention (An et al., "AGLA: Mitigating Object Hallucinations in
Large Vision-Language Models with Assembly of Global and Local Attention", CVPR 2025; code Lackel/AGLA).

Before the batch is built, a matcher (``agla_matchers``) locates the prompt-relevant region of the
image; the augmented view blacks out the ``ratio`` least relevant pixels (smoothed map; adaptive
``ratio = similarity / 2``, AGLA Sec. 3.2). A branch row sees the same prompt with the augmented
view. Per step (AGLA Eq. 6-7, released ``sample``):

    l = l_orig + alpha * l_aug   on tokens with p_orig >= beta * max p_orig;   alpha = 2, beta = 0.5

a product of experts (p ~ p_orig * p_aug^alpha), not a contrast. Cost: one extra unmitigated
prefill per request for the default attention matcher (one CLIP forward for ``clip``), then two
rows per token. alpha = 0 keeps the branch and applies only the cut.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from clearsight.errors import InputError
from clearsight.mitigations._branch_common import cut, plausible, require_image, weighted_sum
from clearsight.mitigations.agla_matchers import MATCHERS, augmented_view, match_for
from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.pai import LayerList
from clearsight.mitigations.registry import register

AUG = "aug"


def agla_logits(main: torch.Tensor, aug: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """AGLA Eq. 7: l_orig + alpha l_aug on the tokens with p_orig >= beta * max p_orig."""
    return cut(weighted_sum(main, [(alpha, aug)], 1.0), plausible(main, beta))


@register
class AGLA(Mitigation):
    name: Literal["agla"] = "agla"
    summary = "AGLA (An et al. 2025): assemble logits with a prompt-relevant masked view, l + alpha l_aug"
    kind = "branch"

    alpha: float = Field(2.0, ge=0.0, description="weight of the augmented view: l_orig + alpha l_aug")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="plausibility cut: keep p_orig >= beta * max p_orig")
    matcher: str = Field("auto", description="attention (the LVLM's own), clip (needs clip_path), or auto")
    clip_path: str | None = Field(None, description="local folder of a transformers CLIP model (the clip matcher)")
    mask_ratio: float | None = Field(None, ge=0.0, lt=1.0,
                                     description="fraction of pixels blacked out (None = similarity / 2)")
    sigma: float = Field(0.02, ge=0.0, description="Gaussian smoothing of the map, fraction of the longer side")
    matcher_layers: LayerList = Field(None, description="attention matcher layers (default: the middle half)")

    @field_validator("matcher")
    @classmethod
    def _known_matcher(cls, v: str) -> str:
        if v != "auto" and v not in MATCHERS:
            raise ValueError(f"unknown matcher '{v}': choose auto, {', '.join(sorted(MATCHERS))}")
        return v

    def _matcher_name(self) -> str:
        if self.matcher == "auto":
            return "clip" if self.clip_path else "attention"
        if self.matcher == "clip" and not self.clip_path:
            raise InputError("agla matcher=clip needs clip_path (a local folder with a transformers CLIP model)")
        return self.matcher

    def branches(self, ctx: RequestContext) -> list[Branch]:
        require_image(ctx, "agla", "its branch is the image with the prompt-irrelevant pixels masked")
        assert ctx.image is not None
        match = match_for(MATCHERS[self._matcher_name()](self), ctx)
        ratio = self.mask_ratio if self.mask_ratio is not None else min(match.similarity / 2, 0.99)
        view = augmented_view(ctx.image, match, ratio, self.sigma)
        ctx.state["agla"] = {"match": match, "ratio": ratio, "view": view}
        return [Branch(AUG, image=view)]

    def combine(self, logits: dict[str, torch.Tensor], step: int, ctx: RequestContext) -> torch.Tensor | None:
        return agla_logits(logits[MAIN], logits[AUG], self.alpha, self.beta)
