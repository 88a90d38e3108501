"""The torch backend: PyTorch SDPA, the fast path on CPU.

- A layer whose probabilities the plan does not change runs transformers' own ``sdpa_attention_forward``
  with the mask transformers built (then ``head_scale``, if any), so an empty plan costs one
  context-variable lookup per layer. A custom prompt mask matters only while prompt rows are queries:
  decode steps of unedited layers take the stock path too.
- Constant biases and custom masks become one float mask for SDPA.
- VAR's redistribution uses the two-pass trick: pass 1 is SDPA with the one-hot key segments as
  values (giving each row's segment masses), pass 2 adds ``log c_segment`` to the mask. Exact, and
  never materialises the probabilities.
- Score-dependent edits (``abs_bias``, counterfactual) and last-row statistics run only the rows
  they touch through the explicit path of the reference backend (at decode that is one row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from clearsight.kernels.context import current_plan
from clearsight.kernels.plan import (
    AttentionPlan,
    LayerEdit,
    gather_key_values,
    redistribution_factors,
    segment_one_hot,
)
from clearsight.kernels.reference import check_attention_kwargs, explicit_probabilities, finish_output


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _first_explicit_row(plan: AttentionPlan, edit: LayerEdit | None, layer: int, Lq: int, Lk: int) -> int:
    """Index of the first query row that needs the explicit path (Lq = none). No host synchronisation."""
    q0 = Lq
    if edit is not None:
        if edit.abs_rows_from is not None:
            q0 = min(q0, max(edit.abs_rows_from - (Lk - Lq), 0))
        if edit.counterfactual_active:
            q0 = 0
    if plan.stats.last_row and plan.stats.wants(layer):
        q0 = min(q0, Lq - 1)
    return q0


def _sdpa_rows(
    plan: AttentionPlan,
    edit: LayerEdit | None,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    q_index: torch.Tensor,
    scale: float,
    want_masses: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA over these query rows; ``mask`` is the plan's additive mask for them [B, 1, Lq, Lk]."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    seg = plan.segments(layer, Lk)
    if edit is not None and edit.bias is not None:
        mask = mask + gather_key_values(edit.bias, seg).to(q.dtype)
    red = edit.redistribute if edit is not None else None
    masses = None
    if red is not None or want_masses:
        onehot = segment_one_hot(seg, q.dtype).unsqueeze(1).expand(B, H, Lk, -1)
        masses = F.scaled_dot_product_attention(q, k, onehot, attn_mask=mask, scale=scale).float()
    if red is not None:
        assert masses is not None
        c = redistribution_factors(masses, red, q_index)
        log_c = torch.log(c).to(q.dtype)  # [B, H, Lq, S]
        mask = mask + torch.gather(log_c, 3, seg.view(B, 1, 1, Lk).expand(B, H, Lq, Lk))
        masses = masses * c
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out, masses


def torch_attention(
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
    edit = plan.layer_edit(layer) if plan is not None else None
    stats = plan is not None and plan.stats.wants(layer)
    if plan is None or not (
        stats
        or (edit is not None and edit.edits_scores)
        or (plan.has_custom_mask and not plan.only_generated_queries(query.shape[2], key.shape[2]))
    ):
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if edit is not None and edit.head_scale is not None:
            out = out * edit.head_scale.to(out.dtype).view(out.shape[0], 1, -1, 1)
        return out, None

    B, H, Lq, D = query.shape
    n_rep = H // key.shape[1]
    k = repeat_kv(key, n_rep)
    v = repeat_kv(value, n_rep)
    Lk = k.shape[2]
    scale = scaling if scaling is not None else D**-0.5
    q_index = plan.query_index(Lq, Lk)
    allowed = plan.windowed(plan.allowed(Lq, Lk), window)
    q0 = _first_explicit_row(plan, edit, layer, Lq, Lk)

    outs, masses, probs = [], [], None
    if q0 > 0:
        out, m = _sdpa_rows(
            plan, edit, layer, query[:, :, :q0], k, v, plan.float_mask(Lq, Lk, query.dtype, window)[:, :, :q0],
            q_index[:q0], scale,
            want_masses=stats and plan.stats.segment_mass,
        )
        outs.append(out.float())
        if m is not None:
            masses.append(m)
    if q0 < Lq:
        # at decode this path's cost is its op count (one query row): no no-op casts or slices
        scores = torch.matmul(_f32(query if q0 == 0 else query[:, :, q0:]), _f32(k).transpose(-1, -2)) * scale
        probs = explicit_probabilities(plan, layer, scores, allowed if q0 == 0 else allowed[:, :, q0:],
                                       q_index if q0 == 0 else q_index[q0:], window)
        outs.append(torch.matmul(probs, _f32(v)))
        if stats and plan.stats.segment_mass:
            seg = plan.segments(layer, Lk)
            masses.append(torch.einsum("bhqk,bks->bhqs", probs, segment_one_hot(seg, probs.dtype)))
    if stats:
        if plan.stats.segment_mass:
            plan.stats_out.segment_mass.setdefault(layer, []).append(torch.cat(masses, 2))
        if plan.stats.last_row:
            assert probs is not None
            plan.stats_out.last_row.setdefault(layer, []).append(probs[:, :, -1, :].clone())
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    out = finish_output(plan, layer, out)
    return (out if out.dtype == query.dtype else out.to(query.dtype)), None
