"""M3ID: Multi-Modal Mutual-Information Decoding (Favero et al., "Multi-Modal Hallucination Control by
Visual Information Grounding", CVPR 2024).

A branch row sees the same prompt without the image (l_u); the main row sees it (l_c). Per step t
(the index of the token being chosen, counted from 1 for the first generated token):

    l_t = l_c + ((1 - g_t) / g_t) * (l_c - l_u),   g_t = exp(-lambda * t)       (paper Eq. 8-9)

so the weight ``(1 - g_t) / g_t = exp(lambda * t) - 1`` grows with t, countering the fading of the
visual conditioning over long answers. It is applied only when the conditioned model is not
confident: when ``max p_c >= threshold`` the step keeps l_c unchanged.

There is no official code and the paper's defaults are not confirmed (reference notes, Sec. 8 and
10). Our defaults, documented in docs/branch-mitigations.md:

- ``lam = 0.02``: weight exp(0.02 t) - 1 = 0.02 at the first token, 0.22 at t = 10, 1.0 at t = 35,
  2.7 at t = 64; comparable with VCD's alpha = 1 over a typical caption (64 tokens). For one-word
  (POPE-style) answers the effect is therefore small; raise ``lam`` there.
- ``threshold = 0.9``: the combination is skipped at steps where the image-conditioned model
  already gives one token >= 90 % probability.
- ``max_weight`` (default None = no cap) bounds the weight for very long generations.

No plausibility cut (the paper has none). lam = 0 gives weight 0: the tokens are exactly the unmitigated ones.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from clearsight.mitigations._branch_common import contrast, require_image
from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.registry import register

NOIMG = "noimg"
# lam * t is saturated here: a weight of e^30 (1e13) already leaves only the contrast l_c - l_u to decide in
# float32, and a larger exponent would overflow (math.expm1 raises past 709, float32 logits turn inf past 88)
MAX_EXPONENT = 30.0


def m3id_weight(t: int, lam: float, max_weight: float | None = None) -> float:
    """(1 - g_t) / g_t with g_t = exp(-lam t), i.e. exp(lam t) - 1 (optionally capped), lam t saturated at 30."""
    w = math.expm1(min(lam * t, MAX_EXPONENT))
    return min(w, max_weight) if max_weight is not None else w


def m3id_logits(main: torch.Tensor, noimg: torch.Tensor, t: int, lam: float, threshold: float,
                max_weight: float | None = None) -> torch.Tensor:
    """l_c + w_t (l_c - l_u) when max p_c < threshold, else l_c."""
    if float(torch.softmax(main.float(), -1).max()) >= threshold:
        return main
    w = m3id_weight(t, lam, max_weight)
    return contrast(main, noimg, w)  # (1 + w) l_c - w l_u


@register
class M3ID(Mitigation):
    name: Literal["m3id"] = "m3id"
    summary = "M3ID (Favero et al. 2024): l_c + (exp(lam t)-1)(l_c - l_noimg), when max p_c < threshold"
    kind = "branch"

    lam: float = Field(0.02, ge=0.0, description="lambda of g_t = exp(-lambda t): weight exp(lambda t) - 1 at token t")
    threshold: float = Field(0.9, gt=0.0, le=1.0, description="confidence gate: apply only when max p_c < threshold")
    max_weight: float | None = Field(None, ge=0.0, description="cap of the weight (None = uncapped)")

    def branches(self, ctx: RequestContext) -> list[Branch]:
        require_image(ctx, "m3id", "its branch is the same prompt without the image")
        return [Branch(NOIMG, image=None)]

    def combine(self, logits: dict[str, torch.Tensor], step: int, ctx: RequestContext) -> torch.Tensor | None:
        return m3id_logits(logits[MAIN], logits[NOIMG], step + 1, self.lam, self.threshold, self.max_weight)
