"""load_model(spec): builtins, local checkpoints and the local HF cache (never a download)."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from clearsight.config import ModelSpec
from clearsight.errors import InputError, ModelNotFoundError
from clearsight.kernels.registry import attn_implementation, default_backend, dispatch_implementation
from clearsight.models.adapters import Adapter, adapter_for
from clearsight.models.builtin import BUILTINS
from clearsight.models.processors import TextOnlyProcessor
from clearsight.models.shipped import shipped_path

BUILTIN_PREFIX = "builtin:"


@dataclass
class LVLM:
    """A loaded vision-language model: the HF model, its processor, its adapter, the active backend."""

    model: PreTrainedModel
    processor: ProcessorMixin
    adapter: Adapter
    spec: ModelSpec
    backend: str = "torch"
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_backend(self, backend: str) -> None:
        """Switch the language model's attention (reference | torch | triton | sdpa); the vision tower keeps its own.

        ``dispatch``: the backend is chosen per forward (``kernels.context.use_backend``), as the Engine does.
        """
        impl = dispatch_implementation() if backend == "dispatch" else attn_implementation(backend)
        if backend == "triton" and self.device.type != "cuda":
            from clearsight.kernels.triton_attention import INTERPRET

            if not INTERPRET:
                raise InputError("the triton backend runs on CUDA GPUs (on a CPU only under TRITON_INTERPRET=1, "
                                 "for tests): use --backend torch here")
        if hasattr(self.model.config, "text_config"):
            self.model.set_attn_implementation({"text_config": impl})
        else:  # a text-only model: its only attention is the language model's
            self.model.set_attn_implementation(impl)
        self.backend = backend

    def fingerprint(self) -> str:
        """A stable id of the weights and config, for caches keyed by model."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.spec.source.encode())
            h.update(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
            h.update(str(self.dtype).encode())
            src = Path(self.spec.source)
            if src.is_dir():
                for f in sorted(src.glob("*.safetensors")):
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device '{device}' is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' asked for but no CUDA GPU is visible: use --device cpu")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


# files a checkpoint folder may hold its weights in (transformers' names; sharded checkpoints have an index)
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def check_checkpoint_folder(path: Path, source: str) -> None:
    """One-line errors for a damaged checkpoint folder, before transformers reads it: config.json unreadable,
    not JSON, without a model_type transformers knows; no weights; a safetensors file cut short or corrupt."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = f"model folder '{source}'"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: config.json is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}): "
                         "fix or re-save the checkpoint") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: config.json cannot be read ({exc.__class__.__name__}): fix or re-save the "
                         "checkpoint") from None
    if not isinstance(config, dict):
        raise InputError(f"{where}: config.json holds a JSON {type(config).__name__}, not an object: fix or re-save "
                         "the checkpoint")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in CONFIG_MAPPING:
        import transformers

        raise InputError(f"{where}: config.json's model_type '{model_type}' is not one transformers knows "
                         f"(transformers {transformers.__version__}): fix config.json, or use a transformers that "
                         "supports it")
    if not any(next(path.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS):
        raise InputError(f"{where} has no weights (*.safetensors or pytorch_model.bin): copy the weights into it, or "
                         "save the model there with save_pretrained")
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise InputError(f"{where}: {file.name} is truncated or corrupt ({problem}): re-copy the file")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing, from its header alone (None if it is whole).

    Layout: an 8-byte little-endian header length n, n bytes of JSON header, then the tensor data, which the
    header's ``data_offsets`` must cover exactly.
    """
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than its 8-byte header length"
    with file.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if 8 + n > size:
            return f"{size:,} bytes, but its header alone claims {8 + n:,}"
        if n > SAFETENSORS_MAX_HEADER:
            return f"a header length of {n:,} bytes, past the format's limit"
        try:
            header = json.loads(fh.read(n))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
            return "its header is not the JSON table of tensors it should be"
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{size:,} bytes, its header expects {expected:,}"
    return None


def _load_processor(location: str) -> ProcessorMixin:
    try:
        found = AutoProcessor.from_pretrained(location, local_files_only=True)
        failure: Exception | None = None
        if isinstance(found, ProcessorMixin):
            return found
        # a processor class transformers cannot resolve (e.g. our image-only ones, saved) gives a bare tokenizer
    except (ImportError, AttributeError, ValueError, OSError, TypeError) as exc:
        found, failure = None, exc
    # Qwen2-VL's and LLaVA-OneVision's stock processors need torchvision for their video processor; images need none
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from clearsight.models.processors import ImageOnlyQwen2VLProcessor

    cfg = AutoConfig.from_pretrained(location, local_files_only=True)
    if cfg.model_type == "llava_onevision":  # its stock processor needs a video processor too
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        from clearsight.models.processors import ImageOnlyLlavaOnevisionProcessor

        tok = AutoTokenizer.from_pretrained(location, local_files_only=True)
        ip = LlavaOnevisionImageProcessorPil.from_pretrained(location, local_files_only=True)
        saved = _processor_config(location)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # tokens per base grid, if not saved
        return ImageOnlyLlavaOnevisionProcessor(
            image_processor=ip, tokenizer=tok, chat_template=saved.get("chat_template", tok.chat_template),
            num_image_tokens=saved.get("num_image_tokens") or side * side,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=saved.get("vision_aspect_ratio", cfg.vision_aspect_ratio))
    if cfg.model_type == "qwen3_vl":  # its stock processor needs a video processor too
        from clearsight.models.processors import ImageOnlyQwen3VLProcessor

        tok = AutoTokenizer.from_pretrained(location, local_files_only=True)
        ip = Qwen2VLImageProcessorPil.from_pretrained(location, local_files_only=True)
        return ImageOnlyQwen3VLProcessor(image_processor=ip, tokenizer=tok,
                                         chat_template=_processor_config(location).get("chat_template",
                                                                                       tok.chat_template))
    if cfg.model_type == "smolvlm":  # its stock processor needs a video processor and num2words (videos only)
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        from clearsight.models.processors import ImageOnlySmolVLMProcessor

        tok = AutoTokenizer.from_pretrained(location, local_files_only=True)
        ip = SmolVLMImageProcessorPil.from_pretrained(location, local_files_only=True)
        saved = _processor_config(location)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor
        return ImageOnlySmolVLMProcessor(image_processor=ip, tokenizer=tok,
                                         image_seq_len=saved.get("image_seq_len") or side * side,
                                         chat_template=saved.get("chat_template", tok.chat_template))
    if cfg.model_type == "internvl":  # its stock processor needs a video processor too
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        from clearsight.models.processors import ImageOnlyInternVLProcessor

        tok = AutoTokenizer.from_pretrained(location, local_files_only=True)
        saved = _processor_config(location)
        return ImageOnlyInternVLProcessor(
            image_processor=GotOcr2ImageProcessorPil.from_pretrained(location, local_files_only=True),
            tokenizer=tok, image_seq_length=saved.get("image_seq_length") or cfg.image_seq_length,
            chat_template=saved.get("chat_template", tok.chat_template))
    if cfg.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        if failure is not None:
            raise failure
        return found
    tok = AutoTokenizer.from_pretrained(location, local_files_only=True)
    ip = Qwen2VLImageProcessorPil.from_pretrained(location, local_files_only=True)
    return ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)


