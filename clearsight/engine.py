"""Engine: one loaded model, many concurrent callers, continuous batching.

One scheduler thread is the only code that runs the model. Callers (any thread, or asyncio) submit
requests and get a ``RequestHandle``: iterate its ``TokenEvent``s, ``result(timeout)``, ``await``
it or ``async for`` over it, ``cancel()``. Per iteration the thread admits waiting requests (prefilled
as their own small batch, then joined into the running batch by left padding), runs one decode step
of every running batch, and drops finished, cancelled and expired rows at once (see
``clearsight.decoding.scheduler``). Limits: requests / rows / KV tokens in flight (over a limit a
request waits) and queue length (a full queue raises ``EngineBusy`` from ``submit``).

Backends: the language model is switched once to the per-forward dispatcher; each request names its
backend (default: the model's), and requests of different backends run as separate batches, stepped
alternately by the same thread (one forward runs one backend).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from clearsight.config import DecodeSpec, GenerationRequest, ModelSpec
from clearsight.decoding.batch import Entry
from clearsight.decoding.generate import GenerationResult, TokenEvent, as_decode, as_request, check_compile
from clearsight.decoding.scheduler import Scheduler
from clearsight.errors import ClearsightError, EngineBusy, EngineClosed, InputError
from clearsight.kernels.plan import StatsRequest
from clearsight.kernels.registry import check_dispatchable
from clearsight.mitigations import parse_mitigations
from clearsight.models.loader import LVLM, load_model

_END = object()


def merge_queue(q: queue.SimpleQueue[Any], producers: int, end: object = _END) -> Iterator[Any]:
    """Items of ``producers`` producers feeding one queue, until each has put ``end``; an exception put by
    a producer is raised here, in the consumer's thread."""
    left = producers
    while left:
        item = q.get()
        if item is end:
            left -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield item


