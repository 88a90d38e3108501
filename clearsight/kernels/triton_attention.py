"""Fused Triton attention kernels that execute an AttentionPlan (see plan.py for the semantics).

One kernel body, three modes (``MODE`` constexpr), launched on a grid
``(cdiv(Lq, BLOCK_M), B * H, SPLITS)``:

- ``MODE_ONLINE`` (0): flash-style online softmax (FlashAttention-2 schedule) with the score edits
  that need no row statistics: segment bias, abs-bias, rank/limit masks, padding, head scale, and
  per-segment masses accumulated online. Used for empty plans, biases, masks and head scaling.
- ``MODE_STATS`` (1): pass 1 of the two-pass scheme (docs/kernels.md; reference/kernels.md §7.2):
  QK^T and exp only (no PV) -> per query row the max, the normaliser, the four segment masses and
  the counterfactual statistics (image key counts, image max score, random-draw sums, shuffled sums).
- ``MODE_OUTPUT`` (2): pass 2: with the exact row statistics known, every key's final probability is
  a closed form (softmax -> counterfactual replacement -> VAR factor ``c_segment``), so the output is
  one PV sweep with no rescaling, and the last row's probabilities can be written out as statistics.

Decode uses the same body with ``BLOCK_M = 16`` (so ``tl.dot`` stays legal: one live row out of 16,
the kernel is bandwidth bound anyway) and ``SPLITS > 1``: each split covers a contiguous key range
and writes partial results that ``_merge_kernel`` combines (log-sum-exp merge for ``MODE_ONLINE``,
a plain sum for ``MODE_OUTPUT`` whose weights are already normalised; flash-decoding, reference/
kernels.md §3 and §7.7). The split count depends on shapes only, never on tensor values, and no
launcher path reads a tensor value on the host, so a decode step is CUDA-graph friendly.

Scores are kept in the log2 domain (``s * log2(e)``, ``exp2``) as in the Triton fused-attention
tutorial. Accumulation is float32 for any input dtype; under ``TRITON_INTERPRET=1`` tiles are
upcast to float32 before ``tl.dot`` because the interpreter's bf16 dot is broken (reference/
kernels.md §5).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from clearsight.kernels.plan import GENERATED_RANK_OFFSET

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MODE_ONLINE = 0
MODE_STATS = 1
MODE_OUTPUT = 2

# columns of the per-row statistics buffer [B*H, SPLITS, Lq, NSTAT]
ST_M, ST_L, ST_MASS = 0, 1, 2  # row max (log2 units), normaliser, 4 segment masses (2..5)
ST_CNT, ST_MAXIMG, ST_RND, ST_SHF = 6, 8, 9, 11  # per image segment (IMAGE, IMAGE_SINK) pairs
NSTAT = 16

LOG2E = 1.4426950408889634
# finite "minus infinity" for running maxima: exp2(-inf - NEG_BIG) = 0, never NaN (a constexpr: the
# compiler only lets kernels read constexpr globals; the interpreter does not check)
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)
# generated keys rank above every prompt limit (plan.GENERATED_RANK_OFFSET); a global the kernels read
GEN_OFFSET: tl.constexpr = tl.constexpr(GENERATED_RANK_OFFSET)


# ----------------------------------------------------------------------------------------------- helpers
# Reductions are spelled tl.reduce(x, axis, <triton's own combine function>) and zeros tl.full, not
# tl.sum / tl.max / tl.zeros: those are @triton.jit functions of triton's standard library, decorated
# when triton is first imported, and the package import pulls triton in (through torch._dynamo)
# before a test can set TRITON_INTERPRET=1; the interpreter cannot call a compiled-mode JIT function.
# tl.reduce with _sum_combine / _elementwise_max is exactly what tl.sum / tl.max compile to, and the
# interpreter maps these two combine functions to numpy reductions (never calling them).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max2)


@triton.jit
def _rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def _uniform_hash(seed, head, q, k):
    """plan.uniform_hash in uint32 arithmetic (lowbias32 mix): wraparound multiplication equals the
    reference's ``& 0xFFFFFFFF`` after every product, so the draws are bit-identical."""
    x = (
        seed.to(tl.uint32) * 0x9E3779B1
        + head.to(tl.uint32) * 0x85EBCA77
        + q.to(tl.uint32) * 0xC2B2AE3D
        + k.to(tl.uint32) * 0x27D4EB2F
    )
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return ((x >> 8) + 1).to(tl.float32) / 16777216.0


