"""clearsight: hallucination mitigation for vision-language models, applied inside attention.

>>> from clearsight import load_model, generate, DecodeSpec
>>> lvlm = load_model("builtin:tiny-llava")
>>> result = generate(lvlm, {"prompt": "what is in the image?"}, decode=DecodeSpec(max_new_tokens=4))[0]

The public names are imported on first use (PEP 562), so ``import clearsight`` and the CLI's
``--help`` / ``--version`` stay fast; transformers loads only when a model is needed.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("clearsight")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_EXPORTS = {
    "DecodeSpec": "clearsight.config", "GenerationRequest": "clearsight.config", "ModelSpec": "clearsight.config",
    "GenerationResult": "clearsight.decoding", "TokenEvent": "clearsight.decoding", "generate": "clearsight.decoding",
    "stream_generate": "clearsight.decoding", "ClearsightError": "clearsight.errors", "InputError": "clearsight.errors",
    "AttentionPlan": "clearsight.kernels.plan", "QueryRows": "clearsight.kernels.plan",
    "Segment": "clearsight.kernels.plan", "StatsRequest": "clearsight.kernels.plan",
    "Branch": "clearsight.mitigations", "Mitigation": "clearsight.mitigations",
    "parse_mitigation": "clearsight.mitigations", "LVLM": "clearsight.models.loader",
    "load_model": "clearsight.models.loader",
}
__all__ = [
    "LVLM", "AttentionPlan", "Branch", "ClearsightError", "DecodeSpec", "GenerationRequest", "GenerationResult",
    "InputError", "Mitigation", "ModelSpec", "QueryRows", "Segment", "StatsRequest", "TokenEvent", "__version__",
    "generate", "load", "load_model", "parse_mitigation", "stream_generate",
]


def __getattr__(name: str) -> Any:
    if name == "load":
        name = "load_model"
    module = _EXPORTS.get(name)  # every name of __all__ but __version__ and load
    if module is None:
        raise AttributeError(f"module 'clearsight' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from clearsight.config import DecodeSpec, GenerationRequest, ModelSpec
    from clearsight.decoding import GenerationResult, TokenEvent, generate, stream_generate
    from clearsight.errors import ClearsightError, InputError
    from clearsight.kernels.plan import AttentionPlan, QueryRows, Segment, StatsRequest
    from clearsight.mitigations import Branch, Mitigation, parse_mitigation
    from clearsight.models.loader import LVLM, load_model

    load = load_model
