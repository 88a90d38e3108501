"""The compiled decode step (static KV cache + torch.compile) against the eager step: same greedy tokens.

The step is compiled with ``aot_eager`` here: dynamo's full-graph capture of the model, the plan binding and
the static cache are what is tested; inductor's CPU code generation takes minutes on a 2-core machine (the
benchmark ``benchmarks/compiled_step.py`` runs it).
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from tinyworld import make_image, tiny

import clearsight.decoding.compiled as compiled
from clearsight import DecodeSpec, generate
from clearsight.engine import Engine
from clearsight.errors import InputError
from clearsight.mitigations import Mitigation
from clearsight.mitigations.base import MAIN

DECODE = DecodeSpec(max_new_tokens=6, ignore_eos=True)


class HalfHeads(Mitigation):
    """Test-only: halves two heads' outputs of layer 1 on the main row (a decode edit the graph captures)."""

    name: Literal["test-half-heads"] = "test-half-heads"

    def apply(self, ctx):
        ctx.plan.scale_heads(1, [ctx.rows[MAIN]], torch.tensor([0.5, 1.0, 0.5, 1.0]))


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "COMPILER", "aot_eager")


def _requests(n: int = 2):
    # rows of different lengths (left padding), one without an image
    reqs = [{"prompt": "describe the image please", "image": make_image(0)},
            {"prompt": "what color is the shape on the left of the picture"},
            {"prompt": "is there a red circle?", "image": make_image(2, (32, 32))}]
    return reqs[:n]


@pytest.mark.parametrize(("family", "mitigations"), [
    ("tiny-llava", []),
    ("tiny-llava", ["mma"]),  # a prompt-only mask: the decode plan is stock attention
    ("tiny-llava", [HalfHeads()]),  # a per-head scale at decode: the plan is traced into the graph
    ("tiny-qwen2-vl", []),  # 3-D M-RoPE positions
    ("tiny-instructblip", []),  # the step runs the adapter's decode_model (InstructBLIP's language model)
])
def test_compiled_step_gives_the_eager_tokens(family, mitigations):
    lvlm = tiny(family)
    reqs = _requests(3 if mitigations else 2)
    if mitigations:
        reqs = [r for r in reqs if "image" in r]  # MMA edits image rows
    eager = generate(lvlm, reqs, mitigations, decode=DECODE)
    comp = generate(lvlm, reqs, mitigations, decode=DECODE, compile=True)
    assert [r.token_ids for r in comp] == [r.token_ids for r in eager]
    assert all(len(r.token_ids) == 6 for r in comp)
    assert [r.decode_step for r in comp] == ["compiled"] * len(reqs)
    assert [r.decode_step for r in eager] == [None] * len(reqs)
    if mitigations and isinstance(mitigations[0], HalfHeads):  # the edit changes the tokens: it is not skipped
        assert [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)] != [r.token_ids for r in eager]


def test_uncapturable_plan_falls_back_to_the_eager_step():
    lvlm = tiny("tiny-llava")
    reqs = _requests(1)
    for method, why in (("var", "hooks installed"), ("pai", "attention-score edits")):
        eager = generate(lvlm, reqs, [method], decode=DECODE)
        comp = generate(lvlm, reqs, [method], decode=DECODE, compile=True)
        assert comp[0].token_ids == eager[0].token_ids
        assert comp[0].decode_step.startswith(f"eager ({why}"), comp[0].decode_step


def test_failed_trace_falls_back_and_says_so(monkeypatch):
    def broken(model):
        def step(*args):
            raise RuntimeError("no graph today")
        return step

    monkeypatch.setattr(compiled, "step_function", broken)
    lvlm = tiny("tiny-llava")
    eager = generate(lvlm, _requests(1), decode=DECODE)
    comp = generate(lvlm, _requests(1), decode=DECODE, compile=True)
    assert comp[0].token_ids == eager[0].token_ids
    assert comp[0].decode_step.startswith("eager (the trace failed"), comp[0].decode_step
    assert "no graph today" in comp[0].decode_step


def test_engine_compiles_and_joins_fall_back_to_dynamic_cache():
    # requests arriving one after another: a join copies the static cache back, the next step builds a new one
    lvlm = tiny("tiny-llava")
    reqs = _requests(2)
    eager = generate(lvlm, reqs, decode=DECODE)
    with Engine(lvlm, compile=True) as engine:
        first = engine.submit(reqs[0], decode=DECODE)
        second = engine.submit(reqs[1], decode=DECODE)
        results = [first.result(120), second.result(120)]
    assert [r.token_ids for r in results] == [r.token_ids for r in eager]
    assert all(r.decode_step == "compiled" for r in results), [r.decode_step for r in results]


def test_compile_must_be_a_bool():
    with pytest.raises(InputError, match="compile must be True or False"):
        generate(tiny("tiny-llava"), "describe", compile="yes")
