"""The triton backend vs the reference backend, under the Triton interpreter (CPU, tiny shapes).

``TRITON_INTERPRET=1`` must be set before triton is imported (triton reads it when ``@triton.jit``
decorates a kernel), so it is set at the very top of this module. Shapes: B = 3 left-padded rows
(pads 0, 2, 3), H = 4 query heads over 2 KV heads (GQA), D = 8, an odd prompt length L0 = 13, tiles
of 16 (prefill: one query tile; decode at L0 + 20 keys: two KV splits merged by log-sum-exp).

Tolerances (float32 under the interpreter): outputs 1e-4 absolute against the float32 reference
(observed differences are about 1e-6), statistics 1e-5; fp16/bf16 inputs (upcast in the kernel)
rtol 2e-3 / 1.6e-2 (one rounding of the output to the input dtype). Padding query rows are never
read, so they are excluded, as in test_backends.py.
"""

from __future__ import annotations

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton kernel is defined (TRITON_INTERPRET=0: GPU tier)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot be tested")

from plan_cases import PADS, D, H, make_plan, make_qkv  # noqa: E402
from test_backends import FEATURES as BASE_FEATURES  # noqa: E402
from test_backends import (  # noqa: E402
    _abs_last,
    _aki,
    _bias,
    _head_scale,
    _redistribute,
    aki_hand_mask,
    masked_softmax_attention,
)

from clearsight.kernels import triton_attention as ta  # noqa: E402
from clearsight.kernels.context import use_plan  # noqa: E402
from clearsight.kernels.plan import Counterfactual, Segment, uniform_hash  # noqa: E402
from clearsight.kernels.reference import reference_attention  # noqa: E402
from clearsight.kernels.triton_backend import kernel_plan, triton_attention  # noqa: E402

if not ta.INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "clearsight.kernels.triton_attention was imported before TRITON_INTERPRET=1 was set and there is "
        "no GPU; run this file alone or export TRITON_INTERPRET=1",
        allow_module_level=True,
    )

L = 13  # odd prompt length: ragged tiles everywhere
DEC_EXTRA = 20  # decode at L + 20 keys: two KV splits of the interpreter's 16-key blocks
ATOL = 1e-4
STATS_ATOL = 1e-5


class _Module:
    layer_idx = 1
    num_key_value_groups = 2
    is_causal = True


MODULE = _Module()


def _mask(plan):
    """test_backends' custom mask for any prompt length: concentric-style ranks inside row 0's image
    block (bidirectional within a ring), and row 2's image queries see the whole prompt."""
    L0 = plan.prompt_len
    rank = torch.arange(L0)
    rank[2:8] = torch.tensor([2, 2, 3, 3, 2, 2])
    plan.set_mask([0], rank.unsqueeze(0), rank.unsqueeze(0), owner="cca")
    limit = torch.arange(L0)
    p = PADS[2]
    limit[p + 2 : p + 8] = L0 - 1
    plan.set_mask([2], torch.arange(L0).unsqueeze(0), limit.unsqueeze(0), owner="cca")


def _combined(plan):
    _bias(plan)
    _abs_last(plan)
    _redistribute(plan)
    _head_scale(plan)
    _mask(plan)


FEATURES = {**BASE_FEATURES, "mask": _mask, "combined": _combined}


def _run(fn, plan, q, k, v, mask=None):
    if plan is not None and mask is None:
        mask = plan.allowed(q.shape[2], k.shape[2])
    with use_plan(plan):
        out, weights = fn(MODULE, q, k, v, mask, scaling=D**-0.5)
    assert weights is None
    return out


def _valid_rows(Lq: int, prefill: bool) -> torch.Tensor:
    valid = torch.ones(len(PADS), Lq, dtype=torch.bool)
    if prefill:
        for b, p in enumerate(PADS):
            valid[b, :p] = False
    return valid


def _shapes(phase: str, length: int = L) -> tuple[int, int]:
    return (length, length) if phase == "prefill" else (1, length + DEC_EXTRA)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_feature_matches_reference(feature, phase):
    plan = make_plan(L=L)
    FEATURES[feature](plan)
    Lq, Lk = _shapes(phase)
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=zlib.crc32(feature.encode()) % 1000)
    out = _run(triton_attention, plan, q, k, v)
    ref = _run(reference_attention, plan, q, k, v)
    assert out.shape == ref.shape == (len(PADS), Lq, H, D)
    diff = (out - ref).abs()[_valid_rows(Lq, phase == "prefill")]
    assert diff.max().item() < ATOL, f"{feature}/{phase}: max diff {diff.max().item():.2e}"


