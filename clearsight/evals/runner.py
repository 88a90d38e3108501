"""Run an EvalJob: generate (cached, resumable) -> score (pure, no model) -> report.

The generation cache (``<output>/generations.jsonl``) is keyed by a stable hash of the system
(model identity, mitigation parameters, decode spec) and the sample (benchmark, split, id, prompt),
flushed per record. A killed run loses at most the record being written and a rerun skips what is
cached, so restarting a job finishes it with the same cache and metrics as an uninterrupted run.

The output folder (see ``run_job``): everything is validated and prepared before anything is written;
the run holds the folder's lock (``clearsight.evals.outdir``) from its first write to its last;
``job.json`` is written (atomically) once the cache holds every generation it names, so ``clearsight
report`` of a folder always finds what it needs. A folder that holds another job's ``job.json`` takes
only the same benchmarks: new systems are added to it, a system of the same name must have the same
settings, anything else is refused before the run starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearsight.evals._io import atomic_write_bytes, atomic_write_text
from clearsight.evals.cache import GenerationCache
from clearsight.evals.datasets.pope import PopeFile, PopeSet, build_prompt, get_parser, load_pope_file
from clearsight.evals.datasets.pope import score_pope as _score_pope
from clearsight.evals.datasets.shapes import resolve_builtin
from clearsight.evals.errors import EvalInputError
from clearsight.evals.executor import Executor, LocalExecutor, Task, WorkItem, make_executor
from clearsight.evals.job import ChairBenchmark, CrossCheckBenchmark, EvalJob, PopeBenchmark, SystemSpec, load_job
from clearsight.evals.metrics.chair import (
    ChairVocabulary,
    build_ground_truth,
    compute_chair,
    sample_image_ids,
)
from clearsight.evals.metrics.crosscheck import (
    IMPLICIT_PROMPT,
    Correlation,
    CrossCheckResult,
    EmbeddingScorer,
    PromptJudgeScorer,
    aggregate_sample,
    aggregate_system,
    correlate,
    crosscheck_explicit,
    implicit_answer_to_score,
    rank_systems,
    split_sentences,
)
from clearsight.evals.metrics.partner import (
    PartnerQuestion,
    load_partner_file,
    partner_map,
    score_partner,
    take_partner_questions,
)
from clearsight.evals.outdir import check_output_path, output_lock
from clearsight.evals.progress import ProgressFile
from clearsight.evals.report import DataFile, EvalResults, SystemResult, write_report
from clearsight.evals.stats import Measure, chair_measures, compute_stats, partner_measures, pope_measures

ProgressFactory = Callable[[int, str], Any]


# ------------------------------------------------------------------------------------------- data
@dataclass
class PreparedPope:
    bench: PopeBenchmark
    sets: dict[str, PopeSet]
    items: list[WorkItem]
    where: dict[str, tuple[str, Any]]  # sample id -> (split, question id)
    images: dict[Path, bytes] = field(default_factory=dict)  # parquet images, written by Prepared.materialize
    partner: list[PartnerQuestion] = field(default_factory=list)  # the shapes world's partner question set
    partner_file: PopeFile | None = None


@dataclass
class PreparedChair:
    bench: ChairBenchmark
    vocab: ChairVocabulary
    image_ids: list[int]
    items: list[WorkItem]
    image_of: dict[str, int]  # sample id -> image id
    instances: list[str]
    captions: list[str]
    ground_truth: dict[int, set[str]] = field(default_factory=dict)
    partners: dict[str, str] | None = None  # shape -> partner, where the world knows them (the shapes world)


def _prompt_tag(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:10]


def prepare_pope(bench: PopeBenchmark, output: Path) -> PreparedPope:
    """Load and check the questions; writes nothing (parquet images are kept for ``Prepared.materialize``)."""
    if bench.parquet and not bench.files:
        image_dir = output / "pope_images"
        sets, images = _parquet_sets(bench, image_dir)
        prep = _prepare_pope_sets(bench, sets, image_dir)
        prep.images = images
        return prep
    if bench.files:
        sets = {s: load_pope_file(bench.files[s], split=s, image_dir=bench.image_dir) for s in bench.splits}
        image_dir = Path(bench.image_dir) if bench.image_dir else None
    else:
        world = resolve_builtin(bench.data or "builtin:shapes")
        sets = {s: load_pope_file(world.pope[s], split=s, image_dir=world.images_dir) for s in bench.splits}
        image_dir = world.images_dir
        prep = _prepare_pope_sets(bench, sets, image_dir)
        if bench.partner:
            _add_partner(prep, world.partner, image_dir)
        return prep
    return _prepare_pope_sets(bench, sets, image_dir)


PARTNER_SET = "partner"


def _add_partner(prep: PreparedPope, path: Path, image_dir: Path) -> None:
    """The partner question set (issue 16): beside the official splits, under sample ids of its own."""
    bench = prep.bench
    questions, pfile = load_partner_file(path)
    chosen = take_partner_questions(questions, bench.partner)
    have = sum(q.kind == "partner" for q in chosen)
    if have < bench.partner:
        raise EvalInputError(f"pope partner = {bench.partner} but the world holds only {have} partner questions "
                             f"({path}): lower partner")
    prep.partner, prep.partner_file = chosen, pfile
    for pq in chosen:
        q = pq.question
        prompt = build_prompt(q.text, bench.prompt_suffix)
        sid = f"pope/{PARTNER_SET}/{q.question_id}/{_prompt_tag(prompt)}"
        prep.items.append(WorkItem(sid, prompt, str(image_dir / q.image), bench.max_new_tokens))
        prep.where[sid] = (PARTNER_SET, q.question_id)


def _parquet_sets(bench: PopeBenchmark, image_dir: Path) -> tuple[dict[str, PopeSet], dict[Path, bytes]]:
    """lmms-lab/POPE parquet: the embedded images are written once beside the results, named by image."""
    from clearsight.evals.datasets.pope import load_pope_parquet

    loaded = load_pope_parquet(bench.parquet)
    missing = [s for s in bench.splits if s not in loaded]
    if missing:
        raise EvalInputError(f"parquet files {bench.parquet[0]}...: no questions of split {missing[0]!r}; "
                             f"they hold {', '.join(sorted(loaded))}")
    images: dict[Path, bytes] = {}
    for s in bench.splits:
        for q in loaded[s].questions:
            if q.image_bytes is None:
                raise EvalInputError(f"parquet question {q.question_id!r} has no embedded image bytes")
            images[image_dir / q.image] = q.image_bytes
    return {s: loaded[s] for s in bench.splits}, images


def _prepare_pope_sets(bench: PopeBenchmark, sets: dict[str, PopeSet], image_dir: Path | None) -> PreparedPope:
    items, where = [], {}
    for split, pset in sets.items():
        if not pset.questions:
            raise EvalInputError(f"POPE split {split!r} has no questions: the file {pset.files[0].path} is empty")
        if bench.limit is not None:
            pset.questions = pset.questions[: bench.limit]
        for q in pset.questions:
            prompt = build_prompt(q.text, bench.prompt_suffix)
            sid = f"pope/{split}/{q.question_id}/{_prompt_tag(prompt)}"
            image = str(image_dir / q.image) if image_dir is not None else q.image
            items.append(WorkItem(sid, prompt, image, bench.max_new_tokens))
            where[sid] = (split, q.question_id)
    return PreparedPope(bench, sets, items, where)


def prepare_chair(bench: ChairBenchmark) -> PreparedChair:
    if bench.data and not bench.instances:
        world = resolve_builtin(bench.data)
        instances, captions, image_dir = [str(world.instances)], [str(world.captions)], world.images_dir
        vocab = ChairVocabulary.load(bench.vocabulary or world.vocabulary)
        partners = partner_map(world.spec.partner_pairs)
    else:
        instances, captions = list(bench.instances), list(bench.captions)
        partners = None
        image_dir = Path(bench.image_dir or ".")
        vocab = ChairVocabulary.load(bench.vocabulary) if bench.vocabulary else ChairVocabulary.coco()
    ids = sample_image_ids(instances[0], n=bench.n_images, seed=bench.seed)
    files = _image_files(instances)
    items, image_of = [], {}
    for image_id in ids:
        path = image_dir / files[image_id]
        if not path.is_file():
            raise EvalInputError(f"CHAIR image {path} (id {image_id}) does not exist: check image_dir")
        sid = f"chair/{image_id}/{_prompt_tag(bench.prompt)}"
        items.append(WorkItem(sid, bench.prompt, str(path), bench.max_new_tokens))
        image_of[sid] = image_id
    return PreparedChair(bench, vocab, ids, items, image_of, instances, captions, partners=partners)


def _image_files(instance_files: Sequence[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for f in instance_files:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
        out.update({int(im["id"]): im["file_name"] for im in data.get("images", [])})
    return out


# ------------------------------------------------------------------------------------------- keys
def model_identity(system: SystemSpec) -> str:
    """What identifies the weights, computed without loading them (so scoring needs no model)."""
    from clearsight import __version__

    src = system.model
    if src == "builtin:shapes-llava":  # shipped weights: a retrained checkpoint must not reuse old generations
        from clearsight.models.shipped import shapes_llava_path

        return f"{src}#{_folder_hash(shapes_llava_path(), contents=True)}"
    if src.startswith("builtin:"):  # built in code, seeded: the version identifies them
        return f"{src}@clearsight-{__version__}"
    path = Path(src).expanduser()
    if (path / "config.json").is_file():
        return f"{path.resolve()}#{_folder_hash(path)}"
    return src


def _folder_hash(path: Path, contents: bool = False) -> str:
    """config.json plus each safetensors file's name and content digest (small shipped files: their bytes).

    The digest is of the contents, not the size: a fine-tuned checkpoint has the sizes of its base model, and
    reusing the base model's generations for it would be silently wrong. Cached by the files' names, sizes and
    modification times: a job asks once per system and stage, and a process hashes each file once."""
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    return _hash_files(tuple((str(f), st.st_size, st.st_mtime_ns) for f in files if (st := f.stat())), contents)


@functools.lru_cache(maxsize=32)
def _hash_files(files: tuple[tuple[str, int, int], ...], contents: bool) -> str:
    (config, _, _), *weights = files
    h = hashlib.sha256(Path(config).read_bytes())
    for name, _, _ in weights:
        h.update(Path(name).read_bytes() if contents else f"{Path(name).name}:{_file_digest(Path(name))}".encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    """sha256 of a file. A Hugging Face cache snapshot links each weights file to a blob named by its sha256
    (the git-LFS object id), so that name is used and nothing is read; else the file is read once (about
    1 GB/s: 10 s for a 7B model in float16, once per process)."""
    target = path.resolve()
    if len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    h = hashlib.sha256()
    with open(target, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# transformers' own attention: it runs no AttentionPlan, so the mitigations that edit attention do nothing
# there and the outputs differ from the plan-running backends' (reference / torch / triton, equal to float
# rounding: tests/kernels): such a backend is part of the key, the others are not (docs/evals.md)
STOCK_BACKENDS = ("sdpa", "eager")


def system_config(system: SystemSpec, max_new_tokens: int) -> dict[str, Any]:
    decode = system.decode_for(max_new_tokens).model_dump(mode="json")  # no batch size: it is not a decoding option
    config = {"model": model_identity(system), "dtype": system.dtype, "mitigations": system.mitigation_config(),
              "decode": decode}
    if system.backend in STOCK_BACKENDS:
        config["backend"] = system.backend
    return config


# ------------------------------------------------------------------------------------------- run
@dataclass
class Prepared:
    pope: PreparedPope | None = None
    chair: PreparedChair | None = None
    crosscheck: CrossCheckBenchmark | None = None

    @property
    def items(self) -> list[WorkItem]:
        return [*(self.pope.items if self.pope else []), *(self.chair.items if self.chair else [])]

    def materialize(self) -> None:
        """Write what preparing found but did not write (parquet images), each file atomically, once."""
        for target, data in (self.pope.images if self.pope else {}).items():
            if not target.exists():
                atomic_write_bytes(target, data)


def prepare(job: EvalJob) -> Prepared:
    prep = Prepared()
    for bench in job.benchmarks:
        if isinstance(bench, PopeBenchmark):
            prep.pope = prepare_pope(bench, Path(job.output))
        elif isinstance(bench, ChairBenchmark):
            prep.chair = prepare_chair(bench)
        else:
            prep.crosscheck = bench
    return prep


def _tqdm_progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)


def _configs(system: SystemSpec, items: Sequence[WorkItem]) -> dict[int, dict[str, Any]]:
    """The system's cache config per distinct max_new_tokens (reads the model's config once, not per sample)."""
    return {n: system_config(system, n) for n in {it.max_new_tokens for it in items}}


def pending_work(job: EvalJob, prep: Prepared, cache: GenerationCache) -> dict[str, list[WorkItem]]:
    out = {}
    items = prep.items
    for system in job.systems:
        configs = _configs(system, items)
        out[system.label] = [it for it in items if not cache.has(configs[it.max_new_tokens], it.sample_id)]
    return out


def generate_stage(job: EvalJob, prep: Prepared, cache: GenerationCache, executor: Executor,
                   progress: ProgressFactory | None = _tqdm_progress) -> int:
    """Generate what the cache lacks; returns the number of new records.

    Packed (``job.pack``, the default): every pending task of every system goes to the executor in one
    call, one stream per model: no pass drains before the next starts, and requests of different
    systems share batches wherever the stream moves on. Ordered system by system, longest outputs first
    within a system, rather than sample by sample: on CPU a batch mixing many systems' mitigations ran
    1.5x slower per request than batches of one system (measured, docs/evals.md). Unpacked: one call per
    system and max_new_tokens. The records are the same either way; this process is the only writer of
    the cache."""
    todo = pending_work(job, prep, cache)
    total = sum(len(v) for v in todo.values())
    labels = {s.label for s in job.systems}
    totals = {label: len(prep.items) for label in labels}
    tracker = ProgressFile(job.output, totals, {k: totals[k] - len(v) for k, v in todo.items()},
                           executor=job.executor)
    bar = progress(total, "generate") if progress and total else None
    written = 0
    configs: dict[tuple[str, int], dict[str, Any]] = {}
    tasks: list[Task] = []
    for system in job.systems:
        for it in todo[system.label]:
            if (system.label, it.max_new_tokens) not in configs:
                configs[(system.label, it.max_new_tokens)] = system_config(system, it.max_new_tokens)
            tasks.append(Task(system, system.decode_for(it.max_new_tokens), it))

    def on_result(task: Task, record: dict[str, Any]) -> None:
        nonlocal written
        label = task.system.label
        output = record.pop("output")
        if cache.put(configs[(label, task.item.max_new_tokens)], task.item.sample_id, output, system_name=label,
                     **record):
            written += 1
        tracker.add(label)  # also when another system of the same config (e.g. another backend) wrote it first
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

    try:
        if job.pack:
            rank = {s.label: i for i, s in enumerate(job.systems)}
            tasks.sort(key=lambda t: (rank[t.system.label], -t.item.max_new_tokens))  # stable: sample order kept
            if tasks:
                executor.generate_tasks(tasks, on_result)
        else:
            groups: dict[tuple[str, int], list[Task]] = {}
            for t in tasks:
                groups.setdefault((t.system.label, t.item.max_new_tokens), []).append(t)
            for group in groups.values():
                executor.generate_tasks(group, on_result)
    except BaseException:
        tracker.set_state("failed")
        raise
    finally:
        if bar is not None:
            bar.close()
    tracker.set_state("scoring")
    return written


def run_job(job: EvalJob, executor: Executor | None = None, progress: ProgressFactory | None = _tqdm_progress,
            generate_only: bool = False) -> EvalResults | None:
    """Generate (resuming from the cache), score and write the report into ``job.output``.

    Validates and prepares everything before writing anything; holds the output folder's lock for the
    run (a second run into the folder is refused with ``FolderInUseError``); writes ``job.json`` once
    the cache holds every generation of the job. When the folder already holds a job, this job is merged
    into it (see ``merge_with_folder``) and the results cover the merged job's systems.
    """
    out = check_output_path(job.output)
    prep = prepare(job)
    with output_lock(out):
        job = merge_with_folder(job, out)
        prep.materialize()
        cache = GenerationCache(out / "generations.jsonl")
        own = executor is None
        executor = executor or make_executor(job)
        try:
            generate_stage(job, prep, cache, executor, progress)
            atomic_write_text(out / "job.json", job.model_dump_json(indent=2))
            if generate_only:
                ProgressFile.finish(out)
                return None
            results = score_job(job, prep, cache, executor if isinstance(executor, LocalExecutor) else None)
        finally:
            if own:
                executor.close()
        write_report(results, out)
        ProgressFile.finish(out)
    return results


def _system_identity(system: SystemSpec) -> dict[str, Any]:
    """What makes a system's outputs: two systems of one name must agree on it to share a folder."""
    decode = system.decode_for(1).model_dump(mode="json")
    return {"model": system.model, "dtype": system.dtype, "mitigations": system.mitigation_config(),
            "decode": decode}


