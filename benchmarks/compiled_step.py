"""The compiled decode step against the eager step on this machine: milliseconds a step and the ratio.

A LLaVA-shaped random model (``common.llava_shaped``) decodes the same requests with ``compile=False`` and
``compile=True`` (static KV cache + ``torch.compile``: inductor, CUDA graphs on a GPU), taking turns; each
run's step time is its decode time over its decode steps. The first compiled run traces and compiles (its
time is printed apart) and is not counted. The tokens of both runs are compared (they must be the same).

    python benchmarks/compiled_step.py                  # batch 1 and 4, hidden 256, 8 layers
    python benchmarks/compiled_step.py --batch 1 --hidden 512 --layers 4 --mitigations mma
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_model_arguments, interleaved, llava_shaped, machine, scene

from clearsight import DecodeSpec, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, new_tokens=24, repeats=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--mitigations", nargs="*", default=[], help="e.g. mma (one the compiled step captures)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    lvlm = llava_shaped(args.hidden, args.layers, args.heads, image_size=args.image_size, device=args.device)
    decode = DecodeSpec(max_new_tokens=args.new_tokens, ignore_eos=True)
    print(f"compiled vs eager decode step on {machine()}; LLaVA-shaped h={args.hidden} L={args.layers}, "
          f"{args.new_tokens} new tokens, mitigations {args.mitigations or 'none'}")
    print(f"{'batch':>5} {'eager ms/step':>14} {'compiled ms/step':>17} {'speed-up':>9} {'first compile':>14}  step")
    for B in args.batch:
        reqs = [{"prompt": f"describe the image in detail please {i}", "image": scene(i, args.image_size)}
                for i in range(B)]
        tokens: dict[bool, list[list[int]]] = {}
        steps: dict[bool, str] = {}

        def run(compile: bool, reqs=reqs, tokens=tokens, steps=steps) -> float:
            rs = generate(lvlm, reqs, args.mitigations, decode=decode, max_batch=len(reqs), compile=compile)
            tokens[compile] = [r.token_ids for r in rs]
            steps[compile] = rs[0].decode_step or "eager"
            return max(r.timings["decode_s"] for r in rs) / max(len(rs[0].token_ids) - 1, 1)

        t0 = time.perf_counter()
        run(True)  # trace + compile for this batch's shapes
        first = time.perf_counter() - t0
        t = interleaved({"eager": lambda: run(False), "compiled": lambda: run(True)}, args.repeats, warmup=0)
        same = "same tokens" if tokens[True] == tokens[False] else "TOKENS DIFFER"
        print(f"{B:>5} {1e3 * t['eager']:>14.2f} {1e3 * t['compiled']:>17.2f} {t['eager'] / t['compiled']:>8.2f}x "
              f"{first:>13.1f}s  {steps[True]}, {same}")


if __name__ == "__main__":
    main()
