"""How a plan reaches attention: a context variable bound around each forward.

Thread- and asyncio-safe, and needs no new model kwargs (``generate``-style loops reject unknown
kwargs; see reference/kernels.md section 1.4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from clearsight.kernels.plan import AttentionPlan

_PLAN: ContextVar[AttentionPlan | None] = ContextVar("clearsight_attention_plan", default=None)
# the backend a forward runs when the language model uses the per-forward dispatcher (registry.DISPATCH)
_BACKEND: ContextVar[str | None] = ContextVar("clearsight_attention_backend", default=None)


def current_plan() -> AttentionPlan | None:
    return _PLAN.get()


@contextlib.contextmanager
def use_plan(plan: AttentionPlan | None) -> Iterator[AttentionPlan | None]:
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


def current_backend() -> str | None:
    return _BACKEND.get()


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[str | None]:
    """Bind the attention backend of the forwards run inside (read by ``registry.dispatch_attention``)."""
    token = _BACKEND.set(backend)
    try:
        yield backend
    finally:
        _BACKEND.reset(token)