@triton.jit
def _score_tile(
    q, offs_n, n_ok, offs_m, m_ok, qi, lim, lo2, hi2, is_padq, abs_rows, pad, L0, scale,
    k_base, stride_kn, stride_kd, offs_d, d_ok,
    seg_base, bias_base, abs_base, rank_base,
    mask_base, stride_mq, stride_mk, window,
    HAS_BIAS: tl.constexpr, HAS_ABS: tl.constexpr, HAS_RANK: tl.constexpr, DENSE_MASK: tl.constexpr,
    NEED_SEG: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Plan steps 1-4 for the keys ``offs_n`` (a contiguous tile, or a gathered one for SHUFFLED).

    Returns the edited scores in log2 units (-inf where not allowed), the key segments and the
    allowed mask. ``n_ok`` already excludes keys at or beyond the valid key length.
    """
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s_raw = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    in_prompt = offs_n < L0
    if NEED_SEG:
        # generated keys (index >= L0) are TEXT = 0
        seg = tl.load(seg_base + offs_n, mask=n_ok & in_prompt, other=0).to(tl.int32)
    else:
        seg = offs_n * 0
    s = s_raw
    if HAS_BIAS:
        s = s + tl.load(bias_base + seg)[None, :]
    if HAS_ABS:
        # PAI / PAINT: the boost scales with |raw score| (plan step 3), only on the selected query rows
        ab = tl.load(abs_base + seg)
        s = s + tl.where(abs_rows[:, None], ab[None, :] * tl.abs(s_raw), 0.0)
    if DENSE_MASK:
        allowed = tl.load(mask_base + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk,
                          mask=n_ok[None, :], other=0) != 0
        allowed = allowed & (offs_n[None, :] <= qi[:, None]) & n_ok[None, :]
    else:
        if HAS_RANK:
            # custom masks (CCA, modality-mutual): key j visible iff k_rank[j] <= q_limit[i] or
            # q_lo2[i] <= k_rank[j] <= q_hi2[i] (plan step 4); generated keys rank above every prompt limit
            rank = tl.load(rank_base + offs_n, mask=n_ok & in_prompt, other=0).to(tl.int32)
            rank = tl.where(in_prompt, rank, offs_n + GEN_OFFSET)
            second = (rank[None, :] >= lo2[:, None]) & (rank[None, :] <= hi2[:, None])
            allowed = (rank[None, :] <= lim[:, None]) | second
        else:
            allowed = offs_n[None, :] <= lim[:, None]
        allowed = allowed & (offs_n >= pad)[None, :] & n_ok[None, :]
        if HAS_WINDOW:
            # sliding-window layer (Gemma 3): key j visible only if j > i - window (AttentionPlan.windowed)
            allowed = allowed & (offs_n[None, :] > qi[:, None] - window)
        # padding query rows attend to themselves only (plan.allowed), so no softmax row is empty
        allowed = tl.where(is_padq[:, None], offs_n[None, :] == qi[:, None], allowed)
    allowed = allowed & m_ok[:, None]  # rows past Lq: all -inf, so their dead lanes stay finite
    s = tl.where(allowed, s * 1.4426950408889634, float("-inf"))
    return s, seg, allowed


@triton.jit
def _seg_pick(seg, c0, c1, c2, c3):
    """Per-key value of a per-row, per-segment quantity: [BM] x 4 -> [BM, BN]."""
    return tl.where(seg[None, :] == 0, c0[:, None],
                    tl.where(seg[None, :] == 1, c1[:, None], tl.where(seg[None, :] == 2, c2[:, None], c3[:, None])))


# ----------------------------------------------------------------------------------------------- main kernel
@triton.jit
def _attn_kernel(
    Q, K, V, Out, St, Acc, SegOut, LastRow,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    KvValid, Pad, Seg, stride_segb, Rank, Limit, Lo2, Hi2, stride_rankb, BlkMin, stride_blkb,
    Bias, AbsBias, AbsFrom, HeadScale,
    CfKind, CfSeed, CfSource, stride_srcb,
    RedP, RedRho, RedMin, RedFrom,
    Mask, stride_mb, stride_mq, stride_mk,
    H, N_REP, Lq, Lk, L0, D, scale, Window,
    MODE: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_PER_ROW: tl.constexpr, HAS_PAD: tl.constexpr, HAS_RANK: tl.constexpr, DENSE_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ABS: tl.constexpr, HAS_HS: tl.constexpr, HAS_CF: tl.constexpr,
    HAS_RED: tl.constexpr, STATS_SEG: tl.constexpr, STATS_LAST: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // N_REP  # grouped-query attention: several query heads share one KV head
    NEED_SEG: tl.constexpr = HAS_BIAS or HAS_ABS or HAS_CF or HAS_RED or STATS_SEG

    # valid key length: a static cache hands over max_cache_len keys, the rest are masked
    if KV_PER_ROW:
        kvl = tl.load(KvValid + b).to(tl.int32)
    else:
        kvl = Lk
    q_off = kvl - Lq  # query row i sits at key index q_off + i
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    qi = q_off + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if HAS_PAD:
        pad = tl.load(Pad + b).to(tl.int32)
    else:
        pad = 0
    is_padq = qi < pad
    if HAS_RANK:
        lim = tl.load(Limit + b * stride_rankb + qi, mask=m_ok & (qi < L0) & (qi >= 0), other=0).to(tl.int32)
        lim = tl.where(qi < L0, lim, qi + GEN_OFFSET)
        # the second interval of ranks (AKI's mask); generated queries have none (lo 0 > hi -1)
        in_q = m_ok & (qi < L0) & (qi >= 0)
        lo2 = tl.load(Lo2 + b * stride_rankb + qi, mask=in_q, other=0).to(tl.int32)
        hi2 = tl.load(Hi2 + b * stride_rankb + qi, mask=in_q, other=-1).to(tl.int32)
    else:
        lim = qi
        lo2 = qi * 0
        hi2 = lo2 - 1
    if HAS_ABS:
        abs_rows = qi >= tl.load(AbsFrom + b).to(tl.int32)
    else:
        abs_rows = qi < 0

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    seg_base = Seg + b * stride_segb
    bias_base = Bias + pid_bh * 4
    abs_base = AbsBias + pid_bh * 4
    rank_base = Rank + b * stride_rankb
    mask_base = Mask + b * stride_mb

    # ---- key range of this program: causal bound, padding, custom-mask extent, split ----------------
    q_last = q_off + tl.minimum(Lq, (pid_m + 1) * BLOCK_M) - 1  # largest query index in the tile
    q_first = q_off + pid_m * BLOCK_M
    hi = q_last + 1
    if HAS_RANK:
        # custom ranks may open later prompt keys to prompt queries (bidirectional groups)
        hi = tl.where(q_first < L0, tl.maximum(hi, tl.minimum(L0, kvl)), hi)
    if DENSE_MASK:
        lo = 0
    else:
        lo = (tl.minimum(pad, q_first) // BLOCK_N) * BLOCK_N  # keys before the padding never count
        if HAS_WINDOW:  # nor keys before the tile's sliding window
            lo = tl.maximum(lo, (tl.maximum(q_first - Window + 1, 0) // BLOCK_N) * BLOCK_N)
    n_blocks = (hi - lo + BLOCK_N - 1) // BLOCK_N
    per_split = (n_blocks + SPLITS - 1) // SPLITS
    start = lo + pid_s * per_split * BLOCK_N
    end = tl.minimum(hi, start + per_split * BLOCK_N)
    # block skipping: the largest rank any query of the tile may see (its limit or its second interval's end)
    max_lim = _rmax(tl.where(m_ok & ~is_padq, tl.maximum(lim, hi2), -1), axis=0)
    row_base = (pid_bh * SPLITS + pid_s) * Lq + offs_m  # row index into St / Acc

    if HAS_CF:
        kind = tl.load(CfKind + b).to(tl.int32)
        seed = tl.load(CfSeed + b)
        src_base = CfSource + b * stride_srcb
    else:
        kind = 0
        seed = 0
        src_base = CfSource

    if MODE == 2:
        # ---- pass 2 prologue: merge the per-split pass-1 statistics, then derive per-row constants ----
        m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        for sp in tl.static_range(SPLITS):
            r = ((pid_bh * SPLITS + sp) * Lq + offs_m) * 16
            m_i = tl.maximum(m_i, tl.load(St + r + 0, mask=m_ok, other=NEG_BIG))
        l_i = tl.full([BLOCK_M], 0, tl.float32)
        M0 = tl.full([BLOCK_M], 0, tl.float32)
        M1 = tl.full([BLOCK_M], 0, tl.float32)
        M2 = tl.full([BLOCK_M], 0, tl.float32)
        M3 = tl.full([BLOCK_M], 0, tl.float32)
        cnt1 = tl.full([BLOCK_M], 0, tl.float32)
        cnt2 = tl.full([BLOCK_M], 0, tl.float32)
        mx_img = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        rnd1 = tl.full([BLOCK_M], 0, tl.float32)
        rnd2 = tl.full([BLOCK_M], 0, tl.float32)
        sh1 = tl.full([BLOCK_M], 0, tl.float32)
        sh2 = tl.full([BLOCK_M], 0, tl.float32)
        for sp in tl.static_range(SPLITS):
            r = ((pid_bh * SPLITS + sp) * Lq + offs_m) * 16
            alpha = tl.exp2(tl.load(St + r + 0, mask=m_ok, other=NEG_BIG) - m_i)
            l_i += alpha * tl.load(St + r + 1, mask=m_ok, other=0.0)
            M0 += alpha * tl.load(St + r + 2, mask=m_ok, other=0.0)
            M1 += alpha * tl.load(St + r + 3, mask=m_ok, other=0.0)
            M2 += alpha * tl.load(St + r + 4, mask=m_ok, other=0.0)
            M3 += alpha * tl.load(St + r + 5, mask=m_ok, other=0.0)
            if HAS_CF:
                cnt1 += tl.load(St + r + 6, mask=m_ok, other=0.0)
                cnt2 += tl.load(St + r + 7, mask=m_ok, other=0.0)
                mx_img = tl.maximum(mx_img, tl.load(St + r + 8, mask=m_ok, other=NEG_BIG))
                rnd1 += tl.load(St + r + 9, mask=m_ok, other=0.0)
                rnd2 += tl.load(St + r + 10, mask=m_ok, other=0.0)
                sh1 += alpha * tl.load(St + r + 11, mask=m_ok, other=0.0)
                sh2 += alpha * tl.load(St + r + 12, mask=m_ok, other=0.0)
        inv_l = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
        M0 = M0 * inv_l
        M1 = M1 * inv_l
        M2 = M2 * inv_l
        M3 = M3 * inv_l
        # counterfactual replacement over the visible image keys, keeping the row's image mass
        # (plan.counterfactual_weights; CausalMM, Zhou et al. 2025, Sec. 3.3)
        ek = tl.full([BLOCK_M], 0, tl.int32)
        coef = tl.full([BLOCK_M], 0, tl.float32)
        top = tl.full([BLOCK_M], 0, tl.float32)
        if HAS_CF:
            mass = M1 + M2
            count = cnt1 + cnt2
            top = tl.exp2(mx_img - m_i) * inv_l  # largest visible image probability
            rnd = rnd1 + rnd2
            shf = (sh1 + sh2) * inv_l
            rev = top * count - mass  # sum over image keys of (top - a_j)
            ek = tl.where(count > 0, kind, 0) + tl.full([BLOCK_M], 0, tl.int32)
            # a shuffle with no weight on the visible keys, or a reversal of a flat distribution
            # (one visible image key), falls back to uniform; rev is formed by cancellation, so
            # "zero" is tested relative to the mass
            ek = tl.where((ek == 3) & ~(shf > 0), 1, ek)
            ek = tl.where((ek == 4) & ~((count > 1.5) & (rev > 1e-6 * mass)), 1, ek)
            count_s = tl.maximum(count, 1.0)
            rnd_s = tl.where(rnd > 0, rnd, 1.0)
            shf_s = tl.where(shf > 0, shf, 1.0)
            rev_s = tl.where(rev > 0, rev, 1.0)
            coef = tl.where(ek == 1, mass / count_s, tl.where(ek == 2, mass / rnd_s,
                            tl.where(ek == 3, mass / shf_s, tl.where(ek == 4, mass / rev_s, 0.0))))
            # image-segment masses after the replacement (VAR reads them next)
            M1n = tl.where(ek == 1, cnt1, tl.where(ek == 2, rnd1, tl.where(ek == 3, sh1 * inv_l,
                           tl.where(ek == 4, top * cnt1 - M1, M1))))
            M2n = tl.where(ek == 1, cnt2, tl.where(ek == 2, rnd2, tl.where(ek == 3, sh2 * inv_l,
                           tl.where(ek == 4, top * cnt2 - M2, M2))))
            M1 = tl.where(ek > 0, coef * M1n, M1)
            M2 = tl.where(ek > 0, coef * M2n, M2)
        # VAR (Kang et al. 2025, Sec. 4; plan.redistribution_factors): per-row segment factors c_g
        c0 = tl.full([BLOCK_M], 1.0, tl.float32)
        c1 = tl.full([BLOCK_M], 1.0, tl.float32)
        c2 = tl.full([BLOCK_M], 1.0, tl.float32)
        c3 = tl.full([BLOCK_M], 1.0, tl.float32)
        if HAS_RED:
            p = tl.load(RedP + b) + tl.full([BLOCK_M], 0, tl.float32)
            m_img = M1 + M2
            m_ns = M1
            m_sink = M2 + M3
            min_mass = tl.load(RedMin + b)
            rho = tl.load(RedRho + b)
            applied = (qi >= tl.load(RedFrom + b).to(tl.int32)) & (m_img >= min_mass)
            applied = applied & (m_ns >= rho * m_img)
            applied = applied & (m_ns > 0) & (p > 0)
            c1 = tl.where(applied, 1.0 + p * m_sink / tl.maximum(m_ns, 1e-30), 1.0)
            c2 = tl.where(applied, 1.0 - p, 1.0)
            c3 = c2
        if STATS_SEG:
            if pid_s == 0:
                so = ((b * H + h) * Lq + offs_m) * 4
                tl.store(SegOut + so + 0, M0 * c0, mask=m_ok)
                tl.store(SegOut + so + 1, M1 * c1, mask=m_ok)
                tl.store(SegOut + so + 2, M2 * c2, mask=m_ok)
                tl.store(SegOut + so + 3, M3 * c3, mask=m_ok)
    else:
        m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        l_i = tl.full([BLOCK_M], 0, tl.float32)
        M0 = tl.full([BLOCK_M], 0, tl.float32)
        M1 = tl.full([BLOCK_M], 0, tl.float32)
        M2 = tl.full([BLOCK_M], 0, tl.float32)
        M3 = tl.full([BLOCK_M], 0, tl.float32)
        cnt1 = tl.full([BLOCK_M], 0, tl.float32)
        cnt2 = tl.full([BLOCK_M], 0, tl.float32)
        mx_img = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        rnd1 = tl.full([BLOCK_M], 0, tl.float32)
        rnd2 = tl.full([BLOCK_M], 0, tl.float32)
        sh1 = tl.full([BLOCK_M], 0, tl.float32)
        sh2 = tl.full([BLOCK_M], 0, tl.float32)
        inv_l = tl.full([BLOCK_M], 0, tl.float32)
        ek = tl.full([BLOCK_M], 0, tl.int32)
        coef = tl.full([BLOCK_M], 0, tl.float32)
        top = tl.full([BLOCK_M], 0, tl.float32)
        c0 = tl.full([BLOCK_M], 1.0, tl.float32)
        c1 = c0
        c2 = c0
        c3 = c0

    acc = tl.full([BLOCK_M, BLOCK_D], 0, tl.float32)

    # ---- the key loop ---------------------------------------------------------------------------------
    for n0 in range(start, end, BLOCK_N):
        if HAS_RANK:
            # block skipping from ranks (reference/kernels.md §7.3): skip a key block whose smallest rank
            # exceeds every limit in the query tile, unless it holds a padding query's own key
            blk_min = tl.load(BlkMin + b * stride_blkb + n0 // BLOCK_N, mask=n0 < L0, other=0).to(tl.int32)
            blk_min = tl.where(n0 < L0, blk_min, n0 + GEN_OFFSET)
            visit = (blk_min <= max_lim) | ((n0 < pad) & (n0 + BLOCK_N > q_first))
        else:
            visit = n0 >= 0
        if visit:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < kvl
            s, seg, allowed = _score_tile(
                q, offs_n, n_ok, offs_m, m_ok, qi, lim, lo2, hi2, is_padq, abs_rows, pad, L0, scale,
                k_base, stride_kn, stride_kd, offs_d, d_ok, seg_base, bias_base, abs_base, rank_base,
                mask_base, stride_mq, stride_mk, Window,
                HAS_BIAS, HAS_ABS, HAS_RANK, DENSE_MASK, NEED_SEG, UPCAST, DOT_PREC, HAS_WINDOW,
            )
            if MODE == 0:
                m_new = tl.maximum(m_i, _rmax(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                pr = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + _rsum(pr, axis=1)
                if STATS_SEG:
                    M0 = M0 * alpha + _rsum(tl.where(seg[None, :] == 0, pr, 0.0), axis=1)
                    M1 = M1 * alpha + _rsum(tl.where(seg[None, :] == 1, pr, 0.0), axis=1)
                    M2 = M2 * alpha + _rsum(tl.where(seg[None, :] == 2, pr, 0.0), axis=1)
                    M3 = M3 * alpha + _rsum(tl.where(seg[None, :] == 3, pr, 0.0), axis=1)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=DOT_PREC)
                m_i = m_new
            else:
                img = allowed & ((seg[None, :] == 1) | (seg[None, :] == 2))
                s_src = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
                u = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
                if HAS_CF:
                    if kind == 3:
                        # SHUFFLED: key j takes the probability of key source[j]: re-score the gathered keys
                        src = tl.load(src_base + offs_n, mask=n_ok & (offs_n < L0), other=0).to(tl.int32)
                        src = tl.where(offs_n < L0, src, offs_n)
                        s_src, _seg_src, _al_src = _score_tile(
                            q, src, n_ok & (src < kvl), offs_m, m_ok, qi, lim, lo2, hi2, is_padq, abs_rows, pad, L0,
                            scale,
                            k_base, stride_kn, stride_kd, offs_d, d_ok, seg_base, bias_base, abs_base,
                            rank_base, mask_base, stride_mq, stride_mk, Window,
                            HAS_BIAS, HAS_ABS, HAS_RANK, DENSE_MASK, NEED_SEG, UPCAST, DOT_PREC, HAS_WINDOW,
                        )
                    if kind == 2:
                        u = _uniform_hash(seed, h, qi[:, None] - pad, offs_n[None, :] - pad)  # pad-relative positions
                if MODE == 1:
                    # pass 1: running max over the row's scores (and the gathered shuffled scores, which
                    # are scores of visible keys of the same row, so the final max is unchanged)
                    m_new = tl.maximum(m_i, _rmax(s, axis=1))
                    if HAS_CF:
                        m_new = tl.maximum(m_new, _rmax(tl.where(img, s_src, float("-inf")), axis=1))
                    alpha = tl.exp2(m_i - m_new)
                    pr = tl.exp2(s - m_new[:, None])
                    l_i = l_i * alpha + _rsum(pr, axis=1)
                    M0 = M0 * alpha + _rsum(tl.where(seg[None, :] == 0, pr, 0.0), axis=1)
                    M1 = M1 * alpha + _rsum(tl.where(seg[None, :] == 1, pr, 0.0), axis=1)
                    M2 = M2 * alpha + _rsum(tl.where(seg[None, :] == 2, pr, 0.0), axis=1)
                    M3 = M3 * alpha + _rsum(tl.where(seg[None, :] == 3, pr, 0.0), axis=1)
                    if HAS_CF:
                        i1 = img & (seg[None, :] == 1)
                        i2 = img & (seg[None, :] == 2)
                        cnt1 += _rsum(i1.to(tl.float32), axis=1)
                        cnt2 += _rsum(i2.to(tl.float32), axis=1)
                        mx_img = tl.maximum(mx_img, _rmax(tl.where(img, s, NEG_BIG), axis=1))
                        rnd1 += _rsum(tl.where(i1, u, 0.0), axis=1)
                        rnd2 += _rsum(tl.where(i2, u, 0.0), axis=1)
                        psrc = tl.exp2(s_src - m_new[:, None])
                        sh1 = sh1 * alpha + _rsum(tl.where(i1, psrc, 0.0), axis=1)
                        sh2 = sh2 * alpha + _rsum(tl.where(i2, psrc, 0.0), axis=1)
                    m_i = m_new
                else:
                    # pass 2: every probability in closed form, no rescaling
                    pr = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
                    if HAS_CF:
                        base = tl.where(ek[:, None] == 1, 1.0, tl.where(ek[:, None] == 2, u,
                                        tl.where(ek[:, None] == 3, tl.exp2(s_src - m_i[:, None]) * inv_l[:, None],
                                                 top[:, None] - pr)))
                        pr = tl.where(img & (ek[:, None] > 0), coef[:, None] * base, pr)
                    if HAS_RED:
                        pr = pr * _seg_pick(seg, c0, c1, c2, c3)
                    if STATS_LAST:
                        # the last query row's final attention over the keys, for heatmaps
                        lp = LastRow + pid_bh * Lk + offs_n
                        tl.store(lp[None, :] + offs_m[:, None] * 0, pr,
                                 mask=(offs_m == Lq - 1)[:, None] & n_ok[None, :])
                    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                    if UPCAST:
                        v = v.to(tl.float32)
                    acc += tl.dot(pr.to(v.dtype), v, input_precision=DOT_PREC)

    # ---- epilogue -----------------------------------------------------------------------------------------
    if HAS_HS:
        hs = tl.load(HeadScale + pid_bh)  # VHR: per-head output scale
    else:
        hs = 1.0
    if MODE == 1:
        r = row_base * 16
        tl.store(St + r + 0, m_i, mask=m_ok)
        tl.store(St + r + 1, l_i, mask=m_ok)
        tl.store(St + r + 2, M0, mask=m_ok)
        tl.store(St + r + 3, M1, mask=m_ok)
        tl.store(St + r + 4, M2, mask=m_ok)
        tl.store(St + r + 5, M3, mask=m_ok)
        if HAS_CF:
            tl.store(St + r + 6, cnt1, mask=m_ok)
            tl.store(St + r + 7, cnt2, mask=m_ok)
            tl.store(St + r + 8, mx_img, mask=m_ok)
            tl.store(St + r + 9, rnd1, mask=m_ok)
            tl.store(St + r + 10, rnd2, mask=m_ok)
            tl.store(St + r + 11, sh1, mask=m_ok)
            tl.store(St + r + 12, sh2, mask=m_ok)
    else:
        if SPLITS == 1:
            if MODE == 0:
                # a fully masked row (possible only with a dense mask) gives 0, not NaN
                inv = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
                out = acc * (inv * hs)[:, None]
                if STATS_SEG:
                    so = ((b * H + h) * Lq + offs_m) * 4
                    tl.store(SegOut + so + 0, M0 * inv, mask=m_ok)
                    tl.store(SegOut + so + 1, M1 * inv, mask=m_ok)
                    tl.store(SegOut + so + 2, M2 * inv, mask=m_ok)
                    tl.store(SegOut + so + 3, M3 * inv, mask=m_ok)
            else:
                out = acc * hs
            o_ptr = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
            tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        else:
            # split-KV partials: unnormalised (m, l, acc, masses) for the online mode, final weights for pass 2
            a_ptr = Acc + row_base[:, None] * D + offs_d[None, :]
            if MODE == 0:
                tl.store(a_ptr, acc, mask=m_ok[:, None] & d_ok[None, :])
                r = row_base * 16
                tl.store(St + r + 0, m_i, mask=m_ok)
                tl.store(St + r + 1, l_i, mask=m_ok)
                if STATS_SEG:
                    tl.store(St + r + 2, M0, mask=m_ok)
                    tl.store(St + r + 3, M1, mask=m_ok)
                    tl.store(St + r + 4, M2, mask=m_ok)
                    tl.store(St + r + 5, M3, mask=m_ok)
            else:
                tl.store(a_ptr, acc * hs, mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(
    Acc, St, Out, SegOut, HeadScale,
    stride_ob, stride_om, stride_oh, stride_od,
    H, Lq, D,
    SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, NORMALISED: tl.constexpr,
    HAS_HS: tl.constexpr, STATS_SEG: tl.constexpr,
):
    """Combine split-KV partials of one query row (flash-decoding's log-sum-exp merge)."""
    row = tl.program_id(0)  # (b * H + h) * Lq + i
    bh = row // Lq
    i = row % Lq
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    r = (bh * SPLITS + offs_s) * Lq + i
    acc = tl.load(Acc + r[:, None] * D + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    if NORMALISED:
        out = _rsum(acc, axis=0)  # pass-2 partials already carry final weights and the head scale
    else:
        m_s = tl.load(St + r * 16 + 0)
        m = _rmax(m_s, axis=0)
        w = tl.exp2(m_s - m)
        l_s = tl.load(St + r * 16 + 1)
        denom = _rsum(w * l_s, axis=0)
        inv = tl.where(denom > 0, 1.0 / tl.maximum(denom, 1e-30), 0.0)
        if HAS_HS:
            hs = tl.load(HeadScale + bh)
        else:
            hs = 1.0
        out = _rsum(acc * w[:, None], axis=0) * (inv * hs)
        if STATS_SEG:
            for g in tl.static_range(4):
                mg = tl.load(St + r * 16 + 2 + g)
                tl.store(SegOut + row * 4 + g, _rsum(w * mg, axis=0) * inv)
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------- launcher
@dataclass
class KernelPlan:
    """The plan vectors one attention call reads (all on the query's device, no L x L tensor).

    Built by triton_backend from an AttentionPlan and a layer; every field None = feature off.
    Integer tensors may be int64 (the kernels narrow them on load).
    """

    pad: torch.Tensor | None = None  # [B] left padding
    k_rank: torch.Tensor | None = None  # [B, L0] custom mask ranks (None = causal)
    q_limit: torch.Tensor | None = None  # [B, L0]
    q_lo2: torch.Tensor | None = None  # [B, L0] second interval of ranks per query (with k_rank)
    q_hi2: torch.Tensor | None = None  # [B, L0]
    prompt_len: int = 0  # L0 (0 = every key is a generated TEXT key)
    segment: torch.Tensor | None = None  # [B, L0] int8 key segments of this layer
    bias: torch.Tensor | None = None  # [B, H, S] float32
    abs_bias: torch.Tensor | None = None  # [B, H, S] float32
    abs_from: torch.Tensor | None = None  # [B]
    head_scale: torch.Tensor | None = None  # [B, H]
    cf_kind: torch.Tensor | None = None  # [B]
    cf_seed: torch.Tensor | None = None  # [B]
    cf_source: torch.Tensor | None = None  # [B, L0]
    red_p: torch.Tensor | None = None  # [B] (VAR p, rho, min image mass, first query row)
    red_rho: torch.Tensor | None = None
    red_min: torch.Tensor | None = None
    red_from: torch.Tensor | None = None
    dense_mask: torch.Tensor | None = None  # [B|1, 1, Lq|1, >=Lk] bool (no plan bound: transformers' mask)
    window: int | None = None  # sliding window of the layer (with a plan; a dense mask already has it)
    want_segment_mass: bool = False
    want_last_row: bool = False


# id(k_rank) -> (weak reference, block size, per-block minima). Keyed by id with an identity check (a
# WeakKeyDictionary would compare tensor keys with == on lookup); valid because AttentionPlan.set_mask
# writes a new rank tensor on every change (copy on write) and select_rows makes new ones.
_BLK_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def block_min_rank(k_rank: torch.Tensor, block_n: int) -> torch.Tensor:
    """Smallest rank per key block [B, cdiv(L0, block_n)], cached per rank tensor and block size:
    computed once per plan (a few device ops, no host sync) and reused by every layer and step."""
    hit = _BLK_CACHE.get(id(k_rank))
    if hit is not None and hit[0]() is k_rank and hit[1] == block_n:
        return hit[2]
    B, L0 = k_rank.shape
    nblk = triton.cdiv(L0, block_n)
    padded = torch.full((B, nblk * block_n), GENERATED_RANK_OFFSET, dtype=torch.long, device=k_rank.device)
    padded[:, :L0] = k_rank
    mins = padded.view(B, nblk, block_n).amin(-1).to(torch.int32).contiguous()
    for key in [key for key, val in _BLK_CACHE.items() if val[0]() is None]:
        del _BLK_CACHE[key]  # plans that are gone
    _BLK_CACHE[id(k_rank)] = (weakref.ref(k_rank), block_n, mins)
    return mins


def default_blocks(Lq: int, Lk: int, head_dim: int, two_pass: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLITS, num_warps) from shapes only (never from values: CUDA-graph friendly).

    GPU choices come from ahead-of-time sm_90 compiles of every mode at D = 128 (cuobjdump
    -res-usage; docs/kernels.md): these are the largest tiles without register spills. The
    two-pass modes carry ~15 per-row statistics, hence their narrower key tiles.
    """
    if INTERPRET:
        # tiny tiles keep the interpreter fast; two splits still exercise the decode merge
        return 16, 16, (2 if Lq <= 16 and Lk > 16 else 1), 4
    if Lq <= 16:
        # decode: split-KV so that B*H programs fill the GPU (4-8 splits at 1k-4k keys; flash-decoding)
        block_n = 32 if two_pass else 64
        splits = 1
        while splits < 8 and Lk > splits * 256:
            splits *= 2
        return 16, block_n, splits, 4
    if head_dim > 128:
        return 32, 32, 1, 8
    return 64, (32 if two_pass else 64), 1, 8


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kp: KernelPlan,
    scale: float,
    *,
    kv_valid: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the plan's attention: q [B,H,Lq,D], k/v [B,Hkv,Lk,D] -> (out [B,Lq,H,D], masses, last_row).

    ``kv_valid`` [B]: number of valid keys per row (static cache); None = all Lk keys. Query row i
    sits at key index ``kv_valid - Lq + i``. ``masses`` [B,H,Lq,4] and ``last_row`` [B,H,Lk] are
    returned when the plan asks for them (post-edit probabilities, as the reference records).
    """
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    dev = query.device
    two_pass = kp.cf_kind is not None or kp.red_p is not None or kp.want_last_row
    bm0, bn0, sp0, num_warps = default_blocks(Lq, Lk, D, two_pass)
    BLOCK_M = block_m or bm0
    BLOCK_N = block_n or bn0
    SPLITS = splits or sp0
    if SPLITS & (SPLITS - 1):
        raise ValueError(f"splits must be a power of two, got {SPLITS}")
    if SPLITS > 1 and Lq > BLOCK_M:
        SPLITS = 1  # split-KV is a decode schedule: one query tile per (row, head)
    BLOCK_D = max(16, triton.next_power_of_2(D))

    need_seg = (kp.bias is not None or kp.abs_bias is not None or two_pass or kp.want_segment_mass)
    if need_seg and kp.segment is None and kp.prompt_len > 0:
        raise ValueError("segment-dependent edits need KernelPlan.segment")

    out = torch.empty(B, Lq, H, D, dtype=query.dtype, device=dev)
    f32 = torch.float32
    dummy_f = torch.zeros(1, dtype=f32, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    masses = torch.zeros(B, H, Lq, 4, dtype=f32, device=dev) if kp.want_segment_mass else None
    last_row = torch.zeros(B, H, Lk, dtype=f32, device=dev) if kp.want_last_row else None
    st = torch.empty(B * H * SPLITS * Lq * NSTAT, dtype=f32, device=dev) if (two_pass or SPLITS > 1) else dummy_f
    acc = torch.empty(B * H * SPLITS * Lq * D, dtype=f32, device=dev) if SPLITS > 1 else dummy_f

    seg = kp.segment if kp.segment is not None else dummy_i
    has_rank = kp.k_rank is not None
    rank = kp.k_rank if has_rank else dummy_i
    limit = kp.q_limit if has_rank else dummy_i
    if has_rank and (kp.q_lo2 is None or kp.q_hi2 is None):  # no second interval: an empty one per query
        kp.q_lo2, kp.q_hi2 = torch.zeros_like(kp.k_rank), torch.full_like(kp.k_rank, -1)
    lo2 = kp.q_lo2 if has_rank else dummy_i
    hi2 = kp.q_hi2 if has_rank else dummy_i
    blk = block_min_rank(kp.k_rank, BLOCK_N) if has_rank else dummy_i
    mask = kp.dense_mask
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        if mask.shape[-2] == 1 and Lq > 1:
            mask = mask.expand(mask.shape[0], mask.shape[1], Lq, mask.shape[-1])
        smb = mask.stride(0) if mask.shape[0] > 1 else 0
        mask_args = (mask, smb, mask.stride(2) if mask.shape[2] > 1 else 0, mask.stride(3))
    else:
        mask_args = (dummy_i, 0, 0, 0)
    src = kp.cf_source if kp.cf_source is not None else dummy_i

    def _f(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None else dummy_f

    def _i(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None else dummy_i

    upcast = INTERPRET or query.dtype == torch.float32
    dot_prec = "ieee" if (INTERPRET or query.dtype == torch.float32) else "tf32"
    common = dict(
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SPLITS=SPLITS,
        KV_PER_ROW=kv_valid is not None, HAS_PAD=kp.pad is not None, HAS_RANK=has_rank,
        DENSE_MASK=mask is not None, HAS_BIAS=kp.bias is not None, HAS_ABS=kp.abs_bias is not None,
        HAS_HS=kp.head_scale is not None, HAS_CF=kp.cf_kind is not None, HAS_RED=kp.red_p is not None,
        STATS_SEG=kp.want_segment_mass, STATS_LAST=kp.want_last_row, UPCAST=upcast, DOT_PREC=dot_prec,
        HAS_WINDOW=kp.window is not None and mask is None,
    )
    grid = (triton.cdiv(Lq, BLOCK_M), B * H, SPLITS)
    args = [
        query, key, value, out, st, acc, _f(masses), _f(last_row),
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        _i(kv_valid), _i(kp.pad), seg, seg.stride(0) if kp.segment is not None else 0,
        rank, limit, lo2, hi2, rank.stride(0) if has_rank else 0, blk, blk.stride(0) if has_rank else 0,
        _f(kp.bias), _f(kp.abs_bias), _i(kp.abs_from), _f(kp.head_scale),
        _i(kp.cf_kind), _i(kp.cf_seed), src, src.stride(0) if kp.cf_source is not None else 0,
        _f(kp.red_p), _f(kp.red_rho), _f(kp.red_min), _i(kp.red_from),
        *mask_args,
        H, H // Hkv, Lq, Lk, kp.prompt_len, D, float(scale), int(kp.window or 0),
    ]
    launch = dict(num_warps=num_warps, num_stages=2)
    if two_pass:
        _attn_kernel[grid](*args, MODE=MODE_STATS, **common, **launch)
        _attn_kernel[grid](*args, MODE=MODE_OUTPUT, **common, **launch)
    else:
        _attn_kernel[grid](*args, MODE=MODE_ONLINE, **common, **launch)
    if SPLITS > 1:
        _merge_kernel[(B * H * Lq,)](
            acc, st, out, _f(masses), _f(kp.head_scale), *out.stride(), H, Lq, D,
            SPLITS=SPLITS, BLOCK_D=BLOCK_D, NORMALISED=two_pass, HAS_HS=kp.head_scale is not None,
            STATS_SEG=kp.want_segment_mass and not two_pass,
        )
    return out, masses, last_row


def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool) -> float:
    """Matmul FLOPs of one attention call (QK^T and PV), halved for a causal square prefill."""
    f = 4.0 * B * H * Lq * Lk * D
    return f / 2 if causal and Lq == Lk else f


# ----------------------------------------------------------------------------------------------- AOT check
_PTR_TYPES = {
    "St": "*fp32", "Acc": "*fp32", "SegOut": "*fp32", "LastRow": "*fp32", "KvValid": "*i32", "Pad": "*i64",
    "Seg": "*i8", "Rank": "*i64", "Limit": "*i64", "Lo2": "*i64", "Hi2": "*i64",
    "BlkMin": "*i32", "Bias": "*fp32", "AbsBias": "*fp32",
    "AbsFrom": "*i64", "HeadScale": "*fp32", "CfKind": "*i64", "CfSeed": "*i64", "CfSource": "*i64",
    "RedP": "*fp32", "RedRho": "*fp32", "RedMin": "*fp32", "RedFrom": "*i64", "Mask": "*i1",
}


def compile_check(arch: int = 90, dtype: str = "bf16") -> list[str]:
    """Compile every kernel mode ahead of time for ``sm_<arch>`` (no GPU needed: triton ships ptxas).

    The interpreter runs kernels as Python and misses compiled-mode errors (non-constexpr globals,
    type promotion, layouts); this runs the real frontend and backend down to a cubin. Must be
    called in a process without TRITON_INTERPRET=1. Returns the names of the compiled variants.
    """
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels are interpreted functions)")
    target = GPUTarget("cuda", arch, 32)
    flags = dict(
        SPLITS=1, KV_PER_ROW=False, HAS_PAD=True, HAS_RANK=False, DENSE_MASK=False, HAS_BIAS=False,
        HAS_ABS=False, HAS_HS=False, HAS_CF=False, HAS_RED=False, STATS_SEG=False, STATS_LAST=False,
        HAS_WINDOW=False, UPCAST=dtype == "fp32", DOT_PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_D=128,
    )
    every = dict(HAS_BIAS=True, HAS_ABS=True, HAS_RANK=True, HAS_HS=True, HAS_CF=True, HAS_RED=True,
                 STATS_SEG=True, STATS_LAST=True)
    variants = {
        "prefill/online": dict(MODE=0),
        "prefill/online+mask+bias+stats": dict(MODE=0, HAS_BIAS=True, HAS_ABS=True, HAS_RANK=True, STATS_SEG=True),
        "prefill/dense-mask": dict(MODE=0, DENSE_MASK=True, HAS_PAD=False, KV_PER_ROW=True),
        "prefill/online+window+mask": dict(MODE=0, HAS_WINDOW=True, HAS_RANK=True),
        "prefill/stats-pass": dict(MODE=1, **every),
        "prefill/output-pass": dict(MODE=2, **every),
        "decode/online-split": dict(MODE=0, SPLITS=8, KV_PER_ROW=True, STATS_SEG=True, HAS_HS=True),
        "decode/stats-pass-split": dict(MODE=1, SPLITS=8, **every),
        "decode/output-pass-split": dict(MODE=2, SPLITS=8, **every),
    }
    names = list(inspect.signature(_attn_kernel.fn).parameters)
    done = []
    for name, var in variants.items():
        two_pass = var["MODE"] > 0
        bm, bn, _, nw = (16, 32 if two_pass else 64, 8, 4) if name.startswith("decode") else (
            64, 32 if two_pass else 64, 1, 8)
        consts = {**flags, **var, "BLOCK_M": bm, "BLOCK_N": bn}
        sig = {}
        for n in names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in ("Q", "K", "V", "Out"):
                sig[n] = "*" + dtype
            elif n in _PTR_TYPES:
                sig[n] = _PTR_TYPES[n]
            else:
                sig[n] = "fp32" if n == "scale" else "i32"
        triton.compile(ASTSource(fn=_attn_kernel, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": nw, "num_stages": 2})
        done.append(name)
    msig = {"Acc": "*fp32", "St": "*fp32", "Out": "*" + dtype, "SegOut": "*fp32", "HeadScale": "*fp32"}
    for n in list(inspect.signature(_merge_kernel.fn).parameters):
        msig.setdefault(n, "i32")
    for normalised in (False, True):
        consts = dict(SPLITS=8, BLOCK_D=128, NORMALISED=normalised, HAS_HS=True, STATS_SEG=not normalised)
        sig = {n: ("constexpr" if n in consts else t) for n, t in msig.items()}
        triton.compile(ASTSource(fn=_merge_kernel, signature=sig, constexprs=consts), target=target)
        done.append(f"merge/{'normalised' if normalised else 'lse'}")
    return done


__all__ = ["INTERPRET", "KernelPlan", "attention_flops", "compile_check", "default_blocks", "fused_attention"]
