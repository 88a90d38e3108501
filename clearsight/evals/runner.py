"""Run an EvalJob: generate (cached, resumable) -> score (pure, no model) -> report.

The generation cache (``<output>/generations.jsonl``) is keyed by a stable hash of the system
(model identity, mitigation parameters, decode spec) and the sample (benchmark, split, id, prompt,
the image's content digest), flushed per record. A killed run loses at most the record being written and
a rerun skips what is cached, so restarting a job finishes it with the same cache and metrics as an uninterrupted run.

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
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearsight.config import STOCK_BACKENDS
from clearsight.evals._io import atomic_write_text
from clearsight.evals.benchmarks.base import Benchmark, BenchmarkScore, ScoreContext, benchmark_class
from clearsight.evals.cache import GenerationCache
from clearsight.evals.errors import EvalInputError
from clearsight.evals.executor import Executor, Task, WorkItem, make_executor
from clearsight.evals.job import EvalJob, SystemSpec, load_job
from clearsight.evals.outdir import check_output_path, output_lock
from clearsight.evals.progress import ProgressFile
from clearsight.evals.report import EvalResults, SystemResult, write_report
from clearsight.evals.stats import Measure, compute_stats

ProgressFactory = Callable[[int, str], Any]


# ------------------------------------------------------------------------------------------- keys
def model_identity(system: SystemSpec) -> str:
    """What identifies the weights, computed without loading them (so scoring needs no model)."""
    from clearsight import __version__

    src = system.model
    from clearsight.models.shipped import shipped_model_path

    shipped = shipped_model_path(src)
    if shipped is not None:  # shipped weights: a retrained checkpoint must not reuse old generations
        return f"{src}#{_folder_hash(shipped, contents=True)}"
    if src.startswith("builtin:"):  # built in code, seeded: the version identifies them
        return f"{src}@clearsight-{__version__}"
    path = Path(src).expanduser()
    if (path / "config.json").is_file():
        return f"{path.resolve()}#{_folder_hash(path)}"
    snapshot = _hub_snapshot(src)
    if snapshot is not None:  # the snapshot the loader reads: a new revision of the same id is another model
        return f"{src}#{_folder_hash(snapshot)}"
    return src  # not loadable here (nothing is downloaded): only imported outputs can be keyed by it


def _hub_snapshot(src: str) -> Path | None:
    """The local Hugging Face cache folder of ``src``'s current revision (refs/main, as the loader's
    ``from_pretrained(local_files_only=True)`` reads it), or None when ``src`` is no cached hub id."""
    from clearsight.models.loader import _looks_like_hub_id

    if not _looks_like_hub_id(src):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src, "config.json")
    return Path(found).parent if isinstance(found, str) else None


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




def item_inputs(item: WorkItem) -> dict[str, str] | None:
    """What an output depends on that the sample id does not name: the image's content digest (an image
    file replaced under the same path must not reuse the old outputs). None without an image, or when the
    file is absent (outputs imported without the images: there is nothing to read)."""
    if item.image is None:
        return None
    try:
        st = os.stat(item.image)
    except OSError:
        return None
    return {"image": _image_digest(item.image, st.st_size, st.st_mtime_ns)}


@functools.lru_cache(maxsize=8192)
def _image_digest(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and modification time too: a file rewritten in place is read again; POPE asks about
    each image six times per split, and a job looks each item up several times, but reads it once."""
    return _file_digest(Path(path))


def system_config(system: SystemSpec, max_new_tokens: int) -> dict[str, Any]:
    decode = system.decode_for(max_new_tokens).model_dump(mode="json")  # no batch size: it is not a decoding option
    config = {"model": model_identity(system), "dtype": system.dtype, "mitigations": system.mitigation_config(),
              "decode": decode}
    if system.backend in STOCK_BACKENDS:  # its outputs differ from the plan-running backends' (which agree to
        config["backend"] = system.backend  # float rounding: tests/kernels), so it is part of the key
    return config


