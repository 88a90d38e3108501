"""CausalMM (Zhou et al., "Mitigating Modality Prior-Induced Hallucinations in Multimodal Large Language
Models via Deciphering Attention Causality", ICLR 2025; code The-Martyr/CausalMM).

Counterfactual branches, each a row of the batch with the request's prompt and image, whose
attention is replaced by a counterfactual one (paper Sec. 3.3, "counterfactual attention"):

- ``llm``: in the chosen decoder layers (default: all) the row's attention over image keys is
  replaced by a uniform, random, shuffled or reversed distribution with the same image mass (the
  plan's ``counterfactual``, kernels/plan.py step 6), for every query row, prompt and generated.
  ``llm_scope=all`` replaces the whole map instead, as the released code does: every prompt key of the
  row is relabelled as an image key in those layers (the plan's per-layer segments), so the
  counterfactual covers all of them with the row's whole prompt mass (at decode steps the generated
  keys, always text in the plan, keep their own attention).
- ``vision``: in the vision tower's feature layer (the layer whose output the projector reads,
  LLaVA's -2) the self-attention of the branch's image is replaced by a counterfactual map over all
  its tokens (same four kinds, rows renormalised) and the layer's output recomputed from it. This
  is a real re-run of that layer with counterfactual attention; the released LLaVA code instead
  rescales the patch features by a resized shuffled attention map (reference notes, Sec. 4), which
  is close to a blank image. Needs a CLIP-style tower (LLaVA, LLaVA-NeXT), not Qwen2-VL.
- ``multimodal``: both branches.

Per step (paper Eq. 9-10; ``causalmm_sm.py`` / ``causalmm_mm.py`` of the released code):

    single:      l = (1 + gamma) l_main - gamma l_cf
    multimodal:  l = (1 + 2 gamma) l_main - gamma l_cf_vision - gamma l_cf_llm
    on tokens with p_main >= epsilon * max p_main;   gamma = 1, epsilon = 0.6 (llava1.5_eval.bash).

Each counterfactual branch keeps its own KV cache rows for the whole generation, so the contrast
acts at every token (the released code reuses the main pass's cache and loses the counterfactual
after the first token: not copied). gamma = 0 keeps the branches and applies only the cut.

Random and shuffled counterfactuals are keyed by a seed (``seed + layer`` at LLM level); the plan's
counter-based random numbers use positions counted from each row's first non-padding token, so a
branch draws the same numbers alone and inside any batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from clearsight.config import MAX_SEED, Seed
from clearsight.errors import InputError
from clearsight.kernels.plan import Counterfactual, Segment, counterfactual_weights, uniform_hash
from clearsight.mitigations._branch_common import cut, plausible, require_image, weighted_sum
from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.pai import LayerList, boost_layers
from clearsight.mitigations.registry import register

CF_LLM = "cf_llm"
CF_VISION = "cf_vision"
Kind = Literal["uniform", "random", "shuffled", "reversed"]

def causalmm_logits(main: torch.Tensor, cfs: list[torch.Tensor], gamma: float, epsilon: float) -> torch.Tensor:
    """(1 + n gamma) l - gamma sum_i l_cf_i (n = 1: single, n = 2: multimodal), cut at p >= epsilon max p."""
    combined = weighted_sum(main, [(-gamma, cf) for cf in cfs], 1.0 + gamma * len(cfs))
    return cut(combined, plausible(main, epsilon))


def counterfactual_vision_attention(attn: torch.nn.Module, hidden: torch.Tensor, kind: Counterfactual | str,
                                    seed: int) -> torch.Tensor:
    """A CLIP-style self-attention re-run with counterfactual weights: hidden [n, T, C] -> output [n, T, C].

    Weights over all T tokens (CLS included): uniform 1/T, random U(0, 1) renormalised, a seeded key
    permutation of the real map, or ``max - a`` renormalised (``kernels.plan.counterfactual_weights``).
    """
    kind = Counterfactual[kind.upper()] if isinstance(kind, str) else Counterfactual(kind)
    n, T, C = hidden.shape
    H = int(attn.num_heads)
    x = hidden.float()

    def heads(proj: torch.nn.Module) -> torch.Tensor:
        return proj(hidden).float().view(n, T, H, C // H).transpose(1, 2)

    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    a = torch.softmax(q @ k.transpose(-1, -2) * float(attn.scale), -1)
    keys = torch.ones(n, 1, T, T, dtype=torch.bool, device=x.device)
    idx = torch.arange(T, device=x.device)
    source = idx[torch.argsort(uniform_hash(torch.tensor(seed), torch.tensor(-2), torch.tensor(-1), idx))]
    a_cf = counterfactual_weights(
        a, keys, torch.full((n,), int(kind), device=x.device), torch.full((n,), seed, device=x.device),
        source.repeat(n, 1), idx, torch.zeros(n, dtype=torch.long, device=x.device), frozenset({int(kind)}))
    out = (a_cf @ v).transpose(1, 2).reshape(n, T, C).to(hidden.dtype)
    return attn.out_proj(out)


def vision_rows(ctx: RequestContext, row: int) -> slice:
    """Rows of the vision tower's batch that hold the image of batch row ``row`` (LLaVA: 1; NeXT: its tiles)."""
    image_index = sum(1 for lay in ctx.layouts[:row] if lay.image_spans)
    counts = ctx.lvlm.adapter.vision_tiles_per_image(ctx.inputs)[: image_index + 1]
    start = sum(counts[:image_index])
    return slice(start, start + counts[image_index])


