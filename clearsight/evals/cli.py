"""CLI: ``clearsight eval run|pope|chair|crosscheck|mme|amber``, ``clearsight report DIR``, ``clearsight demo``.

Every benchmark command takes ``--limit`` for its size and ``--outputs FILE`` to score outputs generated
elsewhere (JSON lines of sample id and text) with no model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clearsight.cli import extra_command
from clearsight.evals.demo import DEMO_MODELS, N_IMAGES, PARTNER, PER_SPLIT
from clearsight.evals.runner import _tqdm_progress


def _systems(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--system`` values: mitigation specs joined by '+', optionally ``LABEL=`` first ('none' = baseline).

    The text before the first '=' is a label only when it holds no ':' -- in ``var:p=0.4`` (or
    ``var:p=0.4+vhr``) that '=' belongs to a mitigation parameter; ``mine=var:p=0.4`` is labelled."""
    from clearsight.evals.errors import EvalInputError

    raw = args.system or ["none"]
    decode = _decode_overrides(args)
    out = []
    for s in raw:
        label, eq, spec = s.partition("=")
        if not eq or ":" in label:
            label, spec = s, s
        elif not label.strip():
            raise EvalInputError(f"--system {s!r}: the label before '=' is empty: write LABEL={spec} or just {spec}")
        mits = [] if spec.strip() in ("", "none") else [m for m in spec.split("+") if m]
        system: dict[str, Any] = {"name": label, "model": args.model, "backend": args.backend,
                                  "device": args.device, "dtype": args.dtype, "mitigations": mits}
        if decode:
            system["decode"] = decode
        out.append(system)
    return out


def _check_ranges(args: argparse.Namespace) -> None:
    """Whole-number flags out of range: one line naming the flag, before anything is built or written."""
    from clearsight.evals.errors import EvalInputError
    from clearsight.evals.job import MAX_BATCH_SIZE, MAX_NEW_TOKENS

    ranges = {"batch_size": ("--batch-size", MAX_BATCH_SIZE), "max_new_tokens": ("--max-new-tokens", MAX_NEW_TOKENS),
              "limit": ("--limit", None), "n_images": ("--limit", None), "per_split": ("--per-split", None),
              "workers": ("--workers", 1024)}
    for dest, (flag, high) in ranges.items():
        flag = getattr(args, f"_flag_{dest}", None) or flag  # the spelling given (--limit / --n-images)
        value = getattr(args, dest, None)
        if value is None or 1 <= value <= (high or value):
            continue
        allowed = f"from 1 to {high}" if high else "of at least 1"
        raise EvalInputError(f"{flag} {value} is out of range: give a whole number {allowed}")


def _files(values: list[str]) -> dict[str, str]:
    """``--files SPLIT=PATH ...``"""
    from clearsight.evals.errors import EvalInputError

    out: dict[str, str] = {}
    for value in values:
        split, eq, path = value.partition("=")
        if not eq or not split.strip() or not path.strip():
            raise EvalInputError(f"--files: {value!r} is not SPLIT=PATH (e.g. random=coco_pope_random.json): "
                                 "name the split of each file")
        if split.strip() in out:
            raise EvalInputError(f"--files: split {split.strip()!r} is given twice: give one file per split")
        out[split.strip()] = path.strip()
    return out


def _decode_overrides(args: argparse.Namespace) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if args.sample:
        d.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return d


def _run(job_data: dict[str, Any], args: argparse.Namespace) -> int:
    from clearsight.evals.job import parse_job
    from clearsight.evals.runner import run_job

    _check_ranges(args)
    if getattr(args, "outputs", None):
        return _score_file(job_data, args)
    job = parse_job(job_data, where="eval options")
    run_job(job, progress=None if args.no_progress else _tqdm_progress)
    print((Path(job.output) / "report.md").read_text(encoding="utf-8"))
    print(f"results: {Path(job.output).resolve()}")
    return 0