# ------------------------------------------------------------------------------------------- run
@dataclass
class Prepared:
    """The job's benchmarks, by label, each prepared (data loaded and checked, nothing written)."""

    benchmarks: dict[str, Benchmark] = field(default_factory=dict)

    @property
    def items(self) -> list[WorkItem]:
        """First-round work: every system generates each of these."""
        return [it for b in self.benchmarks.values() for it in b.items()]

    def materialize(self) -> None:
        """Write what preparing found but did not write (e.g. embedded images), each file atomically, once."""
        for b in self.benchmarks.values():
            b.materialize()


def prepare(job: EvalJob) -> Prepared:
    prep = Prepared()
    for spec in job.benchmarks:
        prep.benchmarks[spec.label] = benchmark_class(spec.kind)(spec, job)
    for b in prep.benchmarks.values():
        b.prepare(prep.benchmarks)
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
        out[system.label] = [it for it in items if not cache.has(configs[it.max_new_tokens], it.sample_id,
                                                                     item_inputs(it))]
    return out


class _Configs:
    """Each system's cache config per max_new_tokens, computed once (it reads the model's config)."""

    def __init__(self) -> None:
        self._configs: dict[tuple[str, int], dict[str, Any]] = {}

    def __call__(self, system: SystemSpec, max_new_tokens: int) -> dict[str, Any]:
        key = (system.model_dump_json(), max_new_tokens)
        if key not in self._configs:
            self._configs[key] = system_config(system, max_new_tokens)
        return self._configs[key]


def cache_lookup(cache: GenerationCache, configs: _Configs | None = None
                 ) -> Callable[[SystemSpec, WorkItem], str | None]:
    """``lookup(system, item)``: the cached output of that generation, or None."""
    configs = configs or _Configs()

    def lookup(system: SystemSpec, item: WorkItem) -> str | None:
        rec = cache.get(configs(system, item.max_new_tokens), item.sample_id, item_inputs(item))
        return None if rec is None else rec["output"]

    return lookup


def generate_stage(job: EvalJob, prep: Prepared, cache: GenerationCache, executor: Executor,
                   progress: ProgressFactory | None = _tqdm_progress) -> int:
    """Generate what the cache lacks; returns the number of new records.

    Round 0: every system generates every benchmark's items. Later rounds: work a benchmark asks for once
    earlier outputs exist (``Benchmark.follow_up``, e.g. a judge's checks of the first round's outputs),
    through the same executor and cache, until no benchmark asks for more.

    Packed (``job.pack``, the default): every pending task of a round goes to the executor in one call,
    one stream per model: no pass drains before the next starts, and requests of different systems share
    batches wherever the stream moves on. The systems that leave the forward alone go sample by sample (their
    repeated rows share prefills), the others system by system: on CPU a batch mixing many systems' attention
    edits ran 1.5x slower per request than batches of one system (``_packed_order``, docs/evals.md).
    Unpacked: one call per system and max_new_tokens. The records are the same either way; this process is
    the only writer of the cache."""
    todo = pending_work(job, prep, cache)
    labels = {s.label for s in job.systems}
    totals = {label: len(prep.items) for label in labels}
    tracker = ProgressFile(job.output, totals, {k: totals[k] - len(v) for k, v in todo.items()},
                           executor=job.executor)
    configs = _Configs()
    lookup = cache_lookup(cache, configs)
    written = 0
    try:
        pairs = [(s, it) for s in job.systems for it in todo[s.label]]
        written += _generate(job, pairs, cache, executor, tracker, configs, progress, "generate")
        rnd = 1
        while True:
            asked = [p for b in prep.benchmarks.values() for p in b.follow_up(rnd, lookup)]
            if not asked:
                break
            seen: set[tuple[str, str]] = set()
            pending = []
            for system, it in asked:
                key = (system.label, it.sample_id)
                if key in seen:
                    continue
                seen.add(key)
                tracker.extend(system.label, 1, done=0 if lookup(system, it) is None else 1)
                if lookup(system, it) is None:
                    pending.append((system, it))
            written += _generate(job, pending, cache, executor, tracker, configs, progress, f"round {rnd + 1}")
            rnd += 1
    except BaseException:
        tracker.set_state("failed")
        raise
    tracker.set_state("scoring")
    return written


