"""Rows that repeat another row exactly share one prefill forward (decoding.batch ``_repeated_rows``): the same
tokens and logits as when each row runs its own, and fewer rows through the model."""

from __future__ import annotations

import pytest
import torch
from tinyworld import make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.decoding.batch import Batch

DECODE = DecodeSpec(max_new_tokens=3, ignore_eos=True)


def _requests() -> list[dict]:
    """Two images, two questions each: INTER's prompt-free rows repeat per image, its noise-image rows per
    question (one noise image for all), its row with neither for every request; M3ID's image-free rows per
    question."""
    a, b = make_image(1), make_image(2)
    return [{"prompt": q, "image": im} for im in (a, b) for q in ("what is in the picture?", "is it red?")]


@pytest.fixture
def forward_rows(monkeypatch):
    """The rows of every prefill forward, and each prefill's last logits."""
    seen: list[tuple[int, int]] = []  # (rows of the batch, rows through the model)
    logits: list[torch.Tensor] = []
    real = Batch.prefill.__func__

    def prefill(cls, lvlm, entries):
        forward = lvlm.adapter.forward
        rows: list[int] = []

        def counting(**inputs):
            rows.append(int(inputs["input_ids"].shape[0]))
            return forward(**inputs)

        lvlm.adapter.forward = counting
        try:
            batch = real(cls, lvlm, entries)
        finally:
            del lvlm.adapter.forward
        seen.append((batch.num_rows, rows[0]))
        logits.append(batch.logits.clone())
        return batch

    monkeypatch.setattr(Batch, "prefill", classmethod(prefill))
    return seen, logits


@pytest.mark.parametrize("method,rows,through", [("inter", 16, 4 + 2 + 2 + 1), ("m3id", 8, 4 + 2)])
def test_repeated_rows_share_a_forward_with_the_same_tokens_and_logits(method, rows, through, forward_rows,
                                                                      monkeypatch):
    seen, logits = forward_rows
    lvlm = tiny("tiny-llava")
    shared = generate(lvlm, _requests(), [method], decode=DECODE, max_batch=8)
    assert seen == [(rows, through)]
    monkeypatch.setattr(Batch, "_repeated_rows", lambda self, batch, pos: None)
    alone = generate(lvlm, _requests(), [method], decode=DECODE, max_batch=8)
    assert seen[1] == (rows, rows)
    assert [r.token_ids for r in shared] == [r.token_ids for r in alone]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)  # every row's, repeats included


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["pai", "vhr", "causalmm"])  # a plan edit or a hook: the rows stay apart
def test_rows_stay_apart_when_something_tells_them_apart(method, forward_rows):
    seen, _ = forward_rows
    lvlm = tiny("tiny-llava")
    reqs = _requests()
    generate(lvlm, reqs + reqs, [method], decode=DECODE, max_batch=8)  # every request twice
    assert seen and all(through == rows for rows, through in seen if rows > 1)


def test_stats_keep_the_rows_apart(forward_rows):
    from clearsight.kernels.plan import StatsRequest

    seen, _ = forward_rows
    lvlm = tiny("tiny-llava")
    reqs = _requests()
    generate(lvlm, reqs + reqs, decode=DECODE, max_batch=8, stats=StatsRequest(segment_mass=True))
    assert seen == [(8, 8)]


def test_identical_requests_share_and_other_backends_do_not(forward_rows):
    seen, _ = forward_rows
    reqs = _requests()
    generate(tiny("tiny-llava"), reqs + reqs, decode=DECODE, max_batch=8)
    generate(tiny("tiny-llava", backend="reference"), reqs + reqs, decode=DECODE, max_batch=8)
    assert seen == [(8, 4), (8, 8)]  # the reference backend reads the plan's rows even when it is empty