def _score_file(job_data: dict[str, Any], args: argparse.Namespace) -> int:
    """``--outputs FILE``: score another model's outputs (JSON lines of id and text) as one system, no model."""
    from clearsight.evals._io import read_outputs_file
    from clearsight.evals.errors import EvalInputError
    from clearsight.evals.job import parse_job
    from clearsight.evals.runner import score_outputs

    if args.system:
        raise EvalInputError("--outputs scores a file as one system: drop --system (name it with --name)")
    texts = read_outputs_file(args.outputs)
    name = args.name or Path(args.outputs).stem
    bench = job_data["benchmarks"][0]
    if bench["kind"] == "chair":  # exactly the images the file has captions of
        try:
            bench["image_ids"] = sorted(int(k) for k in texts)
        except ValueError:
            raise EvalInputError(f"--outputs {args.outputs}: CHAIR ids are COCO image ids (whole numbers): "
                                 "fix the id of each record") from None
    job_data["systems"] = [{"name": name, "model": f"external:{name}"}]
    job = parse_job(job_data, where="eval options")
    score_outputs(job, {name: texts}, source=str(args.outputs))
    print((Path(job.output) / "report.md").read_text(encoding="utf-8"))
    print(f"results: {Path(job.output).resolve()}")
    return 0


def job_with_overrides(args: argparse.Namespace):
    """The job file with the run flags applied (``--output``, ``--executor``, ``--address``, ``--workers``,
    ``--no-pack``), validated again: a bad flag is one line naming it."""
    from clearsight.evals.job import load_job, parse_job

    job = load_job(args.job)
    update: dict[str, Any] = {}
    if getattr(args, "output", None):
        update["output"] = args.output
    if getattr(args, "executor", None):
        update["executor"] = args.executor
    if getattr(args, "address", None):
        update.update(executor="ray", ray_address=args.address)
    if getattr(args, "workers", None) is not None:
        update["workers"] = args.workers
    if getattr(args, "no_pack", False):
        update["pack"] = False
    return parse_job({**job.model_dump(mode="json"), **update}, where=f"job file '{args.job}' with the flags")


def cmd_eval_run(args: argparse.Namespace) -> int:
    from clearsight.evals.runner import run_job

    job = job_with_overrides(args)
    results = run_job(job, progress=None if args.no_progress else _tqdm_progress, generate_only=args.generate_only)
    if results is not None:
        print((Path(job.output) / "report.md").read_text(encoding="utf-8"))
    print(f"output: {Path(job.output).resolve()}")
    return 0


def cmd_eval_pope(args: argparse.Namespace) -> int:
    from clearsight.evals.datasets.pope import SPLITS

    bench: dict[str, Any] = {"kind": "pope", "parser": args.parser, "limit": args.limit, "splits": args.splits}
    if args.files:
        bench["files"] = _files(args.files)
        bench["image_dir"] = args.image_dir
        bench["data"] = None
        if args.splits is None:  # the splits of the files given
            bench["splits"] = [s for s in SPLITS if s in bench["files"]] or list(bench["files"])
    else:
        bench["data"] = args.data
    if bench["splits"] is None:
        bench["splits"] = list(SPLITS)
    return _run({"systems": _systems(args), "benchmarks": [bench], "output": args.output,
                 "batch_size": args.batch_size}, args)


def _chair_bench(args: argparse.Namespace) -> dict[str, Any]:
    bench: dict[str, Any] = {"kind": "chair", "n_images": args.n_images, "seed": args.image_seed,
                             "max_new_tokens": args.max_new_tokens}
    if args.instances:
        bench.update(data=None, instances=args.instances, captions=args.captions, image_dir=args.image_dir)
    else:
        bench["data"] = args.data
    return bench


def cmd_eval_chair(args: argparse.Namespace) -> int:
    return _run({"systems": _systems(args), "benchmarks": [_chair_bench(args)], "output": args.output,
                 "batch_size": args.batch_size}, args)


def cmd_eval_mme(args: argparse.Namespace) -> int:
    bench: dict[str, Any] = {"kind": "mme", "limit": args.limit, "max_new_tokens": args.max_new_tokens}
    if args.root:
        bench.update(data=None, root=args.root, image_dir=args.image_dir)
    else:
        bench["data"] = args.data
    if args.subsets:
        bench["subsets"] = args.subsets
    return _run({"systems": _systems(args), "benchmarks": [bench], "output": args.output,
                 "batch_size": args.batch_size}, args)


def cmd_eval_amber(args: argparse.Namespace) -> int:
    bench: dict[str, Any] = {"kind": "amber", "limit": args.limit, "parser": args.parser,
                             "max_new_tokens": args.max_new_tokens}
    if args.root:
        bench.update(data=None, root=args.root, image_dir=args.image_dir)
    else:
        bench["data"] = args.data
    if args.parts:
        bench["parts"] = args.parts
    return _run({"systems": _systems(args), "benchmarks": [bench], "output": args.output,
                 "batch_size": args.batch_size}, args)


