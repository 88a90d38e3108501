"""The Evals page's logic: result folders, metric tables, report plots, and per-sample records.

A result folder is what ``clearsight eval run`` writes (docs/evals.md, "Output folders"): ``results.json``
(every metric), ``job.json`` (the job), ``generations.jsonl`` (every output), the report's PNG plots. The
per-sample view joins the job's prepared samples (prompt, image, gold answer or objects) with each system's
cached output, and marks hallucinations as the metrics count them: a POPE "yes" to an absent object, a CHAIR
mention of an object not in the image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clearsight.dashboard.compare import Mention, mark_objects
from clearsight.errors import InputError
from clearsight.evals.benchmarks.chair import Chair
from clearsight.evals.benchmarks.pope import Pope
from clearsight.evals.parsers import PARSERS
from clearsight.evals.report import EvalResults

RESULTS = "results.json"


def result_folders(runs: str | Path) -> list[Path]:
    """Folders under ``runs`` (itself, its children and grandchildren) holding a ``results.json``, newest first."""
    root = Path(runs)
    if not root.is_dir():
        return []
    found = {p.parent for pattern in (RESULTS, f"*/{RESULTS}", f"*/*/{RESULTS}") for p in root.glob(pattern)}
    return sorted(found, key=lambda p: (p / RESULTS).stat().st_mtime, reverse=True)


def load_results(folder: str | Path) -> EvalResults:
    path = Path(folder) / RESULTS
    try:
        return EvalResults.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{folder}: no {RESULTS}; is it an eval output folder (clearsight eval run)?") from None
    except ValueError as exc:
        raise InputError(f"{path}: not a clearsight results file ({str(exc).splitlines()[0]})") from None


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """A result's scalar fields, with dicts of scalars spread out as ``"<field> <key>"`` columns."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if _scalar(v):
            out[k] = v
        elif isinstance(v, dict) and v and all(_scalar(x) for x in v.values()):
            out.update({f"{k} {sub}": x for sub, x in v.items()})
    return out


def _title(label: str) -> str:
    return label.upper() if label.isalpha() and len(label) <= 5 else label


def metric_tables(results: EvalResults) -> dict[str, pd.DataFrame]:
    """Every metric per system, one table per benchmark result, whatever the benchmark (results are plain
    data: each system's result under the benchmark's label). Rows are systems; a result with per-split
    figures (a dict of dicts, e.g. POPE's ``splits``) gets one row per system and split, and its other
    scalar figures go to a ``<label> summary`` table. Results-level rankings (a ``scores`` dict by system,
    e.g. CrossCheck's) get one table too."""
    tables: dict[str, pd.DataFrame] = {}
    labels = list(dict.fromkeys(k for s in results.systems for k in (s.model_extra or {})))
    for label in labels:
        rows, summary = [], []
        for s in results.systems:
            r = (s.model_extra or {}).get(label)
            if not isinstance(r, dict):
                continue
            nested = {k: v for k, v in r.items()
                      if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())}
            if nested:
                for field, parts in nested.items():
                    for part, m in parts.items():
                        rows.append({"system": s.name, field.rstrip("s"): part, **_flat(m)})
                flat = _flat(r)
                if flat:
                    summary.append({"system": s.name, **flat})
            else:
                rows.append({"system": s.name, **_flat(r)})
        if rows:
            tables[_title(label)] = pd.DataFrame(rows)
        if summary:
            tables[f"{_title(label)} summary"] = pd.DataFrame(summary)
    for label, r in (results.model_extra or {}).items():
        scores = r.get("scores") if isinstance(r, dict) else None
        if isinstance(scores, dict) and scores and set(scores) <= {s.name for s in results.systems}:
            others = {k: v for k, v in r.items() if isinstance(v, dict) and set(v) <= set(scores) and k != "scores"}
            tables[_title(label)] = pd.DataFrame([{"system": name, "score": v,
                                                   **{k: d.get(name) for k, d in others.items()}}
                                                  for name, v in scores.items()])
    return tables


def plots(folder: str | Path) -> list[Path]:
    """The report's plots (forest plots, figures, CrossCheck), in the report's order."""
    order = ["figures.png", "forest_pope.png", "forest_partner.png", "forest_chair.png", "crosscheck.png"]
    found = sorted(Path(folder).glob("*.png"), key=lambda p: (order.index(p.name) if p.name in order else 99, p.name))
    return found


def report_markdown(folder: str | Path) -> str | None:
    path = Path(folder) / "report.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None


# ------------------------------------------------------------------------------------------ samples
@dataclass
class SystemAnswer:
    output: str
    hallucinated: bool  # a yes to an absent object (POPE), a mention of an absent object (CHAIR)
    mentions: list[Mention] = field(default_factory=list)  # CHAIR samples
    parsed: str | None = None  # POPE samples: the parser's yes / no (None: unparsed)


