"""Shared pieces of the mitigation tests: tiny models, a q/k/v spy on attention, plain-torch attention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# one model cache for the whole suite: the tiny models and images come from tests/tinyworld.py
from tinyworld import FAMILIES, make_image, tiny  # noqa: F401  (re-exported to the mitigation tests)
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from clearsight.kernels.reference import reference_attention
from clearsight.kernels.torch_backend import torch_attention


@dataclass
class Call:
    layer: int
    q: torch.Tensor  # [B, H, Lq, D] (after RoPE)
    k: torch.Tensor  # [B, H, Lk, D] (GQA expanded)
    v: torch.Tensor
    out: torch.Tensor  # [B, Lq, H, D] what the backend returned
    scale: float


@dataclass
class Spy:
    layers: set[int]
    calls: dict[int, list[Call]] = field(default_factory=dict)


_BACKENDS = {"torch": torch_attention, "reference": reference_attention}


@contextlib.contextmanager
def spy_attention(lvlm, layers, backend: str = "torch") -> Iterator[Spy]:
    """Record q/k/v/out of the given layers at every forward, running the clearsight backend."""
    spy = Spy(set(layers))
    inner = _BACKENDS[backend]

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out, w = inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
        if module.layer_idx in spy.layers:
            rep = query.shape[1] // key.shape[1]
            spy.calls.setdefault(module.layer_idx, []).append(Call(
                module.layer_idx, query.detach().float().clone(),
                key.detach().float().repeat_interleave(rep, 1).clone(),
                value.detach().float().repeat_interleave(rep, 1).clone(), out.detach().float().clone(),
                float(scaling if scaling is not None else query.shape[-1] ** -0.5)))
        return out, w

    name = f"clearsight_testspy_{backend}"
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    lvlm.model.set_attn_implementation({"text_config": name})
    try:
        yield spy
    finally:
        lvlm.set_backend(backend)


def causal(Lq: int, Lk: int) -> torch.Tensor:
    """[Lq, Lk] bool causal mask for the last Lq queries."""
    q = torch.arange(Lk - Lq, Lk).view(-1, 1)
    return torch.arange(Lk).view(1, -1) <= q


def plain_attention(q, k, v, scale, allowed, score_fn=None, prob_fn=None, head_scale=None) -> torch.Tensor:
    """One row: q [H, Lq, D], k/v [H, Lk, D], allowed [Lq, Lk] -> [Lq, H, D] (the backend's layout)."""
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if score_fn is not None:
        s = score_fn(s)
    s = s.masked_fill(~allowed, float("-inf"))
    a = torch.softmax(s, -1)
    if prob_fn is not None:
        a = prob_fn(a)
    out = a @ v.double()
    if head_scale is not None:
        out = out * torch.as_tensor(head_scale, dtype=out.dtype).view(-1, 1, 1)
    return out.transpose(0, 1).float()
