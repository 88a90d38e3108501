"""CausalMM's vision-level counterfactual (every kind) against a float64 re-implementation from its
documented definition (docs/branch-mitigations.md; Zhou et al. 2025, Sec. 3.3), with the draws of
``cf_oracle`` rather than the kernels' helpers: a CLIP self-attention whose map over all T tokens (CLS
included) is replaced, per head and query, by uniform 1/T, U(0, 1) draws renormalised (head, query, key),
the real row with its keys permuted (the order of ``uniform(seed, -2, -1, j)``), or ``max - a``
renormalised."""

from __future__ import annotations

import pytest
import torch
from cf_oracle import shuffle_order, uniform
from tinyworld import tiny

from clearsight.mitigations.causalmm import counterfactual_vision_attention


def oracle(attn, hidden: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    n, T, C = hidden.shape
    H = int(attn.num_heads)
    h64 = hidden.double()

    def heads(proj):
        w, b = proj.weight.double(), proj.bias.double()
        return (h64 @ w.T + b).view(n, T, H, C // H).transpose(1, 2)

    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    a = torch.softmax(q @ k.transpose(-1, -2) * float(attn.scale), -1)
    cf = torch.empty_like(a)
    order = shuffle_order(seed, -2, list(range(T)))
    for b in range(n):
        for hd in range(H):
            for i in range(T):
                row = a[b, hd, i].tolist()
                if kind == "uniform":
                    w = [1.0] * T
                elif kind == "random":
                    w = [uniform(seed, hd, i, j) for j in range(T)]
                elif kind == "shuffled":
                    w = [row[order[j]] for j in range(T)]
                else:
                    w = [max(row) - x for x in row]
                    if sum(w) == 0:
                        w = [1.0] * T
                cf[b, hd, i] = torch.tensor(w, dtype=torch.float64) / sum(w)
    out = (cf @ v).transpose(1, 2).reshape(n, T, C)
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


@pytest.mark.parametrize("kind", ["uniform", "random", "shuffled", "reversed"])
def test_vision_counterfactual_matches_its_definition(kind):
    attn = tiny("tiny-llava").adapter.vision_tower.encoder.layers[0].self_attn
    hidden = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = counterfactual_vision_attention(attn, hidden, kind, 3)
        real = attn(hidden)[0]
    want = oracle(attn, hidden, kind, 3)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    assert (got - real).abs().max() > 1e-2  # the counterfactual is not the real attention
    if kind in ("random", "shuffled"):  # seeded: another seed, other weights
        with torch.no_grad():
            other = counterfactual_vision_attention(attn, hidden, kind, 4)
        assert (other - got).abs().max() > 1e-3
