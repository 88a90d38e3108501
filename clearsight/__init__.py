"""clearsight: hallucination mitigation for vision-language models, applied inside attention.

>>> from clearsight import load_model, generate, DecodeSpec
>>> lvlm = load_model("builtin:tiny-llava")
>>> result = generate(lvlm, {"prompt": "what is in the image?"}, decode=DecodeSpec(max_new_tokens=4))[0]
"""

from importlib.metadata import PackageNotFoundError, version

from clearsight.config import DecodeSpec, GenerationRequest, ModelSpec
from clearsight.decoding import GenerationResult, TokenEvent, generate, stream_generate
from clearsight.errors import ClearsightError, InputError
from clearsight.kernels.plan import AttentionPlan, QueryRows, Segment, StatsRequest
from clearsight.mitigations import Branch, Mitigation, parse_mitigation
from clearsight.models.loader import LVLM, load_model

try:
    __version__ = version("clearsight")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

load = load_model

__all__ = [
    "LVLM", "AttentionPlan", "Branch", "ClearsightError", "DecodeSpec", "GenerationRequest", "GenerationResult",
    "InputError", "Mitigation", "ModelSpec", "QueryRows", "Segment", "StatsRequest", "TokenEvent", "__version__",
    "generate", "load", "load_model", "parse_mitigation", "stream_generate",
]