class _VisionCounterfactual:
    """Forward hook on the vision feature layer's attention: counterfactual output for one image's rows."""

    def __init__(self, spec: CausalMM, ctx: RequestContext) -> None:
        self.spec, self.ctx = spec, ctx
        self.rows = vision_rows(ctx, ctx.rows[f"causalmm.{CF_VISION}"])
        self.handle: Any = None

    def __call__(self, attn: torch.nn.Module, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        if self.ctx.step != 0:
            return None
        out = output.clone()
        out[self.rows] = counterfactual_vision_attention(attn, hidden[self.rows], self.spec.vision_kind,
                                                         self.spec.seed)
        return out

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


@register
class CausalMM(Mitigation):
    name: Literal["causalmm"] = "causalmm"
    summary = "CausalMM (Zhou et al. 2025): contrast with counterfactual-attention branches, (1+g) l - g l_cf"
    kind = "branch"
    plan_fields = {"counterfactual": "replaces the attention over the image keys of its counterfactual row"}
    plan_rows = "own"

    gamma: float = Field(1.0, ge=0.0, description="contrast weight: (1+gamma) l - gamma l_cf")
    epsilon: float = Field(0.6, ge=0.0, le=1.0, description="plausibility cut: keep p >= epsilon * max p (0 = off)")
    level: Literal["llm", "vision", "multimodal"] = Field(
        "llm", description="counterfactual in the LLM's image attention, the vision feature layer, or both")
    llm_kind: Kind = Field("random", description="LLM-level counterfactual attention on image keys")
    llm_scope: Literal["image", "all"] = Field(
        "image", description="LLM-level counterfactual over the image keys (image) or the whole map (all, the "
        "released code)")
    vision_kind: Kind = Field("shuffled", description="vision-level counterfactual attention (released code: shuffle)")
    layers: LayerList = Field(None, description="decoder layers of the LLM-level counterfactual (default: all)")
    seed: Seed = Field(0, description="seed of the random / shuffled counterfactuals")

    def edits_plan(self) -> bool:
        return CF_LLM in self._branch_names()  # the vision-level counterfactual is a hook, not a plan edit

    def refuses(self, other: Mitigation) -> str | None:
        if self.llm_scope == "all" and self.edits_plan() and other.edits_plan() and (
                "segments" in other.plan_fields or other.abs_bias_rows is not None):
            return (f"causalmm:llm_scope=all relabels every prompt key of its counterfactual row as an image key, "
                    f"and {other.name} writes that row's key segments or boosts its image keys; use "
                    f"causalmm:llm_scope=image to combine them")
        return None

    def _branch_names(self) -> list[str]:
        return {"llm": [CF_LLM], "vision": [CF_VISION], "multimodal": [CF_VISION, CF_LLM]}[self.level]

    def branches(self, ctx: RequestContext) -> list[Branch]:
        require_image(ctx, "causalmm", "its branches are counterfactual attention over the image")
        if CF_VISION in self._branch_names() and not ctx.lvlm.adapter.vision_feature_hook:
            raise InputError(f"causalmm level={self.level} needs a CLIP-style vision tower (LLaVA, LLaVA-NeXT, "
                             f"OneVision); {ctx.lvlm.adapter.family} has none: use level=llm")
        return [Branch(name) for name in self._branch_names()]

    def apply(self, ctx: RequestContext) -> None:
        if CF_LLM not in self._branch_names():
            return
        row = ctx.rows[f"causalmm.{CF_LLM}"]
        kind = Counterfactual[self.llm_kind.upper()]
        whole = None
        if self.llm_scope == "all":  # the released code's whole-map counterfactual: every prompt key is "image"
            whole = ctx.plan.segment[row].clone()
            whole[ctx.layouts[row].pad:] = Segment.IMAGE
        for layer in boost_layers(self.layers, ctx.plan.num_layers, start=0):
            if whole is not None:
                ctx.plan.set_segments(layer, [row], whole.unsqueeze(0), owner=self.name)
            # seed + layer, wrapped into int64 for seeds within num_layers of 2**63
            ctx.plan.set_counterfactual([layer], [row], kind, (self.seed + layer) & MAX_SEED, owner=self.name)

    def install(self, ctx: RequestContext) -> Any | None:
        if CF_VISION not in self._branch_names():
            return None
        hook = _VisionCounterfactual(self, ctx)
        hook.handle = ctx.lvlm.adapter.hook_vision_feature_attention(hook)
        return hook

    def combine(self, logits: dict[str, torch.Tensor], step: int, ctx: RequestContext) -> torch.Tensor | None:
        return causalmm_logits(logits[MAIN], [logits[n] for n in self._branch_names()], self.gamma, self.epsilon)
