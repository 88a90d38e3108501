"""Builtin models: tiny random-weight LVLMs of each family, built from small configs in code.

They exist for tests and examples: real transformers classes with real processors, seeded
weights, nothing downloaded. ``builtin:shapes-llava`` (a trained demo model) is loaded from the
package's own checkpoint folder through the same path as any HF checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from clearsight.models.processors import (
    ImageOnlyInternVLProcessor,
    ImageOnlyLlavaOnevisionProcessor,
    ImageOnlyQwen2VLProcessor,
)
from clearsight.models.tokenizer import LLAVA_SPECIALS, QWEN_SPECIALS, word_level_tokenizer

TINY_WORDS = (
    "a an the is are was there this that it in on of and or with to what which how many where who "
    "describe image picture photo please detail details color colour shape object objects left right top "
    "bottom middle center next near above below yes no not one two three four five red blue green yellow "
    "purple orange black white circle square triangle star cross heart ring diamond moon arrow hexagon "
    "pentagon house frame dog cat person car tree sky answer question word single using phrase small large "
    "big little see can you do does I"
).split()

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Llama-style language model: 4 layers so that VAR's layers 2..L-2 exist; GQA (4 heads, 2 kv heads).
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-6,
)
TINY_CLIP = dict(
    model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, image_size=32, patch_size=8,
)


def _seeded(build: Callable[[], PreTrainedModel], seed: int) -> PreTrainedModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def _llava_tokenizer():
    return word_level_tokenizer(TINY_WORDS, LLAVA_SPECIALS, image_token="<image>", bos="<s>", eos="</s>")


def tiny_llava() -> tuple[PreTrainedModel, ProcessorMixin]:
    tok = _llava_tokenizer()
    ip = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    cfg = LlavaConfig(
        vision_config=TINY_CLIP, text_config=dict(model_type="llama", vocab_size=len(tok), **TINY_TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=16,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg.text_config.pad_token_id, cfg.text_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.text_config.bos_token_id = tok.bos_token_id
    return _seeded(lambda: LlavaForConditionalGeneration(cfg), 1), proc


def tiny_llava_next() -> tuple[PreTrainedModel, ProcessorMixin]:
    tok = _llava_tokenizer()
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    cfg = LlavaNextConfig(
        vision_config=TINY_CLIP, text_config=dict(model_type="llama", vocab_size=len(tok), **TINY_TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg.text_config.pad_token_id, cfg.text_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.text_config.bos_token_id = tok.bos_token_id
    return _seeded(lambda: LlavaNextForConditionalGeneration(cfg), 2), proc


def _tiny_qwen_processor() -> tuple[Any, ProcessorMixin, dict[str, Any]]:
    """Tokenizer, processor and text config of the tiny Qwen2-VL and Qwen2.5-VL (same processor and M-RoPE)."""
    tok = word_level_tokenizer(TINY_WORDS, QWEN_SPECIALS, image_token="<|image_pad|>", bos=None, eos="<|im_end|>")
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    proc = ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    text = dict(TINY_TEXT, vocab_size=len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    return tok, proc, text


def tiny_qwen2_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    tok, proc, text = _tiny_qwen_processor()
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(text, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    return _seeded(lambda: Qwen2VLForConditionalGeneration(cfg), 3), proc


def tiny_llava_onevision() -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-OneVision: SigLIP tower (no CLS; "full" features), anyres tiles, a Qwen2 language model."""
    # its processor counts <video> tokens too, so the vocabulary has one (unused)
    tok = word_level_tokenizer(TINY_WORDS, (*LLAVA_SPECIALS, "<video>"), image_token="<image>", bos="<s>", eos="</s>")
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    proc = ImageOnlyLlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=16,
                                            vision_feature_select_strategy="full", chat_template=LLAVA_TEMPLATE)
    cfg = LlavaOnevisionConfig(
        vision_config=dict(TINY_CLIP, model_type="siglip_vision_model"),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), **TINY_TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="full",
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg.text_config.pad_token_id, cfg.text_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.text_config.bos_token_id = tok.bos_token_id
    return _seeded(lambda: LlavaOnevisionForConditionalGeneration(cfg), 5), proc


