"""CHAIR (Rohrbach, Hendricks et al., "Object Hallucination in Image Captioning", EMNLP 2018).

Follows the logic of the original ``LisaAnne/Hallucination/utils/chair.py`` and of Maxlinn's Python 3
port used by OPERA / VCD / lmms-eval (reference/evals.md section 2), with three deliberate differences,
all documented in docs/evals.md:

* singularisation uses ``inflect`` (offline, no NLTK data). Vocabulary words are never singularised
  (inflect would turn "bus" into "bu"), so "glass" stays "glass" and "wine glass" merges directly;
* phrases are matched longest-first with any length, so the three-word "stove top oven" can match
  (the original merged two words at a time and never matched it);
* vocabulary entries are stripped and lowercased (" motor bike", " cheesecake", "iPhone" never matched).

Metrics (section 2.4): CHAIR_s = captions with >= 1 hallucinated mention / captions; CHAIR_i =
hallucinated mentions / mentions (repeats count); recall = sum |distinct GT objects mentioned| / sum |GT
objects| (micro, OPERA); mean length in words.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clearsight.evals._inflect import inflect_engine
from clearsight.evals._io import (
    atomic_write_json,
    canonical_json,
    read_json_file,
    require_file,
    sha256_file,
    sha256_text,
)
from clearsight.evals.errors import EvalInputError
from clearsight.evals.stats import Measure

COCO_VOCAB_RESOURCE = "coco_chair_vocab.json"

# Lowercase word tokens (letters/digits with inner hyphens or apostrophes) and single punctuation marks.
# Punctuation stays a token so that phrases never merge across it ("a baby, dog" is not "baby dog").
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")
_WORD_RE = re.compile(r"[a-z0-9]")
# NLTK's word_tokenize (the Treebank tokenizer the original CHAIR uses) splits the clitics 's 'm 'd 'll 're
# 've and n't off the end of a word (its ENDING_QUOTES rules), so "the dog's owner" mentions "dog".
_CLITIC_RE = re.compile(r"^([a-z0-9][a-z0-9'-]*?)('s|'m|'d|'ll|'re|'ve|n't)$")
# part of the ground-truth cache key: a change of the tokenizer must not reuse objects found by the old one
TOKENIZER_VERSION = "nltk-clitics-1"


def _normalised(value: Any) -> Any:
    """Vocabulary entries as the caption tokens are: stripped, lowercased, single spaces."""
    if isinstance(value, str):
        return " ".join(value.lower().split())
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


class ChairCategory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="canonical ('node') word, e.g. the COCO category name")
    synonyms: list[str] = Field(default_factory=list)

    _normalise = field_validator("name", "synonyms", mode="before")(lambda v: _normalised(v))


class QualifiedHeads(BaseModel):
    """``"<qualifier> <head>"`` is rewritten to ``head`` (e.g. "baby elephant" -> "elephant")."""

    model_config = ConfigDict(extra="ignore")
    qualifiers: list[str]
    heads: list[str]


class DropRule(BaseModel):
    """If ``when`` is among a caption's words, every ``drop`` word is removed (toilet seat is no chair)."""

    model_config = ConfigDict(extra="ignore")
    drop: str
    when: str


