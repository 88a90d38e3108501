"""Decode step time of the two-branch mitigations vs unmitigated and vs running the two rows sequentially.

    python benchmarks/branch_overhead.py [--new-tokens 32 --repeats 3]

On a LLaVA-shaped random-weight model (torch backend), for VCD, M3ID, AGLA and CausalMM (LLM level):
- batched: the method as shipped, main row + branch row in one forward per step;
- unmitigated: the main row alone;
- sequential: the main row alone plus the branch's row alone, run one after the other (the sum of
  the two step times; the branch alone is the same request with the branch's input: the noised /
  masked image costs what the image costs, M3ID's branch has no image, CausalMM's alone carries
  the counterfactual plan edit).
Target on CPU: batched <= 1.7x unmitigated and faster than sequential. AGLA's matcher prefill is a
per-request cost outside the decode step (reported separately as prepare time).
"""

from __future__ import annotations

import argparse
from typing import Literal

import torch
from common import add_model_arguments, interleaved, llava_shaped, machine, scene

from clearsight import DecodeSpec, generate
from clearsight.mitigations import Mitigation
from clearsight.mitigations.base import MAIN


class CounterfactualMain(Mitigation):
    """Benchmark-only: CausalMM's LLM-level counterfactual on the main row (its branch, run alone)."""

    name: Literal["bench-cf"] = "bench-cf"

    def apply(self, ctx):
        for layer in range(ctx.plan.num_layers):
            ctx.plan.set_counterfactual([layer], [ctx.rows[MAIN]], "random", layer, owner=self.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, new_tokens=32, repeats=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    lvlm = llava_shaped(args.hidden, args.layers, args.heads, image_size=args.image_size, device=args.device)
    prompt = "describe the image in detail please"
    img = scene(0, args.image_size)
    decode = DecodeSpec(max_new_tokens=args.new_tokens, ignore_eos=True)
    prepare: dict[str, float] = {}

    def step_time(request: dict, mitigations: list, key: str | None = None):
        def once() -> float:
            r = generate(lvlm, [request], mitigations, decode=decode)[0]
            if key is not None:
                prepare[key] = r.timings["prepare_s"]
            return r.timings["decode_s"] / max(len(r.token_ids) - 1, 1)
        return once

    with_image = {"prompt": prompt, "image": img}
    runs = {
        "unmitigated": step_time(with_image, []),
        "alone: image row": step_time(with_image, []),
        "alone: no-image row": step_time({"prompt": prompt}, []),
        "alone: counterfactual row": step_time(with_image, [CounterfactualMain()]),
        "vcd": step_time(with_image, ["vcd"]),
        "m3id": step_time(with_image, ["m3id"]),
        "agla": step_time(with_image, ["agla"], key="agla"),
        "causalmm": step_time(with_image, ["causalmm"]),
    }
    t = interleaved(runs, repeats=args.repeats)
    branch_alone = {"vcd": "alone: image row", "m3id": "alone: no-image row", "agla": "alone: image row",
                    "causalmm": "alone: counterfactual row"}
    base = t["unmitigated"]
    n_img = (args.image_size // 8) ** 2
    print(f"branch_overhead: LLaVA-shaped model hidden={args.hidden} layers={args.layers} heads={args.heads}, "
          f"{n_img} image tokens, {args.new_tokens} new tokens, greedy, torch backend, median of {args.repeats}")
    print(f"machine: {machine()}")
    print(f"unmitigated step: {base * 1e3:.2f} ms")
    print(f"{'method':<10}{'batched ms':>12}{'sequential ms':>15}{'vs unmitigated':>16}{'vs sequential':>15}  target")
    for m, alone in branch_alone.items():
        seq = t["alone: image row"] + t[alone]
        r_base, r_seq = t[m] / base, t[m] / seq
        ok = "met" if r_base <= 1.7 and r_seq < 1.0 else "NOT met"
        print(f"{m:<10}{t[m] * 1e3:>12.2f}{seq * 1e3:>15.2f}{r_base:>15.2f}x{r_seq:>14.2f}x  {ok}")
    print(f"agla matcher + batch preparation (per request, not per step): {prepare.get('agla', 0.0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
