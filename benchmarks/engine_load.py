"""Open-loop load on the Engine vs static batching vs one-at-a-time.

On the demo model and a LLaVA-shaped random model: Poisson arrivals (seeded) at three rates, relative
to the measured time of one request alone (rate x 1/t_solo); a mix of unmitigated, single-pass (pai)
and branch (vcd) requests. Answer lengths (``--lengths``, a comma list; default both of the first two):
``varied`` (each request's own length, seeded, uniform over [L/4, 7L/4] with mean L = ``--new-tokens``,
as answers ending at EOS are), ``pope-chair`` (this project's own traffic: 2/3 POPE-style yes/no answers
of 1-4 tokens, 1/3 CHAIR-style captions of 48-64 tokens, seeded, mean 20.3) or ``fixed`` (every request
exactly L tokens: the case where static batching wastes nothing). Prints throughput (generated
tokens/s), p50/p99 latency and p50/p99 time to first token, and the Engine's ratios to static batching
(collect up to B arrived requests, run them to completion, repeat: submitted as one group to an Engine,
so both run on the same thread and machinery; with several ``--batch`` sizes, the one with the higher
throughput at each rate is the baseline) and to one-at-a-time (``generate()`` of each request alone, in
the caller's thread). ``--smoke``: tiny sizes, for CI.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from typing import NoReturn

import torch
from common import llava_shaped, machine, scene

from clearsight import DecodeSpec, load_model, stream_generate
from clearsight.engine import Engine

MIX = [[], ["pai"], ["vcd"]]
REQUESTS = 32
# Chosen by measurement at 6 / t_solo on both models and both workloads (README, "Engine under load"):
# static batching had its best throughput at 16 requests (of 8 / 16 / 32); the Engine's time to first token was
# much lower at 32 rows than at 16, and 64 rows were slower than 32.
STATIC_BATCH = "16"
ENGINE_ROWS = 32
LENGTHS = ("varied", "fixed", "pope-chair")
POPE_SHARE = 2 / 3  # pope-chair: the share of short (POPE-style yes/no) answers; the rest are captions (CHAIR)


def answer_length(rng: random.Random, lengths: str, new_tokens: int) -> int:
    """One request's answer length (``--lengths``)."""
    if lengths == "fixed":
        return new_tokens
    if lengths == "pope-chair":  # a yes/no of 1-4 tokens, or a 48-64 token caption
        return rng.randint(1, 4) if rng.random() < POPE_SHARE else rng.randint(48, 64)
    return rng.randint(max(1, new_tokens // 4), max(1, 7 * new_tokens // 4))


def workload(n: int, rate: float, seed: int, image_size: int, new_tokens: int, lengths: str):
    """(arrival time, request, mitigations, decode) per request; the same seed gives the same requests."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        length = answer_length(rng, lengths, new_tokens)
        out.append((t, {"prompt": f"question {i}: what is in the picture?", "image": scene(i, image_size)},
                    MIX[rng.randrange(len(MIX))], DecodeSpec(max_new_tokens=length, ignore_eos=True)))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Clock:
    """Per request: arrival, first token and end times, and tokens generated."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.start: dict[int, float] = {}
        self.first: dict[int, float] = {}
        self.end: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def on_event(self, i: int):
        def record(ev) -> None:
            self.first.setdefault(i, time.perf_counter())
            if ev.finished:
                self.end[i], self.tokens[i] = time.perf_counter(), len(ev.result.token_ids)
        return record


def run_engine(lvlm, work, max_rows) -> Clock:
    """Open loop: each request is submitted when it arrives and joins the running batch."""
    with Engine(lvlm, max_rows=max_rows) as eng:
        clock = Clock()
        handles = []
        for i, (at, req, mits, decode) in enumerate(work):
            time.sleep(max(0.0, clock.t0 + at - time.perf_counter()))
            clock.start[i] = time.perf_counter()
            handles.append(eng.submit(req, mits, decode, on_event=clock.on_event(i)))
        for h in handles:
            h.result(600)
    return clock


def run_static(lvlm, work, batch) -> Clock:
    """When idle, take up to ``batch`` arrived requests (waiting for one if none), run them to completion
    as one group, repeat; arrival times are the workload's, as in the open-loop engine run."""
    with Engine(lvlm, max_rows=None) as eng:
        clock = Clock()
        i = 0
        while i < len(work):
            now = time.perf_counter() - clock.t0
            if work[i][0] > now:
                time.sleep(work[i][0] - now)
                now = work[i][0]
            group = [j for j in range(i, min(i + batch, len(work))) if work[j][0] <= now]
            i = group[-1] + 1
            for j in group:
                clock.start[j] = clock.t0 + work[j][0]
            handles = [eng.submit(work[j][1], work[j][2], work[j][3], on_event=clock.on_event(j)) for j in group]
            for h in handles:
                h.result(600)
    return clock


def run_one_at_a_time(lvlm, work) -> Clock:
    """``generate()`` of one arrived request at a time, in the caller's thread (what a plain loop does)."""
    clock = Clock()
    for j, (at, req, mits, decode) in enumerate(work):
        time.sleep(max(0.0, clock.t0 + at - time.perf_counter()))
        clock.start[j] = clock.t0 + at
        record = clock.on_event(j)
        for ev in stream_generate(lvlm, [req], mits, decode=decode):
            record(ev)
    return clock


def summary(c: Clock):
    lat = [c.end[i] - c.start[i] for i in c.end]
    ttft = [c.first[i] - c.start[i] for i in c.first]
    return {"tok/s": sum(c.tokens.values()) / (max(c.end.values()) - c.t0), "p50 lat": statistics.median(lat),
            "p99 lat": pct(lat, 0.99), "p50 ttft": statistics.median(ttft), "p99 ttft": pct(ttft, 0.99)}


def fail(message: str) -> NoReturn:
    """Bad input: one line, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def ints(text: str, option: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        fail(f"{option}: {text!r} is not a comma list of positive integers (e.g. 8,16)")
    return out


def bench_model(name: str, lvlm, image_size: int, args) -> None:
    with torch.inference_mode():
        probe = workload(3, 1.0, args.seed, image_size, args.new_tokens, "fixed")
        for _, req, mits, decode in probe[:1]:  # warm-up: first-call costs are not a request's time
            list(stream_generate(lvlm, [req], mits, decode=decode))
        t = time.perf_counter()
        for _, req, mits, decode in probe:
            list(stream_generate(lvlm, [req], mits, decode=decode))
        solo = (time.perf_counter() - t) / len(probe)
    batches = ints(args.batch, "--batch")
    print(f"\n== {name}: one request alone ({args.new_tokens} tokens) {solo * 1e3:.0f} ms; {args.requests} requests, "
          f"mix unmitigated/pai/vcd; engine max {args.engine_rows} rows; static batch "
          f"{' or '.join(map(str, batches))} requests (the one with the higher throughput is the baseline)")
    for lengths in args.lengths.split(","):
        for mult in (float(x) for x in args.rates.split(",")):
            work = workload(args.requests, mult / solo, args.seed, image_size, args.new_tokens, lengths)
            results = {"engine": summary(run_engine(lvlm, work, args.engine_rows))}
            for b in batches:
                results[f"static B={b}"] = summary(run_static(lvlm, work, b))
            results["one-at-a-time"] = summary(run_one_at_a_time(lvlm, work))
            static = max((k for k in results if k.startswith("static")), key=lambda k: results[k]["tok/s"])
            print(f"\n{lengths} lengths, rate {mult:g} / t_solo")
            keys = list(results["engine"])
            print(f"{'':>14} " + " ".join(f"{k:>9}" for k in keys))
            for system, r in results.items():
                print(f"{system:>14} " + " ".join(f"{r[k]:9.3f}" for k in keys))
            for base in (static, "one-at-a-time"):
                ratios = " ".join(f"{k} {results['engine'][k] / results[base][k]:.2f}x" for k in keys)
                print(f"{'engine/' + base:>24}: {ratios}")


def main() -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--models", default="demo,llava-shaped",
                    help="comma list: demo (builtin:shapes-llava), llava-shaped (random, benchmarks/common.py)")
    ap.add_argument("--requests", type=int, default=REQUESTS)
    ap.add_argument("--new-tokens", type=int, default=24, help="mean answer length L (varied, fixed)")
    ap.add_argument("--lengths", default="varied,pope-chair",
                    help="comma list of workloads. varied: uniform over [L/4, 7L/4] per request (seeded); fixed: "
                         "every answer L tokens; pope-chair: 2/3 yes/no answers of 1-4 tokens, 1/3 captions of "
                         "48-64 tokens (seeded; mean 20.3)")
    ap.add_argument("--batch", default=STATIC_BATCH, help="static batch size(s) in requests, comma list; each runs "
                    "and the one with the higher throughput at each rate is the baseline")
    ap.add_argument("--engine-rows", type=int, default=ENGINE_ROWS, help="the Engine's max_rows (main + branch rows)")
    ap.add_argument("--rates", default="0.5,2,6", help="arrival rates, in multiples of 1 / (one request alone)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for option, value in (("--requests", args.requests), ("--new-tokens", args.new_tokens),
                          ("--engine-rows", args.engine_rows)):
        if value < 1:
            fail(f"{option} must be at least 1, got {value}")
    ints(args.batch, "--batch")
    for lengths in args.lengths.split(","):
        if lengths not in LENGTHS:
            fail(f"--lengths: unknown workload {lengths!r}: use {', '.join(LENGTHS)}")
    for name in args.models.split(","):
        if name not in ("demo", "llava-shaped"):
            fail(f"--models: unknown model {name!r}: use demo and/or llava-shaped")
    if args.smoke:
        args.requests, args.new_tokens = 6, 4
    print(f"engine_load: {machine()}, torch threads {torch.get_num_threads()}")
    for name in args.models.split(","):
        if name == "demo":
            bench_model("builtin:shapes-llava (demo model)", load_model("builtin:shapes-llava"), 96, args)
        elif name == "llava-shaped":
            if args.smoke:
                lvlm, size = llava_shaped(hidden=64, layers=2, heads=4, image_size=32), 32
            else:
                lvlm, size = llava_shaped(), 96
            bench_model("LLaVA-shaped random model", lvlm, size, args)
    print(f"\nengine_load took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    threading.current_thread().name = "engine_load"
    main()
