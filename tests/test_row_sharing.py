"""Rows that repeat another row exactly share one prefill forward (decoding.batch ``_row_digests``): the same
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

    def prefill(cls, lvlm, entries, recent=None):
        forward = lvlm.adapter.forward
        rows: list[int] = []

        def counting(**inputs):
            rows.append(int(inputs["input_ids"].shape[0]))
            return forward(**inputs)

        lvlm.adapter.forward = counting
        try:
            batch = real(cls, lvlm, entries, recent)
        finally:
            del lvlm.adapter.forward
        seen.append((batch.num_rows, rows[0] if rows else 0))
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
    monkeypatch.setattr(Batch, "_row_digests", lambda self, batch, pos: None)
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


# ---------------------------------------------------------------- rows kept across groups (decoding.recent_rows)
def test_a_later_group_reuses_a_row_an_earlier_group_ran(forward_rows, monkeypatch):
    """max_batch=2: the first two requests form one group, the last two the next. The second asking of the
    short question runs no row through the model although its first asking ran padded beside a longer one; it
    gets exactly the logits that asking computed, and every request the tokens of a run that keeps nothing. In
    both groups the short row is padded (keys placed after the padding)."""
    from clearsight.decoding.recent_rows import RecentRows

    seen, logits = forward_rows
    lvlm = tiny("tiny-llava")
    a, b = make_image(1), make_image(2)
    short = {"prompt": "is it red?", "image": a}
    long = {"prompt": "what shapes are in the picture, and where are they?", "image": a}
    other = {**long, "image": b}
    reqs = [long, short, short, other]  # the second short asking runs padded beside `other`
    reused = generate(lvlm, reqs, decode=DECODE, max_batch=2)
    assert seen == [(2, 2), (2, 1)]  # the second group runs only `other` (another image)
    torch.testing.assert_close(logits[1][0], logits[0][1], rtol=0, atol=0)
    monkeypatch.setattr(RecentRows, "get", lambda self, digest: None)
    seen.clear()
    alone = generate(lvlm, reqs, decode=DECODE, max_batch=2)
    assert seen == [(2, 2), (2, 2)]
    assert [r.token_ids for r in reused] == [r.token_ids for r in alone]
    assert reused[1].token_ids == reused[2].token_ids


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_row_with_a_plan_edit_is_never_reused(forward_rows):
    seen, _ = forward_rows
    q = {"prompt": "is it red?", "image": make_image(1)}
    generate(tiny("tiny-llava"), [q, q], ["pai"], decode=DECODE, max_batch=1)
    assert all(through == rows for rows, through in seen)


def test_recent_rows_is_a_byte_bounded_lru():
    from clearsight.decoding.recent_rows import RecentRows

    def row(x: float) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        kv = torch.full((2, 3, 4), x)  # 96 bytes each for keys and values
        return [(kv, kv.clone())], torch.full((8,), x)  # + 32 bytes of logits: 224 bytes a row

    store = RecentRows(max_bytes=3 * 224)
    for i in range(3):
        store.put(bytes([i]), *row(float(i)))
    assert (len(store), store.bytes) == (3, 672)
    assert store.get(bytes([0]))[1][0] == 0.0  # row 0 is now the most recently used
    store.put(bytes([3]), *row(3.0))  # evicts row 1, the least recently used
    assert [store.get(bytes([i])) is not None for i in range(4)] == [True, False, True, True]
    assert store.hits == 4
    store.put(bytes([2]), *row(9.0))  # a row already held is not replaced
    assert store.get(bytes([2]))[1][0] == 2.0
    store.put(b"big", [(torch.zeros(100), torch.zeros(100))], torch.zeros(1))  # larger than the whole store
    assert store.get(b"big") is None and len(store) == 3
    store.clear()
    assert (len(store), store.bytes) == (0, 0)
    with pytest.raises(ValueError, match="max_bytes"):
        RecentRows(max_bytes=-1)
