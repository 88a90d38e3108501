"""The counterfactual draws against ``cf_oracle`` (their documented definitions in plain Python integers):
``uniform_hash`` bit for bit, and the SHUFFLED permutation the plan builds for each row and layer."""

from __future__ import annotations

import pytest
import torch
from cf_oracle import shuffle_order, uniform

from clearsight.kernels.plan import AttentionPlan, RowLayout, Segment, uniform_hash


def test_uniform_hash_bit_for_bit():
    # negative heads / queries (the shuffle and the vision tower use -1, -2) and seeds past 2**32 and 2**62
    for seed in (0, 1, 7, 2**32 + 5, 2**62 + 123):
        for head in (-2, -1, 0, 3):
            q = torch.tensor([-1, 0, 5, 1000]).view(-1, 1)
            k = torch.arange(-3, 40).view(1, -1)
            got = uniform_hash(torch.tensor(seed), torch.tensor(head), q, k)
            want = torch.tensor([[uniform(seed, head, int(qi), int(kj)) for kj in k[0]] for qi in q[:, 0]])
            assert got.dtype == torch.float32
            assert torch.equal(got, want.to(torch.float32)), (seed, head)


def _plan(pads: tuple[int, ...], span: int, L: int) -> AttentionPlan:
    seg = torch.full((len(pads), L), int(Segment.TEXT), dtype=torch.int8)
    layouts = []
    for b, p in enumerate(pads):
        seg[b, p + 1: p + 1 + span] = Segment.IMAGE
        layouts.append(RowLayout(pad=p, image_spans=((p + 1, p + 1 + span),), grids=((1, span),)))
    return AttentionPlan(num_layers=3, num_heads=2, segment=seg, layouts=layouts)


@pytest.mark.parametrize("seed", [0, 5, 2**40 + 1])
def test_shuffle_source_is_the_documented_permutation(seed):
    pads, span, L = (0, 4), 40, 50
    plan = _plan(pads, span, L)
    plan.set_counterfactual([0, 2], [0, 1], "shuffled", seed=seed, owner="causalmm")
    for layer in (0, 2):
        source = plan.layers[layer].counterfactual.source
        for b, pad in enumerate(pads):
            keys = list(range(pad + 1, pad + 1 + span))
            want = list(range(L))  # identity outside the image span
            want[pad + 1: pad + 1 + span] = shuffle_order(seed, layer, keys, pad)
            assert source[b].tolist() == want, (layer, b)
            assert want != list(range(L))
    # padding-independent: the same permutation relative to each row's start
    s = plan.layers[0].counterfactual.source
    assert (s[0, 1: 1 + span] - 0).tolist() == (s[1, 5: 5 + span] - 4).tolist()
    # another layer draws another permutation
    assert not torch.equal(plan.layers[0].counterfactual.source, plan.layers[2].counterfactual.source)