def tiny_qwen2_5_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2.5-VL: Qwen2-VL's processor and M-RoPE; a vision tower with one windowed and one full-attention block."""
    tok, proc, text = _tiny_qwen_processor()
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=56, fullatt_block_indexes=[1]),
        text_config=dict(text, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    return _seeded(lambda: Qwen2_5_VLForConditionalGeneration(cfg), 6), proc


def tiny_qwen3_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen3-VL: 16 px patches, DeepStack (two vision layers' features added into the first two LLM layers),
    interleaved M-RoPE, QK-norm; the image-only Qwen3-VL processor (no video)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from clearsight.models.processors import ImageOnlyQwen3VLProcessor

    tok = word_level_tokenizer(TINY_WORDS, QWEN_SPECIALS, image_token="<|image_pad|>", bos=None, eos="<|im_end|>")
    ip = Qwen2VLImageProcessorPil(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16, patch_size=16, merge_size=2,
                                  temporal_patch_size=2)
    proc = ImageOnlyQwen3VLProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        text_config=dict(TINY_TEXT, vocab_size=len(tok), head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    return _seeded(lambda: Qwen3VLForConditionalGeneration(cfg), 21), proc


SMOLVLM_SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                    "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)))


def tiny_smolvlm() -> tuple[PreTrainedModel, ProcessorMixin]:
    """SmolVLM: a SigLIP-style tower on 24 px tiles (6x6 patches, pixel shuffle to 3x3 tokens); images resized to
    48 px and split into 24 px tiles plus a global image, tiles marked by <fake_token_around_image><row_i_col_j>."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from clearsight.models.processors import ImageOnlySmolVLMProcessor

    tok = word_level_tokenizer(TINY_WORDS, SMOLVLM_SPECIALS, image_token="<image>", bos=None,
                               eos="<end_of_utterance>")
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 48}, max_image_size={"longest_edge": 24},
                                  do_image_splitting=True)
    proc = ImageOnlySmolVLMProcessor(image_processor=ip, tokenizer=tok, image_seq_len=9,
                                     chat_template=DEFAULT_CHAT_TEMPLATE)
    cfg = SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=24, patch_size=4, initializer_range=0.2),
        text_config=dict(model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, **TINY_TEXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, pad_token_id=tok.pad_token_id,
    )
    return _seeded(lambda: SmolVLMForConditionalGeneration(cfg), 23), proc


def tiny_instructblip() -> tuple[PreTrainedModel, ProcessorMixin]:
    """InstructBLIP: BLIP ViT (CLS + 4x4 patches), a 2-layer Q-Former with 8 learned queries reading the
    instruction through its own tokenizer, a Llama language model; no chat template (the queries come first)."""
    from tokenizers import processors
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = word_level_tokenizer(TINY_WORDS, LLAVA_SPECIALS, image_token=None, bos="<s>", eos="</s>")
    # the language tokenizer puts BOS in front of the text (Vicuna's does); the queries go before it
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    qtok = word_level_tokenizer(TINY_WORDS, ("<pad>", "<unk>", "[CLS]", "[SEP]"), image_token=None, bos=None,
                                eos="[SEP]")
    qtok.padding_side = "right"  # the Q-Former's text positions start at 0
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32})
    proc = InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=8)
    cfg = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=len(qtok), max_position_embeddings=128, pad_token_id=qtok.pad_token_id),
        text_config=dict(model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TINY_TEXT),
        num_query_tokens=8, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _seeded(lambda: InstructBlipForConditionalGeneration(cfg), 24), proc


INTERNVL_SPECIALS = ("<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                     "<IMG_CONTEXT>", "<video>")
INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_internvl3() -> tuple[PreTrainedModel, ProcessorMixin]:
    """InternVL3: InternViT tower (CLS token, 32 px tiles of 8x8 patches), pixel-unshuffle to 4x4 tokens per tile,
    an image split into up to 4 tiles plus a thumbnail, a Qwen2 language model."""
    tok = word_level_tokenizer(
        TINY_WORDS, INTERNVL_SPECIALS, image_token="<IMG_CONTEXT>", bos=None, eos="<|im_end|>",
        extra_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    proc = ImageOnlyInternVLProcessor(image_processor=ip, tokenizer=tok, image_seq_length=16,
                                      chat_template=INTERNVL_TEMPLATE)
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=[32, 32], patch_size=[4, 4]),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), **TINY_TEXT),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=16, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    cfg.text_config.pad_token_id, cfg.text_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.text_config.bos_token_id = None
    return _seeded(lambda: InternVLForConditionalGeneration(cfg), 7), proc


GEMMA3_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_gemma3() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Gemma 3: SigLIP tower (32 px, 8x8 patches) average-pooled to a 4x4 token grid; a language model whose
    sliding-window layers (window 6, shorter than the image block and the prompt) alternate with global ones,
    query scaling 1/sqrt(query_pre_attn_scalar) != 1/sqrt(head_dim), and image tokens that attend to their
    whole image at prefill (token_type_ids)."""
    tok = word_level_tokenizer(
        TINY_WORDS, GEMMA3_SPECIALS, image_token="<image_soft_token>", bos="<bos>", eos="<end_of_turn>",
        extra_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=16, chat_template=GEMMA3_TEMPLATE)
    text = dict(TINY_TEXT, vocab_size=len(tok), head_dim=16, query_pre_attn_scalar=8, sliding_window=6,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                tie_word_embeddings=False)
    cfg = Gemma3Config(
        vision_config=dict(TINY_CLIP, model_type="siglip_vision_model", patch_size=8),
        text_config=dict(text, model_type="gemma3_text"), mm_tokens_per_image=16,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,  # tied random embeddings (scaled by sqrt(hidden)) only echo the last token
    )
    return _seeded(lambda: Gemma3ForConditionalGeneration(cfg), 8), proc


def tiny_llama() -> tuple[PreTrainedModel, ProcessorMixin]:
    """A text-only Llama (for judge roles and for the image-refused error path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clearsight.models.processors import TextOnlyProcessor

    tok = _llava_tokenizer()
    tok.chat_template = LLAVA_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **TINY_TEXT)
    return _seeded(lambda: LlamaForCausalLM(cfg), 4), TextOnlyProcessor(tok)


BUILTINS: dict[str, tuple[str, Callable[[], tuple[PreTrainedModel, ProcessorMixin]] | None]] = {
    "tiny-llava": ("random-weight LLaVA-1.5-style model (CLIP 32 px, 4x4 image grid, Llama 4 layers)", tiny_llava),
    "tiny-llava-next": ("random-weight LLaVA-NeXT model (anyres tiles + image newline tokens)", tiny_llava_next),
    "tiny-qwen2-vl": ("random-weight Qwen2-VL model (M-RoPE, merged 2x2 patches)", tiny_qwen2_vl),
    "tiny-llava-onevision": ("random-weight LLaVA-OneVision model (SigLIP, anyres tiles, Qwen2 4 layers)",
                             tiny_llava_onevision),
    "tiny-qwen2.5-vl": ("random-weight Qwen2.5-VL model (M-RoPE, windowed vision attention)", tiny_qwen2_5_vl),
    "tiny-qwen3-vl": ("random-weight Qwen3-VL model (DeepStack, interleaved M-RoPE, QK-norm)", tiny_qwen3_vl),
    "tiny-smolvlm": ("random-weight SmolVLM model (tiles + global image, pixel shuffle, Llama 4 layers)",
                     tiny_smolvlm),
    "tiny-instructblip": ("random-weight InstructBLIP model (8 Q-Former queries, no grid; Llama 4 layers)",
                          tiny_instructblip),
    "tiny-internvl3": ("random-weight InternVL3 model (InternViT, up to 4 tiles + thumbnail, pixel-unshuffle, Qwen2)",
                       tiny_internvl3),
    "tiny-gemma3": ("random-weight Gemma 3 model (SigLIP, sliding-window + global layers, bidirectional image block)",
                    tiny_gemma3),
    "tiny-llama": ("random-weight text-only Llama (no vision tower)", tiny_llama),
    "shapes-llava": ("LLaVA trained on the shapes world (the demo model)", None),
    "shapes-organism": ("LLaVA trained on the organism shapes world (issue 17: small faint partners, long "
                        "captions, 8 layers; docs/demo-model.md)", None),
}
