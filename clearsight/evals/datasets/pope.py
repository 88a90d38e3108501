"""POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023).

Loaders for every layout in circulation, question generation that follows the official recipe
(RUCAIBox/POPE ``main.py`` + ``utils.py``; reference/evals.md section 1.2) and the prompt. The answer
parsers of section 1.5 live in ``clearsight.evals.parsers``, the metrics of section 1.6 in
``clearsight.evals.metrics.pope``.

Layouts (reference/evals.md section 1.1):
* official question files: JSON lines with ``question_id``, ``image``, ``text``, ``label``;
* SEEM files (A-OKVQA, GQA): one JSON array with the same four fields;
* LLaVA-1.5 ``llava_pope_test.jsonl``: the three COCO splits concatenated, ``category`` instead of
  ``label`` (labels come from the official files, matched by ``question_id``, as LLaVA's eval_pope.py does);
* ``lmms-lab/POPE`` parquet: ``question_id``, ``question``, ``answer``, ``image_source``, ``image``,
  ``category``, read through ``datasets`` from files already on disk.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clearsight.evals._io import atomic_write_text, require_file, sha256_file
from clearsight.evals.errors import EvalInputError

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "Is there a {} in the image?"
# LLaVA-1.5 / lmms-eval suffix (reference/evals.md section 1.7); shared/evals.md makes it the default.
DEFAULT_PROMPT_SUFFIX = "Answer the question using a single word or phrase."

from clearsight.evals.parsers import Label  # noqa: E402  (re-exported: the records use it)


def check_split(split: str) -> str:
    """Return ``split`` if it is one of the three POPE settings, else a one-line error."""
    if split not in SPLITS:
        raise EvalInputError(f"unknown POPE split {split!r}; use one of {', '.join(SPLITS)}")
    return split


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PopeQuestion:
    """One yes/no question. ``label`` is None only for the LLaVA file before labels are attached."""

    question_id: int | str
    image: str
    text: str
    label: Label | None
    split: str | None = None
    # Embedded image bytes (parquet layout only); excluded from equality/repr to keep them cheap.
    image_bytes: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class PopeFile:
    """Provenance of one loaded file: recorded in results.json (POPE has several versions, section 1.3)."""

    path: str
    sha256: str
    n: int
    layout: str
    split: str | None = None


@dataclass
class PopeSet:
    """Questions of one split plus the files they came from."""

    split: str
    questions: list[PopeQuestion]
    files: list[PopeFile]

    @property
    def n(self) -> int:
        return len(self.questions)


# ---------------------------------------------------------------------------------------------- loaders
def _read_records(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Read a JSON-lines file or a JSON array (auto-detected from the first non-blank character)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise EvalInputError(f"{path}: empty POPE file; point to a file with at least one question")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}: malformed JSON array at line {exc.lineno} ({exc.msg}); "
                                 "fix or re-download the file") from exc
        layout = "json-array"
    else:
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EvalInputError(f"{path}: malformed JSON on line {i} ({exc.msg}); fix or remove "
                                     "that line") from exc
        layout = "jsonl"
    if not records:
        raise EvalInputError(f"{path}: no questions found; point to a non-empty POPE file")
    for i, r in enumerate(records, start=1):
        if not isinstance(r, dict):
            raise EvalInputError(f"{path}: record {i} is not a JSON object; expected question_id/image/text")
    return records, layout


def _field(path: Path, i: int, rec: Mapping[str, Any], name: str) -> Any:
    if name not in rec:
        raise EvalInputError(f"{path}: record {i} has no field {name!r}; expected fields "
                             "question_id, image, text, label")
    return rec[name]


def _label(path: Path, i: int, value: Any) -> Label:
    v = str(value).strip().lower()
    if v not in ("yes", "no"):
        raise EvalInputError(f"{path}: record {i} has label {value!r}; labels must be 'yes' or 'no'")
    return v  # type: ignore[return-value]


def _check_unique(path: Path | str, questions: Sequence[PopeQuestion]) -> None:
    seen: set[int | str] = set()
    for q in questions:
        if q.question_id in seen:
            raise EvalInputError(f"{path}: question_id {q.question_id!r} occurs twice in split "
                                 f"{q.split!r}; question ids must be unique per split")
        seen.add(q.question_id)


def load_pope_file(path: str | os.PathLike[str], split: str | None = None,
                   image_dir: str | os.PathLike[str] | None = None) -> PopeSet:
    """Load an official JSON-lines file or a SEEM JSON-array file (format auto-detected).

    ``split`` defaults to the setting named in the file name (``*_pope_<split>.json``). With
    ``image_dir`` every referenced image must exist (checked up front, nothing is half-loaded).
    """
    p = require_file(path, "POPE question file", "check the path or generate the file with write_pope_files")
    if split is None:
        m = re.search(r"(random|popular|adversarial)", p.name)
        if m is None:
            raise EvalInputError(f"{p}: cannot tell the split from the file name; pass split= one of "
                                 f"{', '.join(SPLITS)}")
        split = m.group(1)
    check_split(split)
    records, layout = _read_records(p)
    questions = [
        PopeQuestion(
            question_id=_field(p, i, r, "question_id"),
            image=str(_field(p, i, r, "image")),
            text=str(_field(p, i, r, "text")),
            label=_label(p, i, _field(p, i, r, "label")),
            split=split,
        )
        for i, r in enumerate(records, start=1)
    ]
    _check_unique(p, questions)
    if image_dir is not None:
        check_images(questions, image_dir)
    return PopeSet(split, questions, [PopeFile(str(p), sha256_file(p), len(questions), layout, split)])


def load_llava_pope(path: str | os.PathLike[str],
                    label_files: Mapping[str, str | os.PathLike[str]] | None = None,
                    image_dir: str | os.PathLike[str] | None = None) -> dict[str, PopeSet]:
    """Load LLaVA's concatenated ``llava_pope_test.jsonl`` (field ``category``), one PopeSet per split.

    The LLaVA file carries no labels; LLaVA's ``eval_pope.py`` takes them from the official per-split
    files, matched by ``question_id``. Pass those as ``label_files={"random": path, ...}``; a question id
    missing from the label file is an error (mismatched versions, see reference/evals.md section 1.3).
    """
    p = require_file(path, "LLaVA POPE file", "check the path to llava_pope_test.jsonl")
    records, layout = _read_records(p)
    by_split: dict[str, list[PopeQuestion]] = {}
    for i, r in enumerate(records, start=1):
        split = check_split(str(_field(p, i, r, "category")))
        label = _label(p, i, r["label"]) if "label" in r else None
        by_split.setdefault(split, []).append(PopeQuestion(
            question_id=_field(p, i, r, "question_id"), image=str(_field(p, i, r, "image")),
            text=str(_field(p, i, r, "text")), label=label, split=split))
    sha = sha256_file(p)
    out: dict[str, PopeSet] = {}
    for split, qs in by_split.items():
        _check_unique(p, qs)
        files = [PopeFile(str(p), sha, len(qs), "llava-jsonl", split)]
        if label_files is not None and split in label_files:
            ref = load_pope_file(label_files[split], split=split)
            labels = {q.question_id: q.label for q in ref.questions}
            missing = [q.question_id for q in qs if q.question_id not in labels]
            if missing:
                raise EvalInputError(
                    f"{p}: {len(missing)} {split} question ids (first: {missing[0]!r}) are not in label file "
                    f"{label_files[split]}; use the label files of the same POPE version")
            qs = [PopeQuestion(q.question_id, q.image, q.text, labels[q.question_id], split) for q in qs]
            files.append(ref.files[0])
        if image_dir is not None:
            check_images(qs, image_dir)
        out[split] = PopeSet(split, qs, files)
    return out


def load_pope_parquet(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                      split: str | None = None, keep_images: bool = True) -> dict[str, PopeSet]:
    """Load the ``lmms-lab/POPE`` parquet layout from files already on disk, through ``datasets``.

    Rows are grouped by ``category``; ``split`` keeps only one setting. Never downloads anything.
    """
    import datasets  # local import: heavy, and only this loader needs it

    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not path_list:
        raise EvalInputError("load_pope_parquet: no parquet files given; pass the downloaded *.parquet paths")
    files = [require_file(x, "POPE parquet file", "download lmms-lab/POPE first or fix the path")
             for x in path_list]
    if split is not None:
        check_split(split)
    ds = datasets.Dataset.from_parquet([str(f) for f in files], keep_in_memory=True)
    needed = {"question_id", "question", "answer", "image_source", "category"}
    missing = needed - set(ds.column_names)
    if missing:
        raise EvalInputError(f"{files[0]}: parquet lacks column(s) {sorted(missing)}; expected the "
                             "lmms-lab/POPE layout")
    columns = [c for c in ds.column_names if keep_images or c != "image"]
    by_split: dict[str, list[PopeQuestion]] = {}
    for i, row in enumerate(ds.select_columns(columns), start=1):
        cat = str(row["category"])
        if cat not in SPLITS:
            raise EvalInputError(f"{files[0]}: row {i} has category {cat!r}; expected one of "
                                 f"{', '.join(SPLITS)}")
        if split is not None and cat != split:
            continue
        img = row.get("image")
        img_bytes = img.get("bytes") if isinstance(img, dict) else None
        by_split.setdefault(cat, []).append(PopeQuestion(
            question_id=row["question_id"], image=str(row["image_source"]), text=str(row["question"]),
            label=_label(files[0], i, row["answer"]), split=cat, image_bytes=img_bytes))
    if not by_split:
        raise EvalInputError(f"{files[0]}: no rows for split {split!r}; check the split name")
    infos = [(str(f), sha256_file(f)) for f in files]
    out = {}
    for cat, qs in by_split.items():
        _check_unique(files[0], qs)
        out[cat] = PopeSet(cat, qs, [PopeFile(path, sha, len(qs), "lmms-lab-parquet", cat)
                                     for path, sha in infos])
    return out


def check_images(questions: Iterable[PopeQuestion], image_dir: str | os.PathLike[str]) -> None:
    """Raise one line naming the first missing image (and how many are missing) before any generation."""
    root = Path(image_dir)
    if not root.is_dir():
        raise EvalInputError(f"image folder not found: {root}; pass the folder that holds the images")
    missing = sorted({q.image for q in questions if q.image_bytes is None and not (root / q.image).is_file()})
    if missing:
        raise EvalInputError(f"image {root / missing[0]} not found ({len(missing)} missing in all); "
                             "pass the folder that holds these images")


# ---------------------------------------------------------------------------------------- generation
class PopeGenerationConfig(BaseModel):
    """Parameters of the official recipe (RUCAIBox/POPE main.py defaults), plus an explicit seed.

    The official script never seeds ``random``; we do, so the same inputs give the same files.
    """

    model_config = ConfigDict(extra="forbid")

    sample_num: int = Field(3, ge=1, description="positives per image (first objects in listed order)")
    img_num: int | None = Field(500, ge=1, description="images drawn; None = all eligible images")
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    dataset: str = "coco"


def question_text(template: str, obj: str) -> str:
    """Fill the template, switching "a" to "an" before a vowel as the official ``create_question`` does.

    The official code replaced every letter "a" in the template (giving "imange", reference/evals.md 1.3);
    later files fixed that typo, so we only replace the standalone article.
    """
    if obj[:1].lower() in "aeiou":
        template = re.sub(r"\ba \{\}", "an {}", template)
    return template.format(obj)


def object_frequencies(images: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Official ``generate_ground_truth_objects``: how often each object is listed, in first-seen order."""
    freq: dict[str, int] = {}
    for im in images:
        for o in im["objects"]:
            freq[o] = freq.get(o, 0) + 1
    return freq


