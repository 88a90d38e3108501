"""A text-only model (builtin:tiny-llama, no vision tower): generation equals transformers' own greedy
generate, text-only mitigations run, image-contrast ones fail clearly (issue 22)."""

from __future__ import annotations

import pytest
import torch
from tinyworld import tiny

from clearsight import DecodeSpec, generate
from clearsight.errors import InputError

PROMPTS = ["tell me a story", "what is two plus two, please answer"]


def test_text_only_model_matches_stock_generate():
    lvlm = tiny("tiny-llama")
    adapter = lvlm.adapter
    ours = [r.token_ids for r in generate(lvlm, PROMPTS, decode=DecodeSpec(max_new_tokens=6, ignore_eos=True))]
    for prompt, got in zip(PROMPTS, ours):
        batch = adapter.encode([adapter.chat_prompt(prompt, False)], [None])
        lvlm.set_backend("sdpa")
        with torch.inference_mode():
            out = lvlm.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=adapter.pad_token_id)
        lvlm.set_backend("torch")
        assert got == out[0, batch["input_ids"].shape[1]:].tolist()
    assert ours[0] != ours[1]


def test_text_only_model_refuses_image_contrast_methods():
    lvlm = tiny("tiny-llama")
    with pytest.raises(InputError, match="vcd needs an image"):
        generate(lvlm, PROMPTS[:1], ["vcd"], DecodeSpec(max_new_tokens=2))
