"""Pydantic schemas of the HTTP API: OpenAI's chat format (the part clearsight serves), the native
``/v1/generate`` request, and the server's settings and limits.

Request models forbid unknown fields, so a typo or an unsupported OpenAI option is a 400 naming it, not a
silently ignored field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clearsight.config import MAX_SEED
from clearsight.decoding.generate import MAX_IMAGE_PIXELS

# ---------------------------------------------------------------------------------------------- settings


class Limits(BaseModel):
    """What one request may ask for; each is checked before the model runs and answered with a 4xx naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(16 << 20, ge=1024, description="HTTP request body (413 past it)")
    max_image_bytes: int = Field(8 << 20, ge=1, description="one image after base64 decoding")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, le=MAX_IMAGE_PIXELS,
                                  description="width x height of one image, read from its header before decoding")
    max_images: int = Field(1, ge=0, le=1, description="images per request (the engine takes one per request)")
    max_prompt_tokens: int = Field(4096, ge=1, description="prompt tokens, image tokens included")
    max_tokens: int = Field(1024, ge=1, le=8192, description="new tokens per request (max_tokens)")
    default_max_tokens: int = Field(64, ge=1, le=8192, description="new tokens when a request gives none")
    max_messages: int = Field(64, ge=1, description="chat messages per request")
    max_stop: int = Field(4, ge=0, description="stop strings per request")
    max_mitigations: int = Field(8, ge=0, description="mitigations per request")

    @model_validator(mode="after")
    def _default_within(self) -> Limits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        return self


class ServeSettings(BaseModel):
    """The gateway's settings: the API key, limits, and what image URLs besides data URLs may be read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: str | None = Field(None, description="bearer token every route but /healthz needs; None = no auth")
    limits: Limits = Limits()
    # Server-side fetches are off by default (SSRF): only URLs starting with one of these prefixes are read,
    # e.g. "file:///data/images/" or "https://images.example.org/".
    image_url_allow: tuple[str, ...] = ()
    retry_after_s: int = Field(1, ge=0, description="Retry-After of a 429 (queue full) or 503 (worker lost)")

    @field_validator("image_url_allow")
    @classmethod
    def _prefixes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in v:
            # "https://host" would also let "https://host.evil.example/..." through: a prefix ends with a slash
            if not prefix.startswith(("file:///", "http://", "https://")) or not prefix.endswith("/"):
                raise ValueError(f"image URL prefix {prefix!r}: give file:///folder/, http://host/path/ or "
                                 "https://host/path/ (ending with a slash)")
        return v

    @field_validator("api_key")
    @classmethod
    def _key_non_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("the API key is empty: give a non-empty key or none")
        return v


# ---------------------------------------------------------------------------------------------- OpenAI chat


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str = Field(description="a data URL (data:image/png;base64,...); other schemes only if allow-listed")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


# OpenAI options clearsight does not serve: a request that sets one gets a 400 naming it (they are declared so
# that the error says "not supported" instead of "unknown field")
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "audio", "prediction",
                "top_logprobs", "logit_bias")


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's chat request, plus clearsight's ``mitigations`` and ``ignore_eos``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 or omitted: greedy decoding")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    # clearsight's extras (the openai client sends them with extra_body=...)
    mitigations: list[str | dict[str, Any]] | str | None = Field(
        None, description="as the CLI and Python API take them: ['var', 'vcd:alpha=1', {'name': 'pai'}]")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (benchmarks)")
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    prediction: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None


# ---------------------------------------------------------------------------------------------- native


class StatsSpec(BaseModel):
    """Attention statistics to return (``clearsight.StatsRequest``): segment masses and/or the last row."""

    model_config = ConfigDict(extra="forbid")

    segment_mass: bool = False
    last_row: bool = False
    layers: list[int] | None = Field(None, max_length=1024, description="layers to record; None = every layer")


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: one request as the Engine takes it (``clearsight.GenerationRequest`` + DecodeSpec)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    image: str | None = Field(None, description="a data URL (data:image/png;base64,...)")
    id: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="this request's sampling seed")
    mitigations: list[str | dict[str, Any]] | str | None = None
    decode: dict[str, Any] | None = Field(None, description="DecodeSpec fields: max_new_tokens, do_sample, ...")
    stats: StatsSpec | None = None
    backend: str | None = Field(None, description="attention backend of this request (default: the model's)")
    stream: bool = False


def unsupported_fields(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(field, why) for each OpenAI option the request sets that clearsight does not serve."""
    out = []
    for name in _UNSUPPORTED:
        value = getattr(req, name)
        if value is not None and value != {} and value != [] and not (name == "tool_choice" and value == "none"):
            out.append((name, f"{name} is not supported by this server: remove it"))
    if req.n is not None and req.n != 1:
        out.append(("n", "n > 1 is not supported: send one request per completion"))
    if req.logprobs:
        out.append(("logprobs", "logprobs are not supported: remove it or set it to false"))
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            out.append((name, f"{name} is not supported: remove it or set it to 0"))
    if req.modalities is not None and any(m != "text" for m in req.modalities):
        out.append(("modalities", "only the text output modality is supported"))
    return out
