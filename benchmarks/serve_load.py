"""HTTP + Ray Serve vs the Engine in-process: throughput and p50/p99 latency at concurrency 1, 4 and 16.

Closed loop: ``c`` callers each send their share of the requests one after the other. In-process, a caller
submits to one ``Engine`` and waits for the result; over HTTP, a caller posts ``/v1/chat/completions`` (the
same request: the demo model, an image as a data URL, greedy, ``ignore_eos`` so every request makes the
same number of tokens) to a local Ray Serve app with one replica of the same model. Prints both side by
side and the ratio HTTP / in-process (the cost of HTTP, JSON, base64, the proxy, the gateway and the
handle). ``--smoke``: tiny sizes, for CI.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx
import torch
from common import machine

from clearsight import DecodeSpec
from clearsight.engine import Engine

MODEL = "builtin:shapes-llava"
IMAGE = Path(__file__).resolve().parents[1] / "docs" / "example.png"
PROMPTS = ["Describe the image.", "Is there a heart?", "What colour is the star?", "Is there a cross?"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def closed_loop(call: Callable[[int], int], n: int, concurrency: int) -> dict[str, float]:
    """``call(i)`` -> tokens made, from ``concurrency`` threads, ``n`` calls in all."""
    latencies: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            made = call(i)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                tokens.append(made)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"req/s": n / wall, "tok/s": sum(tokens) / wall, "p50 s": statistics.median(latencies),
            "p99 s": pct(latencies, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per caller at each concurrency (min 16 in all)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the replica")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.smoke:
        levels, args.requests, args.new_tokens = [1, 4], 1, 2
    torch.set_num_threads(args.threads)
    print(f"serve_load: {machine()}; demo model, {args.new_tokens} new tokens per request (ignore_eos), "
          f"torch threads {args.threads} (in-process and in the replica)")
    from PIL import Image

    image = Image.open(IMAGE).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    decode = DecodeSpec(max_new_tokens=args.new_tokens, ignore_eos=True)
    sizes = {c: max(4 if args.smoke else 16, c * args.requests) for c in levels}

    engine_results = {}
    with Engine(MODEL) as engine:
        engine.generate([{"prompt": PROMPTS[0], "image": image}], decode=decode)  # warm-up

        def local(i: int) -> int:
            req = {"prompt": PROMPTS[i % len(PROMPTS)], "image": image}
            return len(engine.submit(req, (), decode).result(600).token_ids)

        for c in levels:
            engine_results[c] = closed_loop(local, sizes[c], c)

    from clearsight.workers import app as serve_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = serve_app.ServeConfig(models=[serve_app.ServedModel(name="demo", source=MODEL, threads=args.threads)])
    http_results = {}
    try:
        base = serve_app.start(config, port=port, num_cpus=4)
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

        def remote(i: int) -> int:
            body = {"model": "demo", "max_tokens": args.new_tokens, "ignore_eos": True, "messages": [
                {"role": "user", "content": [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                                             {"type": "image_url", "image_url": {"url": url}}]}]}
            r = client.post(base + "/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        remote(0)  # warm-up
        for c in levels:
            http_results[c] = closed_loop(remote, sizes[c], c)
        client.close()
    finally:
        serve_app.stop()

    keys = ["req/s", "tok/s", "p50 s", "p99 s"]
    print(f"\n{'concurrency':>11} {'requests':>8} | " + " ".join(f"{'engine ' + k:>14}" for k in keys) + " | "
          + " ".join(f"{'http ' + k:>12}" for k in keys) + " | " + " ".join(f"{k + ' ratio':>14}" for k in keys))
    for c in levels:
        e, h = engine_results[c], http_results[c]
        print(f"{c:>11} {sizes[c]:>8} | " + " ".join(f"{e[k]:14.3f}" for k in keys) + " | "
              + " ".join(f"{h[k]:12.3f}" for k in keys) + " | " + " ".join(f"{h[k] / e[k]:13.2f}x" for k in keys))
    print("\nratio = HTTP + Serve / Engine in-process (throughput < 1 and latency > 1: the overhead)")


if __name__ == "__main__":
    main()
