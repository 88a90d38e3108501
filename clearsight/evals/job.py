"""EvalJob: what to evaluate (systems x benchmarks), as a pydantic spec loadable from TOML, YAML or JSON.

Each benchmark entry is validated by the spec class of the registered benchmark its ``kind`` names
(``clearsight.evals.benchmarks``), so a plug-in benchmark is usable in a job as soon as it is registered."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from clearsight.config import DEFAULT_MODEL, DecodeSpec, DType, ModelSpec
from clearsight.evals.benchmarks.base import MAX_NEW_TOKENS, BenchmarkSpec
from clearsight.evals.errors import EvalInputError
from clearsight.evals.stats import StatsSettings

__all__ = ["MAX_BATCH_SIZE", "MAX_NEW_TOKENS", "BenchmarkSpec", "EvalJob", "SystemSpec", "load_job", "parse_job"]
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


def _benchmark_entry(i: int, entry: Any) -> BenchmarkSpec:
    """One job benchmark entry, validated by the spec class its ``kind`` names (any registered benchmark)."""
    from clearsight.errors import pydantic_message
    from clearsight.evals.benchmarks.base import registered

    if isinstance(entry, BenchmarkSpec):
        return entry
    if not isinstance(entry, dict):
        raise BenchmarkEntryError(f"benchmarks.{i}: not a table of benchmark settings")
    classes = registered()
    kind = entry.get("kind")
    if kind not in classes:
        what = "no kind" if kind is None else f"unknown kind {kind!r}"
        raise BenchmarkEntryError(f"benchmarks.{i}: {what}: choose from {', '.join(classes)}")
    try:
        return classes[kind].spec_class.model_validate(entry)
    except ValidationError as exc:
        raise BenchmarkEntryError(pydantic_message(exc, f"benchmarks.{i}.{kind}").replace(
            f"benchmarks.{i}.{kind}: ", f"benchmarks.{i}.{kind}.", 1).replace(
            "; ", f"; benchmarks.{i}.{kind}.")) from None


class BenchmarkEntryError(ValueError):
    """A bad benchmark entry, its message already naming the field (``benchmarks.N.kind.field: ...``)."""


class EvalJob(BaseModel):
    """Systems x benchmarks, an output folder, and run settings."""

    model_config = ConfigDict(extra="forbid")

    systems: list[SystemSpec] = Field(min_length=1)
    benchmarks: list[SerializeAsAny[BenchmarkSpec]] = Field(min_length=1)
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

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _benchmark_specs(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        return [_benchmark_entry(i, b) for i, b in enumerate(v)]

    @model_validator(mode="after")
    def _checks(self) -> EvalJob:
        labels = [s.label for s in self.systems]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"two systems are both named {dupes[0]!r}: give each a unique name")
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(f"baseline {self.baseline!r} is not one of the systems ({', '.join(labels)})")
        names = [b.label for b in self.benchmarks]
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            raise ValueError(f"two benchmarks are both named {dupes[0]!r}: give each of them a unique name "
                             "(name = ...)")
        for b in self.benchmarks:
            why = b.check_in_job(self)
            if why:
                raise ValueError(why)
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

    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        # each entry against its own kind's spec first: the message names benchmarks.N.kind.field
        try:
            data = {**data, "benchmarks": [_benchmark_entry(i, b) for i, b in enumerate(data["benchmarks"])]}
        except BenchmarkEntryError as exc:
            raise EvalInputError(f"{where}: {exc}") from None
    try:
        return EvalJob.model_validate(data)
    except ValidationError as exc:
        raise EvalInputError(pydantic_message(exc, where)) from None

