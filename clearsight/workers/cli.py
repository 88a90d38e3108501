"""``clearsight serve``: the models on Ray Serve behind the OpenAI-compatible HTTP API.

Registered with ``clearsight.cli.extra_command`` (cli.py loads this module by name); Ray is imported only
when the command runs, so ``clearsight --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os

from clearsight.cli import extra_command
from clearsight.config import DEFAULT_MODEL
from clearsight.errors import InputError


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from clearsight.errors import pydantic_message

    if not 0 < args.port < 65536:
        raise InputError(f"--port: {args.port} is not a TCP port: give 1 to 65535")
    for text in args.model or ():
        name, _, source = text.partition("=") if "=" in text else (text, "", text)
        if not text.strip() or not source.strip() or not name.strip():
            raise InputError(f"--model: {text!r} is incomplete: give SOURCE or NAME=SOURCE (e.g. "
                             f"--model {DEFAULT_MODEL} or --model demo={DEFAULT_MODEL})")
    api_key = args.api_key if args.api_key is not None else os.environ.get("CLEARSIGHT_API_KEY") or None
    limits = {k: v for k, v in (("max_tokens", args.max_tokens), ("max_prompt_tokens", args.max_prompt_tokens))
              if v is not None}
    if "max_tokens" in limits:
        limits["default_max_tokens"] = min(64, limits["max_tokens"])
    try:
        from clearsight.workers.app import config_from  # imports ray: only now

        config = config_from(args.model or [DEFAULT_MODEL], replicas=args.replicas, max_replicas=args.max_replicas,
                             gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                             device=args.device, backend=args.backend, threads=args.threads, api_key=api_key,
                             limits=limits, image_url_allow=args.allow_image_url)
    except ValidationError as exc:
        message = pydantic_message(exc, "serve options")
        for field in ("replicas", "max_replicas", "gpus_per_replica", "cpus_per_replica", "threads", "max_tokens",
                      "max_prompt_tokens", "api_key", "device", "backend"):  # name the flag, not the field
            message = message.replace(f" {field}: ", f" --{field.replace('_', '-')}: ")
        raise InputError(message.replace("models: ", "--model: ")) from None
    from clearsight.workers.app import run_server

    return run_server(config, host=args.host, port=args.port, address=args.address)


@extra_command
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API (Ray Serve)",
                       description="Serve models on Ray Serve behind an OpenAI-compatible HTTP API "
                       "(docs/serving.md). Starts a local Ray in this process unless --address is given.")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]SOURCE",
                   help=f"a model to serve, named NAME (default: its source); repeatable (default: {DEFAULT_MODEL})")
    p.add_argument("--replicas", type=int, default=1, help="replicas per model (each one Engine)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale each model between --replicas and this many replicas (default: fixed)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (0 on CPU; 0.5 shares one)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, ray://host:10001); default: start a local Ray in-process")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /healthz "
                   "(default: $CLEARSIGHT_API_KEY)")
    p.add_argument("--device", default=None, help="model device (default: cuda with GPUs per replica, else cpu)")
    p.add_argument("--backend", default=None, help="attention backend: torch | reference | triton | sdpa")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask (default 1024)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt, image tokens included")
    p.add_argument("--allow-image-url", action="append", default=[], metavar="PREFIX",
                   help="also read image URLs starting with PREFIX (e.g. file:///data/images/); "
                   "default: data URLs only")
    p.set_defaults(func=cmd_serve)
