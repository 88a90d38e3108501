"""Processor variants needed without torchvision."""

from __future__ import annotations

import re

from transformers import (
    InternVLProcessor,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    SmolVLMProcessor,
)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without the video processor.

    The stock class insists on a video processor, which needs torchvision; CPU-only installs have
    none (there is no CPU torchvision wheel in this project's registries). Images work unchanged.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class TextOnlyProcessor:
    """The processor interface (chat template + tokenizer call) for a text-only language model."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        if self.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=tokenize)
        # no template: the raw prompt text
        parts = []
        for m in messages:
            content = m["content"]
            parts.append(content if isinstance(content, str) else " ".join(c.get("text", "") for c in content))
        return "\n".join(parts)

    def __call__(self, text, return_tensors: str = "pt", padding: bool = True, **kwargs):
        return self.tokenizer(text, return_tensors=return_tensors, padding=padding)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without the video processor (torchvision-free, as for Qwen2-VL above)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 vision_aspect_ratio="anyres_max_9", **kwargs):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = "<video>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without the video processor (torchvision-free, as for Qwen2-VL above).

    Images tokenise as in the stock class (``<|vision_start|>``, the merged patches, ``<|vision_end|>``);
    the frame timestamps (``<t seconds>``) it writes exist only for videos, which need the video processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor without the video processor and without ``num2words`` (both serve videos only).

    Images are laid out as in the stock class: per tile ``<fake_token_around_image><row_i_col_j>`` and the
    tile's image tokens, a newline after each row of tiles, then the global image between two
    ``<fake_token_around_image>`` with ``<global-img>`` in front.
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None,
                 **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = None  # no videos: nothing in the text is a video slot
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        # the stock method reads the video processor's frame settings first; images need none of them
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                                  **kwargs)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without the video processor (torchvision-free, as for Qwen2-VL above)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token, self.video_token = tokenizer.context_image_token, tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")
