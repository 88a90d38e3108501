"""The ``clearsight`` command line (also ``python -m clearsight``).

Every user error ends as one line on stderr (``error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from clearsight.config import DEFAULT_MODEL  # the demo model: one default for the CLI and eval jobs

_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def extra_command(add: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
    """Let other layers (evals, workers, dashboard) add subcommands without editing this file's parser."""
    _EXTRA_COMMANDS.append(add)
    return add


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def decode_spec_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from clearsight.config import DecodeSpec
    from clearsight.errors import InputError, pydantic_message

    try:
        return DecodeSpec(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    except ValidationError as exc:
        raise InputError(pydantic_message(exc, "decoding options")) from None


def add_model_arguments(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=default,
                   help="local path, cached HF id, or builtin:<name> (default: %(default)s)")
    p.add_argument("--backend", default=None, help="attention backend: torch | reference | triton | sdpa")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])


def model_spec_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from clearsight.config import ModelSpec
    from clearsight.errors import InputError, pydantic_message

    try:
        return ModelSpec(source=args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    except ValidationError as exc:
        raise InputError(pydantic_message(exc, "model")) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from clearsight.config import GenerationRequest
    from clearsight.decoding.generate import as_request, check_context
    from clearsight.engine import Engine
    from clearsight.mitigations import parse_mitigations
    from clearsight.models.loader import load_model

    decode = decode_spec_from_args(args)
    mitigations = parse_mitigations(args.mitigation)  # validate before loading anything
    request: GenerationRequest = as_request({"prompt": args.prompt, "image": args.image})
    if args.image is not None:
        from clearsight.decoding.generate import load_image

        load_image(args.image, "--image")
    lvlm = load_model(model_spec_from_args(args))
    adapter = lvlm.adapter  # the prompt's text tokens against the context, before the engine starts
    check_context(lvlm, 0, adapter.count_tokens(adapter.chat_prompt(request.prompt, request.image is not None)),
                  decode, at_least=request.image is not None)
    with Engine(lvlm, max_requests=1) as engine:  # one request; the engine is the one code path that runs models
        if args.stream and not args.json:
            for event in engine.stream([request], mitigations, decode):
                print(event.text, end="", flush=True)
            print()
            return 0
        result = engine.generate([request], mitigations, decode)[0]
        backend = engine.backend
    if args.json:
        _print_json({**result.to_dict(), "model": lvlm.spec.source, "backend": backend,
                     "decode": decode.model_dump()})
    else:
        print(result.text)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from clearsight.mitigations.compat import compatibility_matrix, matrix_markdown
    from clearsight.models.adapters import ADAPTERS, capabilities
    from clearsight.models.loader import describe_builtins

    info = {
        "builtins": describe_builtins(),
        "adapters": [{"family": a.family, "classes": [c.__name__ for c in a.model_classes], "doc": (a.__doc__ or "")
                      .strip().splitlines()[0], "capabilities": capabilities(a)} for a in ADAPTERS],
        "matrix": compatibility_matrix(),
    }
    if args.json:
        _print_json(info)
        return 0
    print("Builtin models:")
    for b in info["builtins"]:
        print(f"  {b['name']:<26} {b['description']}")
    print("\nSupported families (load any checkpoint of these classes from a local path or the HF cache):")
    for a in info["adapters"]:
        print(f"  {a['family']:<16} {', '.join(a['classes'])}: {a['doc']}")
    if args.matrix:
        print("\nCompatibility (mitigation x family; yes, or why it is refused):")
        print(matrix_markdown())
    return 0


def cmd_mitigations(args: argparse.Namespace) -> int:
    from clearsight.mitigations import describe_mitigations

    info = describe_mitigations()
    if args.json:
        _print_json(info)
        return 0
    for m in info:
        print(f"{m['name']} ({m['kind']}): {m['summary']}")
        for p in m["parameters"]:
            desc = f"  {p['description']}" if p["description"] else ""
            print(f"    {p['name']} = {p['default']!r} ({p['type']}){desc}")
    print("\nUse as --mitigation NAME or --mitigation NAME:key=value,key=value (lists as a|b|c).")
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with the project's error shape: one `error: ...` line naming the argument, exit status 2
    (argparse's own prints the whole usage block first). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from clearsight import __version__

    parser = OneLineErrorParser(prog="clearsight", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"clearsight {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt about one image")
    g.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--mitigation", "-m", action="append", default=[],
                   help="mitigation, e.g. var or var:p=0.4 (repeatable; see `clearsight mitigations`)")
    g.add_argument("--json", action="store_true", help="print the full result as JSON")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_model_arguments(g)
    add_decode_arguments(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list builtin models and supported model families")
    m.add_argument("--json", action="store_true")
    m.add_argument("--matrix", action="store_true", help="also print which mitigation runs on which family")
    m.set_defaults(func=cmd_models)

    mi = sub.add_parser("mitigations", help="list mitigations with their parameters and defaults")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(func=cmd_mitigations)

    _load_extra_commands()
    for add in _EXTRA_COMMANDS:
        add(sub)
    return parser


def _load_extra_commands() -> None:
    import importlib

    for module in ("clearsight.evals.cli", "clearsight.workers.cli", "clearsight.dashboard.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise


def main(argv: Sequence[str] | None = None) -> int:
    from clearsight.errors import ClearsightError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClearsightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
