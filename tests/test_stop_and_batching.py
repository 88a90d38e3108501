"""Behaviours users rely on (issue 22): several stop strings (the earliest in the text wins), several
requests streamed interleaved, chunking by ``max_batch`` (same tokens, order and ids kept), and attention
statistics of a padded batch with branch rows equal to the request's solo run."""

from __future__ import annotations

import pytest
import torch
from tinyworld import make_image, tiny

from clearsight import DecodeSpec, generate, stream_generate
from clearsight.decoding.sampling import find_stop
from clearsight.kernels.plan import StatsRequest

PROMPTS = ["what is in the picture?", "describe the image please", "is there a red circle?",
           "what colour is the shape?", "how many shapes are there in this picture?"]
SIZES = [(40, 50), (64, 30), (32, 32), (50, 40), (30, 60)]


def _reqs(n: int) -> list[dict]:
    return [{"prompt": PROMPTS[i], "image": make_image(i, SIZES[i]), "id": f"r{i}"} for i in range(n)]


def test_find_stop_earliest_position_wins_not_list_order():
    assert find_stop("the red circle and the blue square", ("blue", "red")) == 4
    assert find_stop("the red circle", ("circle", "the red")) == 0
    assert find_stop("abcabc", ("cab", "bc")) == 1  # overlapping candidates: the earlier start
    assert find_stop("abc", ("x", "y")) is None
    assert find_stop("abc", ()) is None
    assert find_stop("abc", ("c",)) == 2


def test_several_stop_strings_the_earliest_in_the_text_wins():
    lvlm = tiny("tiny-llava")
    req = _reqs(1)
    full = generate(lvlm, req, decode=DecodeSpec(max_new_tokens=12))[0]
    words = full.text.split()
    assert len(words) >= 5
    late, early = words[4], words[1]
    assert full.text.find(early) < full.text.find(late)
    got = generate(lvlm, req, decode=DecodeSpec(max_new_tokens=12, stop=(late, early)))[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[: full.text.find(early)].strip()
    # generation stops at the token that completes the stop string: no more tokens than needed
    assert len(got.token_ids) < len(full.token_ids) and full.token_ids[: len(got.token_ids)] == got.token_ids


def test_streaming_several_requests_interleaved():
    lvlm = tiny("tiny-llava")
    reqs = _reqs(3)
    decode = DecodeSpec(max_new_tokens=6, ignore_eos=True)
    want = generate(lvlm, reqs, decode=decode)
    events = list(stream_generate(lvlm, reqs, decode=decode, max_batch=3))
    order = [e.request for e in events]
    # interleaved: the first step gives one token of each request before any request's second token
    assert sorted(order[:3]) == [0, 1, 2]
    for i, w in enumerate(want):
        mine = [e for e in events if e.request == i]
        assert [e.token_id for e in mine] == w.token_ids
        assert "".join(e.text for e in mine).strip() == w.text
        assert [e.finished for e in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].result.id == f"r{i}"


@pytest.mark.parametrize("mitigations", [[], ["vcd:alpha=1"]], ids=["plain", "vcd-branches"])
def test_chunking_by_max_batch_keeps_tokens_order_and_ids(mitigations):
    lvlm = tiny("tiny-llava")
    n = 3 if mitigations else 5  # a branch method doubles the rows: fewer requests keep the test light
    reqs = _reqs(n)
    decode = DecodeSpec(max_new_tokens=4)
    runs = {b: generate(lvlm, reqs, mitigations, decode, max_batch=b) for b in (1, 2, n)}
    for b, results in runs.items():
        assert [r.id for r in results] == [f"r{i}" for i in range(n)], b
        assert [r.prompt for r in results] == PROMPTS[:n], b
        assert [r.token_ids for r in results] == [r.token_ids for r in runs[1]], b
    assert len({tuple(r.token_ids) for r in runs[1]}) > 1  # the requests differ: order is observable


def test_statistics_of_a_padded_batch_with_branches_equal_the_solo_run():
    lvlm = tiny("tiny-llava")
    reqs = _reqs(3)  # prompts of different lengths: the batch is left-padded
    stats = StatsRequest(segment_mass=True, last_row=True, layers=frozenset({1}))
    decode = DecodeSpec(max_new_tokens=2)
    batched = generate(lvlm, reqs, ["vcd"], decode, stats=stats)
    for req, b in zip(reqs, batched):
        solo = generate(lvlm, [req], ["vcd"], decode, stats=stats)[0]
        assert b.token_ids == solo.token_ids
        assert b.stats["layout"] == solo.stats["layout"] and b.stats["pad"] == 0
        torch.testing.assert_close(b.stats["segment_mass"][1], solo.stats["segment_mass"][1], atol=1e-5, rtol=1e-4)
        rows_b, rows_s = b.stats["last_row"][1], solo.stats["last_row"][1]
        assert len(rows_b) == len(rows_s) == 2  # the prefill's last row, then one per decode step
        for x, y in zip(rows_b, rows_s):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    # the statistics are the main row's: a probability mass per segment, summing to one per query
    mass = batched[0].stats["segment_mass"][1]
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)), atol=1e-4, rtol=0)


JOIN_DECODE = DecodeSpec(max_new_tokens=3, ignore_eos=True)


def _prefilled(lvlm, i: int, compile: bool = False):
    """A batch of request i alone, prefilled, its first token chosen (what the scheduler joins)."""
    from clearsight.config import GenerationRequest
    from clearsight.decoding.batch import Batch, Entry

    e = Entry(GenerationRequest(prompt=PROMPTS[i], image=make_image(i, SIZES[i])), [], JOIN_DECODE,
              compile=compile)
    e.prepare(lvlm)
    b = Batch.prefill(lvlm, [e])
    b.choose()
    return b, e


def test_a_joined_batch_asks_for_the_compiled_step_only_if_both_did():
    lvlm = tiny("tiny-llava")
    for mine, theirs in ((True, True), (True, False), (False, True)):
        a, _ = _prefilled(lvlm, 0, mine)
        b, _ = _prefilled(lvlm, 1, theirs)
        a.join(b)
        assert a.compile is (mine and theirs) and a.num_rows == 2, (mine, theirs)


def test_joining_into_a_batch_whose_rows_all_left_takes_the_other_whole():
    """``Batch.join`` into a batch with no rows left (the scheduler replaces such a batch instead, but the
    method allows it): the result is the other batch, which then decodes as its request alone. A batch of
    another key is refused."""
    from clearsight.decoding.batch import Batch

    lvlm, decode = tiny("tiny-llava"), JOIN_DECODE
    empty, _ = _prefilled(lvlm, 0)
    with pytest.raises(ValueError, match="^join: batches of different backends or statistics$"):
        empty.join(Batch(lvlm, ("reference", None)))  # the scheduler only joins batches of one key
    empty.select([])
    other, entry = _prefilled(lvlm, 1)
    rows, plan = other.rows, other.plan
    empty.join(other)
    assert empty.rows is rows and empty.entries == [entry] and empty.plan is plan
    while entry.active:
        empty.decode()
        empty.choose()
    assert entry.tokens == generate(lvlm, [_reqs(2)[1]], decode=decode)[0].token_ids
