"""Mixed batch == solo runs, on every builtin family, for every mitigation that edits the attention plan (issue 22).

One plan serves a batch of unrelated requests, each row keeping its own edits (kernels/plan.py); a row's
greedy tokens must not depend on what its neighbours ask for. The families come from the builtin registry
and the methods from their declarations (``kind == "plan"`` or exclusive ``plan_fields``), so a family or
method added later joins this test; a cell the compatibility matrix refuses is skipped by the matrix. Each
mitigation row must write the plan (its writers are recorded), so a selection that edits nothing, or a
strength of zero, fails instead of passing trivially. Rows are compared by tokens and by the last query
row's attention in every layer and step (a leak of one row's edit into another can leave random tiny
weights' greedy tokens unchanged), and the batch must really be one batch: a failed group prefill is
retried request by request, which would make any batch "equal" its solo runs.

tests/test_families.py checks unmitigated mixed batches of the new families;
tests/mitigations/test_composition.py composed rows on tiny-llava; tests/test_engine.py requests that join
a running batch (the plan's concatenate) on tiny-llava.
"""

from __future__ import annotations

import pytest
import torch
from tinyworld import make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.decoding.batch import Batch
from clearsight.kernels.plan import AttentionPlan, StatsRequest
from clearsight.mitigations.compat import WORKS, compatibility_matrix
from clearsight.mitigations.registry import REGISTRY
from clearsight.models.builtin import BUILTINS

BUILTIN_FAMILIES = sorted(name for name, (_, build) in BUILTINS.items() if build is not None)  # not shipped weights
PLAN_METHODS = sorted(name for name, cls in REGISTRY.items() if cls.kind == "plan" or cls.plan_fields)
# parameters that make the method act on random tiny weights (defaults otherwise): tiny models have no VAR sink
# table, and a low tau with no mass thresholds makes VAR find sinks and move mass on every row
ACTING: dict[str, dict] = {"var": {"sink_dims": [3], "tau": 0.5, "rho": 0.0, "min_image_mass": 0.0}}
WRITERS = ("add_bias", "add_abs_bias", "set_redistribute", "set_counterfactual", "scale_heads", "set_segments",
           "set_mask", "set_position_ids")
DECODE = DecodeSpec(max_new_tokens=3, ignore_eos=True)
STATS = StatsRequest(last_row=True)


def _spec(method: str) -> dict:
    return {"name": method, **ACTING.get(method, {})}


def test_the_selection_is_the_plan_editing_methods():
    # the methods whose only effect is on the attention plan, and CausalMM's counterfactual branch row
    assert {"pai", "vhr", "var", "cca", "mma", "imbalanced", "causalmm"} <= set(PLAN_METHODS)
    assert not {"vcd", "m3id", "none"} & set(PLAN_METHODS)  # logits-level: tests/mitigations/test_*.py
    assert {"tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"} <= set(BUILTIN_FAMILIES)


@pytest.mark.filterwarnings("ignore::UserWarning")  # untrained-checkpoint warnings of cca / mma on random weights
@pytest.mark.parametrize("builtin", BUILTIN_FAMILIES)
def test_mixed_batch_equals_solo_runs(builtin, monkeypatch):
    """One batch per family: a row per method the matrix lets this family run (each a different mitigation),
    an unmitigated row and a row without an image, images of different sizes; each row equals its solo run."""
    lvlm = tiny(builtin)
    matrix = compatibility_matrix()
    family = lvlm.adapter.family
    if family not in matrix["none"]:
        pytest.skip(f"{builtin}: no family column in the matrix (a text-only model has no image keys to edit)")
    methods = [m for m in PLAN_METHODS if matrix[m][family] == WORKS]  # refused cells: by the matrix
    assert len(methods) >= 4, methods
    sizes = [(40, 50), (32, 32), (64, 30)]
    requests = [{"prompt": f"what is in picture {i}?", "image": make_image(i, sizes[i % 3]), "mitigations": [_spec(m)]}
                for i, m in enumerate(methods)]
    requests[1:1] = [{"prompt": "describe the image please", "image": make_image(9, (50, 40)), "mitigations": []},
                     {"prompt": "describe the image", "image": None, "mitigations": []}]
    groups: list[int] = []  # the prefill groups' sizes
    failed: list[BaseException] = []  # a group whose prefill fails is retried request by request: solo runs

    def prefill(cls, lv, entries, recent=None, _prefill=Batch.prefill.__func__):
        groups.append(len(entries))
        try:
            return _prefill(cls, lv, entries, recent)
        except Exception as exc:
            failed.append(exc)
            raise

    monkeypatch.setattr(Batch, "prefill", classmethod(prefill))
    batched = generate(lvlm, requests, decode=DECODE, stats=STATS, max_batch=len(requests))
    # every row prefilled in one batch (probe generations, e.g. imbalanced's, are prefills of their own)
    assert not failed and max(groups) == len(requests), (failed, groups)
    monkeypatch.undo()

    written: list[str] = []
    adapter_writing = [False]  # the family's own mask (Gemma 3's image block: adapter.prepare_plan) is no edit
    for name in WRITERS:
        original = getattr(AttentionPlan, name)
        monkeypatch.setattr(AttentionPlan, name, lambda self, *a, _f=original, _n=name, **k: (
            adapter_writing[0] or written.append(_n), _f(self, *a, **k))[1])
    adapter_class, prepare = type(lvlm.adapter), type(lvlm.adapter).prepare_plan

    def prepare_plan(self, plan):
        adapter_writing[0] = True
        try:
            prepare(self, plan)
        finally:
            adapter_writing[0] = False

    monkeypatch.setattr(adapter_class, "prepare_plan", prepare_plan)
    for r, b in zip(requests, batched, strict=True):
        written.clear()
        solo = generate(lvlm, [r], decode=DECODE, stats=STATS)[0]
        assert bool(written) == bool(r["mitigations"]), (r["mitigations"], written)  # a method's row writes the plan
        assert b.token_ids == solo.token_ids and solo.token_ids, r["mitigations"]
        # the last query row's attention in every layer and step: tokens of random tiny weights can miss an
        # edit that leaks into another row, these probabilities do not
        assert b.stats["last_row"].keys() == solo.stats["last_row"].keys()
        for layer, steps in solo.stats["last_row"].items():
            assert len(b.stats["last_row"][layer]) == len(steps) == DECODE.max_new_tokens
            for x, y in zip(b.stats["last_row"][layer], steps, strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m, r=r, layer=layer: (
                    f"{r['mitigations']} layer {layer}: {m}"))
