"""The Compare page's logic, as plain functions the page calls (and the tests call without Streamlit).

- ``mitigation_fields``: each mitigation's pydantic fields as widget descriptions (kind, default, bounds);
  ``build_system`` validates a system's values through the mitigation's own model.
- ``run_compare``: runs several systems on one image and prompt through an Engine or a ``clearsight
  serve`` Client, yielding each token as it comes, with a deadline (a stuck run ends in an error, never
  a hang).
- ``mark_objects``: the objects an output mentions, by the CHAIR object extraction, each in the ground
  truth or not (hallucinated).
- ``attention_grid`` / ``token_image_mass`` / ``overlay``: the answer's attention on the image tokens from
  the attention statistics' last rows (``StatsRequest(last_row=True)``), mapped to the image's token grid.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from clearsight.config import DecodeSpec
from clearsight.decoding.generate import GenerationResult, TokenEvent
from clearsight.errors import InputError
from clearsight.evals.datasets.shapes import (
    Scene,
    ShapesWorldSpec,
    generate_scenes,
    render_scene,
    shapes_chair_vocabulary,
)
from clearsight.evals.metrics.chair import ChairVocabulary
from clearsight.kernels.plan import StatsRequest
from clearsight.mitigations.registry import REGISTRY, parse_mitigation

# The demo model's caption prompt (docs/demo-model.md): it answers this with "a <colour> <shape>, ..." lists.
DEFAULT_PROMPT = "Please describe this image in detail."


# ------------------------------------------------------------------------------------------ systems
@dataclass(frozen=True)
class FieldInfo:
    """One parameter of a mitigation, as the page draws its widget."""

    name: str
    kind: str  # "float" | "int" | "bool" | "choice" | "text" (optional values and lists: typed as text)
    default: Any
    description: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None  # inclusive (pydantic ge); an exclusive gt/lt is left to pydantic's check
    maximum: float | None = None


def _bounds(metadata: Sequence[Any]) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            lo = float(m.ge)
        if getattr(m, "le", None) is not None:
            hi = float(m.le)
    return lo, hi


def mitigation_names() -> list[str]:
    return sorted(REGISTRY)


def mitigation_fields(name: str) -> list[FieldInfo]:
    """The parameters of mitigation ``name`` from its pydantic model (defaults and ge/le bounds included)."""
    if name not in REGISTRY:
        raise InputError(f"mitigation: unknown {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    out = []
    for fname, info in REGISTRY[name].model_fields.items():
        if fname == "name":
            continue
        ann, desc = info.annotation, info.description or ""
        lo, hi = _bounds(info.metadata)
        if typing.get_origin(ann) is typing.Literal:
            out.append(FieldInfo(fname, "choice", info.default, desc, choices=typing.get_args(ann)))
        elif ann is bool:
            out.append(FieldInfo(fname, "bool", info.default, desc))
        elif ann is float:
            out.append(FieldInfo(fname, "float", info.default, desc, minimum=lo, maximum=hi))
        elif ann is int:
            out.append(FieldInfo(fname, "int", info.default, desc, minimum=lo, maximum=hi))
        else:  # str, optional numbers, lists of layers: typed, parsed like the CLI's NAME:key=value
            out.append(FieldInfo(fname, "text", info.default, desc, minimum=lo, maximum=hi))
    return out


def text_value(text: str, default: Any) -> Any:
    """A text widget's value: empty gives the default; ``1,2`` / ``1|2`` a list; numbers as numbers."""
    text = text.strip()
    if not text:
        return default
    parts = [p.strip() for p in re.split(r"[,|]", text) if p.strip()]

    def num(p: str) -> Any:
        for cast in (int, float):
            try:
                return cast(p)
            except ValueError:
                pass
        return p

    if len(parts) > 1:
        return [num(p) for p in parts]
    return num(parts[0])