def _packed_order(tasks: Sequence[Task]) -> Callable[[Task], tuple[int, int, int]]:
    """The sort key of a packed stream. Systems whose mitigations all leave the forward alone (none, VCD, M3ID,
    AGLA, INTER: branch rows and logits only) go first, sample by sample, so each sample's requests of those
    systems arrive together and the rows they repeat (the unmitigated prompt, shared branch rows) share one
    prefill (``decoding.batch``); the others follow system by system, since on CPU a batch that mixes attention
    edits runs every row the slowest member's way. Longest outputs first within each part."""
    from clearsight.mitigations import parse_mitigations

    rank: dict[str, int] = {}
    sample: dict[str, int] = {}
    neutral: dict[str, bool] = {}
    for t in tasks:
        label = t.system.label
        rank.setdefault(label, len(rank) + 1)
        sample.setdefault(t.item.sample_id, len(sample))
        if label not in neutral:
            neutral[label] = all(m.leaves_forward_alone() for m in parse_mitigations(t.system.mitigations))

    def key(t: Task) -> tuple[int, int, int]:
        if neutral[t.system.label]:
            return 0, -t.item.max_new_tokens, sample[t.item.sample_id]  # stable: system order within a sample
        return rank[t.system.label], -t.item.max_new_tokens, 0  # stable: sample order kept

    return key


def _generate(job: EvalJob, pairs: Sequence[tuple[SystemSpec, WorkItem]], cache: GenerationCache,
              executor: Executor, tracker: ProgressFile, configs: _Configs, progress: ProgressFactory | None,
              desc: str) -> int:
    """One round: generate ``pairs`` (system, item) through the executor, caching each record as it comes."""
    if not pairs:
        return 0
    bar = progress(len(pairs), desc) if progress else None
    written = 0
    tasks = [Task(system, system.decode_for(it.max_new_tokens), it) for system, it in pairs]

    def on_result(task: Task, record: dict[str, Any]) -> None:
        nonlocal written
        label = task.system.label
        output = record.pop("output")
        if cache.put(configs(task.system, task.item.max_new_tokens), task.item.sample_id, output,
                     item_inputs(task.item), system_name=label, **record):
            written += 1
        tracker.add(label)  # also when another system of the same config (e.g. another backend) wrote it first
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

    try:
        if job.pack:
            tasks.sort(key=_packed_order(tasks))
            executor.generate_tasks(tasks, on_result)
        else:
            groups: dict[tuple[str, int], list[Task]] = {}
            for t in tasks:
                groups.setdefault((t.system.label, t.item.max_new_tokens), []).append(t)
            for group in groups.values():
                executor.generate_tasks(group, on_result)
    finally:
        if bar is not None:
            bar.close()
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
        for b in prep.benchmarks.values():  # the merged job: its systems are the ones to generate and score
            b.job = job
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
            results = score_job(job, prep, cache)
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
        rec = cache.get(configs[it.max_new_tokens], it.sample_id, item_inputs(it))
        if rec is None:
            missing += 1
        else:
            got[it.sample_id] = rec["output"]
    if missing:
        raise EvalInputError(f"system {system.label!r}: {missing} of {len(items)} samples have no cached output in "
                             f"{cache.path}; run the generation stage (clearsight eval run) first")
    return got


