"""The shapes world: a seeded, offline scene generator with exact ground truth.

Why it exists (shared/evals.md, "The shapes world"): every benchmark (POPE, CHAIR, CrossCheck) must run end
to end on a laptop without downloads, through the same code paths as COCO. Scenes hold a few coloured
shapes on a grid; some shape types come in *partner pairs* that co-occur with a set probability, so that a
model trained on these scenes learns a co-occurrence prior and adversarial POPE (negatives by
co-occurrence, reference/evals.md 1.2) is harder than random POPE, as on COCO.

World layout follows reference/demo-model.md: 96x96 px, a 4x4 grid of 24-px cells, objects of 18-22 px
in a random free cell with +-2 px jitter, 16 shape types, 5 colours, 8 partner pairs, partner probability
0.85, optional near-invisible *training-only* noise objects, captions like
"a yellow diamond, a blue ring and a yellow square.".

Files written by :func:`write_shapes_world` mirror COCO 2014 (``images/``, ``annotations/instances_*.json``,
``annotations/captions_*.json``) plus official-format POPE files and a CHAIR vocabulary, so the COCO loaders
read them unchanged.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clearsight.evals._inflect import inflect_engine
from clearsight.evals._io import atomic_write_bytes, atomic_write_text, canonical_json, sha256_text
from clearsight.evals.datasets.pope import (
    SPLITS,
    PopeGenerationConfig,
    PopeSet,
    load_pope_file,
    write_pope_files,
)
from clearsight.evals.errors import EvalInputError
from clearsight.evals.metrics.chair import ChairVocabulary, build_ground_truth
from clearsight.evals.metrics.partner import build_partner_questions, write_partner_file

GENERATOR_VERSION = 2  # bump when drawing/sampling changes so cached builtin folders are regenerated

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond",
    "moon", "arrow", "hexagon", "pentagon", "hourglass", "house", "frame", "trapezoid",
)

# Synonyms exercise CHAIR's synonym handling; "plus sign" is a two-word compound on purpose.
SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "disk", "dot"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross", "plus", "plus sign"],
    "heart": ["heart"],
    "ring": ["ring", "hoop", "annulus"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "moon": ["moon", "crescent"],
    "arrow": ["arrow"],
    "hexagon": ["hexagon"],
    "pentagon": ["pentagon"],
    "hourglass": ["hourglass"],
    "house": ["house", "hut"],
    "frame": ["frame", "outline"],
    "trapezoid": ["trapezoid", "trapezium"],
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
}

# Eight pairs covering the 16 types (the first four are the examples of reference/demo-model.md).
PARTNER_PAIRS: tuple[tuple[str, str], ...] = (
    ("square", "hourglass"), ("ring", "diamond"), ("pentagon", "house"), ("triangle", "frame"),
    ("circle", "star"), ("cross", "heart"), ("moon", "arrow"), ("hexagon", "trapezoid"),
)


ORGANISM_FIELDS = ("small_shapes", "small_size", "small_contrast", "caption_style")


class ShapesWorldSpec(BaseModel):
    """Everything that determines a shapes world; the same spec always gives the same bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 1000 scenes hold ~740 shapes whose partner is absent: enough partner questions for a yes-rate CI
    # half-width of <= 4 points (issue 16); 500 held ~370.
    n_images: int = Field(1000, ge=1)
    seed: int = 1234
    image_size: int = 96
    grid: int = 4
    shapes: tuple[str, ...] = SHAPES
    synonyms: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in SYNONYMS.items()})
    colours: dict[str, tuple[int, int, int]] = Field(default_factory=lambda: dict(COLOURS))
    background: tuple[int, int, int] = (30, 30, 30)
    partner_pairs: tuple[tuple[str, str], ...] = PARTNER_PAIRS
    partner_probability: float = Field(0.85, ge=0.0, le=1.0,
                                       description="P(partner present | one member present)")
    objects_per_scene: tuple[int, int] = (2, 6)
    object_size: tuple[int, int] = (18, 22)
    jitter: int = 2
    noise_fraction: float = Field(0.0, ge=0.0, le=1.0,
                                  description="share of objects drawn nearly invisible (training only)")
    noise_alpha: float = 0.08
    captions_per_image: int = Field(3, ge=1)
    name: str = "shapes"
    # Model-organism options (issue 17), all off by default so the shipped world is unchanged (and so is its
    # digest: see ``digest``). A VCD-style contrast needs a prior whose evidence is lost under diffusion noise
    # while its trigger survives (Leng et al. 2024 Sec. 3: noise keeps the coarse scene, loses small details),
    # so the second member of a pair can be drawn small and at low contrast next to a large trigger.
    small_shapes: tuple[str, ...] = Field((), description="shape types drawn small and at low contrast")
    small_size: tuple[int, int] = (8, 11)
    small_contrast: float = Field(1.0, gt=0.0, le=1.0,
                                  description="opacity of the small shapes over the background")
    caption_style: Literal["list", "long"] = Field(
        "list", description="list: 'a red square, a blue ring and ...'; long: positions and sizes, each "
        "partner named right after its trigger ('a large red square at the top left with a small blue "
        "hourglass at the lower right, ...'), so the text itself carries the pair prior")

    @model_validator(mode="after")
    def _check(self) -> ShapesWorldSpec:
        lo, hi = self.objects_per_scene
        if not 1 <= lo <= hi <= min(self.grid**2, len(self.shapes)):
            raise ValueError(f"objects_per_scene {self.objects_per_scene} must satisfy 1 <= min <= max <= "
                             f"min(grid cells, shape types)")
        if self.image_size % self.grid:
            raise ValueError("image_size must be a multiple of grid")
        seen: set[str] = set()
        for a, b in self.partner_pairs:
            for t in (a, b):
                if t not in self.shapes:
                    raise ValueError(f"partner {t!r} is not a shape type")
                if t in seen:
                    raise ValueError(f"shape {t!r} is in more than one partner pair")
                seen.add(t)
        unknown = [t for t in self.small_shapes if t not in self.shapes]
        if unknown:
            raise ValueError(f"small_shapes {unknown} are not shape types")
        if not 1 <= self.small_size[0] <= self.small_size[1] <= self.cell:
            raise ValueError(f"small_size {self.small_size} must satisfy 1 <= min <= max <= cell ({self.cell})")
        missing = [s for s in self.shapes if s not in self.synonyms]
        if missing:
            raise ValueError(f"no synonym list for {missing}")
        return self

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

    def digest(self) -> str:
        """Short hash of the spec + generator version (names the builtin cache folder)."""
        dumped = self.model_dump(mode="json")
        for key in ORGANISM_FIELDS:  # absent at their defaults: worlds written before them keep their folder
            if getattr(self, key) == type(self).model_fields[key].default:
                dumped.pop(key)
        payload = {"v": GENERATOR_VERSION, "spec": dumped}
        return sha256_text(canonical_json(payload))[:16]


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    cell: tuple[int, int]  # (row, col)
    bbox: tuple[int, int, int, int]  # COCO [x, y, w, h]
    noise: bool = False