class RequestHandle:
    """One submitted request: its token events, its result or error, cancellation."""

    def __init__(self, engine: Engine, index: int) -> None:
        self._engine = engine
        self.index = index
        self._lock = threading.Lock()
        self._history: list[Any] = []  # TokenEvents, then _END or an exception
        self._subscribers: list[Callable[[Any], None]] = []
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._entry: Entry | None = None

    # ------------------------------------------------------------------ fed by the engine thread
    def _post(self, item: Any) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._history.append(item)
            subscribers = list(self._subscribers)
            if isinstance(item, TokenEvent) and item.result is not None:
                self._result = item.result
            elif isinstance(item, BaseException):
                self._error = item
            if item is _END or isinstance(item, BaseException):
                self._done.set()
        for fn in subscribers:
            fn(item)
        if isinstance(item, TokenEvent) and item.result is not None:
            self._post(_END)

    def _subscribe(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            history = list(self._history)
            self._subscribers.append(fn)
        for item in history:
            fn(item)

    # ------------------------------------------------------------------ caller side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; its result, or its error raised (TimeoutError after ``timeout`` s)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.index} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def add_done_callback(self, fn: Callable[[RequestHandle], None]) -> None:
        """Call ``fn(handle)`` once when the request ends (result or error): at once if it already has,
        else on the engine thread (keep it short, e.g. put the handle on a queue)."""
        fired = False

        def on_item(item: Any) -> None:
            nonlocal fired
            if not fired and (item is _END or isinstance(item, BaseException)):
                fired = True
                fn(self)

        self._subscribe(on_item)

    def cancel(self) -> None:
        """Stop generating: the request's rows leave the batch at the next step; it ends with RequestCancelled."""
        if self._entry is not None:
            self._entry.cancelled = True
        self._engine._wake()

    def __iter__(self) -> Iterator[TokenEvent]:
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._subscribe(q.put)
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _async_items(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribe(lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        while True:
            item = await q.get()
            yield item
            if item is _END or isinstance(item, BaseException):
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        async for item in self._async_items():
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __await__(self):
        async def wait() -> GenerationResult:
            async for item in self._async_items():
                if item is _END or isinstance(item, BaseException):
                    break
            return self.result(0)

        return wait().__await__()


class Engine:
    """Owns one loaded model; serves many callers with continuous batching (module docstring).

    ``model``: an ``LVLM`` already loaded (shared, e.g. in tests), a ``ModelSpec`` or a source string.
    Limits: ``max_requests`` / ``max_rows`` / ``max_tokens`` in flight (KV entries, padding included;
    a soft limit checked before each admission), ``max_queue`` requests waiting. ``compile``: decode steps
    run ``torch.compile``d over a preallocated KV cache where a batch allows (``decoding.compiled``; results
    say which step ran in ``decode_step``). Use as a context manager or call ``close()``.
    """

    def __init__(self, model: LVLM | ModelSpec | str, *, max_rows: int | None = 64, max_tokens: int = 1 << 20,
                 max_queue: int = 1024, max_requests: int | None = None, backend: str | None = None,
                 compile: bool = False) -> None:
        self.compile = check_compile(compile)
        self.lvlm = model if isinstance(model, LVLM) else load_model(model)
        self.backend = backend or self.lvlm.backend
        check_dispatchable(self.backend)
        self._previous_backend = self.lvlm.backend
        self.lvlm.set_backend("dispatch")
        self.lvlm.backend = self.backend
        self.max_queue = max_queue
        self._scheduler = Scheduler(self.lvlm, max_requests=max_requests, max_rows=max_rows, max_tokens=max_tokens)
        self._cv = threading.Condition()
        self._inbox: list[Entry] = []
        self._closed = False
        self._counter = 0
        self._snapshot = self._scheduler.snapshot()
        self._thread = threading.Thread(target=self._run, name="clearsight-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, request: GenerationRequest | dict[str, Any] | str, mitigations: Any = (),
               decode: DecodeSpec | dict[str, Any] | None = None, *, stats: StatsRequest | None = None,
               backend: str | None = None, index: int | None = None,
               on_event: Callable[[TokenEvent], None] | None = None) -> RequestHandle:
        """Queue one request; returns at once. Raises ``EngineBusy`` when the queue is full and
        ``EngineClosed`` after ``close()``; a bad request fails its handle (``InputError``), alone.

        ``on_event`` is called on the engine thread with each of this request's events, before the
        handle sees it (keep it short; it may call ``submit``).
        """
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is closed: create a new Engine")
            if self._waiting() >= self.max_queue:
                raise EngineBusy(f"the engine's queue is full ({self.max_queue} requests waiting): retry later")
            handle = RequestHandle(self, self._counter if index is None else index)
            self._counter += 1
            try:
                req = as_request(request)
                mits = parse_mitigations(req.mitigations if req.mitigations is not None else mitigations)
                spec = as_decode(decode)
                chosen = backend or self.backend
                check_dispatchable(chosen)
            except ClearsightError as exc:
                handle._post(exc)
                return handle
            except ValueError as exc:  # a mitigation's own validation
                handle._post(InputError(str(exc).splitlines()[0]))
                return handle

            def event(ev: TokenEvent) -> None:
                if on_event is not None:
                    on_event(ev)
                handle._post(ev)

            entry = Entry(req, mits, spec, index=handle.index, stats=stats, backend=chosen,
                          on_event=event, on_error=handle._post, compile=self.compile)
            handle._entry = entry
            self._inbox.append(entry)
            self._cv.notify()
        return handle

    def generate(self, requests: Sequence[GenerationRequest | dict[str, Any] | str], mitigations: Sequence[Any] = (),
                 decode: DecodeSpec | None = None, *, stats: StatsRequest | None = None, backend: str | None = None,
                 timeout: float | None = None) -> list[GenerationResult]:
        """Submit every request and wait for all; results in request order (the first error is raised)."""
        handles = [self.submit(r, mitigations, decode, stats=stats, backend=backend, index=i)
                   for i, r in enumerate(requests)]
        return [h.result(timeout) for h in handles]

    def stream(self, requests: Sequence[GenerationRequest | dict[str, Any] | str], mitigations: Sequence[Any] = (),
               decode: DecodeSpec | None = None, *, stats: StatsRequest | None = None,
               backend: str | None = None) -> Iterator[TokenEvent]:
        """Events of all the requests as they come (``event.request`` = index in ``requests``)."""
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        handles = [self.submit(r, mitigations, decode, stats=stats, backend=backend, index=i)
                   for i, r in enumerate(requests)]
        for h in handles:
            h._subscribe(q.put)
        try:
            yield from merge_queue(q, len(handles))
        finally:
            for h in handles:
                if not h.done:
                    h.cancel()

    def stats(self) -> dict[str, int]:
        """A snapshot (updated by the engine thread each step): waiting, requests, rows, tokens, key_columns,
        batches."""
        with self._cv:
            return {**self._snapshot, "waiting": self._waiting()}

    def close(self, timeout: float | None = None) -> None:
        """Stop the engine: every unfinished request ends with ``EngineClosed``; the model gets its backend back."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the engine thread
    def _waiting(self) -> int:
        """Requests submitted and not yet admitted (len() of a deque is atomic: no lock with the thread needed)."""
        return len(self._inbox) + len(self._scheduler.waiting)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _run(self) -> None:
        sched = self._scheduler
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._inbox and not sched.busy:
                        self._cv.wait()
                    if self._closed:
                        break
                    for e in self._inbox:
                        sched.add(e)
                    self._inbox.clear()
                try:
                    sched.step()
                except Exception as exc:  # the scheduler's own bug: fail what is in flight, keep serving
                    sched.abort(exc)
                with self._cv:
                    self._snapshot = sched.snapshot()
        finally:
            closed = EngineClosed("the engine was closed before this request finished")
            with self._cv:
                self._closed = True
                pending = list(self._inbox)
                self._inbox.clear()
            sched.abort(closed)
            for e in pending:
                if e.on_error is not None:
                    e.on_error(closed)
            with self._cv:
                self._snapshot = sched.snapshot()
            try:
                self.lvlm.set_backend(self._previous_backend)
            except Exception:  # noqa: BLE001 - restoring is best effort
                pass