def score_job(job: EvalJob, prep: Prepared, cache: GenerationCache) -> EvalResults:
    """Score every system from the cache, with no model: each benchmark scores its own outputs (those that
    read other benchmarks' outputs or scores last), then the statistics run over all their measures."""
    data_files = []
    measures: list[Measure] = []
    fields: dict[str, Any] = {}
    per_system: dict[str, dict[str, Any]] = {s.label: {} for s in job.systems}
    scored: dict[str, BenchmarkScore] = {}
    ctx = ScoreContext(job=job, outputs=lambda system, items: _outputs(cache, system, items),
                       lookup=cache_lookup(cache), output_dir=Path(job.output), scored=scored)
    for bench in sorted(prep.benchmarks.values(), key=lambda b: b.depends_on_others):
        bench.job = job
        sc = bench.score(ctx)
        scored[bench.label] = sc
        data_files += sc.data_files
        measures += sc.measures
        fields.update(sc.fields)
        for label, entries in sc.per_system.items():
            per_system[label].update(entries)
    systems = []
    for system in job.systems:
        decode = system.decode_for(1).model_dump(mode="json", exclude={"max_new_tokens"})
        decode["batch_size"] = job.batch_size  # the batch size the run used (the executor's), not a default
        systems.append(SystemResult(name=system.label, config={"model": system.model,
                                                                "mitigations": system.mitigations},
                                    decode=decode, **per_system[system.label]))
    results = EvalResults(systems=systems, data_files=data_files,
                          notes={"decode": {s.label: s.decode_for(1).describe().split(",")[0] for s in job.systems}},
                          **fields)
    results.stats = compute_stats(measures, [s.label for s in job.systems], job.baseline_label, job.stats)
    from clearsight.evals.verdict import cannot_act

    results.notes["cannot_act"] = {s.label: why for s in job.systems if (why := cannot_act(s))}
    return results


def score_from_cache(job: EvalJob) -> EvalResults:
    """Re-score an existing output folder without loading any model.

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


def score_outputs(job: EvalJob, outputs: Mapping[str, Mapping[str, str]], source: str = "outputs") -> EvalResults:
    """Score outputs generated elsewhere, with no model: ``outputs[system][id] = text``, where ``id`` is
    each benchmark's own id of a sample (``Benchmark.external_ids``, e.g. an image id or a question id).

    Each system of ``job`` whose label is a key of ``outputs`` gets its texts written into the folder's
    cache (under its own config, as if it had generated them), then the job is scored from the cache
    like any other (``clearsight report DIR`` works on the folder afterwards). Every sample of the job
    needs a text, and every id must be known: otherwise a one-line error naming the first, before
    anything is written."""
    out = check_output_path(job.output)
    prep = prepare(job)
    missing_sys = [s.label for s in job.systems if s.label not in outputs]
    if missing_sys:
        raise EvalInputError(f"{source}: no outputs for system {missing_sys[0]!r}")
    ids: dict[str, WorkItem] = {}
    for b in prep.benchmarks.values():
        mine = b.external_ids()
        clash = sorted(set(mine) & set(ids))
        if clash:
            raise EvalInputError(f"{source}: id {clash[0]!r} names a sample of two benchmarks: score one "
                                 "benchmark at a time")
        ids.update(mine)
    records: list[tuple[SystemSpec, WorkItem, str]] = []
    for system in job.systems:
        given = outputs[system.label]
        unknown = sorted(set(given) - set(ids))
        if unknown:
            raise EvalInputError(f"{source}: id {unknown[0]!r} is not a sample of the benchmark "
                                 f"({len(unknown)} unknown): give the benchmark's own ids")
        lacking = [k for k in ids if k not in given]
        if lacking:
            raise EvalInputError(f"{source}: no text for id {lacking[0]!r} ({len(lacking)} of {len(ids)} "
                                 "missing): give every sample, or a smaller --limit")
        records += [(system, ids[k], str(given[k])) for k in ids]
    with output_lock(out):
        job = merge_with_folder(job, out)
        for b in prep.benchmarks.values():
            b.job = job
        prep.materialize()
        cache = GenerationCache(out / "generations.jsonl")
        configs = _Configs()
        for system, item, text in records:
            config = configs(system, item.max_new_tokens)
            rec = cache.get(config, item.sample_id, item_inputs(item))
            if rec is not None and rec["output"] != text:
                raise EvalInputError(f"{source}: {system.label!r} already has another output for "
                                     f"{item.sample_id!r} in {cache.path}: use another --output or --name")
            cache.put(config, item.sample_id, text, item_inputs(item), system_name=system.label,
                      imported_from=source)
        atomic_write_text(out / "job.json", job.model_dump_json(indent=2))
        results = score_job(job, prep, cache)
        write_report(results, out)
    return results
