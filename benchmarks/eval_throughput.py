"""Eval throughput (generations/s) of the demo job's generation stage, side by side in one run:

- local, one system after the other (``pack = false``: eleven passes over the samples);
- local with cross-system packing (one stream of mixed batches);
- Ray with 1 worker and with 2 workers (packed; each worker one Engine, ``worker_num_cpus`` = 1, so each
  runs torch on one thread: the pool, not torch's threads, uses the cores).

Each run generates into a fresh output folder (nothing cached); before it, the same executor runs a small
warm-up job (other samples), so that the processes are started and the model loaded (in every Ray
worker): the figures are generation throughput, the start-up is printed beside them. A local Ray is
started once, before the Ray runs. The records of every
run are checked equal to the unpacked local run's (greedy). Targets (issue 14): packing >= 1.3x unpacked;
Ray 2 workers >= 1.6x Ray 1 worker on 2 cores. ``--smoke``: the tiny random model, a few samples (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import machine

from clearsight.evals.demo import demo_job
from clearsight.evals.executor import LocalExecutor
from clearsight.evals.runner import run_job


def records(out: Path) -> dict[str, str]:
    return {r["key"]: r["output"] for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}


def run(name: str, job, warm, executor) -> tuple[float, int]:
    """Warm the executor (``warm``: a small job into another folder, enough chunks to reach every worker, so
    each has started and loaded the model), then time ``job`` on it; both times are printed."""
    try:
        t = time.perf_counter()
        run_job(warm, executor=executor, progress=None, generate_only=True)
        startup = time.perf_counter() - t
        t = time.perf_counter()
        run_job(job, executor=executor, progress=None, generate_only=True)
        seconds = time.perf_counter() - t
    finally:
        executor.close()
    n = sum(1 for _ in (Path(job.output) / "generations.jsonl").open())
    print(f"{name:>22}: {n / seconds:7.2f} generations/s  ({n} in {seconds:.1f} s; start-up + warm-up job "
          f"{startup:.1f} s)", flush=True)
    return seconds, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (CI)")
    ap.add_argument("--model", default=None, help="default: the demo model (builtin:shapes-llava)")
    ap.add_argument("--per-split", type=int, default=8, help="POPE questions per split")
    ap.add_argument("--n-images", type=int, default=4, help="CHAIR images")
    ap.add_argument("--batch-size", type=int, default=16, help="the demo job's")
    ap.add_argument("--partner", type=int, default=0,
                    help="partner questions (the demo asks 600, plus controls: 30x the generations of the default)")
    args = ap.parse_args()
    if args.per_split < 1 or args.n_images < 1 or args.batch_size < 1 or args.partner < 0:
        ap.error("--per-split, --n-images and --batch-size must be at least 1, --partner at least 0")
    if args.smoke:
        args.model, args.per_split, args.n_images = args.model or "builtin:tiny-llava", 1, 1
    warnings.simplefilter("ignore")  # the demo's mitigations warn about the untrained demo model, per request
    import ray

    from clearsight.workers.executor import RayExecutor, RaySettings

    cores = os.cpu_count()
    root = Path(tempfile.mkdtemp(prefix="eval-throughput-"))

    def job(name: str, **kw):
        j = demo_job(output=str(root / name), model=args.model, per_split=args.per_split, n_images=args.n_images,
                     partner=args.partner)
        return j.model_copy(update={"batch_size": args.batch_size, **kw})

    j = job("x")
    print(f"eval_throughput: {machine()}, {cores} cores, torch threads {torch.get_num_threads()}; demo job: "
          f"{len(j.systems)} systems on {j.systems[0].model}, POPE {args.per_split} x 3 splits + CHAIR "
          f"{args.n_images} images, batch_size {args.batch_size}")
    def warm(name: str):
        # other samples than the timed job's (CHAIR image seed), 3 x 11 tasks: more chunks than workers
        return job(f"{name}-warm").model_copy(update={"benchmarks": [
            j.benchmarks[1].model_copy(update={"n_images": 3, "seed": 99})]})

    times = {}
    times["local"] = run("local (unpacked)", job("local", pack=False), warm("local"), LocalExecutor(args.batch_size))
    times["packed"] = run("local, packed", job("packed"), warm("packed"), LocalExecutor(args.batch_size))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local Ray
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for n in (1, 2):
            ex = RayExecutor(RaySettings(workers=n, batch_size=args.batch_size, num_cpus=1))
            times[f"ray{n}"] = run(f"ray, {n} worker{'s' * (n > 1)}", job(f"ray{n}", executor="ray", workers=n),
                                   warm(f"ray{n}"), ex)
    finally:
        ray.shutdown()
    ref = records(root / "local")
    same = all(records(root / name) == ref for name in ("packed", "ray1", "ray2"))
    rate = {k: n / s for k, (s, n) in times.items()}
    print(f"packed / unpacked: {rate['packed'] / rate['local']:.2f}x (target 1.3x)")
    print(f"ray 2 workers / ray 1 worker: {rate['ray2'] / rate['ray1']:.2f}x on {cores} cores (target 1.6x)")
    print(f"ray 2 workers / local packed: {rate['ray2'] / rate['packed']:.2f}x")
    print(f"records identical to the unpacked local run's: {same}")
    if not same:
        raise SystemExit("records differ")


if __name__ == "__main__":
    main()
