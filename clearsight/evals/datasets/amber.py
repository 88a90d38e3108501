"""AMBER from its official files on disk (the repository's ``data`` folder plus the images), and an
AMBER-style set built from a shapes world.

Official files: ``annotations.json`` (a list; entry ``id - 1`` is query ``id``: ``type``, ``truth``,
``hallu``), ``relation.json`` (object -> associated words), ``safe_words.txt`` (one word a line),
``query/query_generative.json`` and ``query/query_discriminative.json`` (or ``query/query_all.json``): lists
of ``{"id", "image", "query"}``; images (``AMBER_<n>.jpg``) in a folder of their own.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from clearsight.evals._io import read_json_file, require_file
from clearsight.evals.datasets.shapes_derived import number_word, plural, read_scenes, write_derived
from clearsight.evals.errors import EvalInputError
from clearsight.evals.metrics.amber import AmberAnnotation, AmberVocabulary

PARTS: tuple[str, ...] = ("generative", "discriminative")


class AmberQuery(BaseModel):
    id: int
    image: str
    query: str


@dataclass
class AmberData:
    queries: dict[str, list[AmberQuery]]  # part -> queries in file order
    annotations: dict[int, AmberAnnotation]
    vocab: AmberVocabulary
    image_dir: Path
    files: list[tuple[str, str, int]] = field(default_factory=list)  # path, sha256, records


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _queries(path: Path) -> list[AmberQuery]:
    data = read_json_file(path, "AMBER query file")
    if not isinstance(data, list):
        raise EvalInputError(f"{path}: not a JSON list of {{id, image, query}} objects")
    try:
        return [AmberQuery.model_validate(q) for q in data]
    except ValidationError as exc:
        from clearsight.errors import pydantic_message

        raise EvalInputError(pydantic_message(exc, str(path))) from None


def load_amber(root: str | Path, image_dir: str | Path | None = None, parts: tuple[str, ...] | list[str] = PARTS
               ) -> AmberData:
    """The queries of ``parts``, their annotations, the vocabulary; every image named must exist."""
    root = Path(root)
    ann_path = require_file(root / "annotations.json", "AMBER annotation file", "give the AMBER data folder as root")
    rel_path = require_file(root / "relation.json", "AMBER relation file", "give the AMBER data folder as root")
    safe_path = require_file(root / "safe_words.txt", "AMBER safe-word file", "give the AMBER data folder as root")
    raw = read_json_file(ann_path, "AMBER annotation file")
    try:
        annotations = {a.id: a for a in (AmberAnnotation.model_validate(x) for x in raw)}
    except (ValidationError, TypeError) as exc:
        raise EvalInputError(f"{ann_path}: not a list of AMBER annotations ({str(exc).splitlines()[0]})") from None
    vocab = AmberVocabulary(read_json_file(rel_path, "AMBER relation file"),
                            [w for w in safe_path.read_text(encoding="utf-8").split("\n") if w])
    files = [(str(ann_path), _sha(ann_path), len(annotations)), (str(rel_path), _sha(rel_path), len(vocab.association)),
             (str(safe_path), _sha(safe_path), len(vocab.safe))]
    queries: dict[str, list[AmberQuery]] = {}
    every = root / "query" / "query_all.json"
    for part in parts:
        path = root / "query" / f"query_{part}.json"
        if path.is_file():
            qs = _queries(path)
        elif every.is_file():
            path = every
            qs = [q for q in _queries(every)
                  if q.id in annotations and (annotations[q.id].type == "generative") == (part == "generative")]
        else:
            raise EvalInputError(f"no AMBER query file {path} (nor {every}): give the AMBER data folder as root")
        unknown = [q.id for q in qs if q.id not in annotations]
        if unknown:
            raise EvalInputError(f"{path}: query id {unknown[0]} has no entry in {ann_path}")
        queries[part] = qs
        files.append((str(path), _sha(path), len(qs)))
    images = Path(image_dir) if image_dir is not None else root / "image"
    for qs in queries.values():
        for q in qs:
            if not (images / q.image).is_file():
                raise EvalInputError(f"AMBER image {images / q.image} (query {q.id}) does not exist: give image_dir")
    return AmberData(queries, annotations, vocab, images, files)


# ------------------------------------------------------------------------------------ shapes world
def build_shapes_amber(instances: str | Path, partners: dict[str, str], seed: int = 0) -> dict[str, str]:
    """AMBER-style official-format files from a shapes world's scenes (relative path -> text).

    Generative: one "Describe this image." per scene; truth = the present shapes, hallu = the absent
    partners of present shapes (the objects the world's prior suggests). Discriminative, per scene, each
    yes or no at random: existence (a present shape / an absent one, preferring an absent partner),
    attribute-state (the colour of a single object), attribute-number (how many of a present shape) and
    relation (is one single object above / left of another). The vocabulary is the shape names."""
    scenes, shapes, colours = read_scenes(instances)
    annotations: list[dict] = []
    gen: list[dict] = []
    dis: list[dict] = []
    for sc in scenes:
        present = sorted({o.shape for o in sc.objects})
        hallu = sorted({partners[s] for s in present if s in partners and partners[s] not in present})
        annotations.append({"id": len(annotations) + 1, "type": "generative", "truth": present, "hallu": hallu})
        gen.append({"id": len(annotations), "image": sc.file_name, "query": "Describe this image."})
    for sc in scenes:
        rng = random.Random(f"amber/{seed}/{sc.image_id}")
        present = sorted({o.shape for o in sc.objects})
        absent = [s for s in shapes if s not in present]
        asks: list[tuple[str, str, str]] = []  # type, question, truth
        if present and absent:
            yes = rng.random() < 0.5
            partner_absent = [partners[s] for s in present if partners.get(s) in absent]
            shape = rng.choice(present) if yes else rng.choice(partner_absent or absent)
            asks.append(("discriminative-hallucination", f"Is there a {shape} in this image?", "yes" if yes else "no"))
        singles = sc.singles()
        if singles and len(colours) > 1:
            o = rng.choice(singles)
            yes = rng.random() < 0.5
            colour = o.colour if yes else rng.choice([c for c in colours if c != o.colour])
            asks.append(("discriminative-attribute-state", f"Is the {o.shape} {colour}?", "yes" if yes else "no"))
        if present:
            shape = rng.choice(present)
            n = sc.count(shape)
            yes = rng.random() < 0.5
            k = n if yes else n + 1
            q = f"Is there one {shape} in this image?" if k == 1 else \
                f"Are there {number_word(k)} {plural(shape)} in this image?"
            asks.append(("discriminative-attribute-number", q, "yes" if yes else "no"))
        pairs = [(a, b) for a in singles for b in singles if a.cell[0] < b.cell[0]]
        if pairs:
            a, b = rng.choice(pairs)
            yes = rng.random() < 0.5
            first, second = (a, b) if yes else (b, a)
            asks.append(("discriminative-relation", f"Is the {first.shape} above the {second.shape}?",
                         "yes" if yes else "no"))
        for kind, question, truth in asks:
            annotations.append({"id": len(annotations) + 1, "type": kind, "truth": truth})
            dis.append({"id": len(annotations), "image": sc.file_name, "query": question})
    return {"annotations.json": json.dumps(annotations), "relation.json": json.dumps({s: [] for s in shapes}),
            "safe_words.txt": "", "query/query_generative.json": json.dumps(gen),
            "query/query_discriminative.json": json.dumps(dis)}


def shapes_amber_root(world_root: str | Path, instances: str | Path, partners: dict[str, str], seed: int = 0
                      ) -> Path:
    """The AMBER-style folder of a written shapes world (``<world>/amber``), written on first use."""
    folder = Path(world_root) / "amber"
    return write_derived(folder, Path(instances), seed, lambda: build_shapes_amber(instances, partners, seed))