def _benchmark_difference(old: Sequence[Any], new: Sequence[Any]) -> str:
    old_d = [b.model_dump(mode="json") for b in old]
    new_d = [b.model_dump(mode="json") for b in new]
    old_kinds, new_kinds = [b["kind"] for b in old_d], [b["kind"] for b in new_d]
    if old_kinds != new_kinds:
        return f"it has {', '.join(old_kinds)}, this run {', '.join(new_kinds)}"
    for a, b in zip(old_d, new_d):
        for key in a:
            if a[key] != b.get(key):
                return f"{a['kind']} {key} is {json.dumps(a[key])} there, {json.dumps(b.get(key))} here"
    return "they differ"


def merge_with_folder(job: EvalJob, out: Path) -> EvalJob:
    """The job to run in ``out``: ``job`` itself, or the folder's job with ``job``'s systems added.

    Policy: a folder holds one set of benchmarks. A run with the same benchmarks resumes it and adds
    its new systems (the report then covers all of them); a system whose name is already there must have
    the same model, dtype, mitigations and decode settings (device and backend may change). Different
    benchmarks, a renamed-in-place system or an unreadable ``job.json`` are refused, with nothing written.
    """
    path = out / "job.json"
    if not path.exists():
        return job
    try:
        old = load_job(path)
    except EvalInputError as exc:
        raise EvalInputError(f"output folder '{out}' has a job.json that is not a valid job ({exc}): "
                             "choose another --output") from None
    if [b.model_dump(mode="json") for b in old.benchmarks] != [b.model_dump(mode="json") for b in job.benchmarks]:
        raise EvalInputError(f"output folder '{out}' holds the results of other benchmarks "
                             f"({_benchmark_difference(old.benchmarks, job.benchmarks)}): run the same benchmarks "
                             "to add systems to it, or choose another --output")
    new = {s.label: s for s in job.systems}
    systems = []
    for s in old.systems:
        mine = new.pop(s.label, None)
        if mine is not None and _system_identity(mine) != _system_identity(s):
            theirs, here = _system_identity(s), _system_identity(mine)
            what = next(k for k in theirs if theirs[k] != here[k])
            verb = "differ" if what.endswith("s") else "differs"
            raise EvalInputError(f"output folder '{out}' already has a system {s.label!r} whose {what} {verb}: "
                                 "give this one another name (--system LABEL=...) or choose another --output")
        systems.append(mine or s)
    systems += list(new.values())
    return EvalJob.model_validate({**job.model_dump(mode="json"), "systems": [s.model_dump(mode="json")
                                                                             for s in systems]})


