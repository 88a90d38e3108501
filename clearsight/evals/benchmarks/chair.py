"""CHAIR as a benchmark: COCO instance + caption files or the shapes world. Metric and ground truth:
``clearsight.evals.metrics.chair``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from clearsight.evals.benchmarks.base import (
    MAX_NEW_TOKENS,
    Benchmark,
    BenchmarkScore,
    BenchmarkSpec,
    DataFile,
    ScoreContext,
    forest_plots,
    register_benchmark,
    result_keys,
)
from clearsight.evals.benchmarks.pope import prompt_tag
from clearsight.evals.errors import EvalInputError
from clearsight.evals.executor import WorkItem
from clearsight.evals.metrics.chair import (
    ChairResult,
    ChairVocabulary,
    build_ground_truth,
    chair_measures,
    compute_chair,
    sample_image_ids,
)
from clearsight.evals.render import Column, fmt, stats_tables, table

CHAIR_PROMPT = "Please describe this image in detail."


class ChairBenchmark(BenchmarkSpec):
    """CHAIR: ``data = "builtin:shapes"`` or COCO ``instances`` + ``captions`` files and ``image_dir``."""

    kind: Literal["chair"] = "chair"
    data: str | None = "builtin:shapes"
    instances: list[str] = Field(default_factory=list)
    captions: list[str] = Field(default_factory=list)
    image_dir: str | None = None
    vocabulary: str | None = Field(None, description="CHAIR vocabulary JSON (default: COCO, or the world's own)")
    n_images: int = Field(500, ge=1, description="images sampled (the --limit of `clearsight eval chair`)")
    seed: int = 0
    image_ids: list[int] | None = Field(None, description="exactly these images instead of a sample (e.g. the "
                                        "images of captions generated elsewhere)")
    prompt: str = CHAIR_PROMPT
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    drop_incomplete: bool = Field(True, description="drop a final incomplete sentence (short-caption protocol)")

    @model_validator(mode="after")
    def _source(self) -> ChairBenchmark:
        if not self.data and not (self.instances and self.captions and self.image_dir):
            raise ValueError("give data = 'builtin:shapes', or instances, captions and image_dir for COCO")
        return self


def _image_files(instance_files: Sequence[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for f in instance_files:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
        out.update({int(im["id"]): im["file_name"] for im in data.get("images", [])})
    return out


@register_benchmark
class Chair(Benchmark):
    kind = "chair"
    order = 20
    spec_class = ChairBenchmark

    def __init__(self, spec: BenchmarkSpec, job: Any) -> None:
        super().__init__(spec, job)
        self.bench: ChairBenchmark = spec  # type: ignore[assignment]
        self.partners: dict[str, str] | None = None  # shape -> partner, where the world knows them
        self.ground_truth: dict[int, set[str]] = {}

    def prepare(self, others: Mapping[str, Benchmark]) -> None:
        bench = self.bench
        if bench.data and not bench.instances:
            from clearsight.evals.datasets.shapes import resolve_builtin
            from clearsight.evals.metrics.partner import partner_map

            world = resolve_builtin(bench.data)
            self.instances, self.caption_files = [str(world.instances)], [str(world.captions)]
            image_dir = world.images_dir
            self.vocab = ChairVocabulary.load(bench.vocabulary or world.vocabulary)
            self.partners = partner_map(world.spec.partner_pairs)
        else:
            self.instances, self.caption_files = list(bench.instances), list(bench.captions)
            image_dir = Path(bench.image_dir or ".")
            self.vocab = ChairVocabulary.load(bench.vocabulary) if bench.vocabulary else ChairVocabulary.coco()
        files = _image_files(self.instances)
        if bench.image_ids is not None:
            unknown = [i for i in bench.image_ids if i not in files]
            if unknown:
                raise EvalInputError(f"CHAIR image id {unknown[0]} is not in {self.instances[0]}: give ids of its "
                                     "images")
            self.image_ids = list(dict.fromkeys(bench.image_ids))
        else:
            self.image_ids = sample_image_ids(self.instances[0], n=bench.n_images, seed=bench.seed)
        self._items: list[WorkItem] = []
        self.image_of: dict[str, int] = {}
        for image_id in self.image_ids:
            path = image_dir / files[image_id]
            if not path.is_file():
                raise EvalInputError(f"CHAIR image {path} (id {image_id}) does not exist: check image_dir")
            sid = self.sample_id(image_id)
            self._items.append(WorkItem(sid, bench.prompt, str(path), bench.max_new_tokens))
            self.image_of[sid] = image_id

    def sample_id(self, image_id: int) -> str:
        return f"{self.label}/{image_id}/{prompt_tag(self.bench.prompt)}"

    def items(self) -> list[WorkItem]:
        return list(self._items)

    def external_ids(self) -> dict[str, WorkItem]:
        """The image id (COCO ``image_id``) of each caption."""
        return {str(self.image_of[it.sample_id]): it for it in self._items}

    def captions(self, outputs: Callable[[Any, Sequence[WorkItem]], dict[str, str]]
                 ) -> dict[str, dict[str, tuple[str, str | None]]]:
        path_of = {it.sample_id: it.image for it in self._items}
        return {s.label: {str(self.image_of[sid]): (text, path_of[sid])
                          for sid, text in outputs(s, self._items).items()}
                for s in self.job.systems}

    def load_ground_truth(self) -> dict[int, set[str]]:
        if not self.ground_truth:
            self.ground_truth = build_ground_truth(
                self.instances, self.caption_files, self.vocab, self.image_ids,
                cache_path=self.output_dir / ("chair_ground_truth.json" if self.label == "chair"
                                              else f"{self.label}_ground_truth.json"))
        return self.ground_truth

    def score_captions(self, captions: Mapping[int, str]) -> ChairResult:
        """CHAIR of one system's captions (image id -> text), on this benchmark's images and settings."""
        unknown = sorted(set(captions) - set(self.image_ids))
        if unknown:
            raise EvalInputError(f"image id {unknown[0]} is not among the {len(self.image_ids)} images of "
                                 f"CHAIR benchmark {self.label!r}")
        return compute_chair(sorted(captions.items()), self.load_ground_truth(), self.vocab,
                             drop_incomplete=self.bench.drop_incomplete)

    def score(self, ctx: ScoreContext) -> BenchmarkScore:
        from clearsight.evals._io import sha256_file

        out = BenchmarkScore()
        for f in self.instances + self.caption_files:
            out.data_files.append(DataFile(path=f, sha256=sha256_file(f), n=len(self.image_ids), layout="coco"))
        rows: dict[str, list[dict[str, Any]]] = {}
        for system in ctx.job.systems:
            outs = ctx.outputs(system, self._items)
            res = self.score_captions({self.image_of[sid]: text for sid, text in outs.items()})
            out.per_system.setdefault(system.label, {})[self.label] = res
            out.headline.setdefault(f"{self.label} CHAIR_i", {})[system.label] = res.chair_i
            rows[system.label] = res.per_caption
        out.measures = chair_measures(rows, self.partners, benchmark=self.label)
        out.fields[f"{self.label}_image_ids"] = self.image_ids
        out.fields[f"{self.label}_seed"] = self.bench.seed
        return out

    # ------------------------------------------------------------------ report
    @staticmethod
    def _columns(key: str) -> list[Column]:
        return [(key, "chair_s", None, "CHAIR_s"), (key, "chair_i", None, "CHAIR_i"), (key, "recall", None, "recall"),
                (key, "partner_share", None, "partner share of halluc."),
                (key, "partner_captions", None, "captions naming a partner")]

    @classmethod
    def render(cls, results: Any) -> list[str]:
        parts: list[str] = []
        for key in result_keys(results, ChairResult):
            rows = []
            for s in results.systems:
                c = (s.model_extra or {}).get(key)
                if isinstance(c, ChairResult):
                    rows.append([s.name, fmt(c.chair_s, True), fmt(c.chair_i, True), fmt(c.recall, True),
                                 f"{c.mean_length:.1f}", str(c.n_captions)])
            title = "CHAIR" if key == "chair" else f"CHAIR `{key}`"
            header = ["system", "CHAIR_s", "CHAIR_i", "recall", "len (words)", "N"]
            parts += [f"## {title}", "", table(header, rows), ""]
            parts += stats_tables(results, cls._columns(key), title)
        return parts

    @classmethod
    def plots(cls, results: Any) -> dict[str, bytes]:
        return forest_plots(results, ChairResult, "CHAIR", cls._columns)

    @classmethod
    def raw_columns(cls, results: Any) -> list[Column]:
        return [c for key in result_keys(results, ChairResult) for c in cls._columns(key)[:3]]
