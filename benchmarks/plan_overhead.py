"""Decode speed of the attention backends with an empty plan, side by side in one run.

    python benchmarks/plan_overhead.py [--new-tokens 64 --batch 1 --repeats 5]

Prints decode tokens/s of stock transformers SDPA, the clearsight `torch` backend with an empty
AttentionPlan bound, and the `reference` backend, on a LLaVA-shaped random-weight model, plus
the ratios. Target: torch / sdpa >= 0.95.
"""

from __future__ import annotations

import argparse

import torch
from common import add_model_arguments, interleaved, llava_shaped, machine, scene

from clearsight import DecodeSpec, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, new_tokens=64, repeats=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    lvlm = llava_shaped(args.hidden, args.layers, args.heads, image_size=args.image_size, device=args.device)
    requests = [{"prompt": "describe the image in detail please", "image": scene(i, args.image_size)}
                for i in range(args.batch)]
    decode = DecodeSpec(max_new_tokens=args.new_tokens, ignore_eos=True)

    def run(backend: str):
        def once() -> float:
            lvlm.set_backend(backend)
            results = generate(lvlm, requests, decode=decode, max_batch=args.batch)
            return results[0].timings["decode_tokens_per_s"] * args.batch
        return once

    tps = interleaved({"sdpa (stock)": run("sdpa"), "torch (empty plan)": run("torch"),
                       "reference (empty plan)": run("reference")}, repeats=args.repeats)
    n_img = (args.image_size // 8) ** 2
    print(f"plan_overhead: LLaVA-shaped model hidden={args.hidden} layers={args.layers} heads={args.heads}, "
          f"{n_img} image tokens, batch {args.batch}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"machine: {machine()}")
    base = tps["sdpa (stock)"]
    print(f"{'backend':<26}{'decode tok/s':>14}{'vs sdpa':>10}")
    for name, v in tps.items():
        print(f"{name:<26}{v:>14.1f}{v / base:>10.3f}")
    ratio = tps["torch (empty plan)"] / base
    print(f"torch/sdpa = {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")


if __name__ == "__main__":
    main()
