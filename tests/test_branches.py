"""Branch / Combiner machinery: extra rows of a request in the same batched forward."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
from tinyworld import make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.mitigations import REGISTRY, Branch, Mitigation, register


class RecordingContrast(Mitigation):
    """Test-only: logits = (1 + alpha) l_main - alpha l_noimg; alpha = None follows the branch alone."""

    name: Literal["test-contrast"] = "test-contrast"
    alpha: float | None = 1.0
    log: ClassVar[list[tuple[int, torch.Tensor, torch.Tensor]]] = []

    def branches(self, ctx):
        return [Branch("noimg", image=None)]

    def combine(self, logits, step, ctx):
        RecordingContrast.log.append((ctx.index, logits["main"].clone(), logits["noimg"].clone()))
        if self.alpha is None:
            return logits["noimg"]
        return (1 + self.alpha) * logits["main"] - self.alpha * logits["noimg"]


class RecordingMain(Mitigation):
    name: Literal["test-record"] = "test-record"
    log: ClassVar[list[torch.Tensor]] = []

    def combine(self, logits, step, ctx):
        RecordingMain.log.append(logits["main"].clone())
        return None


@pytest.fixture(autouse=True)
def registered():
    register(RecordingContrast)
    register(RecordingMain)
    RecordingContrast.log.clear()
    RecordingMain.log.clear()
    yield
    REGISTRY.pop("test-contrast")
    REGISTRY.pop("test-record")


PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=8)


def test_zero_weight_equals_unmitigated():
    lvlm = tiny("tiny-llava")
    req = {"prompt": PROMPT, "image": make_image(1)}
    base = generate(lvlm, [req], decode=DECODE)[0].token_ids
    zero = generate(lvlm, [req], ["test-contrast:alpha=0"], decode=DECODE)[0].token_ids
    assert zero == base


def test_branch_logits_equal_running_the_branch_alone():
    lvlm = tiny("tiny-llava")
    follow = generate(lvlm, [{"prompt": PROMPT, "image": make_image(1)}], ["test-contrast:alpha=None"],
                      decode=DECODE)[0]
    solo = generate(lvlm, [{"prompt": PROMPT}], ["test-record"], decode=DECODE)[0]
    assert follow.token_ids == solo.token_ids
    branch_logits = [b for _, _, b in RecordingContrast.log]
    assert len(branch_logits) == len(RecordingMain.log) == len(solo.token_ids) + (solo.finish_reason == "eos")
    for ours, alone in zip(branch_logits, RecordingMain.log):
        torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)


def test_combination_formula_drives_the_choice():
    lvlm = tiny("tiny-llava")
    out = generate(lvlm, [{"prompt": PROMPT, "image": make_image(2)}], ["test-contrast:alpha=2"], decode=DECODE)[0]
    chosen = []
    for _, main, noimg in RecordingContrast.log:
        chosen.append(int(torch.argmax(3 * main - 2 * noimg)))  # (1 + 2) l - 2 l_noimg, by hand
    assert chosen[: len(out.token_ids)] == out.token_ids
    # the contrast changes something, else the test proves nothing
    base = generate(lvlm, [{"prompt": PROMPT, "image": make_image(2)}], decode=DECODE)[0].token_ids
    assert base != out.token_ids


def test_mixed_batch_equals_solo_runs():
    lvlm = tiny("tiny-llava")
    reqs = [
        {"prompt": PROMPT, "image": make_image(3), "mitigations": ["test-contrast:alpha=1"]},
        {"prompt": "describe the image please", "image": make_image(4), "mitigations": []},
        {"prompt": "is there a red circle?", "image": make_image(5), "mitigations": ["test-contrast:alpha=3"]},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    assert batched == solo
    assert generate(lvlm, reqs[:1], decode=DECODE)[0].mitigations == ["test-contrast:alpha=1.0"]


class NoisedBranch(Mitigation):
    """Test-only: a branch whose processed pixels are replaced; combine follows the branch."""

    name: Literal["test-noised"] = "test-noised"
    value: float = 0.0

    def branches(self, ctx):
        return [Branch("noised", pixel_transform=lambda px: torch.full_like(px, self.value))]

    def combine(self, logits, step, ctx):
        return logits["noised"]


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"])
def test_pixel_transform_touches_only_its_row(family):
    """A branch fed transformed pixels equals a request whose image already has those pixels."""
    lvlm = tiny(family)
    register(NoisedBranch)
    try:
        img = make_image(6)
        req = {"prompt": PROMPT, "image": img}
        followed = generate(lvlm, [req], ["test-noised:value=0.5"], decode=DECODE)[0].token_ids
        # oracle: the processed pixels of a constant image equal the transform's output
        texts = [lvlm.adapter.chat_prompt(PROMPT, True)]
        batch = lvlm.adapter.encode(texts, [img])
        batch["pixel_values"] = torch.full_like(batch["pixel_values"], 0.5)
        lvlm.set_backend("sdpa")
        with torch.inference_mode():
            out = lvlm.model.generate(**batch, max_new_tokens=DECODE.max_new_tokens, do_sample=False,
                                      pad_token_id=lvlm.adapter.pad_token_id)
        lvlm.set_backend("torch")
        expected = []
        for t in out[0, batch["input_ids"].shape[1]:].tolist():
            if t in lvlm.adapter.eos_token_ids:
                break
            expected.append(t)
        assert followed == expected
        plain = generate(lvlm, [req], decode=DECODE)[0].token_ids
        assert plain != expected  # the transform made a difference
    finally:
        REGISTRY.pop("test-noised")


class StopEarly(Mitigation):
    """Test-only: forces end-of-sequence at a given step."""

    name: Literal["test-stop"] = "test-stop"
    at: int = 1

    def combine(self, logits, step, ctx):
        if step < self.at:
            return None
        out = torch.full_like(logits["main"], -1e9)
        out[next(iter(ctx.lvlm.adapter.eos_token_ids))] = 0.0
        return out


class PrefillOnlyBranch(Mitigation):
    """Test-only: a no-image branch needed at the prefill only; records the batch size of each forward."""

    name: Literal["test-prefill-branch"] = "test-prefill-branch"
    keep: bool = False
    sizes: ClassVar[list[int]] = []

    def branches(self, ctx):
        return [Branch("noimg", image=None, until_step=None if self.keep else 0)]

    def install(self, ctx):
        return ctx.lvlm.adapter.hook_layer_inputs(
            lambda layer, h: PrefillOnlyBranch.sizes.append(h.shape[0]) if layer == 0 else None)

    def combine(self, logits, step, ctx):
        if step == 0:
            return logits["main"] - 0.5 * logits["noimg"]
        return None


def test_finished_requests_and_expired_branches_leave_the_batch():
    lvlm = tiny("tiny-llava")
    register(StopEarly)
    register(PrefillOnlyBranch)
    try:
        reqs = [
            {"prompt": PROMPT, "image": make_image(7), "mitigations": ["test-prefill-branch"]},
            {"prompt": "describe the image please", "image": make_image(8), "mitigations": ["test-stop:at=1"]},
            {"prompt": "is there a red circle?", "image": make_image(9), "mitigations": []},
        ]
        PrefillOnlyBranch.sizes.clear()
        batched = generate(lvlm, reqs, decode=DECODE)
        sizes = list(PrefillOnlyBranch.sizes)
        assert batched[1].finish_reason == "eos" and len(batched[1].token_ids) == 1
        # prefill: 4 rows; step 1: the branch has left; after step 1: the stopped request too
        assert sizes[:3] == [4, 3, 2], sizes
        solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
        assert [r.token_ids for r in batched] == solo
        # the branch's logits are used at step 0 only, so dropping it changes nothing
        kept = generate(lvlm, [{**reqs[0], "mitigations": ["test-prefill-branch:keep=true"]}], decode=DECODE)[0]
        assert kept.token_ids == batched[0].token_ids
    finally:
        REGISTRY.pop("test-stop")
        REGISTRY.pop("test-prefill-branch")
