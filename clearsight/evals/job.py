"""EvalJob: what to evaluate (systems x benchmarks), as a pydantic spec loadable from TOML, YAML or JSON."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clearsight.config import DEFAULT_MODEL, DecodeSpec, DType, ModelSpec
from clearsight.evals.datasets.pope import DEFAULT_PROMPT_SUFFIX, SPLITS
from clearsight.evals.errors import EvalInputError
from clearsight.evals.stats import StatsSettings

CHAIR_PROMPT = "Please describe this image in detail."


def _decode_bound(field: str, default: int) -> int:
    """DecodeSpec's upper bound of a field, so that a job cannot ask for more than generation accepts."""
    info = DecodeSpec.model_fields.get(field)
    bounds = [m.le for m in (info.metadata if info else ()) if getattr(m, "le", None) is not None]
    return int(bounds[0]) if bounds else default


MAX_NEW_TOKENS = _decode_bound("max_new_tokens", 8192)
MAX_BATCH_SIZE = 1024


class SystemSpec(BaseModel):
    """One system = a model + mitigations + decode overrides (applied on top of each benchmark's decode)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    model: str = DEFAULT_MODEL
    dtype: DType = "auto"
    device: str = "cpu"
    backend: str | None = None
    mitigations: list[str | dict[str, Any]] = Field(default_factory=list)
    decode: dict[str, Any] = Field(default_factory=dict, description="DecodeSpec overrides, e.g. {do_sample: true}")

    @field_validator("mitigations")
    @classmethod
    def _valid_mitigations(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        from clearsight.mitigations import parse_mitigations

        parse_mitigations(v)  # raises a one-line InputError naming the bad mitigation / parameter
        return v

    @field_validator("decode")
    @classmethod
    def _valid_decode(cls, v: dict[str, Any]) -> dict[str, Any]:
        from clearsight.errors import pydantic_message

        if isinstance(v, dict) and "batch_size" in v:
            raise ValueError("batch_size is not a decoding option: set the job's batch_size")
        try:
            DecodeSpec(**v)  # max_new_tokens too: an override replaces each benchmark's
        except ValidationError as exc:
            raise ValueError(pydantic_message(exc, "decode").removeprefix("decode: ")) from None
        except TypeError as exc:  # e.g. a non-string key from YAML
            raise ValueError(f"not a table of DecodeSpec fields ({exc})") from None
        return v

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        from clearsight.mitigations import parse_mitigations

        mits = parse_mitigations(self.mitigations)
        return "+".join(m.name for m in mits) or "none"

    def model_spec(self) -> ModelSpec:
        return ModelSpec(source=self.model, dtype=self.dtype, device=self.device, backend=self.backend)

    def mitigation_config(self) -> list[dict[str, Any]]:
        """Canonical mitigation parameters (defaults filled in): part of the cache key."""
        from clearsight.mitigations import parse_mitigations

        return [m.model_dump(mode="json") for m in parse_mitigations(self.mitigations)]

    def decode_for(self, max_new_tokens: int) -> DecodeSpec:
        data = {"max_new_tokens": max_new_tokens, **self.decode}
        return DecodeSpec(**data)


class PopeBenchmark(BaseModel):
    """POPE: ``data = "builtin:shapes"``; or ``files`` (split -> official/SEEM file) + ``image_dir``; or
    ``parquet`` (the lmms-lab/POPE files already on disk, images embedded)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pope"] = "pope"
    data: str | None = "builtin:shapes"
    files: dict[str, str] = Field(default_factory=dict)
    parquet: list[str] = Field(default_factory=list, description="lmms-lab/POPE *.parquet files on disk")
    image_dir: str | None = None
    splits: list[str] = Field(default_factory=lambda: list(SPLITS))
    parser: Literal["pope", "negation", "strict"] = "pope"
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX
    max_new_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    limit: int | None = Field(None, ge=1, description="questions per split (first N)")
    partner: int = Field(0, ge=0, description="shapes world only: at least this many questions about the absent "
                         "partner of a present shape (whole scenes, each with a control-absent and a present "
                         "question); 0 = none")

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown split {bad[0]!r}: choose from {', '.join(SPLITS)}")
        if not v:
            raise ValueError("no splits: give at least one of " + ", ".join(SPLITS))
        return v

    @model_validator(mode="after")
    def _source(self) -> PopeBenchmark:
        if self.files:
            missing = [s for s in self.splits if s not in self.files]
            if missing:
                raise ValueError(f"files: no file for split {missing[0]!r}; add it or drop it from splits")
        elif not self.data and not self.parquet:
            raise ValueError("give data = 'builtin:shapes', files = {split: path} or parquet = [paths]")
        if self.partner and (self.files or self.parquet or not self.data):
            raise ValueError("partner questions need a world that knows its partner pairs: use "
                             "data = 'builtin:shapes', or set partner = 0")
        return self


