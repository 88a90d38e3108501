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
from clearsight.evals.datasets.pope import PARSERS
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


def metric_tables(results: EvalResults) -> dict[str, pd.DataFrame]:
    """Every metric per system, one table per benchmark (POPE per split, the partner set, CHAIR, CrossCheck);
    rows are systems."""
    tables: dict[str, pd.DataFrame] = {}
    pope_rows = []
    for s in results.systems:
        if s.pope is None:
            continue
        for split, m in s.pope.splits.items():
            pope_rows.append({"system": s.name, "split": split, "n": m.n, "accuracy": m.accuracy,
                              "precision": m.precision, "recall": m.recall, "f1": m.f1, "yes ratio": m.yes_ratio,
                              "unparsed": m.unparsed})
    if pope_rows:
        tables["POPE"] = pd.DataFrame(pope_rows)
        tables["POPE mean F1"] = pd.DataFrame([{"system": s.name, "mean F1": s.pope.mean_f1}
                                               for s in results.systems if s.pope is not None])
    partner = [{"system": s.name, **{f"{k} yes-rate": v for k, v in s.partner.yes_rate.items()},
                **{f"{k} n": v for k, v in s.partner.n.items()}, "unparsed": s.partner.unparsed}
               for s in results.systems if s.partner is not None]
    if partner:
        tables["Partner questions"] = pd.DataFrame(partner)
    chair = [{"system": s.name, "CHAIR_s": s.chair.chair_s, "CHAIR_i": s.chair.chair_i, "recall": s.chair.recall,
              "mean length": s.chair.mean_length, "captions": s.chair.n_captions, "mentions": s.chair.n_mentions,
              "hallucinated mentions": s.chair.n_hallucinated_mentions}
             for s in results.systems if s.chair is not None]
    if chair:
        tables["CHAIR"] = pd.DataFrame(chair)
    cc = results.crosscheck
    if cc is not None:
        tables["CrossCheck"] = pd.DataFrame([
            {"system": k, "score (lower is better)": v, "rank": cc.ranking.index(k) + 1,
             "samples": cc.n_samples.get(k), "sentences": cc.n_sentences.get(k)} for k, v in cc.scores.items()])
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
    if prep.pope is not None:
        parse = PARSERS[prep.pope.bench.parser]
        labels = {(split, q.question_id): q.label for split, pset in prep.pope.sets.items() for q in pset.questions}
        labels.update({("partner", pq.question.question_id): pq.question.label for pq in prep.pope.partner})
        for item in prep.pope.items:
            split, qid = prep.pope.where[item.sample_id]
            gold = labels.get((split, qid)) or "?"
            answers = {}
            for name in systems:
                text = outputs.get(name, {}).get(item.sample_id)
                if text is None:
                    continue
                parsed = parse(text)
                answers[name] = SystemAnswer(text, parsed == "yes" and gold == "no", parsed=parsed)
            samples.append(Sample(item.sample_id, "pope", split, item.prompt, item.image, gold, answers))
    if prep.chair is not None:
        gt = _chair_ground_truth(folder)
        vocab = prep.chair.vocab
        for item in prep.chair.items:
            objects = sorted(gt.get(prep.chair.image_of[item.sample_id], set()))
            answers = {}
            for name in systems:
                text = outputs.get(name, {}).get(item.sample_id)
                if text is None:
                    continue
                mentions = mark_objects(text, objects, vocab)
                answers[name] = SystemAnswer(text, any(not m.present for m in mentions), mentions=mentions)
            samples.append(Sample(item.sample_id, "chair", "", item.prompt, item.image, objects, answers))
    return samples


def _chair_ground_truth(folder: Path) -> dict[int, set[str]]:
    """The CHAIR ground truth the run scored against (``chair_ground_truth.json``, written by the run)."""
    path = folder / "chair_ground_truth.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {int(k): set(v) for k, v in data.get("objects", {}).items()}


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
