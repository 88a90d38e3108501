"""How a plan reaches attention: a context variable bound around each forward.

Thread- and asyncio-safe, and needs no new model kwargs (``generate``-style loops reject unknown
kwargs; see reference/kernels.md section 1.4).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from clearsight.kernels.plan import AttentionPlan

_PLAN: ContextVar[AttentionPlan | None] = ContextVar("clearsight_attention_plan", default=None)
# the backend a forward runs when the language model uses the per-forward dispatcher (registry.DISPATCH)
_BACKEND: ContextVar[str | None] = ContextVar("clearsight_attention_backend", default=None)


# What a compiled step (``decoding.compiled``) binds while torch.compile traces it: dynamo cannot trace
# ``ContextVar.get`` (a graph break per layer), but it traces a module global and guards on it, so a graph is
# reused while the same plan / backend is bound and retraced when another one is.
# Outside ``use_traced`` (a model a user compiles whole) the ContextVar is read as before (a graph break, correct).
_TRACED: dict[str, object] = {"active": False, "plan": None, "backend": None}


def current_plan() -> AttentionPlan | None:
    if torch.compiler.is_compiling() and _TRACED["active"]:
        return _TRACED["plan"]  # type: ignore[return-value]
    return _PLAN.get()


@contextlib.contextmanager
def use_plan(plan: AttentionPlan | None) -> Iterator[AttentionPlan | None]:
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


def current_backend() -> str | None:
    if torch.compiler.is_compiling() and _TRACED["active"]:
        return _TRACED["backend"]  # type: ignore[return-value]
    return _BACKEND.get()


@contextlib.contextmanager
def use_traced(plan: AttentionPlan | None, backend: str | None) -> Iterator[None]:
    """Bind ``plan`` and ``backend`` for a compiled forward (as ``use_plan`` / ``use_backend`` do for eager ones).

    A process-wide binding, held under ``TRACED_LOCK`` until the block ends (compiled steps of several
    threads take turns).
    """
    with TRACED_LOCK:
        old = dict(_TRACED)
        _TRACED.update(active=True, plan=plan, backend=backend)
        try:
            yield
        finally:
            _TRACED.update(old)


TRACED_LOCK = threading.RLock()


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[str | None]:
    """Bind the attention backend of the forwards run inside (read by ``registry.dispatch_attention``)."""
    token = _BACKEND.set(backend)
    try:
        yield backend
    finally:
        _BACKEND.reset(token)