@dataclass
class Scene:
    image_id: int
    file_name: str
    objects: list[ShapeObject]  # reading order (row-major by cell): the "listed order" POPE uses
    caption: str = ""
    references: list[str] = field(default_factory=list)

    @property
    def object_names(self) -> list[str]:
        return [o.shape for o in self.objects]


# ---------------------------------------------------------------------------------- sampling
def _sample_types(spec: ShapesWorldSpec, rng: random.Random) -> list[str]:
    """Pick the distinct shape types of one scene.

    Each partner pair is a unit that contributes both members with probability q, else one member at
    random; unpaired types are single units. Then P(partner | member) = q / (q + (1 - q) / 2), so
    q = p / (2 - p) gives the spec's partner probability p (exactly when no scene hits its size cap).
    """
    p = spec.partner_probability
    q = p / (2 - p)
    paired = {t for pair in spec.partner_pairs for t in pair}
    units: list[tuple[str, ...]] = [tuple(pr) for pr in spec.partner_pairs]
    units += [(t,) for t in spec.shapes if t not in paired]
    lo, hi = spec.objects_per_scene
    k = rng.randint(lo, hi)
    types: list[str] = []
    for unit in rng.sample(units, len(units)):
        if len(types) >= k:
            break
        if len(unit) == 2 and rng.random() < q and len(types) + 2 <= hi:
            types += list(unit)  # may exceed k by one (never hi) so the last pair is not cut in half
        else:
            types.append(unit[rng.randrange(len(unit))])
    return types