# ------------------------------------------------------------------------------------------- score
def _outputs(cache: GenerationCache, system: SystemSpec, items: Sequence[WorkItem]) -> dict[str, str]:
    got = {}
    missing = 0
    configs = _configs(system, items)
    for it in items:
        rec = cache.get(configs[it.max_new_tokens], it.sample_id)
        if rec is None:
            missing += 1
        else:
            got[it.sample_id] = rec["output"]
    if missing:
        raise EvalInputError(f"system {system.label!r}: {missing} of {len(items)} samples have no cached output in "
                             f"{cache.path}; run the generation stage (clearsight eval run) first")
    return got


def score_job(job: EvalJob, prep: Prepared, cache: GenerationCache,
              model_source: LocalExecutor | None = None) -> EvalResults:
    """Score every system from the cache. Needs no model, except the judge / implicit CrossCheck scorers."""
    systems: list[SystemResult] = []
    data_files: list[DataFile] = []
    captions_by_system: dict[str, dict[int, str]] = {}
    if prep.pope:
        for pset in prep.pope.sets.values():
            data_files += [DataFile.from_pope(f) for f in pset.files]
        if prep.pope.partner_file is not None:
            f = prep.pope.partner_file
            data_files.append(DataFile(path=f.path, sha256=f.sha256, n=len(prep.pope.partner), split=PARTNER_SET,
                                       layout=f.layout))
    # per-sample outcomes, for the statistics: split -> system -> parsed answers (question order)
    pope_preds: dict[str, dict[str, list[Any]]] = {}
    chair_rows: dict[str, list[dict[str, Any]]] = {}
    if prep.chair:
        from clearsight.evals._io import sha256_file

        for f in prep.chair.instances + prep.chair.captions:
            data_files.append(DataFile(path=f, sha256=sha256_file(f), n=len(prep.chair.image_ids), layout="coco"))
        prep.chair.ground_truth = build_ground_truth(
            prep.chair.instances, prep.chair.captions, prep.chair.vocab, prep.chair.image_ids,
            cache_path=Path(job.output) / "chair_ground_truth.json")
    for system in job.systems:
        decode = system.decode_for(1).model_dump(mode="json", exclude={"max_new_tokens"})
        decode["batch_size"] = job.batch_size  # the batch size the run used (the executor's), not a default
        res = SystemResult(name=system.label, config={"model": system.model, "mitigations": system.mitigations},
                           decode=decode)
        if prep.pope:
            outs = _outputs(cache, system, prep.pope.items)
            answers: dict[str, dict[Any, str]] = {s: {} for s in [*prep.pope.sets, PARTNER_SET]}
            for sid, text in outs.items():
                split, qid = prep.pope.where[sid]
                answers[split][qid] = text
            partner_answers = answers.pop(PARTNER_SET)
            parser = prep.pope.bench.parser
            res.pope = _score_pope(prep.pope.sets, answers, parser=parser)
            parse = get_parser(parser)
            for split, pset in prep.pope.sets.items():
                pope_preds.setdefault(split, {})[system.label] = [parse(answers[split][q.question_id])
                                                                  for q in pset.questions]
            if prep.pope.partner:
                res.partner, preds = score_partner(prep.pope.partner, partner_answers, parser=parser)
                pope_preds.setdefault(PARTNER_SET, {})[system.label] = preds
        if prep.chair:
            outs = _outputs(cache, system, prep.chair.items)
            caps = {prep.chair.image_of[sid]: text for sid, text in outs.items()}
            captions_by_system[system.label] = caps
            res.chair = compute_chair(sorted(caps.items()), prep.chair.ground_truth, prep.chair.vocab,
                                      drop_incomplete=prep.chair.bench.drop_incomplete)
            chair_rows[system.label] = res.chair.per_caption
        systems.append(res)
    results = EvalResults(
        systems=systems, data_files=data_files,
        pope_parser=prep.pope.bench.parser if prep.pope else None,
        chair_image_ids=prep.chair.image_ids if prep.chair else None,
        chair_seed=prep.chair.bench.seed if prep.chair else None,
        notes={"decode": {s.label: s.decode_for(1).describe().split(",")[0] for s in job.systems}},
    )
    results.stats = compute_stats(_measures(prep, pope_preds, chair_rows), [s.label for s in job.systems],
                                  job.baseline_label, job.stats)
    from clearsight.evals.verdict import cannot_act

    results.notes["cannot_act"] = {s.label: why for s in job.systems if (why := cannot_act(s))}
    if prep.crosscheck and prep.chair:
        models = model_source or LocalExecutor(batch_size=job.batch_size)
        try:
            results.crosscheck = run_crosscheck(job, prep, captions_by_system, models)
        finally:
            if model_source is None:
                models.close()
        results.correlations = _correlations(results)
    return results


