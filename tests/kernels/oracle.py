"""An independent plain-torch evaluation of the AttentionPlan formula: loops over rows, heads and
queries in float64, written from the plan's documented semantics, not from the backends. The RANDOM draws and
the SHUFFLED order come from ``cf_oracle`` (re-implemented from their definitions), not from the plan."""

from __future__ import annotations

import math

import torch
from cf_oracle import shuffle_order, uniform

from clearsight.kernels.plan import GENERATED_RANK_OFFSET, Counterfactual, Segment


def oracle_attention(q, k, v, plan, layer: int, scale: float, window: int | None = None) -> torch.Tensor:
    """q [B,H,Lq,D], k/v [B,Hkv,Lk,D] -> out [B,Lq,H,D] (float64)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rep = H // Hkv
    L0 = plan.prompt_len
    e = plan.layers.get(layer)
    out = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for b in range(B):
        pad = plan.layouts[b].pad
        base = e.segment if e is not None and e.segment is not None else plan.segment

        def seg(j, b=b, base=base):
            return int(base[b, j]) if j < L0 else int(Segment.TEXT)

        def rank(j, b=b):
            if j >= L0:
                return j + GENERATED_RANK_OFFSET
            return int(plan.k_rank[b, j]) if plan.k_rank is not None else j

        def limit(i, b=b):
            if i >= L0:
                return i + GENERATED_RANK_OFFSET
            return int(plan.q_limit[b, i]) if plan.q_limit is not None else i

        def second(i, r, b=b):  # the second interval of ranks (AKI's mask); none for generated queries
            if i >= L0 or plan.q_lo2 is None:
                return False
            return int(plan.q_lo2[b, i]) <= r <= int(plan.q_hi2[b, i])

        for h in range(H):
            for i in range(Lq):
                qi = Lk - Lq + i
                if qi < pad:
                    keys = [qi]
                else:
                    keys = [j for j in range(Lk) if j >= pad and (rank(j) <= limit(qi) or second(qi, rank(j)))
                            and (window is None or j > qi - window)]  # a sliding-window layer (Gemma 3)
                t = {}
                for j in keys:
                    s = scale * float(q[b, h, i] @ k[b, h // rep, j])
                    x = s
                    if e is not None and e.bias is not None:
                        x += float(e.bias[b, h, seg(j)])
                    if e is not None and e.abs_bias is not None and qi >= int(e.abs_from[b]):
                        x += float(e.abs_bias[b, h, seg(j)]) * abs(s)
                    t[j] = x
                m = max(t.values())
                z = sum(math.exp(x - m) for x in t.values())
                a = {j: math.exp(x - m) / z for j, x in t.items()}
                if e is not None and e.counterfactual is not None:
                    kind = int(e.counterfactual.kind[b])
                    img = [j for j in keys if seg(j) in (Segment.IMAGE, Segment.IMAGE_SINK)]
                    if kind != Counterfactual.NONE and img:
                        mass = sum(a[j] for j in img)
                        if kind == Counterfactual.UNIFORM:
                            w = {j: 1.0 for j in img}
                        elif kind == Counterfactual.RANDOM:
                            seed = int(e.counterfactual.seed[b])
                            w = {j: uniform(seed, h, qi - pad, j - pad) for j in img}
                        elif kind == Counterfactual.SHUFFLED:
                            seed = int(e.counterfactual.seed[b])
                            src = {}
                            for start, end in plan.layouts[b].image_spans:
                                span = list(range(start, end))
                                src.update(zip(span, shuffle_order(seed, layer, span, pad)))
                            w = {j: a.get(src.get(j, j), 0.0) for j in img}
                        else:
                            top = max(a[j] for j in img)
                            w = {j: top - a[j] for j in img}
                            if sum(w.values()) == 0:
                                w = {j: 1.0 for j in img}
                        if sum(w.values()) == 0:
                            w = {j: 1.0 for j in img}
                        tot = sum(w.values())
                        for j in img:
                            a[j] = mass * w[j] / tot
                if e is not None and e.redistribute is not None:
                    r = e.redistribute
                    p = float(r.p_move[b])
                    m_img = sum(a[j] for j in keys if seg(j) in (Segment.IMAGE, Segment.IMAGE_SINK))
                    m_ns = sum(a[j] for j in keys if seg(j) == Segment.IMAGE)
                    m_sink = sum(a[j] for j in keys if seg(j) in (Segment.IMAGE_SINK, Segment.TEXT_SINK))
                    ok = (qi >= int(r.rows_from[b]) and p > 0 and m_ns > 0
                          and m_img >= float(r.min_image_mass[b]) - 1e-7 and m_ns >= float(r.rho[b]) * m_img)
                    if ok:
                        omega = p * m_sink
                        for j in keys:
                            if seg(j) in (Segment.IMAGE_SINK, Segment.TEXT_SINK):
                                a[j] *= 1 - p
                            elif seg(j) == Segment.IMAGE:
                                a[j] *= 1 + omega / m_ns
                o = sum(a[j] * v[b, h // rep, j] for j in keys)
                if e is not None and e.head_scale is not None:
                    o = o * float(e.head_scale[b, h])
                out[b, i, h] = o
    return out