class ChairVocabulary(BaseModel):
    """Object vocabulary + rules. Package data ``coco_chair_vocab.json`` holds the COCO instance."""

    model_config = ConfigDict(extra="ignore")

    name: str
    description: str = ""
    categories: list[ChairCategory]
    compounds: list[str] = Field(default_factory=list, description="phrases merged into one token")
    qualified_heads: list[QualifiedHeads] = Field(default_factory=list)
    rewrites: dict[str, str] = Field(default_factory=dict, description="phrase -> replacement word")
    drop_when_present: list[DropRule] = Field(default_factory=list)

    _normalise = field_validator("compounds", mode="before")(lambda v: _normalised(v))

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def coco(cls) -> ChairVocabulary:
        """The 80-category COCO vocabulary shipped as package data."""
        text = resources.files("clearsight.evals.data").joinpath(COCO_VOCAB_RESOURCE).read_text("utf-8")
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> ChairVocabulary:
        """Load a vocabulary file (same schema as the COCO package data); None gives the COCO one."""
        if path is None:
            return cls.coco()
        data = read_json_file(path, "CHAIR vocabulary file")
        try:
            return cls.model_validate(data)
        except Exception as exc:  # pydantic.ValidationError: keep it to one line
            first = str(exc).splitlines()[1:2]
            raise EvalInputError(f"{path}: not a CHAIR vocabulary ({' '.join(first)}); see "
                                 "clearsight/evals/data/coco_chair_vocab.json for the schema") from exc

    def sha256(self) -> str:
        return sha256_text(canonical_json(self.model_dump()))

    # ---------------------------------------------------------------------------------- derived
    @cached_property
    def inverse(self) -> dict[str, str]:
        """Every entry (name or synonym) -> its node word. Later duplicates do not override earlier."""
        inv: dict[str, str] = {}
        for cat in self.categories:
            for entry in [cat.name, *cat.synonyms]:
                inv.setdefault(entry, cat.name)
        return inv

    @cached_property
    def phrases(self) -> dict[tuple[str, ...], str]:
        """Multi-word phrase -> the token it becomes (compounds map to themselves; rules override)."""
        out: dict[tuple[str, ...], str] = {}
        for c in [*self.compounds, *(e for e in self.inverse if " " in e)]:  # multi-word entries match whole
            out[tuple(c.split())] = c
        for rule in self.qualified_heads:
            for q in rule.qualifiers:
                for h in rule.heads:
                    out[(q, h)] = h
        for src, dst in self.rewrites.items():
            out[tuple(src.split())] = dst
        return out

    @cached_property
    def _max_phrase(self) -> int:
        return max((len(p) for p in self.phrases), default=1)

    @cached_property
    def protected(self) -> frozenset[str]:
        """Words never singularised: every word of the vocabulary and of every phrase."""
        words = {w for entry in self.inverse for w in entry.split()}
        words |= {w for p in self.phrases for w in p}
        return frozenset(words)

    # ---------------------------------------------------------------------------------- text
    def tokenize(self, caption: str) -> list[str]:
        """Lowercase tokens; a final clitic ('s, n't, ...) is its own token as in NLTK's word_tokenize."""
        return tokenize(caption)

    def singularize(self, token: str) -> str:
        if token in self.protected or not token.isalpha():
            return token
        return inflect_engine().singular_noun(token) or token  # False when already singular

    def merge_phrases(self, tokens: Sequence[str]) -> list[str]:
        """Longest-first phrase merging (the original merged pairs: see the module docstring)."""
        out, i = [], 0
        while i < len(tokens):
            for n in range(min(self._max_phrase, len(tokens) - i), 1, -1):
                rep = self.phrases.get(tuple(tokens[i:i + n]))
                if rep is not None:
                    out.append(rep)
                    i += n
                    break
            else:
                out.append(tokens[i])
                i += 1
        return out

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """Object mentions in order as ``(word, node word)``; repeats are kept (they count in CHAIR_i)."""
        words = self.merge_phrases([self.singularize(t) for t in self.tokenize(caption)])
        for rule in self.drop_when_present:
            if rule.when in words:
                words = [w for w in words if w != rule.drop]
        return [(w, self.inverse[w]) for w in words if w in self.inverse]

    def objects(self, caption: str) -> list[str]:
        """Node words mentioned in ``caption`` (with repeats)."""
        return [node for _, node in self.mentions(caption)]


def tokenize(caption: str) -> list[str]:
    """Lowercase word and punctuation tokens, a word's final clitic split off as NLTK does.

    >>> tokenize("The dog's owner can't see the dogs' bowl.")
    ['the', 'dog', "'s", 'owner', 'ca', "n't", 'see', 'the', 'dogs', "'", 'bowl', '.']
    """
    out: list[str] = []
    for tok in _TOKEN_RE.findall(caption.lower()):
        m = _CLITIC_RE.match(tok)
        out += [m.group(1), m.group(2)] if m else [tok]
    return out


def count_words(caption: str) -> int:
    """Caption length in words (tokens containing a letter or digit; punctuation is not a word)."""
    return sum(1 for t in _TOKEN_RE.findall(caption.lower()) if _WORD_RE.search(t))


def drop_incomplete_sentence(caption: str) -> str:
    """Cut everything after the last sentence end (. ! ?), for short (64-token) generations.

    This is the truncation OPERA's author suggests (OPERA issue #30; the commented-out
    ``cap[:cap.rfind('.') + 1]`` in OPERA's chair.py). A caption without any sentence end becomes "".
    """
    text = caption.rstrip()
    ends = [text.rfind(c) for c in ".!?"]
    return text[: max(ends) + 1] if max(ends) >= 0 else ""


# ------------------------------------------------------------------------------------ ground truth
def _image_ids_in(data: Mapping[str, Any], path: Path) -> list[int]:
    if not isinstance(data, Mapping) or "images" not in data or "annotations" not in data:
        raise EvalInputError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations')")
    return [im["id"] for im in data["images"]]


