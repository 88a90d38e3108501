"""The probe API: how mitigations run their probe generations without importing the decoding layer."""

from __future__ import annotations

import pytest
from mithelp import make_image, tiny

import clearsight.decoding.batch as batch_module
from clearsight import DecodeSpec, generate
from clearsight.config import GenerationRequest
from clearsight.decoding import make_probe
from clearsight.decoding.batch import Entry
from clearsight.kernels.plan import StatsRequest
from clearsight.mitigations import base, probe_for

DECODE = DecodeSpec(max_new_tokens=3)


def test_probe_gives_generate_results():
    lvlm = tiny("tiny-llava")
    reqs = [{"prompt": "what is it?", "image": make_image(1)}, "describe nothing"]
    got = make_probe(lvlm)(reqs, decode=DECODE, stats=StatsRequest(last_row=True))
    want = generate(lvlm, reqs, decode=DECODE, stats=StatsRequest(last_row=True))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[0].stats is not None and set(got[0].stats["last_row"]) == set(want[0].stats["last_row"])
    mitigated = make_probe(lvlm)(reqs[:1], ["vcd"], decode=DECODE)
    assert mitigated[0].token_ids == generate(lvlm, reqs[:1], ["vcd"], decode=DECODE)[0].token_ids


def test_request_context_probe_runs_on_the_requests_backend(monkeypatch):
    lvlm = tiny("tiny-llava")
    entry = Entry(GenerationRequest(prompt="hi"), [], DECODE, backend="reference")
    entry.prepare(lvlm)
    assert entry.ctx is not None and entry.ctx.probe is not None
    used: list[str] = []
    real = batch_module.use_backend

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(batch_module, "use_backend", spy)
    got = entry.ctx.run_probe(["hi"], decode=DECODE)
    assert used and set(used) == {"reference"}
    monkeypatch.setattr(batch_module, "use_backend", real)
    assert got[0].token_ids == generate(tiny("tiny-llava", "reference"), ["hi"], decode=DECODE)[0].token_ids


def test_probe_for(monkeypatch):
    lvlm = tiny("tiny-llava")

    def mine(requests, mitigations=(), decode=None, *, stats=None):
        return []

    assert probe_for(lvlm, mine) is mine
    assert probe_for(lvlm)(["hi"], decode=DECODE)[0].token_ids == generate(lvlm, ["hi"], decode=DECODE)[0].token_ids
    monkeypatch.setattr(base, "_probe_factory", None)
    with pytest.raises(RuntimeError, match="no probe"):
        probe_for(lvlm)