@dataclass
class Sample:
    sample_id: str
    benchmark: str  # "pope" | "chair"
    split: str  # POPE split or "partner"; "" for CHAIR
    prompt: str
    image: str | None
    gold: str | list[str]  # POPE: "yes" / "no"; CHAIR: the image's objects
    answers: dict[str, SystemAnswer]

    @property
    def disagree(self) -> bool:
        """Systems differ: different POPE answers, or CHAIR captions with different hallucinated objects."""
        keys = {(a.parsed if self.benchmark == "pope" else
                 tuple(sorted({m.node for m in a.mentions if not m.present}))) for a in self.answers.values()}
        return len(keys) > 1

    def hallucinating(self) -> list[str]:
        return [name for name, a in self.answers.items() if a.hallucinated]


def _outputs(folder: Path) -> dict[str, dict[str, str]]:
    """``outputs[system name][sample id]`` from the generation cache (a torn last line is skipped)."""
    out: dict[str, dict[str, str]] = {}
    path = folder / "generations.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        out.setdefault(rec.get("system_name", "?"), {})[rec["sample_id"]] = rec.get("output", "")
    return out


def load_samples(folder: str | Path) -> list[Sample]:
    """Every sample of the folder's job with each system's output, gold answer and hallucination marks."""
    from clearsight.evals.job import load_job
    from clearsight.evals.runner import prepare

    folder = Path(folder)
    if not (folder / "job.json").is_file():
        raise InputError(f"{folder}: no job.json, so no per-sample view (the run did not finish generating)")
    job = load_job(folder / "job.json")
    prep = prepare(job.model_copy(update={"output": str(folder)}))
    outputs = _outputs(folder)
    systems = [s.label for s in job.systems]
    samples: list[Sample] = []
    for bench in prep.benchmarks.values():
        if isinstance(bench, Pope):
            samples += _pope_samples(bench, systems, outputs)
        elif isinstance(bench, Chair):
            samples += _chair_samples(bench, systems, outputs)
    return samples


def _pope_samples(pope: Pope, systems: Sequence[str], outputs: dict[str, dict[str, str]]) -> list[Sample]:
    parse = PARSERS[pope.bench.parser]
    labels = {(split, q.question_id): q.label for split, pset in pope.sets.items() for q in pset.questions}
    labels.update({("partner", pq.question.question_id): pq.question.label for pq in pope.partner})
    samples = []
    for item in pope.items():
        split, qid = pope.where[item.sample_id]
        gold = labels.get((split, qid)) or "?"
        answers = {}
        for name in systems:
            text = outputs.get(name, {}).get(item.sample_id)
            if text is None:
                continue
            parsed = parse(text)
            answers[name] = SystemAnswer(text, parsed == "yes" and gold == "no", parsed=parsed)
        samples.append(Sample(item.sample_id, "pope", split, item.prompt, item.image, gold, answers))
    return samples


def _chair_samples(chair: Chair, systems: Sequence[str], outputs: dict[str, dict[str, str]]) -> list[Sample]:
    gt = chair.load_ground_truth()  # the run's cached ground truth (its folder's *_ground_truth.json)
    samples = []
    for item in chair.items():
        objects = sorted(gt.get(chair.image_of[item.sample_id], set()))
        answers = {}
        for name in systems:
            text = outputs.get(name, {}).get(item.sample_id)
            if text is None:
                continue
            mentions = mark_objects(text, objects, chair.vocab)
            answers[name] = SystemAnswer(text, any(not m.present for m in mentions), mentions=mentions)
        samples.append(Sample(item.sample_id, "chair", "", item.prompt, item.image, objects, answers))
    return samples


def filter_samples(samples: Sequence[Sample], *, benchmark: str | None = None, disagree: bool = False,
                   hallucinating: str | None = None) -> list[Sample]:
    """``benchmark``: pope / chair / None (both); ``disagree``: only where systems differ; ``hallucinating``: a
    system name (only where it hallucinates), ``"any"`` (where one does) or None."""
    out = []
    for s in samples:
        if benchmark and s.benchmark != benchmark:
            continue
        if disagree and not s.disagree:
            continue
        who = s.hallucinating()
        if hallucinating == "any" and not who:
            continue
        if hallucinating not in (None, "any") and hallucinating not in who:
            continue
        out.append(s)
    return out


def sample_table(samples: Sequence[Sample], systems: Sequence[str]) -> Any:
    """One row per sample: id, benchmark, gold and each system's output (the browser's overview)."""
    rows = []
    for s in samples:
        row: dict[str, Any] = {"sample": s.sample_id, "benchmark": s.benchmark, "split": s.split,
                               "gold": s.gold if isinstance(s.gold, str) else ", ".join(s.gold)}
        for name in systems:
            a = s.answers.get(name)
            row[name] = None if a is None else ("✗ " if a.hallucinated else "") + a.output
        rows.append(row)
    return pd.DataFrame(rows, columns=["sample", "benchmark", "split", "gold", *systems])