@pytest.mark.parametrize("feature", ["combined", "counterfactual_shuffled", "mask"])
def test_multi_tile_prefill_and_block_skipping(feature):
    """L0 = 37: three query tiles and three key blocks; the custom mask's ranks let the kernel skip
    key blocks above a tile (reference/kernels.md §7.3), which must not change the result."""
    plan = make_plan(L=37)
    FEATURES[feature](plan)
    q, k, v = make_qkv(len(PADS), 37, 37, seed=11)
    out = _run(triton_attention, plan, q, k, v)
    ref = _run(reference_attention, plan, q, k, v)
    assert (out - ref).abs()[_valid_rows(37, True)].max().item() < ATOL


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_aki_mask_equals_the_hand_built_mask(phase):
    """AKI's mask (a second interval of ranks per query) at L0 = 37: three query tiles, the image queries of
    the first tile reach into the last key block, which block skipping must still visit."""
    Lq, Lk = (37, 37) if phase == "prefill" else (1, 37 + DEC_EXTRA)
    plan = make_plan(L=37)
    _aki(plan)
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=13)
    out = _run(triton_attention, plan, q, k, v)
    want = masked_softmax_attention(q, k, v, aki_hand_mask(37, Lq, Lk), D**-0.5)
    assert (out.double() - want).abs()[_valid_rows(Lq, phase == "prefill")].max().item() < ATOL


def test_block_skipping_skips():
    """The per-block minimum ranks the kernel reads really exclude the upper key blocks."""
    plan = make_plan(L=37)
    _mask(plan)
    mins = ta.block_min_rank(plan.k_rank, 16)
    assert mins.shape == (len(PADS), 3)
    assert (mins[:, 1] > 15).all() and (mins[:, 2] > 31).all()  # tile 0 (ranks <= 15) skips blocks 1 and 2
    assert ta.block_min_rank(plan.k_rank, 16) is mins  # computed once per plan, reused by layers and steps
    q, k, v = make_qkv(len(PADS), 37, 37, seed=3)
    first = _run(triton_attention, plan, q, k, v)
    assert torch.equal(_run(triton_attention, plan, q, k, v), first)
    with torch.inference_mode():  # plans built in inference mode: ranks without a version counter
        plan_inf = make_plan(L=37)
        _mask(plan_inf)
        assert torch.equal(_run(triton_attention, plan_inf, q, k, v), first)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("setup", ["combined", "counterfactual_redistribute", "segment_mass_only"])
