"""The triton backend: every attention call runs the fused kernels of triton_attention.py.

Same calling convention as the reference and torch backends (transformers' AttentionInterface):
``fn(module, query[B,H,Lq,D], key[B,Hkv,Lk,D], value, attention_mask, scaling=, dropout=, **kwargs)
-> (out[B,Lq,H,D], None)``. The plan comes from the context variable (context.current_plan()).

Nothing here reads a tensor value on the host: the per-call work is Python attribute checks on the
plan (which features exist for this layer) plus, when transformers passes a mask, one tiny device
reduction per forward (cached across layers) for the valid key length of a static cache. So a
decode step needs no host synchronisation and can be captured in a CUDA graph.

- No plan bound: the kernel runs with transformers' mask (bool ``[B,1,Lq,Lk]``; None = causal),
  equal to SDPA.
- A plan bound: the mask comes from the plan's vectors (``pad``, ``k_rank``/``q_limit``/``q_lo2``/``q_hi2``, causal
  otherwise) and is never materialised; the layer's edits select the kernel's features.
"""

from __future__ import annotations

import weakref

import torch

from clearsight.kernels.context import current_plan
from clearsight.kernels.plan import AttentionPlan
from clearsight.kernels.reference import check_attention_kwargs
from clearsight.kernels.triton_attention import INTERPRET, KernelPlan, fused_attention

# (weak reference to the mask, kv_valid) of the last call: transformers builds one mask per forward
# and hands it to every layer, so the reduction runs once per forward
_KV_CACHE: list = [None, None]


def valid_key_length(attention_mask: torch.Tensor, batch: int, num_keys: int) -> torch.Tensor:
    """Per-row count of valid keys [B] from transformers' mask, on device (no host sync).

    A static cache hands over ``max_cache_len`` keys with the unwritten slots masked out: the last
    query row's last allowed key marks the end of the valid keys (reference/kernels.md §1.3).
    """
    prev_ref, prev = _KV_CACHE
    if prev_ref is not None and prev_ref() is attention_mask and prev.shape[0] == batch:
        return prev
    m = attention_mask[:, 0, -1, :num_keys]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    idx = torch.arange(1, num_keys + 1, device=m.device, dtype=torch.int32)
    kv = torch.where(m, idx, torch.zeros_like(idx)).amax(-1).to(torch.int32)
    if kv.shape[0] != batch:
        kv = kv.expand(batch).contiguous()
    _KV_CACHE[0], _KV_CACHE[1] = weakref.ref(attention_mask), kv
    return kv


def kernel_plan(plan: AttentionPlan | None, layer: int, attention_mask: torch.Tensor | None,
                window: int | None = None) -> KernelPlan:
    """The vectors of one layer's edits, as the kernel reads them (no copies of plan tensors); ``window``: the
    layer's sliding window (transformers' mask already holds it when no plan is bound)."""
    if plan is None:
        return KernelPlan(dense_mask=attention_mask)
    edit = plan.layer_edit(layer)
    kp = KernelPlan(pad=plan.pad, prompt_len=plan.prompt_len, window=window)
    if plan.k_rank is not None:
        kp.k_rank, kp.q_limit, kp.q_lo2, kp.q_hi2 = plan.k_rank, plan.q_limit, plan.q_lo2, plan.q_hi2
    seg = edit.segment if edit is not None and edit.segment is not None else plan.segment
    kp.segment = seg.contiguous()
    if plan.stats.wants(layer):
        kp.want_segment_mass = plan.stats.segment_mass
        kp.want_last_row = plan.stats.last_row
    if edit is None:
        return kp
    if edit.bias is not None:
        kp.bias = edit.bias.float().contiguous()
    if edit.abs_bias is not None:
        kp.abs_bias = edit.abs_bias.float().contiguous()
        kp.abs_from = edit.abs_from
    if edit.head_scale is not None:
        kp.head_scale = edit.head_scale.float().contiguous()
    if edit.counterfactual is not None:
        cf = edit.counterfactual
        kp.cf_kind, kp.cf_seed, kp.cf_source = cf.kind, cf.seed, cf.source.contiguous()
    if edit.redistribute is not None:
        r = edit.redistribute
        kp.red_p, kp.red_rho = r.p_move.float(), r.rho.float()
        kp.red_min, kp.red_from = r.min_image_mass.float(), r.rows_from
    return kp


def triton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AttentionInterface function of the triton backend (inference only: ``dropout`` is ignored)."""
    if query.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "the triton attention backend needs a CUDA device; on the CPU it runs only under the Triton "
            "interpreter: export TRITON_INTERPRET=1 before starting Python (it is read when the kernels are "
            "defined), or use the torch backend"
        )
    window = check_attention_kwargs(module, kwargs)
    plan = current_plan()
    layer = module.layer_idx
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if attention_mask is None and 1 < Lq < Lk:
        # prefill into an empty static cache: transformers passes max_cache_len keys and no mask;
        # SDPA slices them the same way
        key, value, Lk = key[:, :, :Lq], value[:, :, :Lq], Lq
    kv_valid = valid_key_length(attention_mask, B, Lk) if attention_mask is not None else None
    kp = kernel_plan(plan, layer, attention_mask, window)
    scale = scaling if scaling is not None else D**-0.5
    out, masses, last_row = fused_attention(query, key, value, kp, scale, kv_valid=kv_valid)
    if plan is not None:
        if masses is not None:
            plan.stats_out.segment_mass.setdefault(layer, []).append(masses)
        if last_row is not None:
            plan.stats_out.last_row.setdefault(layer, []).append(last_row)
    return out, None