def _measures(prep: Prepared, pope_preds: Mapping[str, Mapping[str, list[Any]]],
              chair_rows: Mapping[str, list[dict[str, Any]]]) -> list[Measure]:
    """What the statistics are computed over: every metric's per-sample values, per system."""
    out: list[Measure] = []
    if prep.pope:
        for split, pset in prep.pope.sets.items():
            out += pope_measures(split, [q.label or "no" for q in pset.questions], pope_preds[split])
        if prep.pope.partner:
            out += partner_measures([q.kind for q in prep.pope.partner], pope_preds[PARTNER_SET])
    if prep.chair and chair_rows:
        out += chair_measures(chair_rows, prep.chair.partners)
    return out


def _correlations(results: EvalResults) -> list[Correlation]:
    assert results.crosscheck is not None
    scores = results.crosscheck.scores
    out = []
    refs = {"CHAIR_i": {s.name: s.chair.chair_i for s in results.systems if s.chair},
            "POPE mean F1": {s.name: s.pope.mean_f1 for s in results.systems if s.pope}}
    for name, ref in refs.items():
        if len(ref) >= 2 and len(set(ref.values())) > 1 and len(set(scores.values())) > 1:
            out.append(correlate(scores, ref, name))
    return out


def run_crosscheck(job: EvalJob, prep: Prepared, captions: Mapping[str, Mapping[int, str]],
                   models: LocalExecutor) -> CrossCheckResult:
    bench = prep.crosscheck
    assert bench is not None and prep.chair is not None
    ids = sorted(next(iter(captions.values())))
    if bench.max_samples:
        ids = ids[: bench.max_samples]
    outputs = {name: {i: caps[i] for i in ids} for name, caps in captions.items()}
    if bench.scorer == "embedding":
        from clearsight.evals.embedding import minilm_embed

        return crosscheck_explicit(outputs, EmbeddingScorer(minilm_embed, name="embedding:all-MiniLM-L6-v2"))
    if bench.scorer == "judge":
        judge_system = SystemSpec(model=bench.judge_model or job.systems[0].model)

        def ask(prompt: str) -> str:
            from clearsight import DecodeSpec

            return models.generate_requests(judge_system, [prompt], DecodeSpec(max_new_tokens=4))[0].text

        return crosscheck_explicit(outputs, PromptJudgeScorer(ask, name=f"judge:{judge_system.model}"))
    return implicit_crosscheck(job, prep, outputs, models)


