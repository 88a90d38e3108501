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


def current_plan() -> AttentionPlan | None:
    return _PLAN.get()


@contextlib.contextmanager
def use_plan(plan: AttentionPlan | None) -> Iterator[AttentionPlan | None]:
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)
