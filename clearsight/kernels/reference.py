"""The reference backend: explicit float32 softmax, every plan feature written out plainly.

This is the oracle the torch and triton backends are tested against. It materialises the full
[B, H, Lq, Lk] scores, so it is slow on long prompts; it can also keep one layer's full maps for
the dashboard (``plan.capture_layer``).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv  # grouped-query attention

from clearsight.errors import InputError
from clearsight.kernels.context import current_plan
from clearsight.kernels.plan import (
    AttentionPlan,
    Counterfactual,
    counterfactual_weights,
    gather_key_values,
    redistribution_factors,
    segment_one_hot,
)


def hf_allowed(attention_mask: torch.Tensor | None, B: int, Lq: int, Lk: int, device) -> torch.Tensor:
    """The mask transformers passed (bool, float or None = causal) as [B, 1, Lq, Lk] bool."""
    if attention_mask is None:
        q = torch.arange(Lk - Lq, Lk, device=device).view(-1, 1)
        return (torch.arange(Lk, device=device).view(1, -1) <= q).view(1, 1, Lq, Lk).expand(B, 1, Lq, Lk)
    m = attention_mask[:, :, :, :Lk]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def explicit_probabilities(
    plan: AttentionPlan | None,
    layer: int,
    scores: torch.Tensor,
    allowed: torch.Tensor,
    q_index: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """Plan steps 2-7 on explicit scores [B, H, Lq, Lk] (float32) -> probabilities (``allowed`` already narrowed
    to the layer's sliding ``window``, which keys the per-forward caches)."""
    edit = plan.layer_edit(layer) if plan is not None else None
    s = scores
    if edit is not None:
        assert plan is not None
        seg = plan.segments(layer, scores.shape[-1])
        if edit.bias is not None:
            s = s + gather_key_values(edit.bias, seg)
        if edit.abs_bias is not None:
            assert edit.abs_from is not None
            rows = (q_index.view(1, -1) >= edit.abs_from.view(-1, 1)).view(s.shape[0], 1, -1, 1)
            s = s + rows * gather_key_values(edit.abs_bias, seg) * scores.abs()
    s = torch.where(allowed, s, float("-inf"))
    a = torch.softmax(s, dim=-1)
    if edit is None:
        return a
    if edit.counterfactual is not None:
        cf = edit.counterfactual
        src = cf.source
        if Counterfactual.SHUFFLED in edit.counterfactual_kinds and src.shape[1] < seg.shape[1]:
            # generated keys map to themselves
            extra = torch.arange(src.shape[1], seg.shape[1], device=src.device).repeat(src.shape[0], 1)
            src = torch.cat([src, extra], 1)
        random = Counterfactual.RANDOM in edit.counterfactual_kinds
        grid = plan.counterfactual_grid(layer, allowed, q_index, a.dtype, random, window)
        a = counterfactual_weights(a, grid.image_keys, cf.kind, cf.seed, src, q_index, plan.pad,
                                   edit.counterfactual_kinds, grid,
                                   plan.counterfactual_draws(layer, grid) if random else None)
    if edit.redistribute is not None:
        masses = torch.einsum("bhqk,bks->bhqs", a, segment_one_hot(seg, a.dtype))
        c = redistribution_factors(masses, edit.redistribute, q_index)
        a = a * torch.gather(c, 3, seg.view(seg.shape[0], 1, 1, -1).expand(a.shape))
    return a


def record_stats(plan: AttentionPlan, layer: int, a: torch.Tensor) -> None:
    """Store the requested statistics of probabilities a [B, H, Lq, Lk]."""
    if plan.stats.segment_mass:
        seg = plan.segments(layer, a.shape[-1])
        masses = torch.einsum("bhqk,bks->bhqs", a, segment_one_hot(seg, a.dtype))
        plan.stats_out.segment_mass.setdefault(layer, []).append(masses)
    if plan.stats.last_row:
        plan.stats_out.last_row.setdefault(layer, []).append(a[:, :, -1, :].clone())


def finish_output(plan: AttentionPlan | None, layer: int, out: torch.Tensor) -> torch.Tensor:
    """[B, H, Lq, D] -> head_scale -> [B, Lq, H, D] (the layout transformers expects)."""
    edit = plan.layer_edit(layer) if plan is not None else None
    if edit is not None and edit.head_scale is not None:
        out = out * edit.head_scale.to(out.dtype).view(*edit.head_scale.shape, 1, 1)
    return out.transpose(1, 2).contiguous()


def check_attention_kwargs(module: torch.nn.Module, kwargs: dict) -> int | None:
    """The layer's sliding window (None: global), after refusing attention features no backend executes.

    Sliding windows are executed (``AttentionPlan.windowed``); logit soft-capping is not, and no supported
    family passes it (Gemma 3 keeps ``attn_logit_softcapping`` in its config but never hands it to attention),
    so a model that does is refused rather than run without it."""
    if kwargs.get("softcap") is not None:
        raise InputError(f"{type(module).__name__} asks for attention logit soft-capping, which clearsight's "
                         "backends do not execute: use backend sdpa or eager (stock attention, no attention edits)")
    window = kwargs.get("sliding_window")
    return int(window) if window else None


def reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    window = check_attention_kwargs(module, kwargs)
    plan = current_plan()
    layer = module.layer_idx
    B, H, Lq, D = query.shape
    n_rep = H // key.shape[1]
    k = repeat_kv(key, n_rep).float()
    v = repeat_kv(value, n_rep).float()
    Lk = k.shape[2]
    scale = scaling if scaling is not None else D**-0.5
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    q_index = torch.arange(Lk - Lq, Lk, device=query.device)
    if plan is not None:
        allowed = plan.windowed(plan.allowed(Lq, Lk), window)
    else:
        allowed = hf_allowed(attention_mask, B, Lq, Lk, query.device)  # transformers' mask has the window
    a = explicit_probabilities(plan, layer, scores, allowed, q_index, window)
    if plan is not None:
        if plan.stats.wants(layer):
            record_stats(plan, layer, a)
        if plan.capture_layer == layer:
            plan.captured.append(a.detach().cpu())
    out = torch.matmul(a, v)
    return finish_output(plan, layer, out).to(query.dtype), None