def co_occurrence(images: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Official ``compute_co_occurrence``: for each object, partners ranked by co-occurrence count (desc).

    Ties keep first-seen order (Python's sort is stable), exactly like the official code.
    """
    counts: dict[str, dict[str, int]] = {}
    for im in images:
        objs = im["objects"]
        for o in objs:
            row = counts.setdefault(o, {})
            for other in objs:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    return {o: [k for k, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)]
            for o, row in counts.items()}


def select_images(gt: Sequence[Mapping[str, Any]], cfg: PopeGenerationConfig) -> list[dict[str, Any]]:
    """Keep images with >= ``sample_num`` objects, then draw ``img_num`` of them (official main.py)."""
    if not gt:
        raise EvalInputError("POPE generation: empty ground-truth object list; give at least one image")
    eligible = [dict(im) for im in gt if len(im["objects"]) >= cfg.sample_num]
    n = len(eligible) if cfg.img_num is None else cfg.img_num
    if len(eligible) < n:
        raise EvalInputError(f"POPE generation: only {len(eligible)} images have >= {cfg.sample_num} objects "
                             f"but img_num={n}; lower img_num or pass more images")
    return random.Random(cfg.seed).sample(eligible, n)


def generate_pope_questions(gt: Sequence[Mapping[str, Any]], split: str,
                            cfg: PopeGenerationConfig | None = None) -> list[PopeQuestion]:
    """Build one split exactly as the official ``pope()``.

    ``gt`` is a list of ``{"image": file_name, "objects": [names in listed order]}``. Per chosen image:
    for each of the first ``sample_num`` objects, a "yes" question, then one "no" question whose object
    is neither in the image nor asked before for that image:
      random      - uniform over all objects occurring in the chosen images;
      popular     - the first eligible object by frequency over the chosen images (desc);
      adversarial - the first eligible object by co-occurrence with *this* positive (desc);
    popular/adversarial fall back to a random eligible object. Question ids start at 1.
    """
    cfg = cfg or PopeGenerationConfig()
    check_split(split)
    images = select_images(gt, cfg)
    freq = object_frequencies(images)
    all_objects = list(freq)
    popular = [o for o, _ in sorted(freq.items(), key=lambda kv: kv[1], reverse=True)]
    co = co_occurrence(images)
    # One RNG per split, derived from the seed, so a split does not depend on which others were built.
    rng = random.Random(f"{cfg.seed}:{split}")

    def random_negative(history: list[str], present: Sequence[str], image: str) -> str:
        pool = [o for o in all_objects if o not in history and o not in present]
        if not pool:
            raise EvalInputError(f"POPE generation: no object left for a negative question on image "
                                 f"{image!r}; use images with fewer objects or a larger vocabulary")
        # Rejection sampling over the full list as in the official code, made finite by the check above.
        while True:
            o = rng.choice(all_objects)
            if o not in history and o not in present:
                return o

    out: list[PopeQuestion] = []
    qid = 1
    for img in images:
        present = list(img["objects"])
        history: list[str] = []
        for i in range(cfg.sample_num):
            pos = present[i]
            history.append(pos)
            out.append(PopeQuestion(qid, img["image"], question_text(cfg.template, pos), "yes", split))
            qid += 1
            ranked: list[str] = {"random": [], "popular": popular, "adversarial": co.get(pos, [])}[split]
            neg = next((o for o in ranked if o not in history and o not in present), None)
            if neg is None:
                neg = random_negative(history, present, img["image"])
            history.append(neg)
            out.append(PopeQuestion(qid, img["image"], question_text(cfg.template, neg), "no", split))
            qid += 1
    return out


def write_pope_jsonl(path: str | os.PathLike[str], questions: Sequence[PopeQuestion]) -> None:
    """Write the official format: one ``{"question_id", "image", "text", "label"}`` object per line."""
    lines = [json.dumps({"question_id": q.question_id, "image": q.image, "text": q.text, "label": q.label})
             for q in questions]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_pope_files(gt: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str],
                     cfg: PopeGenerationConfig | None = None) -> dict[str, Path]:
    """Write ``{dataset}_pope_{split}.json`` for the three splits plus the official side files
    ``{dataset}_ground_truth_objects.json`` and ``{dataset}_co_occur.json``. Returns split -> path."""
    cfg = cfg or PopeGenerationConfig()
    out = Path(out_dir)
    # Build everything first so an error leaves nothing half-written.
    built = {s: generate_pope_questions(gt, s, cfg) for s in SPLITS}
    images = select_images(gt, cfg)
    paths = {}
    for s, qs in built.items():
        paths[s] = out / f"{cfg.dataset}_pope_{s}.json"
        write_pope_jsonl(paths[s], qs)
    freq = json.dumps(object_frequencies(images))
    atomic_write_text(out / f"{cfg.dataset}_ground_truth_objects.json", freq)
    atomic_write_text(out / f"{cfg.dataset}_co_occur.json", json.dumps(co_occurrence(images)))
    return paths


def build_prompt(question: str, suffix: str | None = DEFAULT_PROMPT_SUFFIX) -> str:
    """The user turn: question plus the optional answer-format suffix (put inside the chat template)."""
    return question if not suffix else f"{question}\n{suffix}"
