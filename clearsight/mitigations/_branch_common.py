"""Shared pieces of the multi-branch (logits-level) mitigations: AGLA, CausalMM, VCD, M3ID.

The plausibility cut (VCD, Leng et al. 2024, Eq. 4 "adaptive plausibility constraint"; reused by AGLA
and CausalMM) keeps the tokens whose probability under the *reference* distribution is at least
``beta`` times the largest one: ``V_head = {v : p(v) >= beta * max_w p(w)}``; every other token gets
``-inf``. The reference is the ``"main"`` logits the combiner receives, i.e. the model's own logits
when the method is the only (or the first) combiner, and the logits combined so far when it follows
another combiner. So an earlier combiner's cut is never undone (its ``-inf`` stays ``-inf``) and the
last cut in the chain is taken on the distribution that it refines.

All combinations work on raw logits. Every formula here is a sum of logit vectors whose weights add
up to 1 (contrasts) or is a product of experts (AGLA), so adding a constant to one branch's logits
changes the combined logits by a constant too: raw logits and log-probabilities give the same
softmax, the same greedy token and the same sampled token.
"""

from __future__ import annotations

import math

import torch

from clearsight.errors import InputError
from clearsight.mitigations.base import RequestContext

NEG_INF = float("-inf")


def plausible(main: torch.Tensor, beta: float) -> torch.Tensor:
    """Bool [V]: ``p_main(v) >= beta * max p_main`` (all True for beta <= 0).

    Computed in log space: ``log p(v) >= log beta + max log p``; tokens already at -inf are never kept.
    """
    lp = torch.log_softmax(main.float(), -1)
    if beta <= 0:
        return torch.isfinite(lp)
    return lp >= math.log(beta) + lp.max()


def cut(combined: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Tokens outside ``keep`` become -inf."""
    return combined.masked_fill(~keep, NEG_INF)


def weighted_sum(main: torch.Tensor, terms: list[tuple[float, torch.Tensor]], main_weight: float) -> torch.Tensor:
    """``main_weight * main + sum_i w_i * l_i``, with tokens at -inf in ``main`` left at -inf.

    (A zero weight times -inf would give NaN; tokens an earlier combiner removed stay removed.)
    """
    finite = torch.isfinite(main)
    base = torch.where(finite, main.float(), torch.zeros_like(main, dtype=torch.float32))
    out = main_weight * base
    for w, logits in terms:
        out = out + w * logits.float()
    return out.masked_fill(~finite, NEG_INF)


def contrast(main: torch.Tensor, other: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 + alpha) * main - alpha * other`` (VCD Eq. 3, CausalMM's single-counterfactual form)."""
    return weighted_sum(main, [(-alpha, other)], 1.0 + alpha)


def require_image(ctx: RequestContext, method: str, why: str) -> None:
    """Branch methods that contrast against an image variant need an image: fail clearly without one."""
    if ctx.image is None:
        raise InputError(f"{method} needs an image ({why}); request {ctx.index} has none: "
                         f"drop {method} for text-only requests")
