"""Executors run the generation stage: a list of work items for one system, results via a callback.

The local executor runs in this process, through one ``clearsight.engine.Engine`` per loaded model; a
Ray executor (clearsight.workers) implements the same interface, so the runner does not change when
work is spread over a cluster.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from clearsight.config import DecodeSpec
from clearsight.evals.job import SystemSpec

if TYPE_CHECKING:
    from clearsight.decoding.generate import GenerationResult
    from clearsight.engine import Engine, RequestHandle


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
    """Generates in-process: one Engine per loaded model (created on first use, kept for the next system
    that shares the model), at most ``batch_size`` requests in flight per engine, continuously batched.

    Each request names its system's backend (a system without one gets the model's default, never the
    backend of the previous system that used the model) and carries its system's mitigations; the model
    itself is never switched. ``on_result`` runs on the calling thread, in completion order.
    """

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size
        self._engines: dict[Any, Engine] = {}

    def engine(self, system: SystemSpec) -> Engine:
        """The engine of the system's model (loaded with its default backend: a backend is per request)."""
        from clearsight.engine import Engine
        from clearsight.models.loader import load_model

        spec = system.model_spec().model_copy(update={"backend": None})
        key = (spec.source, spec.dtype, spec.device)
        if key not in self._engines:
            # requests in flight = the job's batch size (as before the engine); rows (branches) are not capped
            # beyond that, and the executor keeps the queue short itself (see _submit_all)
            self._engines[key] = Engine(load_model(spec), max_requests=self.batch_size, max_rows=None)
        return self._engines[key]

    def _run(self, system: SystemSpec, requests: Sequence[dict[str, Any]], decode: DecodeSpec,
             mitigations: Sequence[Any]) -> Iterator[tuple[int, GenerationResult, str]]:
        """(index, result, backend) of each request as it finishes. At most 2 x batch_size requests are
        submitted and unfinished at once (the rest wait here, not in the engine's queue). After an error
        nothing more is submitted; the requests in flight finish (their results are yielded, so a resumed
        run need not redo them), then the first error is raised. Leaving early cancels what is in flight."""
        engine = self.engine(system)
        backend = system.backend or engine.backend
        done: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        window = 2 * self.batch_size
        in_flight: dict[int, RequestHandle] = {}
        error: BaseException | None = None
        nxt = 0
        try:
            while (error is None and nxt < len(requests)) or in_flight:
                while error is None and nxt < len(requests) and len(in_flight) < window:
                    handle = engine.submit(requests[nxt], mitigations, decode, backend=backend, index=nxt)
                    in_flight[nxt] = handle
                    handle.add_done_callback(done.put)
                    nxt += 1
                handle = done.get()
                del in_flight[handle.index]
                try:
                    result = handle.result(0)
                except Exception as exc:  # noqa: BLE001 - raised below, once the others have finished
                    error = error or exc
                    continue
                yield handle.index, result, backend
            if error is not None:
                raise error
        finally:
            for handle in in_flight.values():
                handle.cancel()

    def generate(self, system: SystemSpec, decode: DecodeSpec, items: Sequence[WorkItem], on_result: OnResult) -> None:
        requests = [{"prompt": it.prompt, "image": it.image} for it in items]
        for i, r, backend in self._run(system, requests, decode, system.mitigations):
            on_result(items[i], {"output": r.text, "finish_reason": r.finish_reason, "n_tokens": len(r.token_ids),
                                 "backend": backend})

    def generate_requests(self, system: SystemSpec, requests: Sequence[dict[str, Any] | str], decode: DecodeSpec,
                          mitigations: Sequence[Any] | None = None) -> list[GenerationResult]:
        """Results in request order, on the system's model and backend (its mitigations unless given)."""
        reqs = [{"prompt": r} if isinstance(r, str) else r for r in requests]
        results: dict[int, GenerationResult] = {}
        mits = system.mitigations if mitigations is None else mitigations
        for i, r, _ in self._run(system, reqs, decode, mits):
            results[i] = r
        return [results[i] for i in range(len(reqs))]

    def close(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()
