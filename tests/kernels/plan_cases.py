"""Shared plans and q/k/v for the kernel tests (imported by name: only tests/conftest.py is a conftest)."""

from __future__ import annotations

import torch

from clearsight.kernels.plan import AttentionPlan, RowLayout, Segment

PADS = (0, 2, 3)
L0 = 12
H, HKV, D = 4, 2, 8
NUM_LAYERS = 3


def make_plan(pads=PADS, L=L0) -> AttentionPlan:
    """Rows left-padded by `pads`: BOS (text sink), one text token, six image tokens (2 x 3 grid,
    the second one a visual sink), then text."""
    seg = torch.full((len(pads), L), int(Segment.TEXT), dtype=torch.int8)
    layouts = []
    for b, p in enumerate(pads):
        seg[b, p] = Segment.TEXT_SINK
        seg[b, p + 2 : p + 8] = Segment.IMAGE
        seg[b, p + 3] = Segment.IMAGE_SINK
        layouts.append(RowLayout(pad=p, image_spans=((p + 2, p + 8),), grids=((2, 3),)))
    return AttentionPlan(num_layers=NUM_LAYERS, num_heads=H, segment=seg, layouts=layouts)


def make_qkv(B: int, Lq: int, Lk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, HKV, Lk, D, generator=g) * 1.5
    v = torch.randn(B, HKV, Lk, D, generator=g)
    return q, k, v
