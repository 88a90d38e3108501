"""Attention kernels at LLaVA-1.5-7B shapes: SDPA vs the triton backend vs FlexAttention vs eager.

For every shape (prefill L = 640 / 1280 / 2560; decode with 1k-4k cached keys; batch 1 and 8;
H = 32, D = 128, bf16) it times, per edit kind:

- ``sdpa``: torch SDPA (flash) without edits, the speed of stock attention (the 1.00x column);
- ``ours``: clearsight's triton backend with the plan bound (``empty`` = a plan with no edits);
- ``flex``: ``torch.compile(flex_attention)`` with an equivalent ``score_mod`` / ``BlockMask`` where
  one exists (VAR needs two flex calls, pass 1 with one-hot segment values; counterfactual
  replacement and statistics have no score_mod form: ``n/a``);
- ``eager``: clearsight's reference backend, i.e. the papers' style: materialised float32 maps and
  the edit applied in torch on the probabilities (``OOM`` when the maps do not fit).

It prints milliseconds, TFLOP/s (QK^T + PV matmul FLOPs, halved for causal prefill) and the ratios
side by side, plus ``max|ours-eager|`` as a correctness check. There are no wall-clock assertions.

Runs on a CUDA GPU only; on a CPU machine it says so and exits 0. ``--smoke`` runs every code path
(kernel launches, flex score_mods, eager edits) at tiny float32 shapes on the CPU under the Triton
interpreter and fails if ours and eager disagree.

    python benchmarks/attention_kernels.py                       # the full grid (GPU)
    python benchmarks/attention_kernels.py --batch 1 --prefill 640 --decode 1024 --edits empty var
    python benchmarks/attention_kernels.py --smoke               # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

EDITS = (
    "empty", "bias", "abs_bias", "var", "cf_uniform", "cf_random", "cf_shuffled", "cf_reversed",
    "head_scale", "cca_mask", "stats",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefill", type=int, nargs="*", default=[640, 1280, 2560], help="prefill lengths")
    p.add_argument("--decode", type=int, nargs="*", default=[1024, 2048, 4096], help="cached keys at decode")
    p.add_argument("--decode-prompt", type=int, default=640, help="prompt length behind the decode cache")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA); default = --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--edits", nargs="+", choices=EDITS, default=list(EDITS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take a while)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager (materialised maps) baseline")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    # before any kernel is defined: triton reads it when @triton.jit decorates (reference/kernels.md §5)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

if not ARGS.smoke and not torch.cuda.is_available():
    print("attention_kernels: no CUDA GPU here, nothing to benchmark (use --smoke for a CPU check of the code paths)")
    sys.exit(0)

from clearsight.kernels.context import use_plan  # noqa: E402
from clearsight.kernels.plan import (  # noqa: E402
    AttentionPlan,
    Counterfactual,
    QueryRows,
    RowLayout,
    Segment,
    redistribution_factors,
)
from clearsight.kernels.reference import reference_attention  # noqa: E402
from clearsight.kernels.triton_attention import attention_flops  # noqa: E402
from clearsight.kernels.triton_backend import triton_attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _Module(torch.nn.Module):
    """What the attention functions read from a LlamaAttention module."""

    def __init__(self, n_rep: int) -> None:
        super().__init__()
        self.layer_idx = 0
        self.num_key_value_groups = n_rep
        self.is_causal = True


# ------------------------------------------------------------------------------------------------ plans
def llava_layout(L0: int, smoke: bool) -> tuple[int, int, int]:
    """(image start, image end, grid side): LLaVA-1.5 puts 576 = 24 x 24 tokens after ~35 prompt
    tokens; longer prompts get more image tiles (LLaVA-NeXT style), keeping 64 text tokens after."""
    start = 4 if smoke else 35
    side = 4 if smoke else 24
    tiles = max(1, min((L0 - start - (8 if smoke else 64)) // (side * side), 4))
    return start, start + tiles * side * side, side


def build_plan(edit: str, B: int, H: int, L0: int, device: str, smoke: bool) -> AttentionPlan:
    start, end, side = llava_layout(L0, smoke)
    seg = torch.full((B, L0), int(Segment.TEXT), dtype=torch.int8)
    seg[:, 0] = Segment.TEXT_SINK  # BOS
    seg[:, start:end] = Segment.IMAGE
    seg[:, start + 5 : end : 97] = Segment.IMAGE_SINK  # a few visual sinks (VAR finds them per layer)
    layouts = [RowLayout(pad=0, image_spans=((start, end),), grids=((side, side * (end - start) // side**2),))] * B
    plan = AttentionPlan(num_layers=1, num_heads=H, segment=seg.to(device), layouts=layouts)
    rows = range(B)
    if edit == "bias":
        plan.add_bias([0], rows, Segment.IMAGE, 0.5)
    elif edit == "abs_bias":
        plan.add_abs_bias([0], rows, Segment.IMAGE, 0.2, QueryRows.ALL, owner="pai")
    elif edit == "var":
        plan.set_redistribute([0], rows, p_move=0.6, rho=0.5, min_image_mass=0.2,
                              query_rows=QueryRows.AFTER_IMAGE, owner="var")
    elif edit.startswith("cf_"):
        plan.set_counterfactual([0], rows, Counterfactual[edit[3:].upper()], seed=1, owner="causalmm")
    elif edit == "head_scale":
        plan.scale_heads(0, rows, torch.linspace(0.5, 1.5, H))
    elif edit == "cca_mask":
        # concentric causal attention: image tokens ranked by ring (outer first), text shifted after
        pos = torch.arange(L0)
        idx = torch.arange(end - start) % (side * side)
        r, c = idx // side, idx % side
        ring = torch.minimum(torch.minimum(r, c), torch.minimum(side - 1 - r, side - 1 - c))
        rank = pos.clone()
        rank[start:end] = start + ring
        rank[end:] = start + int(ring.max()) + 1 + (pos[end:] - end)
        plan.set_mask(rows, rank.expand(B, L0), rank.expand(B, L0), owner="cca")
    elif edit == "stats":
        plan.stats.segment_mass = True
        plan.stats.last_row = True
    return plan


# ------------------------------------------------------------------------------------------------ flex
def flex_runner(edit: str, plan: AttentionPlan, q, k, v, scale: float, smoke: bool) -> Callable | None:
    """FlexAttention with an equivalent score_mod / BlockMask, or None where none exists."""
    if edit.startswith("cf_") or edit == "stats":
        return None  # mass-preserving replacement and statistics are not pointwise score edits
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fa = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    off = Lk - Lq
    gqa = k.shape[1] != H
    seg = plan.segments(0, Lk)
    e = plan.layer_edit(0)
    dev = q.device

    if edit == "cca_mask":
        rank = plan._ranks(plan.k_rank, Lk)
        limit = plan._ranks(plan.q_limit, Lk)

        def mask_mod(b, h, q_idx, kv_idx):
            return rank[b, kv_idx] <= limit[b, q_idx + off]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + off

    bm = create_block_mask(mask_mod, B, None, Lq, Lk, device=dev, _compile=not smoke) if Lq > 1 else None
    score_mod = None
    if edit == "bias":
        bias = e.bias

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, seg[b, kv_idx]]
    elif edit == "abs_bias":
        ab, abs_from = e.abs_bias, e.abs_from

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + torch.where(q_idx + off >= abs_from[b], ab[b, h, seg[b, kv_idx]] * score.abs(), 0.0)

    def run() -> torch.Tensor:
        out = fa(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa)
        if edit == "head_scale":
            out = out * e.head_scale.to(out.dtype).view(B, H, 1, 1)
        return out.transpose(1, 2)

    if edit == "var":
        # two flex calls: segment masses from one-hot values (padded to 16 columns), then + log c
        onehot = torch.nn.functional.one_hot(seg, 16).to(q.dtype).unsqueeze(1).expand(B, k.shape[1], Lk, 16)
        q_index = torch.arange(off, Lk, device=dev)

        def run() -> torch.Tensor:  # noqa: F811
            masses = fa(q, k, onehot, block_mask=bm, scale=scale, enable_gqa=gqa)[..., :4].float()
            log_c = torch.log(redistribution_factors(masses, e.redistribute, q_index)).to(q.dtype)

            def var_mod(score, b, h, q_idx, kv_idx):
                return score + log_c[b, h, q_idx, seg[b, kv_idx]]

            return fa(q, k, v, score_mod=var_mod, block_mask=bm, scale=scale, enable_gqa=gqa).transpose(1, 2)

    return run


# ------------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], torch.Tensor], warmup: int, iters: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds of fn() and its last output (CUDA events on GPU, perf_counter on CPU)."""
    out = fn()
    for _ in range(warmup):
        out = fn()
    times = []
    if torch.cuda.is_available() and out.is_cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn()
            t.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(t))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def try_timed(fn, warmup, iters) -> tuple[float | None, torch.Tensor | None, str]:
    try:
        ms, out = timed(fn, warmup, iters)
        return ms, out, ""
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, "OOM"
    except Exception as exc:  # a flex compile failure must not hide the other rows
        return None, None, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"


