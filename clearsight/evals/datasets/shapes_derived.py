"""Question sets derived from a written shapes world's instance file (objects with shape, colour and cell),
in other benchmarks' official formats (MME, AMBER), so those benchmarks run offline end to end.

They are written beside the world (``<world>/<benchmark>/``) on first use, each file atomically, and are
a pure function of the instance file and the seed (a marker records both, so a changed world or
generator version writes them anew).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearsight.evals._inflect import inflect_engine
from clearsight.evals._io import atomic_write_text, read_json_file, sha256_file

DERIVED_VERSION = 1  # bump when a generator below changes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cell: tuple[int, int]  # (row, col)


@dataclass(frozen=True)
class SceneRecord:
    image_id: int
    file_name: str
    objects: tuple[SceneObject, ...]

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def singles(self) -> list[SceneObject]:
        """Objects whose shape occurs once in the scene (so "the <shape>" names one object)."""
        c = Counter(o.shape for o in self.objects)
        return [o for o in self.objects if c[o.shape] == 1]


def read_scenes(instances: str | Path) -> tuple[list[SceneRecord], list[str], list[str]]:
    """Scenes (image id order), all shape names and all colours of a shapes-world instance file."""
    data = read_json_file(instances, "shapes-world instance file")
    names = {c["id"]: c["name"] for c in data["categories"]}
    objs: dict[int, list[SceneObject]] = {}
    colours: set[str] = set()
    for a in data["annotations"]:
        if "colour" not in a or "cell" not in a:
            from clearsight.evals.errors import EvalInputError

            raise EvalInputError(f"{instances}: annotation {a.get('id')} has no colour / cell: not a shapes-world "
                                 "instance file")
        objs.setdefault(a["image_id"], []).append(SceneObject(names[a["category_id"]], a["colour"], tuple(a["cell"])))
        colours.add(a["colour"])
    scenes = [SceneRecord(im["id"], im["file_name"], tuple(objs.get(im["id"], [])))
              for im in sorted(data["images"], key=lambda im: im["id"])]
    return scenes, [names[k] for k in sorted(names)], sorted(colours)


def plural(word: str) -> str:
    return inflect_engine().plural_noun(word) or f"{word}s"


def number_word(n: int) -> str:
    return inflect_engine().number_to_words(n)


def write_derived(folder: Path, instances: Path, seed: int, build: Callable[[], dict[str, str]]) -> Path:
    """Write ``build()`` (relative path -> text) into ``folder`` unless its marker says it is current."""
    marker = folder / "derived.json"
    want: dict[str, Any] = {"version": DERIVED_VERSION, "instances": sha256_file(instances), "seed": seed}
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == want:
                return folder
        except ValueError:
            pass
    for rel, text in build().items():
        atomic_write_text(folder / rel, text)
    atomic_write_text(marker, json.dumps(want))
    return folder