def _processor_config(location: str) -> dict[str, Any]:
    """The saved processor_config.json (plus chat_template.jinja) of a folder or a cached HF id; {} if none."""
    from huggingface_hub import try_to_load_from_cache

    out: dict[str, Any] = {}
    for name in ("processor_config.json", "chat_template.jinja"):
        path: Path | None = Path(location) / name
        if not path.exists():
            cached = try_to_load_from_cache(location, name) if _looks_like_hub_id(location) else None
            path = Path(cached) if isinstance(cached, str) else None
        if path is None:
            continue
        if name.endswith(".json"):
            loaded = json.loads(path.read_text(encoding="utf-8"))
            out.update(loaded if isinstance(loaded, dict) else {})
        else:
            out["chat_template"] = path.read_text(encoding="utf-8")
    return out


def _from_pretrained(location: str, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on stderr; clearsight's own output stays clean
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_checkpoint(location, dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_checkpoint(location: str, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    cfg = AutoConfig.from_pretrained(location, local_files_only=True)
    if cfg.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        # a text-only language model (usable as a judge; images are refused with a clear error)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, local_files_only=True)
        return model, TextOnlyProcessor(AutoTokenizer.from_pretrained(location, local_files_only=True))
    model = AutoModelForImageTextToText.from_pretrained(location, dtype=dtype, local_files_only=True)
    return model, _load_processor(location)


def load_model(spec: ModelSpec | str, **overrides: Any) -> LVLM:
    """Load an LVLM from ``builtin:<name>``, a local path, or an HF id already in the local cache.

    >>> lvlm = load_model("builtin:tiny-llava")
    >>> lvlm.adapter.family
    'llava'
    """
    if isinstance(spec, str):
        spec = ModelSpec(source=spec, **overrides)
    elif overrides:
        spec = spec.model_copy(update=overrides)
    check_device(spec.device)
    if spec.backend is not None:
        attn_implementation(spec.backend)  # an unknown backend fails before anything is loaded
    dtype = resolve_dtype(spec.dtype, spec.device)
    source = spec.source
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ModelNotFoundError(f"unknown builtin model '{name}': choose one of "
                                     + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
        build = BUILTINS[name][1]
        if build is None:
            path = shipped_path(name)
            if not (path / "config.json").exists():
                raise ModelNotFoundError(
                    f"builtin:{name} weights are not in this install ({path}): "
                    "train them with `python scripts/train_shapes_llava.py` (docs/demo-model.md)"
                )
            model, processor = _from_pretrained(str(path), dtype)
        else:
            model, processor = build()
            model = model.to(dtype)
    else:
        path = Path(source).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise ModelNotFoundError(
                    f"model path '{source}' has no config.json: point to a saved HF checkpoint folder")
            check_checkpoint_folder(path, source)
            try:
                model, processor = _from_pretrained(str(path), dtype)
            except torch.cuda.OutOfMemoryError:
                raise
            except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise InputError(f"model folder '{source}' could not be loaded ({exc.__class__.__name__}: {first}): "
                                 "check or re-save the checkpoint") from None
        elif not _looks_like_hub_id(source):
            raise ModelNotFoundError(f"model path '{source}' does not exist: give a checkpoint folder, a cached HF id "
                                     "(org/name) or builtin:<name> (see `clearsight models`)")
        else:
            try:
                model, processor = _from_pretrained(source, dtype)
            except OSError as exc:
                raise ModelNotFoundError(
                    f"model '{source}' is not a local path and not in the local HF cache ({exc.__class__.__name__}); "
                    "nothing is downloaded here: fetch it where there is network (`hf download "
                    f"{source}`) or pass a local folder"
                ) from None
    model = model.to(spec.device).eval()
    lvlm = LVLM(model=model, processor=processor, adapter=adapter_for(model, processor), spec=spec)
    lvlm.set_backend(spec.backend or default_backend(spec.device))
    return lvlm


def describe_builtins() -> list[dict[str, str]]:
    return [{"name": BUILTIN_PREFIX + n, "description": d} for n, (d, _) in BUILTINS.items()]
