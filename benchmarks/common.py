"""Shared pieces of the benchmarks: a LLaVA-shaped random model and interleaved timing."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from clearsight.models.adapters import adapter_for
from clearsight.models.builtin import LLAVA_TEMPLATE, _llava_tokenizer
from clearsight.models.loader import LVLM


def llava_shaped(hidden: int = 256, layers: int = 8, heads: int = 8, kv_heads: int | None = None,
                 image_size: int = 96, patch: int = 8, seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> LVLM:
    """A random-weight LlavaForConditionalGeneration with (image_size / patch)^2 image tokens."""
    from clearsight.config import ModelSpec

    tok = _llava_tokenizer()
    ip = CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=4096),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(image_size // patch) ** 2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval().to(device=device, dtype=dtype)
    lvlm = LVLM(model=model, processor=proc, adapter=adapter_for(model, proc),
                spec=ModelSpec(source=f"bench:llava-h{hidden}-l{layers}", device=device))
    lvlm.set_backend("torch")
    return lvlm


def add_model_arguments(ap, new_tokens: int, repeats: int) -> None:
    """The LLaVA-shaped model and run-length options every benchmark shares."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96, help="with patch 8: (size/8)^2 image tokens")
    ap.add_argument("--new-tokens", type=int, default=new_tokens)
    ap.add_argument("--repeats", type=int, default=repeats)


def scene(seed: int = 0, size: int = 96) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def interleaved(runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median of each measurement, taking turns (A B C A B C ...) so drift hits all alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            samples[k].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timer() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
