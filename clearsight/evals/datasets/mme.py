"""MME hallucination subsets from the official release folder on disk, and an MME-style set built from a
shapes world.

Official layout (``MME_Benchmark_release_version``, as LLaVA's ``convert_answer_to_mme.py`` reads it):
one folder per subset (``existence``, ``count``, ``position``, ``color``) holding, per image, the image
file and a ``<image stem>.txt`` of two lines ``question<TAB>answer`` (answer Yes / No); subsets of the
other layout keep them in ``images/`` and ``questions_answers_YN/``, which is read too.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clearsight.evals.datasets.shapes_derived import number_word, plural, read_scenes, write_derived
from clearsight.evals.errors import EvalInputError
from clearsight.evals.metrics.mme import SUBSETS, MmeQuestion

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
SUFFIX = " Please answer yes or no."  # the official questions end with it


@dataclass
class MmeSubset:
    name: str
    questions: list[MmeQuestion]
    image_dir: Path
    sha256: str  # of the subset's question files (names and bytes, in name order)
    path: str


def _folders(root: Path, subset: str) -> tuple[Path, Path]:
    folder = root / subset
    if (folder / "questions_answers_YN").is_dir():
        return folder / "questions_answers_YN", folder / "images"
    return folder, folder


def load_mme_subset(root: str | Path, subset: str, image_dir: str | Path | None = None) -> MmeSubset:
    """One subset's questions in file order (files by name, two lines each); every image must exist."""
    root = Path(root)
    qa_dir, images = _folders(root, subset)
    if image_dir is not None:
        images = Path(image_dir)
    if not qa_dir.is_dir():
        raise EvalInputError(f"MME subset folder {qa_dir} does not exist: give the MME_Benchmark_release_version "
                             "folder as root")
    files = sorted(p for p in qa_dir.iterdir() if p.suffix == ".txt")
    if not files:
        raise EvalInputError(f"MME subset folder {qa_dir} holds no <image>.txt question files")
    h = hashlib.sha256()
    questions = []
    for f in files:
        raw = f.read_bytes()
        h.update(f.name.encode() + b"\0" + raw)
        image = next((f.stem + s for s in IMAGE_SUFFIXES if (images / (f.stem + s)).is_file()), None)
        if image is None:
            raise EvalInputError(f"MME {subset}: no image {f.stem}.jpg/.png in {images} for {f}: check the folder")
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            question, tab, answer = line.rstrip("\r").rpartition("\t")
            if not tab or answer.strip().lower() not in ("yes", "no"):
                raise EvalInputError(f"{f}:{n}: not 'question<TAB>Yes|No': fix the line")
            questions.append(MmeQuestion(subset=subset, image=image, question=question,
                                         answer=answer.strip().lower()))  # type: ignore[arg-type]
    return MmeSubset(subset, questions, images, h.hexdigest(), str(qa_dir))


def load_mme(root: str | Path, subsets: Sequence[str] = SUBSETS, image_dir: str | Path | None = None
             ) -> dict[str, MmeSubset]:
    return {s: load_mme_subset(root, s, image_dir) for s in subsets}


# ------------------------------------------------------------------------------------ shapes world
def build_shapes_mme(instances: str | Path, seed: int = 0) -> dict[str, str]:
    """MME-style pairs from a shapes world's scenes, as official-layout files (relative path -> text).

    Per scene, one pair per subset where the scene allows it (the yes question first, as in MME):
    existence: a present shape / an absent shape; count: the true number of a present shape / one more;
    position: "Is the A above the B?" for two single objects in different rows, true / swapped (same
    with left of, for the same row); color: the true colour of a single object / another colour."""
    scenes, shapes, colours = read_scenes(instances)
    files: dict[str, str] = {}
    for sc in scenes:
        rng = random.Random(f"{seed}/{sc.image_id}")
        stem = Path(sc.file_name).stem
        present = sorted({o.shape for o in sc.objects})
        absent = [s for s in shapes if s not in present]
        pairs: dict[str, tuple[str, str]] = {}
        if present and absent:
            pairs["existence"] = (f"Is there a {rng.choice(present)} in this image?",
                                  f"Is there a {rng.choice(absent)} in this image?")
        if present:
            shape = rng.choice(present)
            n = sc.count(shape)

            pairs["count"] = (_how_many(shape, n), _how_many(shape, n + 1))
        singles = sc.singles()
        rel = [(a, b) for a in singles for b in singles if a.cell[0] < b.cell[0] or
               (a.cell[0] == b.cell[0] and a.cell[1] < b.cell[1])]
        if rel:
            a, b = rng.choice(rel)
            word = "above" if a.cell[0] < b.cell[0] else "on the left of"
            pairs["position"] = (f"Is the {a.shape} {word} the {b.shape} in this image?",
                                 f"Is the {b.shape} {word} the {a.shape} in this image?")
        if singles and len(colours) > 1:
            o = rng.choice(singles)
            other = rng.choice([c for c in colours if c != o.colour])
            pairs["color"] = (f"Is the {o.shape} {o.colour} in this image?", f"Is the {o.shape} {other} in this image?")
        for subset, (yes, no) in pairs.items():
            files[f"{subset}/{stem}.txt"] = f"{yes}{SUFFIX}\tYes\n{no}{SUFFIX}\tNo\n"
    for subset in SUBSETS:
        if not any(k.startswith(f"{subset}/") for k in files):
            raise EvalInputError(f"the shapes world {instances} gives no MME {subset} pair: use a larger world")
    return files


def _how_many(shape: str, k: int) -> str:
    return (f"Is there one {shape} in this image?" if k == 1
            else f"Are there {number_word(k)} {plural(shape)} in this image?")


def shapes_mme_root(world_root: str | Path, instances: str | Path, seed: int = 0) -> Path:
    """The MME-style folder of a written shapes world (``<world>/mme``), written on first use."""
    folder = Path(world_root) / "mme"
    return write_derived(folder, Path(instances), seed, lambda: build_shapes_mme(instances, seed))
