"""End to end: greedy generation with the triton backend (interpreter on CPU) equals the reference backend."""

from __future__ import annotations

import pytest
from tinyworld import make_image, tiny

pytest.importorskip("triton")
from clearsight.kernels import triton_attention as ta  # noqa: E402

if not ta.INTERPRET:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("triton kernels need TRITON_INTERPRET=1 on a CPU (set by tests/conftest.py)",
                    allow_module_level=True)

from clearsight import DecodeSpec, generate  # noqa: E402

DECODE = DecodeSpec(max_new_tokens=2)  # the prefill and a decode step: each interpreted step costs seconds


@pytest.mark.parametrize(
    ("family", "mitigations"),
    [("tiny-llava", []), ("tiny-llava", ["pai"]), ("tiny-llava", ["cca"]), ("tiny-qwen2-vl", []),
     ("tiny-qwen2.5-vl", [])],
)
def test_triton_generation_equals_reference(family, mitigations):
    requests = [{"prompt": "what is in the picture?", "image": make_image(1)},
                {"prompt": "describe the image please", "image": make_image(2, (64, 30))}]
    lvlm = tiny(family, "reference")
    expected = [r.token_ids for r in generate(lvlm, requests, mitigations, DECODE)]
    lvlm.set_backend("triton")
    try:
        got = [r.token_ids for r in generate(lvlm, requests, mitigations, DECODE)]
    finally:
        lvlm.set_backend("torch")
    assert got == expected
    assert all(len(t) >= 2 for t in expected)
