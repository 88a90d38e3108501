"""Pydantic models shared by several layers: what model to load, how to decode, what to generate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# transformers' own attention backends: they run no AttentionPlan, so attention-editing mitigations do nothing there
STOCK_BACKENDS = ("sdpa", "eager")

DType = Literal["auto", "float32", "float16", "bfloat16"]

# the one default model of every command and job: the demo model (trained, shipped in the package)
DEFAULT_MODEL = "builtin:shapes-llava"

# seeds feed torch.Generator.manual_seed and int64 tensors: non-negative and below 2**63
MAX_SEED = 2**63 - 1


def _seed_in_range(v: int) -> int:
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"{v} is out of range: give a seed from 0 to 2**63-1 ({MAX_SEED})")
    return v


Seed = Annotated[int, AfterValidator(_seed_in_range)]


class ModelSpec(BaseModel):
    """Which model to load: a local path, an HF id already in the local cache, or ``builtin:<name>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="local path, cached HF id, or builtin:<name>")
    dtype: DType = "auto"
    device: str = "cpu"
    backend: str | None = Field(None, description="attention backend: reference | torch | triton | sdpa; None = best")

    @field_validator("source")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model source is empty: give a local path, a cached HF id or builtin:<name>")
        return v.strip()


# batch_size was a DecodeSpec field; it is an engine limit (how many requests run together), not a decoding choice
BATCH_SIZE_NOT_DECODING = ("batch_size is not a decoding option: it is an engine limit (generate(max_batch=...), "
                           "Engine(max_requests=...), an eval job's batch_size)")


class DecodeSpec(BaseModel):
    """How to decode. Greedy unless ``do_sample``; sampling is seeded per request."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_new_tokens: int = Field(64, ge=1, le=8192)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (benchmarks)")

    @model_validator(mode="before")
    @classmethod
    def _no_batch_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and "batch_size" in data:
            raise ValueError(BATCH_SIZE_NOT_DECODING)
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return (v,)
        return v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    def describe(self) -> str:
        if not self.do_sample:
            return f"greedy, max_new_tokens={self.max_new_tokens}"
        return (f"sampling T={self.temperature} top_p={self.top_p} seed={self.seed}, "
                f"max_new_tokens={self.max_new_tokens}")


class GenerationRequest(BaseModel):
    """One prompt, with or without an image. ``image`` is a path or a PIL image."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    prompt: str
    image: Any = None
    id: str | None = None
    seed: Seed | None = Field(None, description="sampling seed of this request (default: the decode seed)")
    mitigations: list[Any] | None = Field(None, description="per-request mitigations (default: the call's)")

    @field_validator("mitigations", mode="before")
    @classmethod
    def _one_mitigation(cls, v: Any) -> Any:
        if isinstance(v, str | dict):
            return [v]  # one mitigation, as parse_mitigations takes it
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty: give the question or instruction to answer")
        return v

    @model_validator(mode="after")
    def _image_kind(self) -> GenerationRequest:
        from PIL import Image

        if self.image is not None and not isinstance(self.image, str | Path | Image.Image):
            raise ValueError(f"image must be a file path or a PIL image, got {type(self.image).__name__}")
        return self
