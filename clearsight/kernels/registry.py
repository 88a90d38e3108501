"""Backends registered with transformers' AttentionInterface (plus a mask function each).

Only the language model is switched (``set_attn_implementation({"text_config": ...})``); the
vision tower keeps its stock attention. No model code is patched.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from clearsight.errors import InputError
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
