"""Probe prefetch (decoding.probes): the batchable probes of waiting requests run as one generation, with the
results each request's own probe gives."""

from __future__ import annotations

import pytest
import torch
from tinyworld import make_image, tiny

import clearsight.decoding.batch as batch_mod
from clearsight import DecodeSpec, generate
from clearsight.decoding.probes import BatchingProbe, ProbeCall, ProbeDeferred, run_batched
from clearsight.decoding.scheduler import Scheduler
from clearsight.errors import InputError

DECODE = DecodeSpec(max_new_tokens=3, ignore_eos=True)
PROMPTS = ["what is in the picture?", "is there a cat?", "describe the colours", "what is on the left?",
           "count the objects", "is it dark?"]


def _requests(n: int = 6) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "image": make_image(100 + i)} for i in range(n)]


@pytest.fixture
def probe_log(monkeypatch):
    """Every probe generation the requests' probes run: the number of requests in each."""
    log: list[int] = []
    real = batch_mod.make_probe

    def counting(lvlm, backend=None):
        inner = real(lvlm, backend)

        def probe(requests, mitigations=(), decode=None, *, stats=None, max_batch=8, batched=False):
            log.append(len(requests) if isinstance(requests, list) else 1)
            return inner(requests, mitigations, decode, stats=stats, max_batch=max_batch)

        return probe

    monkeypatch.setattr(batch_mod, "make_probe", counting)
    return log


@pytest.mark.parametrize("method", ["agla", "imbalanced:head_spread=0.5"])
def test_prefetched_probes_run_as_one_batch_with_the_same_tokens(method, probe_log, monkeypatch):
    lvlm = tiny("tiny-llava")
    reqs = _requests()
    batched = generate(lvlm, reqs, [method], decode=DECODE, max_batch=8)
    assert probe_log == [6]  # one probe generation of the six requests, not six of one
    probe_log.clear()
    monkeypatch.setattr(Scheduler, "_prefetch_probes", lambda self, room: None)
    alone = generate(lvlm, reqs, [method], decode=DECODE, max_batch=8)
    assert probe_log == [1] * 6
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_imbalanced_head_boosts_equal_the_solo_probes():
    """The per-head boosts come from the probe's attention masses: batched, they equal each request's own."""
    from clearsight.decoding.batch import Entry
    from clearsight.mitigations.registry import parse_mitigations

    lvlm = tiny("tiny-llava")
    masses = []
    for max_requests in (8, 1):
        sched = Scheduler(lvlm, max_requests=max_requests)
        entries = [Entry(_req(r), parse_mitigations(["imbalanced:head_spread=0.5"]), DECODE, index=i)
                   for i, r in enumerate(_requests(4))]
        for e in entries:
            sched.add(e)
        while sched.busy:
            sched.step()
        masses.append([torch.stack(list(e.ctx.state["imbalanced.image_mass"].values())) for e in entries])
    for a, b in zip(*masses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _req(r: dict):
    from clearsight.config import GenerationRequest

    return GenerationRequest(prompt=r["prompt"], image=r["image"])


def test_a_bad_request_fails_alone_with_its_own_error(probe_log):
    lvlm = tiny("tiny-llava")
    reqs = _requests(3)
    reqs[1] = {"prompt": "x", "image": "/nonexistent/picture.png"}
    with pytest.raises(InputError, match="request 1: image"):
        generate(lvlm, reqs, ["agla"], decode=DECODE, max_batch=8)


def test_recording_probe_notes_batched_calls_only():
    ran = []

    def inner(requests, mitigations=(), decode=None, *, stats=None):
        ran.append(requests)
        return ["result"]

    memo: dict = {}
    probe = BatchingProbe(inner, memo, recording=True)
    assert probe(["a"], decode={"max_new_tokens": 1}) == ["result"]  # not batchable: runs at once
    with pytest.raises(ProbeDeferred):
        probe([{"prompt": "p", "image": make_image(1)}], decode={"max_new_tokens": 1}, batched=True)
    assert len(ran) == 1 and len(probe.pending) == 1
    call = probe.pending[0]
    memo[call.key] = ["prefetched"]
    # the same content in a new image object hits the memo; other pixels do not
    again = BatchingProbe(inner, memo, recording=True)
    assert again([{"prompt": "p", "image": make_image(1)}], decode={"max_new_tokens": 1}, batched=True) == \
        ["prefetched"]
    with pytest.raises(ProbeDeferred):
        again([{"prompt": "p", "image": make_image(2)}], decode={"max_new_tokens": 1}, batched=True)
    not_recording = BatchingProbe(inner, memo)
    assert not_recording([{"prompt": "q"}], batched=True) == ["result"]  # not prefetched: runs at once


def test_run_batched_groups_and_splits_in_order():
    seen = []

    def probe(requests, mitigations=(), decode=None, *, stats=None, max_batch=8):
        seen.append((list(requests), decode))
        if "boom" in requests:
            raise RuntimeError("boom")
        return [r.upper() for r in requests]

    calls = [("torch", probe, ProbeCall(["a"], (), {"n": 1}, None)),
             ("torch", probe, ProbeCall(["b", "c"], (), {"n": 1}, None)),
             ("torch", probe, ProbeCall(["d"], (), {"n": 2}, None)),  # other decode: its own generation
             ("reference", probe, ProbeCall(["e"], (), {"n": 1}, None)),  # other backend: its own
             ("sdpa", probe, ProbeCall(["boom"], (), {"n": 1}, None))]
    out = run_batched(calls)
    assert out == {0: ["A"], 1: ["B", "C"], 2: ["D"], 3: ["E"]}  # the failed group gives nothing
    assert (["a", "b", "c"], {"n": 1}) in seen and len(seen) == 4