class SystemSpec(BaseModel):
    """One column of the Compare page: a label and its mitigations (each a dict of parameters)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1)
    mitigations: list[dict[str, Any]] = Field(default_factory=list)


def build_system(label: str, chosen: Mapping[str, Mapping[str, Any]]) -> SystemSpec:
    """A system from the widgets' values: ``{mitigation: {param: value}}``. Each mitigation is validated by its
    own pydantic model now, so an out-of-range value is an ``InputError`` naming the system and field."""
    mits = []
    for name, values in chosen.items():
        spec = {"name": name, **{k: v for k, v in values.items()}}
        try:
            parse_mitigation(spec)
        except (ValueError, InputError) as exc:
            raise InputError(f"{label}: {str(exc).splitlines()[0]}") from None
        mits.append(spec)
    return SystemSpec(label=label, mitigations=mits)


# ------------------------------------------------------------------------------------------ images
@dataclass
class SceneImage:
    image: Image.Image
    ground_truth: list[str]  # object names (the CHAIR vocabulary's node words)
    caption: str = ""


def shapes_scene(seed: int, spec: ShapesWorldSpec | None = None) -> SceneImage:
    """A generated shapes-world scene (one image of a world seeded ``seed``) and its ground-truth objects."""
    spec = (spec or ShapesWorldSpec()).model_copy(update={"n_images": 1, "seed": int(seed)})
    scene: Scene = generate_scenes(spec)[0]
    return SceneImage(render_scene(scene, spec), sorted(set(scene.object_names)), scene.caption)


def parse_objects(text: str, vocab: ChairVocabulary | None = None) -> list[str]:
    """Ground truth typed by the user: comma-separated object words, mapped to the vocabulary's node words
    (``squares`` -> ``square``); words outside the vocabulary are kept as typed."""
    vocab = vocab or shapes_chair_vocabulary()
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        found = vocab.objects(part)
        out.extend(found or [part])
    return sorted(set(out))


# ------------------------------------------------------------------------------------------ marking
@dataclass(frozen=True)
class Mention:
    word: str  # the word (or merged phrase) as CHAIR extracted it, singularised
    node: str  # the vocabulary's object
    present: bool  # in the ground truth


def mark_objects(text: str, ground_truth: Sequence[str], vocab: ChairVocabulary | None = None) -> list[Mention]:
    """Objects mentioned in ``text`` (CHAIR extraction, repeats kept), each in the ground truth or not."""
    vocab = vocab or shapes_chair_vocabulary()
    gt = set(ground_truth)
    return [Mention(w, node, node in gt) for w, node in vocab.mentions(text)]


def marked_markdown(text: str, mentions: Sequence[Mention]) -> str:
    """``text`` with each mentioned object coloured (Streamlit markdown): green in the ground truth, red not.
    Words are matched in order, singular or plural, case-insensitively."""
    out, pos, low = [], 0, text.lower()
    for m in mentions:
        first = m.word.split()[0]
        hit = re.compile(r"\b" + re.escape(first) + r"\w*").search(low, pos)
        if hit is None:
            continue
        end = hit.end()
        if " " in m.word:  # a merged phrase: colour every word of it
            tail = re.compile(r"\b" + re.escape(m.word.split()[-1]) + r"\w*").search(low, end)
            end = tail.end() if tail else end
        out.append(_escape(text[pos:hit.start()]))
        colour = "green" if m.present else "red"
        out.append(f":{colour}[**{_escape(text[hit.start():end])}**]")
        pos = end
    out.append(_escape(text[pos:]))
    return "".join(out)


def _escape(s: str) -> str:
    return re.sub(r"([\\`*_\[\]{}<>#|~$:])", r"\\\1", s)


# ------------------------------------------------------------------------------------------ attention
def _layout(stats: Mapping[str, Any]) -> tuple[int, int, int, int]:
    lay = stats.get("layout")
    if lay is None or not lay.image_spans or not lay.grids:
        raise InputError("attention: this output has no image tokens (a text-only prompt)")
    (start, end), (rows, cols) = lay.image_spans[0], lay.grids[0]
    if (end - start) != rows * cols:
        raise InputError(f"attention: {end - start} image tokens do not fill the {rows} x {cols} grid")
    return start, end, rows, cols


def attention_layers(stats: Mapping[str, Any]) -> list[int]:
    return sorted(int(k) for k in (stats.get("last_row") or {}))


def _rows(stats: Mapping[str, Any], layer: int | None) -> list[list[np.ndarray]]:
    """Per layer asked (one, or all), the last row of each forward, averaged over heads: ``[keys]`` arrays."""
    last = stats.get("last_row") or {}
    if not last:
        raise InputError("attention: no statistics recorded (run with StatsRequest(last_row=True))")
    layers = attention_layers(stats) if layer is None else [layer]
    if layer is not None and layer not in attention_layers(stats):
        raise InputError(f"attention: layer {layer} not recorded; recorded: {attention_layers(stats)}")
    return [[np.asarray(r, dtype=np.float64).mean(0) for r in last[k]] for k in layers]


def attention_grid(stats: Mapping[str, Any], layer: int | None = None, n_tokens: int | None = None) -> np.ndarray:
    """The answer's attention over the image, as a ``[rows, cols]`` array of the image token grid.

    For each generated token, the last query row of the forward that chose it (forward 0 is the prefill,
    whose last row picks the first token) gives the attention on every key; its image-token slice is
    averaged over heads, then over the answer's tokens (the first ``n_tokens`` forwards; all by default)
    and over layers when ``layer`` is None. Not renormalised: a cell is the mean probability mass that key
    got, so grids of two systems are on one scale.
    """
    start, end, rows, cols = _layout(stats)
    per_layer = _rows(stats, layer)
    grids = []
    for forwards in per_layer:
        fw = forwards[:n_tokens] if n_tokens else forwards
        grids.append(np.mean([f[start:end] for f in fw], axis=0))
    return np.mean(grids, axis=0).reshape(rows, cols)


def token_image_mass(stats: Mapping[str, Any], n_tokens: int, layer: int | None = None) -> list[float]:
    """Per generated token, the image tokens' share of its forward's last-row attention (mean of heads,
    and of layers when ``layer`` is None)."""
    start, end, _, _ = _layout(stats)
    per_layer = _rows(stats, layer)
    n = min(n_tokens, min(len(f) for f in per_layer))
    return [float(np.mean([fw[i][start:end].sum() for fw in per_layer])) for i in range(n)]


def overlay(image: Image.Image, grid: np.ndarray, alpha: float = 0.55, size: int = 288) -> Image.Image:
    """The grid as a heatmap (black -> red -> yellow, scaled to its own maximum) blended over the image,
    each cell upsampled to a block of pixels (nearest), so cells stay visible as the model's tokens."""
    g = np.asarray(grid, dtype=np.float64)
    g = g / g.max() if g.max() > 0 else g
    heat = np.stack([np.clip(2 * g, 0, 1), np.clip(2 * g - 1, 0, 1), np.zeros_like(g)], -1)
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    base = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return Image.blend(base, heat_img, alpha)