def test_stats_match_reference(setup, phase):
    """Segment masses per row [B,H,Lq,S] and the last row over all keys [B,H,Lk], post-edit."""
    plans = []
    for _ in range(2):
        plan = make_plan(L=L)
        if setup == "combined":
            _combined(plan)
        elif setup == "counterfactual_redistribute":
            plan.set_counterfactual([1], [0, 2], Counterfactual.REVERSED, seed=3, owner="causalmm")
            _redistribute(plan)
        else:  # the single-pass kernel accumulates the masses online (and merges them across splits)
            plan.add_bias([1], [0, 1, 2], Segment.IMAGE, 0.5)
        plan.stats.segment_mass = True
        plan.stats.last_row = setup != "segment_mass_only"
        plans.append(plan)
    Lq, Lk = _shapes(phase)
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=5)
    out = _run(triton_attention, plans[0], q, k, v)
    ref = _run(reference_attention, plans[1], q, k, v)
    valid = _valid_rows(Lq, phase == "prefill")
    assert (out - ref).abs()[valid].max().item() < ATOL
    got, want = plans[0].stats_out, plans[1].stats_out
    assert len(got.segment_mass[1]) == 1
    m_got, m_want = got.segment_mass[1][0], want.segment_mass[1][0]
    assert m_got.shape == m_want.shape == (len(PADS), H, Lq, 4)
    assert (m_got - m_want).abs().permute(0, 2, 1, 3)[valid].max().item() < STATS_ATOL
    if setup != "segment_mass_only":
        torch.testing.assert_close(got.last_row[1][0], want.last_row[1][0], atol=STATS_ATOL, rtol=0)
    else:
        assert 1 not in got.last_row


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("masked", [False, True])
def test_no_plan_equals_sdpa(masked, phase):
    """No plan bound: the kernel is the backend and reads transformers' mask (None = causal)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    Lq, Lk = _shapes(phase)
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=2)
    mask = make_plan(L=L).allowed(Lq, Lk) if masked else None
    stock, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=D**-0.5)
    out = _run(triton_attention, None, q, k, v, mask=mask)
    valid = _valid_rows(Lq, phase == "prefill" and masked)
    assert (out - stock).abs()[valid].max().item() < ATOL


def test_untouched_layer_equals_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = make_plan(L=L)
    plan.add_bias([0], [0], Segment.IMAGE, 1.0)  # another layer
    q, k, v = make_qkv(len(PADS), L, L, seed=4)
    mask = plan.allowed(L, L)
    stock, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=D**-0.5)
    out = _run(triton_attention, plan, q, k, v)
    assert (out - stock).abs()[_valid_rows(L, True)].max().item() < ATOL


@pytest.mark.parametrize("with_plan", [False, True])
def test_static_cache(with_plan):
    """A static cache hands over max_cache_len keys with NaN-free but garbage slots; the bool mask
    [B,1,1,max_len] marks the valid ones. Decode and the mask-less prefill into an empty cache."""
    max_len = L + DEC_EXTRA + 7
    Lk = L + 4
    q, k, v = make_qkv(len(PADS), 1, Lk, seed=8)
    kbuf = torch.full((len(PADS), k.shape[1], max_len, D), float("nan"))
    vbuf = torch.full_like(kbuf, float("nan"))  # poisoned: any unmasked read shows up
    kbuf[:, :, :Lk], vbuf[:, :, :Lk] = k, v
    plan = None
    if with_plan:
        plan = make_plan(L=L)
        _combined(plan)
        plan.set_counterfactual([1], [1], Counterfactual.SHUFFLED, seed=5, owner="causalmm")
    ref_mask = make_plan(L=L).allowed(1, Lk)
    static_mask = torch.zeros(len(PADS), 1, 1, max_len, dtype=torch.bool)
    static_mask[..., :Lk] = ref_mask
    out = _run(triton_attention, plan, q, kbuf, vbuf, mask=static_mask)
    ref = _run(reference_attention, plan, q, k, v, mask=ref_mask)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < ATOL
    # prefill into an empty static cache: no mask, max_len keys (sliced like SDPA)
    q, k, v = make_qkv(1, L, L, seed=9)
    kbuf = torch.full((1, k.shape[1], max_len, D), float("nan"))
    vbuf = torch.full_like(kbuf, float("nan"))
    kbuf[:, :, :L], vbuf[:, :, :L] = k, v
    out = _run(triton_attention, None, q, kbuf, vbuf)
    ref = _run(reference_attention, None, q, k, v)
    assert (out - ref).abs().max().item() < ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    """fp16 / bf16 q, k, v: float32 accumulation (upcast under the interpreter), output in the input dtype."""
    plan = make_plan(L=L)
    _combined(plan)
    q, k, v = make_qkv(len(PADS), L, L, seed=6)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = _run(triton_attention, plan, q, k, v)
    ref = _run(reference_attention, plan, q, k, v)
    assert out.dtype == dtype
    # both round a float32 result to the input dtype: at most one ulp apart, i.e. relative
    atol, rtol = (1e-3, 2e-3) if dtype == torch.float16 else (1e-2, 1.6e-2)
    valid = _valid_rows(L, True)
    torch.testing.assert_close(out.float()[valid], ref.float()[valid], atol=atol, rtol=rtol)


@pytest.mark.parametrize("feature", ["combined", "counterfactual_random"])
def test_decode_splits_and_small_lq(feature):
    """Four KV splits, and a 2-row query (speculative-style decode) through the split schedule."""
    plan = make_plan(L=L)
    FEATURES[feature](plan)
    Lk = L + 50
    q, k, v = make_qkv(len(PADS), 2, Lk, seed=12)
    with use_plan(plan):
        ref, _ = reference_attention(MODULE, q, k, v, None, scaling=D**-0.5)
    out, _, _ = ta.fused_attention(q, k, v, kernel_plan(plan, 1, None), D**-0.5, splits=4)
    assert (out - ref).abs().max().item() < ATOL


def test_uniform_hash_bit_exact():
    """The kernel's uint32 lowbias32 mix reproduces plan.uniform_hash bit for bit."""
    import triton.language as tl

    @triton.jit
    def _k(seed_ptr, out_ptr, HEAD: tl.constexpr, Q: tl.constexpr, N: tl.constexpr):
        offs = tl.arange(0, N)
        u = ta._uniform_hash(tl.load(seed_ptr), HEAD + offs * 0, Q + offs * 0, offs * 37)
        tl.store(out_ptr + offs, u)

    for seed in (0, 7, -5, 2**40 + 3):
        out = torch.empty(64)
        _k[(1,)](torch.tensor([seed]), out, HEAD=3, Q=1000, N=64)
        want = uniform_hash(torch.tensor(seed), torch.tensor(3), torch.tensor(1000), torch.arange(64) * 37)
        assert torch.equal(out, want), seed