class ChairBenchmark(BaseModel):
    """CHAIR: ``data = "builtin:shapes"`` or COCO ``instances`` + ``captions`` files and ``image_dir``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["chair"] = "chair"
    data: str | None = "builtin:shapes"
    instances: list[str] = Field(default_factory=list)
    captions: list[str] = Field(default_factory=list)
    image_dir: str | None = None
    vocabulary: str | None = Field(None, description="CHAIR vocabulary JSON (default: COCO, or the world's own)")
    n_images: int = Field(500, ge=1)
    seed: int = 0
    prompt: str = CHAIR_PROMPT
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    drop_incomplete: bool = Field(True, description="drop a final incomplete sentence (short-caption protocol)")

    @model_validator(mode="after")
    def _source(self) -> ChairBenchmark:
        if not self.data and not (self.instances and self.captions and self.image_dir):
            raise ValueError("give data = 'builtin:shapes', or instances, captions and image_dir for COCO")
        return self


class CrossCheckBenchmark(BaseModel):
    """CrossCheck over the systems' CHAIR captions: explicit (embedding / judge) or implicit."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["crosscheck"] = "crosscheck"
    scorer: Literal["embedding", "judge", "implicit"] = "embedding"
    judge_model: str | None = Field(None, description="model for the judge / implicit scorer (default: each system's)")
    max_samples: int | None = Field(None, ge=1)


Benchmark = Annotated[PopeBenchmark | ChairBenchmark | CrossCheckBenchmark, Field(discriminator="kind")]


class EvalJob(BaseModel):
    """Systems x benchmarks, an output folder, and run settings."""

    model_config = ConfigDict(extra="forbid")

    systems: list[SystemSpec] = Field(min_length=1)
    benchmarks: list[Benchmark] = Field(min_length=1)
    output: str = "runs/eval"
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE)
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, description="Ray cluster to join (default: $RAY_ADDRESS, else a local "
                                                      "Ray started in-process)")
    workers: int = Field(1, ge=1, le=1024, description="Ray executor: worker actors, each with its own Engine")
    worker_num_cpus: float = Field(1.0, ge=0, description="Ray executor: CPUs reserved per worker (its torch threads)")
    worker_num_gpus: float = Field(0.0, ge=0, description="Ray executor: GPUs per worker (0 on CPU)")
    pack: bool = Field(True, description="cross-system packing: the systems sharing a model run as one stream of "
                                         "mixed batches (False: one system after the other)")
    baseline: str | None = Field(None, description="the system every other is compared with (default: the "
                                 "system named 'none', if any)")
    stats: StatsSettings = Field(default_factory=StatsSettings)

    @model_validator(mode="after")
    def _checks(self) -> EvalJob:
        labels = [s.label for s in self.systems]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"two systems are both named {dupes[0]!r}: give each a unique name")
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(f"baseline {self.baseline!r} is not one of the systems ({', '.join(labels)})")
        kinds = [b.kind for b in self.benchmarks]
        if "crosscheck" in kinds and "chair" not in kinds:
            raise ValueError("crosscheck scores the CHAIR captions: add a chair benchmark")
        if "crosscheck" in kinds and len(self.systems) < 2:
            raise ValueError("crosscheck needs at least 2 systems")
        return self

    @property
    def baseline_label(self) -> str | None:
        """The baseline's label: ``baseline``, else the system named 'none', else None (no comparisons)."""
        if self.baseline is not None:
            return self.baseline
        return "none" if any(s.label == "none" for s in self.systems) else None


def load_job(path: str | Path) -> EvalJob:
    """Read an EvalJob from .toml, .yaml/.yml or .json; errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"job file '{path}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"job file '{path}' is not a text file (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start} is not UTF-8): give a .toml, .yaml or .json job") from None
    except OSError as exc:
        raise EvalInputError(f"job file '{path}' cannot be read ({exc.strerror or exc}): check its permissions") \
            from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise EvalInputError(f"job file '{path}': unknown format {p.suffix!r}; use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise EvalInputError(f"job file '{path}' is not valid {p.suffix[1:].upper()}: {first}") from None
    return parse_job(data, where=f"job file '{path}'")


def parse_job(data: Any, where: str = "job") -> EvalJob:
    from clearsight.errors import pydantic_message

    try:
        return EvalJob.model_validate(data)
    except ValidationError as exc:
        raise EvalInputError(pydantic_message(exc, where)) from None