def fmt(ms: float | None, note: str = "", width: int = 9) -> str:
    return f"{ms:{width}.3f}" if ms is not None else f"{(note or 'n/a')[:width]:>{width}}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:6.2f}x" if a is not None and b is not None and b > 0 else "    -  "


# ------------------------------------------------------------------------------------------------ main
def bench_shape(phase: str, B: int, L0: int, Lk: int, args, device: str, dtype) -> list[float]:
    H = args.heads
    Hkv = args.kv_heads or H
    D = args.head_dim
    Lq = L0 if phase == "prefill" else 1
    scale = D**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype, generator=g)
    module = _Module(H // Hkv).to(device)
    flops = attention_flops(B, H, Lq, Lk, D, causal=phase == "prefill")
    w, it = args.warmup, args.iters

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=Lq > 1, scale=scale, enable_gqa=Hkv != H
        ).transpose(1, 2)

    base_ms, _, _ = try_timed(sdpa, w, it)
    print(f"\n{phase} B={B} Lq={Lq} Lk={Lk} H={H} Hkv={Hkv} D={D} {args.dtype}  "
          f"({flops / 1e9:.2f} GFLOP; sdpa {fmt(base_ms).strip()} ms, "
          f"{(flops / base_ms / 1e9 if base_ms else 0):.1f} TFLOP/s)")
    print(f"{'edit':12s} {'ours ms':>9s} {'TFLOP/s':>8s} {'ours/sdpa':>9s} | {'flex ms':>9s} {'flex/ours':>9s} | "
          f"{'eager ms':>9s} {'eager/ours':>10s} | max|ours-eager|")
    diffs, errors = [], []
    for edit in args.edits:
        plan = build_plan(edit, B, H, L0, device, args.smoke)

        def ours(plan=plan) -> torch.Tensor:
            with use_plan(plan):
                return triton_attention(module, q, k, v, None, scaling=scale)[0]

        def eager(plan=plan) -> torch.Tensor:
            with use_plan(plan):
                return reference_attention(module, q, k, v, None, scaling=scale)[0]

        o_ms, o_out, o_note = try_timed(ours, w, it)
        if o_note.startswith("error"):
            errors.append(f"{phase} {edit}: ours {o_note}")
        flex_ms, flex_note = None, "n/a"
        if not args.no_flex:
            fr = flex_runner(edit, plan, q, k, v, scale, args.smoke)
            if fr is not None:
                flex_ms, f_out, flex_note = try_timed(fr, w, it)
                if flex_note.startswith("error"):
                    errors.append(f"{phase} {edit}: flex {flex_note}")
                if args.smoke and f_out is not None and o_out is not None:
                    diffs.append((f_out.float() - o_out.float()).abs().max().item())
        e_ms, e_out, e_note = (None, None, "skipped") if args.no_eager else try_timed(eager, w, it)
        if e_note.startswith("error"):
            errors.append(f"{phase} {edit}: eager {e_note}")
        diff = ""
        if o_out is not None and e_out is not None:
            d = (o_out.float() - e_out.float()).abs().max().item()
            diffs.append(d)
            diff = f"{d:.2e}"
        tflops = f"{flops / o_ms / 1e9:8.1f}" if o_ms else f"{'-':>8s}"
        print(f"{edit:12s} {fmt(o_ms, o_note)} {tflops} {ratio(o_ms, base_ms):>9s} | {fmt(flex_ms, flex_note)} "
              f"{ratio(flex_ms, o_ms):>9s} | {fmt(e_ms, e_note)} {ratio(e_ms, o_ms):>10s} | {diff}")
        del plan
    for err in errors:
        print(f"  {err}")
    # an error counts as an infinite difference: --smoke fails on it
    return diffs + [float("inf")] * len(errors)


def main(args: argparse.Namespace) -> int:
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        # tiny shapes: the interpreter is ~1000x slower than a GPU (reference/kernels.md §5)
        args.batch, args.prefill, args.decode, args.decode_prompt = [1], [40], [56], 40
        args.heads, args.kv_heads, args.head_dim, args.dtype = 2, 1, 16, "fp32"
        args.warmup, args.iters = 0, 1
    dtype = DTYPES[args.dtype]
    print(f"attention_kernels on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (TRITON_INTERPRET=1)'}; "
          "ratios: ours/sdpa = cost over stock attention; flex/ours and eager/ours > 1 mean ours is faster; "
          "eager = materialised fp32 maps + torch edits")
    diffs: list[float] = []
    for B in args.batch:
        for L in args.prefill:
            diffs += bench_shape("prefill", B, L, L, args, device, dtype)
        for Lk in args.decode:
            diffs += bench_shape("decode", B, min(args.decode_prompt, Lk - 1), Lk, args, device, dtype)
    if args.smoke:
        worst = max(diffs, default=0.0)
        print(f"\nsmoke: {len(diffs)} comparisons, worst max|diff| = {worst:.2e}")
        if worst > 1e-3:
            print("smoke: FAILED: the kernel, flex and eager paths disagree")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
