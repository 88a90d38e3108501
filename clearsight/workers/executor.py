"""The Ray executor: the generation stage of an eval job on a pool of Ray actors, locally or on a cluster.

Why an actor pool of our own rather than Ray Data ``map_batches`` (shared/reference/serving.md section 2):
the driver must be the only writer of the generation cache, record by record, and must know exactly
which tasks a lost worker took with it. With our own pool the driver streams chunks of tasks to the
workers (at most ``depth`` chunks in flight per worker, so each worker's Engine always has the next chunk
to batch with), gets each chunk's records back, appends them to the cache itself and requeues the
chunks of a worker that died. Ray Data would add a dataset stage and its own retry and checkpoint rules
(the ``CheckpointFilter`` deadlocks on 2 CPUs, measured) for no gain here: there is no preprocessing
stage to pipeline, and resuming is the cache's job already.

Faults (each tested in tests/evals/test_ray_executor.py):

- a worker dies (killed, out of memory, its node lost): its chunks in flight fail with a ``RayActorError``
  and go back to the front of the queue; the actor is restarted by Ray (``max_restarts=-1``: its
  constructor runs again, loading the model), on another node when its node is gone. Nothing it had
  finished is lost: records are written as each chunk returns. A task that fails ``max_attempts`` times
  ends the run with an error naming it (a sample that crashes every worker must not loop forever).
- the driver dies: the cache holds every record written so far (flushed per record); running the same
  command again generates only what is missing.

``ray`` is imported only when an executor is built, so ``import clearsight`` never needs it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clearsight.config import DecodeSpec
from clearsight.evals.errors import EvalInputError
from clearsight.evals.executor import LocalExecutor, OnTaskResult, Task, WorkItem, model_key, register_executor
from clearsight.evals.job import SystemSpec


class RaySettings(BaseModel):
    """How the Ray executor runs (from an EvalJob: ``workers``, ``worker_num_cpus``, ...)."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(1, ge=1, le=1024)
    batch_size: int = Field(8, ge=1, le=1024, description="requests in flight in each worker's Engine")
    address: str | None = Field(None, description="cluster address; None: $RAY_ADDRESS, else a local Ray")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    depth: int = Field(2, ge=1, description="chunks in flight per worker")
    chunk_size: int | None = Field(None, ge=1, description="tasks per chunk (default: batch_size)")
    max_attempts: int = Field(3, ge=1, description="runs of one task before the run fails")
    scheduling_strategy: str = Field("SPREAD", description="Ray actor placement (SPREAD: over the nodes)")


class _Worker:
    """One Ray actor: a LocalExecutor (one Engine per model it is sent), run by the driver's chunks."""

    def __init__(self, batch_size: int) -> None:
        self.executor = LocalExecutor(batch_size=batch_size)

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def run(self, chunk: list[tuple[int, dict[str, Any], dict[str, Any], tuple[str, str, str | None, int]]]
            ) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
        """(index, record) of each task done, and the first error (the others' records still come back)."""
        tasks = [Task(SystemSpec.model_validate(s), DecodeSpec.model_validate(d), WorkItem(*it))
                 for _, s, d, it in chunk]
        position = {id(t): chunk[i][0] for i, t in enumerate(tasks)}
        out: list[tuple[int, dict[str, Any]]] = []
        try:
            self.executor.generate_tasks(tasks, lambda t, rec: out.append((position[id(t)], rec)))
        except Exception as exc:  # noqa: BLE001 - the finished records still reach the cache
            return out, f"{type(exc).__name__}: {exc}"
        return out, None

    def close(self) -> None:
        self.executor.close()


