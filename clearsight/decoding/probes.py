"""Probe generations of many requests run as one batch.

AGLA's attention matcher and the imbalanced fix's head sensitivities each run a one-token probe prefill
of their request before the request's own rows exist. Run one request at a time, those probes were about
half of those methods' time on the demo job (a batch of 32 requests paid 32 prefills of one row). The
scheduler now prefetches them: before admitting waiting requests it prepares them once with a
*recording* probe, which notes each probe call that its caller marked ``batched=True`` and stops the
preparation there (``ProbeDeferred``); the noted calls of all those requests run as one probe generation
per (mitigations, decode, statistics, backend); the results wait in each request's memo, and the real
preparation finds them there. Sequential probes (a second probe that depends on the first's result) take
one round each.

Only calls marked ``batched=True`` are deferred: the caller promises it reads nothing but the returned
results (VHR, whose probe is read through hooks around the call, runs its probe as before). A result
equals the one the request's own probe would give (the rows of a batch are computed independently; the
same statement as for any batch, see ``tests/test_probe_batching.py``). When a batched run fails, nothing
is stored and every request runs its own probe in its real preparation, so an error lands on its request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clearsight.mitigations.base import Probe

MAX_PROBE_BATCH = 32  # requests per batched probe generation
MAX_ROUNDS = 4  # sequential batched probes per request prefetched; later ones run when the request is prepared


class ProbeDeferred(Exception):
    """Raised by a recording probe: the call is noted, to run batched with other requests' probes."""


def _value_key(v: Any) -> Any:
    if isinstance(v, Image.Image):
        return ("image", v.mode, v.size, hashlib.sha256(v.tobytes()).hexdigest())
    if isinstance(v, dict):
        return tuple(sorted((k, _value_key(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_value_key(x) for x in v)
    if hasattr(v, "model_dump"):  # pydantic (GenerationRequest, DecodeSpec, mitigation specs)
        return (type(v).__name__, _value_key(v.model_dump()))
    return repr(v)


@dataclass
class ProbeCall:
    requests: list[Any]
    mitigations: Any
    decode: Any
    stats: Any
    key: Any = None  # the call's identity (every argument's content, images by their pixels)
    group: Any = None  # calls with the same group run as one generation (all but the requests)

    def __post_init__(self) -> None:
        self.group = (_value_key(self.mitigations), _value_key(self.decode), repr(self.stats))
        self.key = (_value_key(self.requests), self.group)


class BatchingProbe:
    """A request's probe (``RequestContext.probe``) with a memo of prefetched results.

    ``batched=True`` calls are answered from the memo when prefetched; while ``recording``, a call not in
    the memo is noted in ``pending`` and ``ProbeDeferred`` is raised. Other calls run at once.
    """

    def __init__(self, inner: Probe, memo: dict[Any, list[Any]], recording: bool = False) -> None:
        self.inner, self.memo, self.recording = inner, memo, recording
        self.pending: list[ProbeCall] = []

    def __call__(self, requests: Sequence[Any] | Any, mitigations: Any = (), decode: Any = None, *,
                 stats: Any = None, batched: bool = False) -> list[Any]:
        if batched:
            reqs = list(requests) if isinstance(requests, (list, tuple)) else [requests]
            call = ProbeCall(reqs, mitigations, decode, stats)
            if call.key in self.memo:
                return self.memo[call.key]
            if self.recording:
                self.pending.append(call)
                raise ProbeDeferred
        return self.inner(requests, mitigations, decode, stats=stats)


def run_batched(calls: Sequence[tuple[Any, Callable[..., list[Any]], ProbeCall]]) -> dict[int, list[Any]]:
    """Run ``(where, probe, call)`` triples: the calls with the same ``where`` (the backend: probes that run the
    same way) and group run together, through the first one's probe. Returns call index -> its results.

    A group whose generation fails gives no results (its calls run again one by one, where they belong)."""
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, (where, _, call) in enumerate(calls):
        groups.setdefault((where, call.group), []).append(i)
    out: dict[int, list[Any]] = {}
    for members in groups.values():
        _, probe, first = calls[members[0]]
        for start in range(0, len(members), MAX_PROBE_BATCH):
            chunk = members[start:start + MAX_PROBE_BATCH]
            reqs = [r for i in chunk for r in calls[i][2].requests]
            try:
                results = probe(reqs, first.mitigations, first.decode, stats=first.stats, max_batch=len(reqs))
            except Exception:  # noqa: BLE001 - each call runs again alone, where its error belongs to its request
                continue
            at = 0
            for i in chunk:
                n = len(calls[i][2].requests)
                out[i] = results[at:at + n]
                at += n
    return out
