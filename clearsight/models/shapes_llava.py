"""Builders for ``builtin:shapes-llava``, the demo LLaVA trained on the shapes world.

Only the training script (``scripts/train_shapes_llava.py``) uses this module: the shipped checkpoint
is a plain ``save_pretrained`` folder (config, safetensors, tokenizer, processor, chat template) that
loads through ``AutoModelForImageTextToText`` / ``AutoProcessor`` like any HF checkpoint.

Sizes follow reference/demo-model.md: 96 px images, patch 12 (8 x 8 = 64 image tokens), CLIP vision
tower hidden 192 x 4 layers, Llama LM hidden 192 x 4 layers, tied embeddings, word-level tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import processors
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from clearsight.evals.datasets.shapes import COLOURS, SHAPES
from clearsight.models.builtin import LLAVA_TEMPLATE
from clearsight.models.tokenizer import LLAVA_SPECIALS, word_level_tokenizer

IMAGE_SIZE = 96
PATCH_SIZE = 12
GRID = IMAGE_SIZE // PATCH_SIZE  # 8 x 8 image tokens

CAPTION_PROMPTS = (
    "Please describe this image in detail.",  # CHAIR's default prompt
    "Describe the image.",
    "Describe this image.",
    "What is in the image?",
)
QUESTION_TEMPLATE = "Is there a {} in the image?"  # POPE's template ("an" before a vowel)
ANSWER_SUFFIX = "Answer the question using a single word or phrase."  # POPE's build_prompt suffix

# Every word the training prompts and answers use; anything else maps to <unk>.
WORDS = tuple(dict.fromkeys(
    "USER ASSISTANT Is is there a an in the image Answer question using single word or phrase "
    "Yes No yes no Please describe Describe this detail What what and".split()
    + list(COLOURS) + list(SHAPES)
))

VISION = dict(
    model_type="clip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
)
TEXT = dict(
    model_type="llama", hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=6, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.02,
    tie_word_embeddings=True,
)


def build_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (whitespace + punctuation), BOS added by the post-processor. ``extra_words``
    (appended after ``WORDS``, so the shipped ids are unchanged): e.g. the long caption style's words."""
    words = tuple(dict.fromkeys((*WORDS, *extra_words)))
    tok = word_level_tokenizer(words, LLAVA_SPECIALS, image_token="<image>", bos="<s>", eos="</s>")
    bos_id = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    tok.chat_template = LLAVA_TEMPLATE
    return tok


def build_processor(tok: PreTrainedTokenizerFast | None = None, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    tok = tok or build_tokenizer()
    ip = CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)


def build_config(tok: PreTrainedTokenizerFast, text_layers: int = TEXT["num_hidden_layers"],
                 patch_size: int = PATCH_SIZE) -> LlavaConfig:
    """``text_layers``: language-model depth (4 shipped; the model organism of issue 17 uses 8 so that the
    methods' layer ranges, e.g. VAR's 2..L-2, span more than a couple of layers). ``patch_size``: 12 shipped
    (8 x 8 image tokens); the organism uses 24, one token per grid cell (4 x 4), which makes its longer rows
    affordable on 2 cores."""
    if IMAGE_SIZE % patch_size:
        raise ValueError(f"patch_size must divide {IMAGE_SIZE}, got {patch_size}")
    side = IMAGE_SIZE // patch_size
    cfg = LlavaConfig(
        vision_config=dict(VISION, patch_size=patch_size),
        text_config=dict(TEXT, vocab_size=len(tok), num_hidden_layers=text_layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=side * side,
        projector_hidden_act="gelu", tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    tc = cfg.text_config
    tc.pad_token_id, tc.bos_token_id, tc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return cfg


def build_model(tok: PreTrainedTokenizerFast, text_layers: int = TEXT["num_hidden_layers"],
                patch_size: int = PATCH_SIZE) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration(build_config(tok, text_layers, patch_size))
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    return model


def question(obj: str, suffix: bool = True) -> str:
    """The POPE question for ``obj`` (same text as POPE's question_text + build_prompt)."""
    from clearsight.evals.datasets.pope import build_prompt, question_text

    q = question_text(QUESTION_TEMPLATE, obj)
    return build_prompt(q) if suffix else q
