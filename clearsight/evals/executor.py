"""Executors run the generation stage: a list of tasks (system x work item), results via a callback.

The local executor runs in this process, through one ``clearsight.engine.Engine`` per loaded model; the
Ray executor (``clearsight.workers.executor``) implements the same interface, so the runner does not
change when work is spread over a cluster. Executors are chosen by name (``make_executor``): a front end
registers its executor with ``register_executor``, and a name this layer does not know is looked up in
``EXECUTOR_PLUGINS`` (a module imported by name), so the evals never import the layers above them.

Cross-system packing: ``generate_tasks`` takes the tasks of many systems at once. Tasks that share a
model go to that model's Engine as one stream; each request carries its own system's mitigations,
decode settings and backend, and the Engine batches any requests of one backend together (requests of
different backends run as separate batches, stepped alternately by the same thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from clearsight.config import DecodeSpec

if TYPE_CHECKING:
    from clearsight.decoding.generate import GenerationResult
    from clearsight.engine import Engine, RequestHandle
    from clearsight.evals.job import SystemSpec


@dataclass(frozen=True)
class WorkItem:
    """One generation: a sample of a benchmark, with its prompt and image file."""

    sample_id: str
    prompt: str
    image: str | None
    max_new_tokens: int


OnResult = Callable[[WorkItem, dict[str, Any]], None]


@dataclass(frozen=True)
class Task:
    """One generation of one system: the unit of a (packed) generation stream."""

    system: SystemSpec
    decode: DecodeSpec
    item: WorkItem


OnTaskResult = Callable[[Task, dict[str, Any]], None]


def model_key(system: SystemSpec) -> tuple[str, str, str]:
    """What decides the Engine a system runs on (a backend is per request, not per engine)."""
    return (system.model, str(system.dtype), system.device)


class Executor(Protocol):
    def generate_tasks(self, tasks: Sequence[Task], on_result: OnTaskResult) -> None:
        """Generate every task (in any order), calling ``on_result(task, record)`` on the calling thread as
        each one finishes; record = output, finish_reason, n_tokens, backend."""

    def close(self) -> None: ...


ExecutorFactory = Callable[..., Executor]
_EXECUTORS: dict[str, ExecutorFactory] = {}
# executors that live above this layer: the module that registers each, imported by name on first use
EXECUTOR_PLUGINS = {"ray": "clearsight.workers.executor"}


def register_executor(name: str, factory: ExecutorFactory) -> None:
    """Make ``executor = name`` in a job build its executor with ``factory(job)``."""
    _EXECUTORS[name] = factory


def make_executor(job: Any) -> Executor:
    """The executor a job names (``job.executor``), built from the job's settings."""
    import importlib

    from clearsight.evals.errors import EvalInputError

    name = job.executor
    if name == "local":
        return LocalExecutor(batch_size=job.batch_size)
    if name not in _EXECUTORS and name in EXECUTOR_PLUGINS:
        try:
            importlib.import_module(EXECUTOR_PLUGINS[name])
        except ImportError as exc:
            raise EvalInputError(f"executor {name!r} is not available ({exc}); install clearsight[serve]") from None
    if name not in _EXECUTORS:
        raise EvalInputError(f"executor: unknown executor {name!r}; choose local or ray")
    return _EXECUTORS[name](job)


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
        # callers on several threads (a Ray worker runs its chunks at once) must share one Engine per model:
        # two engines on one loaded model would step it from two threads
        self._lock = threading.Lock()

    def engine(self, system: SystemSpec) -> Engine:
        """The engine of the system's model (loaded with its default backend: a backend is per request)."""
        spec = system.model_spec().model_copy(update={"backend": None})
        key = (spec.source, spec.dtype, spec.device)
        with self._lock:
            return self._engine(key, spec)

    def _engine(self, key: Any, spec: Any) -> Engine:
        from clearsight.engine import Engine
        from clearsight.models.loader import load_model

        if key not in self._engines:
            # requests in flight = the job's batch size (as before the engine); rows (branches) are not capped
            # beyond that, and the executor keeps the queue short itself (see _submit_all)
            self._engines[key] = Engine(load_model(spec), max_requests=self.batch_size, max_rows=None)
        return self._engines[key]

    def _run(self, system: SystemSpec, requests: Sequence[dict[str, Any]], decode: DecodeSpec,
             mitigations: Sequence[Any]) -> Iterator[tuple[int, GenerationResult, str]]:
        engine = self.engine(system)
        backend = system.backend or engine.backend
        yield from self._stream(engine, [(r, mitigations, decode, backend) for r in requests])

    def _stream(self, engine: Engine, submissions: Sequence[tuple[dict[str, Any], Sequence[Any], DecodeSpec, str]]
                ) -> Iterator[tuple[int, GenerationResult, str]]:
        """(index, result, backend) of each (request, mitigations, decode, backend) as it finishes. At most
        2 x batch_size requests are submitted and unfinished at once (the rest wait here, not in the
        engine's queue). After an error nothing more is submitted; the requests in flight finish (their
        results are yielded, so a resumed run need not redo them), then the first error is raised. Leaving
        early cancels what is in flight."""
        done: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        window = 2 * self.batch_size
        in_flight: dict[int, RequestHandle] = {}
        error: BaseException | None = None
        nxt = 0
        try:
            while (error is None and nxt < len(submissions)) or in_flight:
                while error is None and nxt < len(submissions) and len(in_flight) < window:
                    request, mitigations, decode, backend = submissions[nxt]
                    handle = engine.submit(request, mitigations, decode, backend=backend, index=nxt)
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
                yield handle.index, result, submissions[handle.index][3]
            if error is not None:
                raise error
        finally:
            for handle in in_flight.values():
                handle.cancel()

    def generate(self, system: SystemSpec, decode: DecodeSpec, items: Sequence[WorkItem], on_result: OnResult) -> None:
        """One system's items (``generate_tasks`` of one system)."""
        self.generate_tasks([Task(system, decode, it) for it in items], lambda t, rec: on_result(t.item, rec))

    def generate_tasks(self, tasks: Sequence[Task], on_result: OnTaskResult) -> None:
        """Packed: the tasks of each model run as one stream through its Engine, in the given order, whatever
        their systems (per-request mitigations, decode and backend). Models run one after the other."""
        by_model: dict[tuple[str, str, str], list[Task]] = {}
        for t in tasks:
            by_model.setdefault(model_key(t.system), []).append(t)
        for group in by_model.values():
            engine = self.engine(group[0].system)
            subs = [({"prompt": t.item.prompt, "image": t.item.image}, t.system.mitigations, t.decode,
                     t.system.backend or engine.backend) for t in group]
            for i, r, backend in self._stream(engine, subs):
                on_result(group[i], {"output": r.text, "finish_reason": r.finish_reason,
                                     "n_tokens": len(r.token_ids), "backend": backend})

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