def implicit_crosscheck(job: EvalJob, prep: Prepared, outputs: Mapping[str, Mapping[int, str]],
                        models: LocalExecutor) -> CrossCheckResult:
    """Each evidence system is asked, with the image, whether the target sentence contains an error."""
    from clearsight import DecodeSpec

    assert prep.chair is not None
    path_of = {prep.chair.image_of[it.sample_id]: it.image for it in prep.chair.items}
    systems = list(outputs)
    evidence = [s for s in job.systems if s.label in systems]
    per_sentence: dict[tuple[str, int, int], list[float]] = {}
    sentences = {(name, i): split_sentences(text) for name, texts in outputs.items() for i, text in texts.items()}
    for ev in evidence:
        keys, reqs = [], []
        for (name, i), sents in sentences.items():
            for j, s in enumerate(sents):
                keys.append((name, i, j))
                reqs.append({"prompt": IMPLICIT_PROMPT.format(sentence=s), "image": path_of[i]})
        results = models.generate_requests(ev, reqs, DecodeSpec(max_new_tokens=4))
        for key, r in zip(keys, results):
            per_sentence.setdefault(key, []).append(implicit_answer_to_score(r.text))
    scores, n_samples, n_sentences, skipped = {}, {}, {}, {}
    for name in systems:
        sample_scores = {}
        for i in outputs[name]:
            sents = sentences[(name, i)]
            sample_scores[i] = aggregate_sample([per_sentence[(name, i, j)] for j in range(len(sents))])
        scores[name] = aggregate_system(sample_scores)
        n_samples[name] = sum(v is not None for v in sample_scores.values())
        n_sentences[name] = sum(len(sentences[(name, i)]) for i in outputs[name])
        skipped[name] = sum(v is None for v in sample_scores.values())
    return CrossCheckResult(scorer="implicit", scores=scores, ranking=rank_systems(scores), n_samples=n_samples,
                            n_sentences=n_sentences, skipped_samples=skipped)


def score_from_cache(job: EvalJob) -> EvalResults:
    """Re-score an existing output folder without loading any model (explicit scorers only).

    Takes the folder's lock like a run: refused while a run is writing into the folder."""
    prep = prepare(job)
    with output_lock(job.output, create=False, flag="report folder",
                     fix="wait for it to finish, then report again",
                     unwritable_fix="make it writable, or report a copy of the folder"):
        prep.materialize()
        cache = GenerationCache(Path(job.output) / "generations.jsonl")
        if not len(cache):
            raise EvalInputError(f"{cache.path} holds no generations: run the job first")
        results = score_job(job, prep, cache)
        write_report(results, job.output)
    return results