def cmd_eval_crosscheck(args: argparse.Namespace) -> int:
    benches = [_chair_bench(args), {"kind": "crosscheck", "scorer": args.scorer}]
    return _run({"systems": _systems(args), "benchmarks": benches, "output": args.output,
                 "batch_size": args.batch_size}, args)


def cmd_report(args: argparse.Namespace) -> int:
    from clearsight.evals.errors import EvalInputError
    from clearsight.evals.job import load_job
    from clearsight.evals.runner import score_from_cache

    folder = Path(args.dir)
    if not (folder / "job.json").is_file():
        raise EvalInputError(f"'{folder}' is not an eval output folder (no job.json): pass the folder a run wrote")
    job = load_job(folder / "job.json").model_copy(update={"output": str(folder)})
    score_from_cache(job)
    print((folder / "report.md").read_text(encoding="utf-8"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clearsight.evals.demo import demo_data, demo_job
    from clearsight.evals.runner import run_job

    _check_ranges(args)
    job = demo_job(output=args.out, model=args.model, per_split=args.per_split, n_images=args.n_images,
                   partner=args.partner, executor=args.executor, workers=args.workers)
    print(f"demo: {len(job.systems)} systems on {demo_data(job.systems[0].model)} with {job.systems[0].model} "
          f"(POPE {args.per_split} questions x 3 splits + {args.partner} partner questions, "
          f"CHAIR {args.n_images} images)", file=sys.stderr)
    run_job(job, progress=None if args.no_progress else _tqdm_progress)
    print((Path(job.output) / "report.md").read_text(encoding="utf-8"))
    print(f"report folder: {Path(job.output).resolve()}")
    return 0


def _common(p: argparse.ArgumentParser, output: str) -> None:
    from clearsight.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--system", action="append", default=[],
                   help="a system: mitigations joined by '+', optionally LABEL=..., e.g. none, var:p=0.4, "
                        "var:p=0.4+vhr, mine=var:p=0.4 (repeatable; default: none)")
    p.add_argument("--output", default=output,
                   help="output folder (locked while a run writes into it; a folder with results takes only "
                        "the same benchmarks, adding new systems)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size (1 to 1024)")
    p.add_argument("--sample", action="store_true", help="sample (temperature / top-p / seed) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


class _StoreFlag(argparse.Action):
    """Store the value and which of the option's spellings was given (so an error names that one)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"_flag_{self.dest}", option_string)


def _chair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin:shapes")
    p.add_argument("--instances", nargs="*", default=[], help="COCO instances_*2014.json files (instead of --data)")
    p.add_argument("--captions", nargs="*", default=[], help="COCO captions_*2014.json files")
    p.add_argument("--image-dir", default=None)
    p.add_argument("--limit", "--n-images", dest="n_images", type=int, default=500, action=_StoreFlag,
                   help="images sampled (--n-images is the older name)")
    p.add_argument("--image-seed", type=int, default=0,
                   help="seed of the CHAIR image sample (independent of the sampling --seed)")
    p.add_argument("--max-new-tokens", type=int, default=64)


def _outputs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outputs", default=None,
                   help="score this JSON-lines file of {\"id\": ..., \"text\": ...} generated elsewhere (no model); "
                        "ids are the benchmark's own: image id, question id, subset/image/0|1")
    p.add_argument("--name", default=None, help="with --outputs: the system's name (default: the file's stem)")


def add_run_options(p: argparse.ArgumentParser, cluster_address: bool = True) -> None:
    """The flags that override a job file's run settings (``eval run``, ``eval submit``)."""
    p.add_argument("--output", default=None, help="override the job's output folder")
    p.add_argument("--executor", choices=["local", "ray"], default=None)
    if cluster_address:
        p.add_argument("--address", default=None, help="Ray cluster address to join (implies --executor ray)")
    p.add_argument("--workers", type=int, default=None, help="Ray executor: worker actors (default: the job's, 1)")
    p.add_argument("--no-pack", action="store_true",
                   help="run the systems one after the other instead of as one stream of mixed batches")


_EVAL_COMMANDS: list[Any] = []
# front ends that add `eval` subcommands (e.g. submit / status / logs / stop on Ray Jobs), imported by name
EVAL_COMMAND_PLUGINS = ("clearsight.workers.jobs",)


def eval_command(add: Any) -> Any:
    """Register ``add(eval_subparsers)``: the plug-in point for `eval` subcommands of the layers above."""
    _EVAL_COMMANDS.append(add)
    return add


@extra_command
def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="run benchmarks (POPE, CHAIR, CrossCheck, MME, AMBER) or a whole eval job")
    es = ev.add_subparsers(dest="eval_command", required=True)

    run = es.add_parser("run", help="run an EvalJob file (.toml / .yaml / .json); resumes from its cache")
    run.add_argument("job")
    add_run_options(run)
    run.add_argument("--generate-only", action="store_true", help="fill the cache, do not score")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_eval_run)

    pope = es.add_parser("pope", help="POPE on builtin:shapes or official files")
    _common(pope, "runs/pope")
    pope.add_argument("--data", default="builtin:shapes")
    pope.add_argument("--files", nargs="*", default=[], help="SPLIT=PATH official / SEEM files (instead of --data)")
    pope.add_argument("--image-dir", default=None)
    pope.add_argument("--splits", nargs="*", default=None,
                      help="default: random popular adversarial (with --files: the files' splits)")
    pope.add_argument("--parser", choices=["pope", "negation", "strict"], default="pope")
    pope.add_argument("--limit", type=int, default=None, help="questions per split")
    _outputs_args(pope)
    pope.set_defaults(func=cmd_eval_pope)

    chair = es.add_parser("chair", help="CHAIR captioning hallucination on builtin:shapes or COCO files")
    _common(chair, "runs/chair")
    _chair_args(chair)
    _outputs_args(chair)
    chair.set_defaults(func=cmd_eval_chair)

    cc = es.add_parser("crosscheck", help="CrossCheck ranking of systems from their captions (+ CHAIR)")
    _common(cc, "runs/crosscheck")
    _chair_args(cc)
    cc.add_argument("--scorer", choices=["embedding", "judge", "implicit"], default="embedding")
    cc.set_defaults(func=cmd_eval_crosscheck)

    mme = es.add_parser("mme", help="MME hallucination subsets (existence, count, position, color) on builtin:shapes "
                                    "or the official MME folder")
    _common(mme, "runs/mme")
    mme.add_argument("--data", default="builtin:shapes")
    mme.add_argument("--root", default=None, help="the MME_Benchmark_release_version folder (instead of --data)")
    mme.add_argument("--image-dir", default=None, help="where the images are, if not beside the questions")
    mme.add_argument("--subsets", nargs="*", default=None, help="default: existence count position color")
    mme.add_argument("--limit", type=int, default=None, help="images per subset (2 questions each)")
    mme.add_argument("--max-new-tokens", type=int, default=8)
    _outputs_args(mme)
    mme.set_defaults(func=cmd_eval_mme)

    amber = es.add_parser("amber", help="AMBER generative (CHAIR, Cover, Hal, Cog) and discriminative parts on "
                                        "builtin:shapes or the official AMBER files")
    _common(amber, "runs/amber")
    amber.add_argument("--data", default="builtin:shapes")
    amber.add_argument("--root", default=None, help="the AMBER repository's data folder (instead of --data)")
    amber.add_argument("--image-dir", default=None, help="the AMBER images (with --root)")
    amber.add_argument("--parts", nargs="*", default=None, help="default: generative discriminative")
    amber.add_argument("--parser", choices=["amber", "pope", "negation", "strict"], default="amber",
                       help="yes/no rule (amber: the official exact 'Yes' / 'No')")
    amber.add_argument("--limit", type=int, default=None, help="queries per part")
    amber.add_argument("--max-new-tokens", type=int, default=64, help="generative part")
    _outputs_args(amber)
    amber.set_defaults(func=cmd_eval_amber)

    import importlib

    for module in EVAL_COMMAND_PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a front end not installed: its commands are absent
            if exc.name is None or not module.startswith(exc.name):
                raise
    for add in dict.fromkeys(_EVAL_COMMANDS):
        add(es)

    rep = sub.add_parser("report", help="re-score an eval output folder from its cache (no model) and print it")
    rep.add_argument("dir")
    rep.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="the main job: POPE + CHAIR of the demo model, unmitigated and mitigated")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--model", default=None,
                      help=f"default: the first installed of {', '.join(DEMO_MODELS)} (each on its own world)")
    demo.add_argument("--per-split", type=int, default=PER_SPLIT, help="POPE questions per split")
    demo.add_argument("--n-images", type=int, default=N_IMAGES, help="CHAIR images")
    demo.add_argument("--partner", type=int, default=PARTNER,
                      help="questions about the absent partner of a present shape (plus a control-absent and a "
                           "present question per scene)")
    demo.add_argument("--executor", choices=["local", "ray"], default="local",
                      help="local (one process) or ray (a local Ray with --workers worker processes)")
    demo.add_argument("--workers", type=int, default=1, help="with --executor ray: worker processes")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)
