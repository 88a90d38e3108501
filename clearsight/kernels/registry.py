"""Backends registered with transformers' AttentionInterface (plus a mask function each).

Only the language model is switched (``set_attn_implementation({"text_config": ...})``); the
vision tower keeps its stock attention. No model code is patched.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from clearsight.errors import InputError
from clearsight.kernels.context import current_backend
from clearsight.kernels.reference import reference_attention
from clearsight.kernels.torch_backend import torch_attention

PREFIX = "clearsight_"


def _triton_attention() -> Callable | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from clearsight.kernels.triton_backend import triton_attention
    except ImportError:
        return None
    return triton_attention


def backend_functions() -> dict[str, Callable]:
    fns: dict[str, Callable] = {"reference": reference_attention, "torch": torch_attention}
    tri = _triton_attention()
    if tri is not None:
        fns["triton"] = tri
    return fns


_registered: set[str] = set()


def attn_implementation(backend: str) -> str:
    """The transformers attn_implementation name of a clearsight backend (``sdpa`` is stock)."""
    if backend in ("sdpa", "eager"):
        return backend
    fns = backend_functions()
    if backend not in fns:
        known = ", ".join(sorted([*fns, "sdpa", "eager"]))
        hint = " (triton needs the triton package and a working compiler)" if backend == "triton" else ""
        raise InputError(f"unknown attention backend '{backend}'{hint}: choose one of {known}")
    name = PREFIX + backend
    if name not in _registered:
        AttentionInterface.register(name, fns[backend])
        # the kernels read masks as bool [B, 1, Lq, Lk] or None (= causal), like SDPA
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered.add(name)
    return name


def default_backend(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda" and _triton_attention() is not None:
        return "triton"
    return "torch"


# per-forward dispatch: the language model is switched to this once (by the Engine); each forward then runs the
# backend bound with ``context.use_backend``, so requests choose their backend without touching the model
DISPATCH = PREFIX + "dispatch"
DISPATCHABLE = ("reference", "torch", "triton", "sdpa")  # the backends that share sdpa_mask
_dispatch_fns: dict[str, Callable] = {}


def dispatch_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AttentionInterface function that runs the backend bound for this forward (default: torch)."""
    name = current_backend() or "torch"
    fn = _dispatch_fns.get(name)
    if fn is None:
        raise RuntimeError(f"attention backend '{name}' is not dispatchable here: call check_dispatchable first")
    return fn(module, query, key, value, attention_mask, **kwargs)


def check_dispatchable(backend: str) -> None:
    """A one-line InputError unless ``backend`` can be chosen per forward (``dispatch_attention``)."""
    if backend not in DISPATCHABLE:
        raise InputError(f"attention backend '{backend}' cannot be chosen per request: choose one of "
                         f"{', '.join(DISPATCHABLE)}")
    attn_implementation(backend)  # raises the usual error for a missing triton
    if not _dispatch_fns:
        _dispatch_fns.update(backend_functions())
        _dispatch_fns["sdpa"] = sdpa_attention_forward
    if backend not in _dispatch_fns:
        _dispatch_fns.update(backend_functions())


def dispatch_implementation() -> str:
    """The transformers attn_implementation name of the per-forward dispatcher (registered on first use)."""
    check_dispatchable("torch")
    if DISPATCH not in _registered:
        AttentionInterface.register(DISPATCH, dispatch_attention)
        AttentionMaskInterface.register(DISPATCH, sdpa_mask)
        _registered.add(DISPATCH)
    return DISPATCH