def test_edits_change_triton_output():
    """Guard against a kernel that ignores the plan."""
    q, k, v = make_qkv(len(PADS), L, L, seed=1)
    base = _run(triton_attention, make_plan(L=L), q, k, v)
    for name in ("bias", "counterfactual_uniform", "redistribute", "mask"):
        plan = make_plan(L=L)
        FEATURES[name](plan)
        assert (_run(triton_attention, plan, q, k, v) - base).abs().max() > 1e-3, name


def test_kernels_compile_for_sm90():
    """Every kernel mode compiles ahead of time to an sm_90 cubin (no GPU needed: triton ships ptxas).

    The interpreter runs kernels as Python and cannot see compiled-mode errors (a non-constexpr
    global once slipped through); this runs the real compiler in a process without the interpreter.
    """
    import subprocess
    import sys

    code = (
        "import os, triton\n"
        "if 'nvidia' not in triton.backends.backends:\n"
        "    print('SKIP: no nvidia backend in this triton build')\n"
        "    raise SystemExit\n"
        "from clearsight.kernels.triton_attention import compile_check\n"
        "print('compiled', compile_check())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=600,
                         env=env)
    if "SKIP:" in res.stdout:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "output-pass-split" in res.stdout


WINDOW = 5  # a sliding-window layer (Gemma 3) whose window is shorter than the image block and the prompt


def _window_hand_mask(Lq: int, Lk: int) -> torch.Tensor:
    """[B, Lq, Lk] a causal sliding-window layer's mask by hand: key j >= pad, j <= i and j > i - WINDOW."""
    i = torch.arange(Lk - Lq, Lk).view(1, -1, 1)
    j = torch.arange(Lk).view(1, 1, -1)
    pad = torch.tensor(PADS).view(-1, 1, 1)
    return (j >= pad) & (j <= i) & (j > i - WINDOW)


@pytest.mark.parametrize(("feature", "phase"), [("empty", "prefill"), ("empty", "decode"), ("combined", "prefill")])
def test_sliding_window_matches_reference(feature, phase):
    """The kernel's sliding window (plus its block skipping over keys before the window) equals the reference
    backend's ``AttentionPlan.windowed``; with no edits both equal plain attention under the hand-built mask."""
    length = 37 if phase == "prefill" else L
    plan = make_plan(L=length)
    FEATURES[feature](plan)
    Lq, Lk = _shapes(phase, length)
    q, k, v = make_qkv(len(PADS), Lq, Lk, seed=23)
    outs = {}
    for name, fn in (("triton", triton_attention), ("reference", reference_attention)):
        with use_plan(plan):
            outs[name], _ = fn(MODULE, q, k, v, plan.allowed(Lq, Lk), scaling=D**-0.5, sliding_window=WINDOW)
    valid = _valid_rows(Lq, phase == "prefill")
    assert (outs["triton"] - outs["reference"]).abs()[valid].max().item() < ATOL
    unwindowed = _run(reference_attention, plan, q, k, v)
    assert (unwindowed - outs["reference"]).abs()[valid].max().item() > 1e-2  # the window matters here
    if feature == "empty":
        hand = masked_softmax_attention(q, k, v, _window_hand_mask(Lq, Lk), D**-0.5).float()
        assert (outs["reference"] - hand).abs()[valid].max().item() < ATOL


def test_softcap_is_refused():
    """No backend executes attention logit soft-capping: a model that asks for it gets a one-line refusal."""
    from clearsight.errors import InputError

    plan = make_plan(L=L)
    q, k, v = make_qkv(len(PADS), L, L)
    for fn in (triton_attention, reference_attention):
        with use_plan(plan), pytest.raises(InputError, match="soft-capping"):
            fn(MODULE, q, k, v, None, scaling=D**-0.5, softcap=50.0)