class RayExecutor:
    """The ``Executor`` protocol on a pool of Ray actors (module docstring). Joins the cluster at
    ``address`` (or ``$RAY_ADDRESS``), else starts a local Ray in this process (stopped by ``close``);
    a Ray already initialised in this process (e.g. by a test's cluster) is used as it is."""

    def __init__(self, settings: RaySettings | None = None, **kw: Any) -> None:
        self.settings = settings or RaySettings(**kw)
        self._workers: list[Any] = []
        self._owns_ray = False
        self.retried = 0  # chunks requeued after a worker died (for tests and the log)

    # ------------------------------------------------------------------ the pool
    def _start(self) -> None:
        if self._workers:
            return
        import ray

        if not ray.is_initialized():
            address = self.settings.address or os.environ.get("RAY_ADDRESS") or "local"
            _check_reachable(address)
            kw: dict[str, Any] = {"include_dashboard": False} if address == "local" else {}
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False, **kw)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise EvalInputError(f"ray_address {address!r}: cannot join the Ray cluster "
                                     f"({str(exc).splitlines()[0]}); start one (ray start --head) or fix "
                                     "--address") from None
            self._owns_ray = True
        s = self.settings
        actor = ray.remote(_Worker).options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=-1, max_task_retries=0,
            # threaded: a worker runs its `depth` chunks at once, all into one Engine that batches them
            max_concurrency=s.depth + 1, scheduling_strategy=s.scheduling_strategy)
        self._workers = [actor.remote(s.batch_size) for _ in range(s.workers)]

    def where(self) -> list[tuple[int, str]]:
        """(pid, node id) of each worker (starting the pool if needed)."""
        import ray

        self._start()
        return ray.get([w.where.remote() for w in self._workers])

    # ------------------------------------------------------------------ Executor
    def generate(self, system: SystemSpec, decode: DecodeSpec, items: Sequence[WorkItem], on_result: Any) -> None:
        self.generate_tasks([Task(system, decode, it) for it in items], lambda t, rec: on_result(t.item, rec))

    def generate_tasks(self, tasks: Sequence[Task], on_result: OnTaskResult) -> None:
        """Chunks of ``chunk_size`` consecutive tasks of one model, streamed to the workers; ``on_result``
        runs on this thread as each chunk's records come back, once per task whatever the retries."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        if not tasks:
            return
        self._start()
        s = self.settings
        size = s.chunk_size or s.batch_size
        by_model: dict[tuple[str, str, str], list[int]] = {}
        for i, t in enumerate(tasks):
            by_model.setdefault(model_key(t.system), []).append(i)
        queue: deque[list[int]] = deque(idx[j:j + size] for idx in by_model.values() for j in range(0, len(idx), size))
        payload = {i: (i, t.system.model_dump(mode="json"), t.decode.model_dump(mode="json"),
                       (t.item.sample_id, t.item.prompt, t.item.image, t.item.max_new_tokens))
                   for i, t in enumerate(tasks)}
        attempts = dict.fromkeys(range(len(tasks)), 0)
        done: set[int] = set()
        in_flight: dict[Any, tuple[int, list[int]]] = {}
        load = [0] * len(self._workers)
        error: str | None = None
        while (queue and error is None) or in_flight:
            while queue and error is None and min(load) < s.depth:
                w = load.index(min(load))
                chunk = queue.popleft()
                for i in chunk:
                    attempts[i] += 1
                ref = self._workers[w].run.remote([payload[i] for i in chunk])
                in_flight[ref] = (w, chunk)
                load[w] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                w, chunk = in_flight.pop(ref)
                load[w] -= 1
                try:
                    records, err = ray.get(ref)
                except (RayActorError, WorkerCrashedError):
                    # the worker died with the chunk: Ray restarts it; the chunk runs again (first)
                    self.retried += 1
                    again = [i for i in chunk if i not in done]
                    spent = [i for i in again if attempts[i] >= s.max_attempts]
                    if spent:
                        t = tasks[spent[0]]
                        error = (f"sample {t.item.sample_id!r} of system {t.system.label!r} was lost with its worker "
                                 f"{attempts[spent[0]]} times")
                    elif again:
                        queue.appendleft(again)
                    continue
                for i, rec in records:
                    if i not in done:
                        done.add(i)
                        on_result(tasks[i], rec)
                if err is not None and error is None:
                    error = err
        if error is not None:
            raise EvalInputError(f"ray executor: {error}")

    def close(self) -> None:
        import ray

        workers, self._workers = self._workers, []
        for w in workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) nobody listens on: one line now, where ``ray.init`` would
    retry for minutes."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if address in ("local", "auto") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise EvalInputError(f"ray_address {address!r}: nothing answers there ({exc.strerror or exc}); start a "
                             "cluster (ray start --head) or fix --address") from None


def _from_job(job: Any) -> RayExecutor:
    return RayExecutor(RaySettings(workers=job.workers, batch_size=job.batch_size, address=job.ray_address,
                                   num_cpus=job.worker_num_cpus, num_gpus=job.worker_num_gpus))


register_executor("ray", _from_job)
