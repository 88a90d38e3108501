"""Word-level tokenizers built in code, for the builtin models (no download)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

LLAVA_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
QWEN_SPECIALS = ("<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
PUNCTUATION = (".", ",", "?", "!", ":", ";", "'", "\n")


def word_level_tokenizer(
    words: Iterable[str], specials: tuple[str, ...], *, image_token: str | None, bos: str | None, eos: str,
    extra_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A whitespace + punctuation word tokenizer over a fixed vocabulary; unknown words map to <unk>.

    The image token is registered as a special token that is never lowercased or split, as the
    processors require (reference/demo-model.md, pitfalls). ``extra_tokens``: more named special tokens
    (attribute name -> token, e.g. InternVL's ``start_image_token``), readable as ``tok.<name>`` / ``tok.<name>_id``.
    """
    vocab: dict[str, int] = {}
    for tok in (*specials, *PUNCTUATION, *words):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, no space before "."
    kwargs = {"bos_token": bos} if bos else {}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token=eos,
        padding_side="left",
        # no image_token attribute when None: InstructBLIP's processor registers its own (and breaks on a string)
        extra_special_tokens={**({"image_token": image_token} if image_token else {}), **(extra_tokens or {})},
        **kwargs,
    )
    hf.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in ("<pad>", "<unk>")]})
    return hf
