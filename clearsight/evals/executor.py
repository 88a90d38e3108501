"""Executors run the generation stage: a list of work items for one system, results via a callback.

The local executor runs in this process; a Ray executor (clearsight.workers) implements the same
interface, so the runner does not change when work is spread over a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from clearsight.config import DecodeSpec
from clearsight.evals.job import SystemSpec


@dataclass(frozen=True)
class WorkItem:
    """One generation: a sample of a benchmark, with its prompt and image file."""

    sample_id: str
    prompt: str
    image: str | None
    max_new_tokens: int


OnResult = Callable[[WorkItem, dict[str, Any]], None]


class Executor(Protocol):
    def generate(self, system: SystemSpec, decode: DecodeSpec, items: Sequence[WorkItem], on_result: OnResult) -> None:
        """Generate every item (in any order), calling ``on_result(item, record)`` as each one finishes."""

    def close(self) -> None: ...


class LocalExecutor:
    """Generates in-process, batch by batch, keeping loaded models for the next system that shares one."""

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size
        self._models: dict[Any, Any] = {}

    def model(self, system: SystemSpec):
        from clearsight.models.loader import load_model

        spec = system.model_spec()
        key = (spec.source, spec.dtype, spec.device)
        if key not in self._models:
            self._models[key] = load_model(spec)
        lvlm = self._models[key]
        if spec.backend and lvlm.backend != spec.backend:
            lvlm.set_backend(spec.backend)
        return lvlm

    def generate(self, system: SystemSpec, decode: DecodeSpec, items: Sequence[WorkItem], on_result: OnResult) -> None:
        from clearsight.decoding import generate

        lvlm = self.model(system)
        decode = decode.model_copy(update={"batch_size": self.batch_size})
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            results = generate(lvlm, [{"prompt": it.prompt, "image": it.image} for it in chunk],
                               system.mitigations, decode)
            for it, r in zip(chunk, results):
                on_result(it, {"output": r.text, "finish_reason": r.finish_reason, "n_tokens": len(r.token_ids),
                               "backend": lvlm.backend})

    def close(self) -> None:
        self._models.clear()
