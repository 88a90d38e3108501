"""CCA and modality-mutual attention: hand-computed tables, plain-torch attention, warnings, families."""

from __future__ import annotations

import warnings

import pytest
import torch
from mithelp import causal, make_image, plain_attention, spy_attention, tiny

from clearsight import DecodeSpec, generate
from clearsight.errors import InputError
from clearsight.kernels.plan import PlanConflictError, RowLayout
from clearsight.mitigations.cca import UntrainedCheckpointWarning, cca_tables, ring_levels

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=4, ignore_eos=True)


def test_ring_tables_by_hand():
    assert ring_levels(4, 4).view(4, 4).tolist() == [
        [0, 0, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 0],
    ]
    assert ring_levels(5, 5).view(5, 5).tolist() == [
        [0, 0, 0, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 2, 1, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ]
    r24 = ring_levels(24, 24).view(24, 24)
    assert [int((r24 == c).sum()) for c in range(12)] == [92, 84, 76, 68, 60, 52, 44, 36, 28, 20, 12, 4]
    assert r24[0, 0] == 0 and r24[11, 11] == 11 and r24[12, 12] == 11 and r24[5, 20] == 3 and r24[23, 7] == 0
    assert r24[1, 1:23].tolist() == [1] * 22 and r24[10, 10:14].tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("n", [4, 5, 24])
def test_position_and_mask_tables_by_hand(n):
    pad, prefix, after = 2, 3, 4
    s = pad + prefix
    e = s + n * n
    L = e + after
    pos, rank, limit = cca_tables(RowLayout(pad=pad, image_spans=((s, e),), grids=((n, n),)), L)
    rings = (n + 1) // 2
    ring = [min(i, j, n - 1 - i, n - 1 - j) for i in range(n) for j in range(n)]
    assert pos.tolist() == [1, 1, 0, 1, 2] + [3 + c for c in ring] + [3 + rings + t for t in range(after)]
    # the visibility by hand: image q sees image k iff ring(k) <= ring(q); everything else causal
    allowed = rank.view(1, -1) <= limit.view(-1, 1)
    for qi in range(L):
        for kj in range(L):
            if s <= qi < e and s <= kj < e:
                want = ring[kj - s] <= ring[qi - s]
            else:
                want = kj <= qi
            assert bool(allowed[qi, kj]) == want, (qi, kj)


def _positions(lvlm):
    seen = []

    def pre(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, lvlm.adapter.language_model.register_forward_pre_hook(pre, with_kwargs=True)


def test_cca_attention_and_positions_match_plain_torch():
    lvlm = tiny("tiny-llava")
    image = make_image(1)
    seen, h = _positions(lvlm)
    try:
        with spy_attention(lvlm, [0, 3]) as spy, pytest.warns(UntrainedCheckpointWarning, match="cca:trained=true"):
            generate(lvlm, [{"prompt": PROMPT, "image": image}], ["cca"], decode=DECODE)
    finally:
        h.remove()
    s, e = 2, 18  # 'USER:' '<image>'x16 ...
    ring = [min(i, j, 3 - i, 3 - j) for i in range(4) for j in range(4)]
    L0 = spy.calls[0][0].q.shape[2]
    want_pos = list(range(s)) + [s + c for c in ring] + [s + 2 + t for t in range(L0 - e)]
    assert seen[0][0].tolist() == want_pos
    assert [int(p[0, -1]) for p in seen[1:]] == [want_pos[-1] + t for t in range(1, DECODE.max_new_tokens)]
    for layer in (0, 3):
        for c in spy.calls[layer]:
            Lq, Lk = c.q.shape[2], c.k.shape[2]
            allowed = causal(Lq, Lk).clone()
            if Lq == Lk:  # prefill: the concentric block
                for qi in range(s, e):
                    for kj in range(s, e):
                        allowed[qi, kj] = ring[kj - s] <= ring[qi - s]
            want = plain_attention(c.q[0], c.k[0], c.v[0], c.scale, allowed)
            torch.testing.assert_close(c.out[0], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"])
def test_mma_attention_matches_plain_torch(family):
    lvlm = tiny(family)
    with spy_attention(lvlm, [1]) as spy, pytest.warns(UntrainedCheckpointWarning, match="mma"):
        generate(lvlm, [{"prompt": PROMPT, "image": make_image(2)}], ["mma"], decode=DECODE)
    enc = lvlm.adapter.encode([lvlm.adapter.chat_prompt(PROMPT, True)], [make_image(2)])
    ids = enc["input_ids"][0]
    (s, e), = lvlm.adapter.row_layouts(enc)[0].image_spans
    toks = lvlm.adapter.tokenizer.convert_ids_to_tokens(ids.tolist())
    # the question ends where the assistant marker starts (hand-read from the templates): ChatML keeps the
    # end-of-turn token <|im_end|> visible and hides "<|im_start|>assistant"; LLaVA hides " ASSISTANT:"
    marker = {"tiny-qwen2-vl": "<|im_start|>"}.get(family, "<unk>")  # 'ASSISTANT' is <unk> in the tiny vocab
    q_end = len(toks) - toks[::-1].index(marker) - 1
    assert toks[q_end - 1] == ("<|im_end|>" if family == "tiny-qwen2-vl" else "?")
    prefill = 0
    for c in spy.calls[1]:
        Lq, Lk = c.q.shape[2], c.k.shape[2]
        allowed = causal(Lq, Lk).clone()
        if Lq == Lk:
            # AKI's mask: image queries stay causal among the image and also see the question after it
            allowed[s:e, e:q_end] = True
            assert not allowed[s, s + 1] and allowed[e - 1, q_end - 1] and not allowed[s, q_end]
            prefill += 1
        want = plain_attention(c.q[0], c.k[0], c.v[0], c.scale, allowed)
        torch.testing.assert_close(c.out[0], want, atol=2e-5, rtol=1e-4)
    assert prefill == 1


def test_trained_flag_silences_and_families_refused():
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(lvlm, [req], ["cca:trained=true"], decode=DECODE)
        generate(lvlm, [req], ["mma:trained=true"], decode=DECODE)
    for family in ("tiny-llava-next", "tiny-qwen2-vl"):
        with pytest.raises(InputError, match="cca is not supported"):
            generate(tiny(family), [req], ["cca:trained=true"], decode=DECODE)


def test_conflicting_masks_rejected():
    lvlm = tiny("tiny-llava")
    with pytest.raises(PlanConflictError, match="'cca' and 'mma' cannot be combined in one request: both set "
                                                "the attention mask"):
        generate(lvlm, [{"prompt": PROMPT, "image": make_image(3)}], ["cca:trained=1", "mma:trained=1"],
                 decode=DECODE)


def test_mixed_batch_equals_solo_and_text_only_is_unmitigated():
    lvlm = tiny("tiny-llava")
    reqs = [
        {"prompt": PROMPT, "image": make_image(4), "mitigations": ["cca:trained=1"]},
        {"prompt": "describe the image please", "image": make_image(5), "mitigations": []},
        {"prompt": "is there a red circle?", "image": make_image(6), "mitigations": ["mma:trained=1"]},
        {"prompt": "is there a red circle?", "mitigations": ["cca:trained=1"]},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    assert batched == solo
    assert solo[3] == generate(lvlm, [{"prompt": "is there a red circle?"}], decode=DECODE)[0].token_ids