def build_ground_truth(instance_files: Sequence[str | os.PathLike[str]],
                       caption_files: Sequence[str | os.PathLike[str]],
                       vocab: ChairVocabulary | None = None,
                       image_ids: Iterable[int] | None = None,
                       cache_path: str | os.PathLike[str] | None = None) -> dict[int, set[str]]:
    """Per-image GT objects = instance categories (via the synonym map) U objects in human captions.

    COCO needs the train+val 2014 instance and caption files (reference/evals.md section 2.3); the shapes
    world writes one of each. With ``cache_path`` the result for these files + vocabulary + image ids is
    stored as JSON and reused (no pickles).
    """
    vocab = vocab or ChairVocabulary.coco()
    inst = [require_file(p, "COCO instance annotation file", "pass instances_*2014.json paths")
            for p in instance_files]
    caps = [require_file(p, "COCO caption annotation file", "pass captions_*2014.json paths")
            for p in caption_files]
    if not inst:
        raise EvalInputError("build_ground_truth: no instance annotation files given; pass at least one")
    wanted = None if image_ids is None else sorted(set(image_ids))
    key = sha256_text(canonical_json({
        "files": [sha256_file(p) for p in inst + caps], "vocab": vocab.sha256(), "image_ids": wanted,
        "tokenizer": TOKENIZER_VERSION}))
    if cache_path is not None and Path(cache_path).is_file():
        cached = read_json_file(cache_path, "CHAIR ground-truth cache")
        if cached.get("key") == key:
            return {int(k): set(v) for k, v in cached["objects"].items()}

    known: set[int] = set()
    gt: dict[int, set[str]] = {}
    keep = None if wanted is None else set(wanted)
    for p in inst:
        data = read_json_file(p, "COCO instance annotation file")
        known.update(_image_ids_in(data, p))
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        for i, ann in enumerate(data["annotations"]):
            imid = ann["image_id"]
            if keep is not None and imid not in keep:
                continue
            name = names.get(ann["category_id"])
            if name is None or name not in vocab.inverse:
                raise EvalInputError(f"{p}: annotation {i} has category {ann['category_id']!r} ({name!r}) "
                                     f"that is not in CHAIR vocabulary {vocab.name!r}; use the matching "
                                     "vocabulary")
            gt.setdefault(imid, set()).add(vocab.inverse[name])
    for p in caps:
        data = read_json_file(p, "COCO caption annotation file")
        known.update(_image_ids_in(data, p))
        for ann in data["annotations"]:
            imid = ann["image_id"]
            if keep is not None and imid not in keep:
                continue
            gt.setdefault(imid, set()).update(vocab.objects(ann["caption"]))
    ids = sorted(known) if wanted is None else wanted
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise EvalInputError(f"image id {unknown[0]} ({len(unknown)} in all) is not in the annotation files "
                             f"{', '.join(map(str, inst + caps))}; check the image list")
    result = {i: gt.get(i, set()) for i in ids}
    if cache_path is not None:
        objects = {str(i): sorted(v) for i, v in result.items()}
        atomic_write_json(cache_path, {"key": key, "vocab": vocab.name, "objects": objects}, indent=None)
    return result


def sample_image_ids(annotation_file: str | os.PathLike[str], n: int = 500, seed: int = 0) -> list[int]:
    """Seeded CHAIR image list (default 500 images, section 2.5): sorted ids, then ``Random(seed).sample``.

    Save the returned list with the results: image selection is the biggest source of disagreement.
    """
    data = read_json_file(annotation_file, "COCO annotation file")
    ids = sorted(_image_ids_in(data, Path(annotation_file)))
    if len(ids) < n:
        raise EvalInputError(f"{annotation_file}: only {len(ids)} images, cannot sample {n}; lower n")
    return sorted(random.Random(seed).sample(ids, n))


# ------------------------------------------------------------------------------------ scoring
class ChairResult(BaseModel):
    chair_s: float
    chair_i: float
    recall: float
    mean_length: float
    n_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    n_hallucinated_captions: int
    truncated: bool
    per_caption: list[dict[str, Any]] = Field(default_factory=list, repr=False)


