"""What the Engine's left-padded KV cache costs vs a preallocated slot cache, per layer operation.

Two operations of continuous batching, at the demo model's and the LLaVA-shaped model's KV shapes:

- join: ``g`` newcomer rows (prompt ``Lp`` keys) join ``B`` running rows (``L`` keys). Padded (what
  ``batch.Batch.join`` does): left-pad the shorter side with zeros, then concatenate rows, every layer.
  Slot: copy the newcomers' keys into free rows of a preallocated [rows, heads, capacity, dim] buffer.
- append: one decode step adds one key per row. Padded (DynamicCache): ``torch.cat`` of the whole
  [B, heads, L, dim] with the new column, every layer. Slot: write the column in place.

Keys and values both; float32, one torch thread. Prints the median time per operation (all layers).
``--smoke``: tiny sizes, for CI.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from common import machine

SHAPES = {  # name: (layers, kv heads, head dim, prompt keys)
    "demo": (4, 6, 32, 78),
    "llava-shaped": (8, 8, 32, 159),
}


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def padded_join(run: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for a, b in zip(run, new):
        n = a.shape[2] - b.shape[2]  # the running rows are longer here: the newcomers are padded
        b = torch.cat([b.new_zeros(*b.shape[:2], n, b.shape[3]), b], 2)
        out.append(torch.cat([a, b]))
    return out


def slot_join(buf: list[torch.Tensor], new: list[torch.Tensor], first_row: int) -> None:
    for a, b in zip(buf, new):
        a[first_row:first_row + b.shape[0], :, :b.shape[2]].copy_(b)


def padded_append(run: list[torch.Tensor], col: torch.Tensor) -> list[torch.Tensor]:
    return [torch.cat([a, col], 2) for a in run]


def slot_append(buf: list[torch.Tensor], col: torch.Tensor, at: int) -> None:
    for a in buf:
        a[:col.shape[0], :, at:at + 1].copy_(col)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 3 if args.smoke else args.repeats
    print(f"kv_join: {machine()}")
    print(f"{'shape':>13} {'rows B':>6} {'new g':>5} {'keys L':>6} | {'join padded':>11} {'join slot':>9} | "
          f"{'append padded':>13} {'append slot':>11}  (ms, all layers, keys + values)")
    for name, (layers, heads, dim, prompt) in SHAPES.items():
        for rows, new_rows in ((8, 2), (16, 2), (32, 4)):
            if args.smoke and rows > 8:
                continue
            length = prompt + 32  # running rows 32 tokens into their answers
            run = [torch.randn(rows, heads, length, dim) for _ in range(2 * layers)]
            new = [torch.randn(new_rows, heads, prompt + 1, dim) for _ in range(2 * layers)]
            cap = prompt + 128
            buf = [torch.zeros(rows + new_rows, heads, cap, dim) for _ in range(2 * layers)]
            col = torch.randn(rows, heads, 1, dim)
            t_pj = timed(partial(padded_join, run, new), repeats)
            t_sj = timed(partial(slot_join, buf, new, rows), repeats)
            t_pa = timed(partial(padded_append, run, col), repeats)
            t_sa = timed(partial(slot_append, buf, col, length), repeats)
            print(f"{name:>13} {rows:6d} {new_rows:5d} {length:6d} | {t_pj * 1e3:11.3f} {t_sj * 1e3:9.3f} | "
                  f"{t_pa * 1e3:13.3f} {t_sa * 1e3:11.3f}")


if __name__ == "__main__":
    main()
