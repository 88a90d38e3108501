"""Continuous batching without threads: admission, prefill and join, one decode step per running batch.

``Scheduler.step()`` runs one iteration:

1. cancelled requests leave (waiting ones at once, running ones' rows are dropped);
2. admission, first come first served: the waiting requests that fit the limits (requests, rows and
   tokens in flight) are prepared (image, branch rows) and prefilled as their own small batch per
   key (backend, statistics request); each chooses its first token, then the group joins the
   running batch of its key (left padding, see ``batch.Batch.join``);
3. every running batch runs one decode forward and each of its requests chooses its next token.

A request whose input is bad fails alone: preparation errors are its own, and when a group's prefill
raises, each request of the group is retried alone. An error in a running batch's forward fails that
batch's requests only. ``generate()`` drives a Scheduler inline; the Engine drives one on its thread.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from itertools import islice

import torch

from clearsight.decoding.batch import Batch, Entry
from clearsight.decoding.probes import MAX_PROBE_BATCH, MAX_ROUNDS, ProbeDeferred, run_batched
from clearsight.decoding.recent_rows import RecentRows
from clearsight.errors import RequestCancelled
from clearsight.models.loader import LVLM


class Scheduler:
    def __init__(self, lvlm: LVLM, *, max_requests: int | None = None, max_rows: int | None = None,
                 max_tokens: int | None = None) -> None:
        self.lvlm = lvlm
        self.max_requests, self.max_rows, self.max_tokens = max_requests, max_rows, max_tokens
        self.waiting: deque[Entry] = deque()
        self.batches: dict[tuple, Batch] = {}
        self.entries: dict[int, Entry] = {}  # every entry added and not yet done (whatever state it is in)
        self._warned: set[tuple[type[Warning], str]] = set()
        self.recent = RecentRows()  # prefilled rows a later group may repeat (decoding.recent_rows)

    # ------------------------------------------------------------------ facts
    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(b.rows for b in self.batches.values())

    @property
    def running(self) -> list[Entry]:
        return [e for b in self.batches.values() for e in b.entries]

    @property
    def rows_in_flight(self) -> int:
        return sum(b.num_rows for b in self.batches.values())

    @property
    def tokens_in_flight(self) -> int:
        return sum(b.tokens_in_flight for b in self.batches.values() if b.rows)

    def snapshot(self) -> dict[str, int]:
        live = [b for b in self.batches.values() if b.rows]
        return {"waiting": len(self.waiting), "requests": sum(len(b.entries) for b in live),
                "rows": sum(b.num_rows for b in live), "tokens": sum(b.tokens_in_flight for b in live),
                "key_columns": max((b.num_keys for b in live), default=0), "batches": len(live)}

    def warn_once(self, message: str, category: type[Warning] = UserWarning) -> None:
        """Say a request's warning once per scheduler. Python's own once-per-location filter is not enough:
        any ``warnings.catch_warnings()`` in the process (PIL image checks, user code) resets it, and a long
        eval then printed the same mitigation warning for every request."""
        if (category, message) not in self._warned:
            self._warned.add((category, message))
            warnings.warn(message, category, stacklevel=4)  # the mitigation's line (via RequestContext.warn)

    def add(self, entry: Entry) -> None:
        entry.warner = self.warn_once
        self.entries[id(entry)] = entry
        self.waiting.append(entry)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        for key, batch in list(self.batches.items()):
            if not batch.rows:
                del self.batches[key]
                continue
            try:
                with torch.inference_mode():
                    batch.decode()
                    events = batch.choose()
            except Exception as exc:  # a failing forward ends the requests of this batch, never the others
                del self.batches[key]
                for e in batch.fail(exc):
                    self._error(e, exc)
                continue
            self._emit(events)

    def _drop_cancelled(self) -> None:
        for e in [e for e in self.waiting if e.cancelled]:
            self.waiting.remove(e)
            self._error(e, RequestCancelled(f"request {e.index} was cancelled"))
        for batch in self.batches.values():
            gone = [e for e in batch.entries if e.cancelled]
            if gone:
                batch.drop_inactive()
                for e in gone:
                    self._error(e, RequestCancelled(f"request {e.index} was cancelled"))

    def _fits(self, entry: Entry, requests: int, rows: int) -> bool:
        if requests == 0:
            return True  # an oversized request runs alone rather than never
        if self.max_requests is not None and requests + 1 > self.max_requests:
            return False
        if self.max_rows is not None and rows + len(entry.rows) > self.max_rows:
            return False
        return self.max_tokens is None or self.tokens_in_flight < self.max_tokens

    def _prefetch_probes(self, room: int) -> None:
        """Prepare the next ``room`` waiting requests, their batchable probes run as one batch per kind
        (``decoding.probes``): a request's failure here is not reported; its real preparation raises it again."""
        todo = [e for e in islice(self.waiting, room) if e.ctx is None and not e.prefetched]
        if len(todo) < 2:
            return
        for e in todo:
            e.prefetched = True
        for _ in range(MAX_ROUNDS):
            calls = []
            for e in todo:
                try:
                    e.prepare(self.lvlm, record=True)
                except ProbeDeferred:
                    assert e.probe is not None
                    calls.extend((e, c) for c in e.probe.pending)
                except Exception:  # noqa: BLE001 - reported by the request's own preparation at admission
                    pass
            results = run_batched([(e.backend, e.probe.inner, c) for e, c in calls])  # type: ignore[union-attr]
            if not results:
                return
            for i, (e, c) in enumerate(calls):
                if i in results:
                    e.probe_memo[c.key] = results[i]
            todo = list({id(e): e for e, _ in calls}.values())

    def _admit(self) -> None:
        requests = sum(len(b.entries) for b in self.batches.values())
        rows = self.rows_in_flight
        groups: dict[tuple, list[Entry]] = {}
        room = MAX_PROBE_BATCH if self.max_requests is None else self.max_requests - requests
        if room > 1:
            self._prefetch_probes(room)
        while self.waiting:
            e = self.waiting[0]
            if e.ctx is None:
                try:
                    e.prepare(self.lvlm)
                except Exception as exc:
                    self.waiting.popleft()
                    self._error(e, exc)
                    continue
            if not self._fits(e, requests, rows):
                break  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            requests, rows = requests + 1, rows + len(e.rows)
            groups.setdefault(e.key, []).append(e)
        for key, group in groups.items():
            for batch in self._prefill(group):
                running = self.batches.get(key)
                if running is None or not running.rows:
                    if batch.rows:
                        self.batches[key] = batch
                else:
                    running.join(batch)

    def _prefill(self, group: list[Entry]) -> list[Batch]:
        """Prefilled batches of the group (each token chosen); on an error, every request is retried alone."""
        for e in group:
            e.timings.setdefault("admitted", time.perf_counter())
        try:
            with torch.inference_mode():
                batch = Batch.prefill(self.lvlm, group, self.recent)
                events = batch.choose()
        except Exception as exc:
            if len(group) == 1:
                self._error(group[0], exc)
                return []
            out = []
            for e in group:
                try:
                    e.prepare(self.lvlm)
                except Exception as exc2:
                    self._error(e, exc2)
                    continue
                out.extend(self._prefill([e]))
            return out
        self._emit(events)
        return [batch]

    # ------------------------------------------------------------------ reporting
    def _emit(self, events) -> None:
        for e, event in events:
            if event.finished:
                self._finish(e)
            if e.on_event is not None:
                e.on_event(event)

    def _finish(self, e: Entry) -> None:
        e.remove_hooks()
        e.done = True
        self.entries.pop(id(e), None)

    def _error(self, e: Entry, exc: BaseException) -> None:
        self._finish(e)
        if e.on_error is not None:
            e.on_error(exc)

    def abort(self, exc: BaseException | None = None) -> None:
        """End everything waiting or running (hooks removed); with ``exc``, report it to each request."""
        entries = list(self.entries.values())
        self.waiting.clear()
        for b in self.batches.values():
            b.fail(exc or RuntimeError("aborted"))
        self.batches.clear()
        self.recent.clear()
        for e in entries:
            if e.done:
                continue
            if exc is not None:
                self._error(e, exc)
            else:
                self._finish(e)