# ------------------------------------------------------------------------------------------ running
@dataclass
class SystemOutput:
    """What one system produced so far; ``result`` once it finished, ``error`` if it failed."""

    label: str
    tokens: list[str] = field(default_factory=list)  # each event's new text
    result: GenerationResult | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else "".join(self.tokens)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class RunTimeout(InputError):
    """The run did not finish within its deadline."""


def run_compare(backend: Any, image: Image.Image | None, prompt: str, systems: Sequence[SystemSpec],
                decode: DecodeSpec, *, timeout: float = 120.0, stats: bool = True
                ) -> Iterator[tuple[int, TokenEvent | None, list[SystemOutput]]]:
    """Run every system on (image, prompt), one request each, through ``backend`` (an ``Engine`` or a
    ``clearsight.workers.Client``: both have ``stream``). Yields ``(system index, event, outputs)`` as tokens
    come; a failed request ends its system with its error (the others go on). The stream is read on a
    thread so that a stalled backend ends in ``RunTimeout`` after ``timeout`` s instead of blocking."""
    outputs = [SystemOutput(s.label) for s in systems]
    requests = [{"prompt": prompt, "image": image, "mitigations": s.mitigations} for s in systems]
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    end = object()

    def pump() -> None:
        try:
            for ev in backend.stream(requests, decode=decode,
                                     stats=StatsRequest(last_row=True) if stats else None):
                q.put(ev)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            q.put(exc)
        q.put(end)

    threading.Thread(target=pump, name="clearsight-dashboard-run", daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            item = q.get(timeout=max(left, 0.001))
        except queue.Empty:
            raise RunTimeout(f"run: no answer within {timeout:.0f} s; the model or server is stuck or too "
                             "slow: lower max new tokens or raise the timeout") from None
        if item is end:
            break
        if isinstance(item, BaseException):
            # The stream stops at the first failed request: mark what did not finish with that error.
            msg = str(item).splitlines()[0] if str(item) else type(item).__name__
            for o in outputs:
                if not o.done:
                    o.error = msg
            yield -1, None, outputs
            break
        out = outputs[item.request]
        out.tokens.append(item.text)
        if item.result is not None:
            out.result = item.result
        yield item.request, item, outputs