def compute_chair(captions: Mapping[int, str] | Sequence[tuple[int, str]],
                  ground_truth: Mapping[int, set[str] | Sequence[str]],
                  vocab: ChairVocabulary | None = None,
                  drop_incomplete: bool = False) -> ChairResult:
    """Score generated captions against per-image GT sets (from :func:`build_ground_truth`)."""
    vocab = vocab or ChairVocabulary.coco()
    items = list(captions.items()) if isinstance(captions, Mapping) else list(captions)
    if not items:
        raise EvalInputError("compute_chair: no captions given; generate captions first")
    n_ment = n_hall = n_hall_caps = n_words = recalled = n_gt = 0
    per: list[dict[str, Any]] = []
    for imid, cap in items:
        if imid not in ground_truth:
            raise EvalInputError(f"compute_chair: image id {imid!r} has no ground truth; build it for the "
                                 "same image list")
        text = drop_incomplete_sentence(cap) if drop_incomplete else cap
        gt = set(ground_truth[imid])
        ments = vocab.mentions(text)
        hall = [m for m in ments if m[1] not in gt]
        rec = sorted({node for _, node in ments if node in gt})
        words = count_words(text)
        n_ment += len(ments)
        n_hall += len(hall)
        n_hall_caps += bool(hall)
        n_words += words
        recalled += len(rec)
        n_gt += len(gt)
        per.append({"image_id": imid, "caption": text, "mentions": ments, "hallucinated": hall,
                    "hallucinated_words": [w for w, _ in hall], "recalled": rec, "gt_objects": sorted(gt),
                    "n_words": words})
    n = len(items)
    return ChairResult(
        chair_s=n_hall_caps / n, chair_i=n_hall / n_ment if n_ment else 0.0,
        recall=recalled / n_gt if n_gt else 0.0, mean_length=n_words / n, n_captions=n, n_mentions=n_ment,
        n_hallucinated_mentions=n_hall, n_hallucinated_captions=n_hall_caps, truncated=drop_incomplete,
        per_caption=per)


def load_captions_file(path: str | os.PathLike[str], image_id_key: str = "image_id",
                       caption_key: str = "caption") -> list[tuple[int, str]]:
    """Read generated captions from JSON lines or a JSON array of ``{image_id, caption}`` objects."""
    p = require_file(path, "caption file", "check the path")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = read_json_file(p, "caption file")
    else:
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise EvalInputError(f"{p}: malformed JSON on line {i} ({exc.msg}); "
                                         "fix that line") from exc
    if not records:
        raise EvalInputError(f"{p}: empty caption file; generate captions first")
    out = []
    for i, r in enumerate(records, start=1):
        if image_id_key not in r or caption_key not in r:
            raise EvalInputError(f"{p}: record {i} lacks {image_id_key!r} or {caption_key!r}")
        out.append((r[image_id_key], r[caption_key]))
    return out


def chair_measures(per_caption: Mapping[str, Sequence[Mapping]], partners: Mapping[str, str] | None = None,
                   benchmark: str = "chair") -> list[Measure]:
    """CHAIR_s, CHAIR_i and recall per image (``ChairResult.per_caption``, same image order for every
    system); with the world's partner map also the partner share of hallucinated mentions and the share of
    captions that name an absent partner."""
    cs, cin, cid, rn, rd, pn, pd, pc = ({} for _ in range(8))
    for name, rows in per_caption.items():
        cs[name] = np.array([bool(r["hallucinated"]) for r in rows], dtype=float)
        cin[name] = np.array([len(r["hallucinated"]) for r in rows], dtype=float)
        cid[name] = np.array([len(r["mentions"]) for r in rows], dtype=float)
        rn[name] = np.array([len(r["recalled"]) for r in rows], dtype=float)
        rd[name] = np.array([len(r["gt_objects"]) for r in rows], dtype=float)
        if partners is not None:
            from clearsight.evals.metrics.partner import partner_mentions

            counts = [partner_mentions(r["hallucinated"], r["gt_objects"], partners) for r in rows]
            pn[name] = np.array(counts, dtype=float)
            pd[name] = cin[name]
            pc[name] = (np.array(counts) > 0).astype(float)
    ones = {k: np.ones(len(v)) for k, v in cs.items()}
    out = [Measure(benchmark, "chair_s", None, "proportion", cs, ones, "CHAIR_s", False),
           Measure(benchmark, "chair_i", None, "ratio", cin, cid, "CHAIR_i", False),
           Measure(benchmark, "recall", None, "ratio", rn, rd, "recall", True)]
    if partners is not None:
        out += [Measure(benchmark, "partner_share", None, "ratio", pn, pd, "partner share of hallucinations", False),
                Measure(benchmark, "partner_captions", None, "proportion", pc, ones,
                        "captions naming an absent partner", False)]
    return out