def generate_scenes(spec: ShapesWorldSpec | None = None) -> list[Scene]:
    """The in-memory world: ``spec.n_images`` scenes with objects, colours, cells and captions.

    Deterministic for a spec (one ``random.Random(seed)``); a training script can call this directly.
    """
    spec = spec or ShapesWorldSpec()
    rng = random.Random(spec.seed)
    colours = list(spec.colours)
    cell = spec.cell
    scenes = []
    for idx in range(spec.n_images):
        types = _sample_types(spec, rng)
        cells = rng.sample([(r, c) for r in range(spec.grid) for c in range(spec.grid)], len(types))
        objs = []
        for t, (r, c) in zip(types, cells):
            size = rng.randint(*(spec.small_size if t in spec.small_shapes else spec.object_size))
            cx = c * cell + cell // 2 + rng.randint(-spec.jitter, spec.jitter)
            cy = r * cell + cell // 2 + rng.randint(-spec.jitter, spec.jitter)
            x = min(max(cx - size // 2, 0), spec.image_size - size)
            y = min(max(cy - size // 2, 0), spec.image_size - size)
            noise = spec.noise_fraction > 0 and rng.random() < spec.noise_fraction
            objs.append(ShapeObject(t, rng.choice(colours), (r, c), (x, y, size, size), noise))
        objs.sort(key=lambda o: o.cell)
        image_id = idx + 1
        scene = Scene(image_id, f"{spec.name}_{spec.seed}_{image_id:06d}.png", objs)
        scene.caption = scene_caption(objs) if spec.caption_style == "list" else long_caption(objs, spec)
        scene.references = reference_captions(objs, spec, rng)
        scenes.append(scene)
    return scenes


def organism_spec(**overrides: Any) -> ShapesWorldSpec:
    """The model-organism world of issue 17: each pair's second member small (8-11 px) and faint (opacity
    0.45) beside a large trigger, long captions with positions in which a present partner follows its
    trigger. ``overrides`` go to :class:`ShapesWorldSpec` (seed, n_images, ...)."""
    base: dict[str, Any] = {"small_shapes": tuple(b for _, b in PARTNER_PAIRS), "small_contrast": 0.45,
                            "caption_style": "long", "name": "shapes-organism"}
    return ShapesWorldSpec(**(base | overrides))


def partner_rate(scenes: Sequence[Scene], pairs: Sequence[tuple[str, str]] = PARTNER_PAIRS) -> float:
    """Measured P(partner present | a paired shape present) over ``scenes``."""
    partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    hit = total = 0
    for s in scenes:
        names = set(s.object_names)
        for n in names:
            if n in partner:
                total += 1
                hit += partner[n] in names
    return hit / total if total else 0.0


# ---------------------------------------------------------------------------------- text
def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_caption(objects: Sequence[ShapeObject]) -> str:
    """The training caption style: "a yellow diamond, a blue ring and a yellow square." (listed order)."""
    return _join([f"a {o.colour} {o.shape}" for o in objects]) + "."


ROW_WORDS = ("top", "upper", "lower", "bottom")
COLUMN_WORDS = ("far left", "left", "right", "far right")
LONG_CAPTION_WORDS = ("large", "small", "at", "the", "with", "far", *ROW_WORDS, *COLUMN_WORDS)


def long_caption(objects: Sequence[ShapeObject], spec: ShapesWorldSpec) -> str:
    """The ``long`` caption style: size, colour, shape and grid position of each object, in reading order,
    except that a present partner is named right after its trigger ("a large red square at the top left with
    a small blue hourglass at the bottom right"). Only for a 4 x 4 grid (the position words)."""
    if spec.grid != len(ROW_WORDS):
        raise EvalInputError(f"caption_style='long' needs a {len(ROW_WORDS)} x {len(ROW_WORDS)} grid, not {spec.grid}")
    partner = {a: b for a, b in spec.partner_pairs}  # trigger -> partner (the first member triggers)
    by_shape = {o.shape: o for o in objects}

    def phrase(o: ShapeObject) -> str:
        size = "small" if o.shape in spec.small_shapes else "large"
        r, c = o.cell
        return f"a {size} {o.colour} {o.shape} at the {ROW_WORDS[r]} {COLUMN_WORDS[c]}"

    trigger_of = {b: a for a, b in partner.items()}
    parts: list[str] = []
    for o in objects:
        if trigger_of.get(o.shape) in by_shape:
            continue  # named with its trigger
        mate = by_shape.get(partner.get(o.shape, ""))
        parts.append(f"{phrase(o)} with {phrase(mate)}" if mate is not None else phrase(o))
    return _join(parts) + "."


def reference_captions(objects: Sequence[ShapeObject], spec: ShapesWorldSpec,
                       rng: random.Random) -> list[str]:
    """A few human-style references per image with synonyms, other orders and plural wording."""
    def syn(shape: str) -> str:
        return rng.choice(spec.synonyms[shape])

    def a(phrase: str) -> str:
        return inflect_engine().a(phrase)  # "an hourglass", "a yellow ring"

    styles = [
        lambda objs: _join([a(f"{o.colour} {syn(o.shape)}") for o in objs]) + ".",
        lambda objs: "There is " + _join([a(syn(o.shape)) for o in objs]) + " in the picture.",
        lambda objs: (f"{len(objs)} shapes on a dark background: "
                      + _join([a(f"{o.colour} {syn(o.shape)}") for o in objs]) + "."),
        lambda objs: "A picture showing " + _join([a(syn(o.shape)) for o in objs]) + ".",
    ]
    out = []
    for i in range(spec.captions_per_image):
        order = list(objects) if i == 0 else rng.sample(list(objects), len(objects))
        out.append(styles[i % len(styles)](order))
    return out


# ---------------------------------------------------------------------------------- drawing
def _shape_mask(shape: str, s: int) -> Image.Image:
    """Draw one shape as an 8-bit mask of size s x s (mask + paste keeps each object inside its box)."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    e = s - 1
    c = e / 2
    w = max(2, s // 5)
    if shape == "circle":
        d.ellipse([0, 0, e, e], fill=255)
    elif shape == "square":
        d.rectangle([0, 0, e, e], fill=255)
    elif shape == "triangle":
        d.polygon([(c, 0), (e, e), (0, e)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = c if k % 2 == 0 else c * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((c + r * math.cos(a), c + r * math.sin(a)))
        d.polygon(pts, fill=255)
    elif shape == "cross":
        t = s // 3
        d.rectangle([t, 0, e - t, e], fill=255)
        d.rectangle([0, t, e, e - t], fill=255)
    elif shape == "heart":
        r = s / 4
        d.ellipse([0, 0, 2 * r, 2 * r], fill=255)
        d.ellipse([e - 2 * r, 0, e, 2 * r], fill=255)
        d.polygon([(0, r * 1.2), (e, r * 1.2), (c, e)], fill=255)
    elif shape == "ring":
        d.ellipse([0, 0, e, e], outline=255, width=w)
    elif shape == "diamond":
        d.polygon([(c, 0), (e, c), (c, e), (0, c)], fill=255)
    elif shape == "moon":
        d.ellipse([0, 0, e, e], fill=255)
        d.ellipse([s * 0.35, -s * 0.1, e + s * 0.35, e - s * 0.1], fill=0)
    elif shape == "arrow":
        t = s // 3
        d.rectangle([0, t, c, e - t], fill=255)
        d.polygon([(c - 1, 0), (e, c), (c - 1, e)], fill=255)
    elif shape == "hexagon":
        d.regular_polygon((c, c, c), 6, fill=255)
    elif shape == "pentagon":
        d.regular_polygon((c, c, c), 5, fill=255)
    elif shape == "hourglass":
        d.polygon([(0, 0), (e, 0), (c, c)], fill=255)
        d.polygon([(0, e), (e, e), (c, c)], fill=255)
    elif shape == "house":
        d.polygon([(c, 0), (e, s * 0.45), (0, s * 0.45)], fill=255)
        d.rectangle([s * 0.15, s * 0.45, e - s * 0.15, e], fill=255)
    elif shape == "frame":
        d.rectangle([0, 0, e, e], outline=255, width=w)
    elif shape == "trapezoid":
        d.polygon([(s * 0.25, 0), (e - s * 0.25, 0), (e, e), (0, e)], fill=255)
    else:
        raise EvalInputError(f"shapes world: no drawing for shape {shape!r}; use one of "
                             f"{', '.join(SHAPES)}")
    return m


def render_scene(scene: Scene, spec: ShapesWorldSpec | None = None) -> Image.Image:
    """Draw a scene as an RGB image; noise objects are blended at ``noise_alpha`` (nearly invisible)."""
    spec = spec or ShapesWorldSpec()
    img = Image.new("RGB", (spec.image_size, spec.image_size), spec.background)
    for o in scene.objects:
        x, y, w, _ = o.bbox
        mask = _shape_mask(o.shape, w)
        if o.noise:
            mask = mask.point(lambda v: int(v * spec.noise_alpha))
        elif o.shape in spec.small_shapes and spec.small_contrast < 1.0:
            mask = mask.point(lambda v: int(v * spec.small_contrast))
        img.paste(spec.colours[o.colour], (x, y, x + w, y + w), mask)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- vocabulary
def shapes_chair_vocabulary(spec: ShapesWorldSpec | None = None) -> ChairVocabulary:
    """CHAIR vocabulary of the shapes world, same schema as the COCO package data."""
    spec = spec or ShapesWorldSpec()
    cats = [{"name": s, "synonyms": [w for w in spec.synonyms[s] if w != s]} for s in spec.shapes]
    compounds = sorted({w for ws in spec.synonyms.values() for w in ws if " " in w})
    return ChairVocabulary.model_validate({
        "name": spec.name,
        "description": "CHAIR vocabulary of the clearsight shapes world (one category per shape type).",
        "categories": cats,
        "compounds": compounds,
    })


# ---------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ShapesWorldFiles:
    """Paths of a written shapes world (COCO-2014-like layout)."""

    root: Path
    spec: ShapesWorldSpec

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def instances(self) -> Path:
        return self.root / "annotations" / f"instances_{self.spec.name}.json"

    @property
    def captions(self) -> Path:
        return self.root / "annotations" / f"captions_{self.spec.name}.json"

    @property
    def vocabulary(self) -> Path:
        return self.root / "annotations" / f"chair_vocab_{self.spec.name}.json"

    @property
    def pope(self) -> dict[str, Path]:
        return {s: self.root / "pope" / f"{self.spec.name}_pope_{s}.json" for s in SPLITS}

    @property
    def partner(self) -> Path:
        """The partner question set (``clearsight.evals.metrics.partner``)."""
        return self.root / "pope" / f"{self.spec.name}_pope_partner.json"

    def load_pope(self) -> dict[str, PopeSet]:
        return {s: load_pope_file(p, split=s, image_dir=self.images_dir) for s, p in self.pope.items()}

    def chair_vocabulary(self) -> ChairVocabulary:
        return ChairVocabulary.load(self.vocabulary)

    def ground_truth(self, image_ids: Sequence[int] | None = None) -> dict[int, set[str]]:
        return build_ground_truth([self.instances], [self.captions], self.chair_vocabulary(), image_ids)


def _coco_files(spec: ShapesWorldSpec, scenes: Sequence[Scene]) -> tuple[dict[str, Any], dict[str, Any]]:
    cat_id = {s: i + 1 for i, s in enumerate(spec.shapes)}
    images = [{"id": s.image_id, "file_name": s.file_name, "width": spec.image_size,
               "height": spec.image_size} for s in scenes]
    anns, caps = [], []
    for s in scenes:
        for o in s.objects:
            anns.append({"id": len(anns) + 1, "image_id": s.image_id, "category_id": cat_id[o.shape],
                         "bbox": list(o.bbox), "area": o.bbox[2] * o.bbox[3], "iscrowd": 0,
                         "colour": o.colour, "cell": list(o.cell), "noise": o.noise})
        for ref in s.references:
            caps.append({"id": len(caps) + 1, "image_id": s.image_id, "caption": ref})
    info = {"description": f"clearsight shapes world {spec.digest()}", "version": str(GENERATOR_VERSION)}
    categories = [{"id": i, "name": s, "supercategory": "shape"} for s, i in cat_id.items()]
    instances = {"info": info, "licenses": [], "images": images, "annotations": anns,
                 "categories": categories}
    captions = {"info": info, "licenses": [], "images": images, "annotations": caps}
    return instances, captions


def write_shapes_world(spec: ShapesWorldSpec, out_dir: str | os.PathLike[str]) -> ShapesWorldFiles:
    """Write images, COCO-format instance/caption files, POPE files (official format, all three splits,
    built from the GT object lists with the official recipe), the partner question set and the CHAIR
    vocabulary.

    Evaluation worlds must be clean: ``noise_fraction > 0`` is refused (noise is for training scenes).
    """
    if spec.noise_fraction > 0:
        raise EvalInputError(f"write_shapes_world: noise_fraction={spec.noise_fraction} but written worlds "
                             "are evaluation data; set noise_fraction=0 (use generate_scenes for training)")
    files = ShapesWorldFiles(Path(out_dir), spec)
    scenes = generate_scenes(spec)
    files.images_dir.mkdir(parents=True, exist_ok=True)
    for s in scenes:
        atomic_write_bytes(files.images_dir / s.file_name, png_bytes(render_scene(s, spec)))
    instances, captions = _coco_files(spec, scenes)
    atomic_write_text(files.instances, json.dumps(instances))
    atomic_write_text(files.captions, json.dumps(captions))
    vocab = shapes_chair_vocabulary(spec)
    atomic_write_text(files.vocabulary, vocab.model_dump_json(indent=1))
    gt = [{"image": s.file_name, "objects": s.object_names, "image_id": s.image_id} for s in scenes]
    # The official POPE input ("segmentation" file): JSON lines of image + objects in listed order.
    atomic_write_text(files.root / "pope" / f"{spec.name}_ground_truth_segmentation.json",
                      "".join(json.dumps(g) + "\n" for g in gt))
    write_pope_files(gt, files.root / "pope",
                     PopeGenerationConfig(img_num=None, seed=spec.seed, dataset=spec.name))
    write_partner_file(files.partner, build_partner_questions(gt, spec.partner_pairs, spec.shapes, seed=spec.seed))
    atomic_write_text(files.root / "spec.json", spec.model_dump_json(indent=1))
    return files


def default_cache_dir() -> Path:
    """``$CLEARSIGHT_CACHE`` or ``~/.cache/clearsight``."""
    return Path(os.environ.get("CLEARSIGHT_CACHE", Path.home() / ".cache" / "clearsight"))


def load_builtin_shapes(cache_dir: str | os.PathLike[str] | None = None,
                        spec: ShapesWorldSpec | None = None) -> ShapesWorldFiles:
    """``builtin:shapes``: generate the default world once into ``<cache>/shapes-<hash>`` and reuse it.

    Generation goes to a temporary folder that is renamed into place, so an interrupted run never leaves
    a half-written world, and two concurrent callers end up with the same complete folder.
    """
    spec = spec or ShapesWorldSpec()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{spec.name}-{spec.digest()}"
    if (target / "spec.json").is_file():
        return ShapesWorldFiles(target, spec)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        write_shapes_world(spec, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "spec.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ShapesWorldFiles(target, spec)


def load_builtin_organism(cache_dir: str | os.PathLike[str] | None = None) -> ShapesWorldFiles:
    """``builtin:shapes-organism``: the model-organism world (:func:`organism_spec`, held-out seed 1234),
    generated once like ``builtin:shapes``; the data ``builtin:shapes-organism`` (the model) is measured on."""
    return load_builtin_shapes(cache_dir, organism_spec())


BUILTIN_DATASETS = {"builtin:shapes": load_builtin_shapes, "builtin:shapes-organism": load_builtin_organism}


def resolve_builtin(ref: str, cache_dir: str | os.PathLike[str] | None = None) -> ShapesWorldFiles:
    """Resolve a ``builtin:<name>`` data reference (``builtin:shapes`` or ``builtin:shapes-organism``)."""
    if ref not in BUILTIN_DATASETS:
        raise EvalInputError(f"unknown built-in dataset {ref!r}; use one of {', '.join(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[ref](cache_dir)
