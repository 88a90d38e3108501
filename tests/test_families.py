"""Every supported family against the stock transformers model (the oracle).

Each family in FAMILIES: an empty plan gives the stock model's greedy tokens (sdpa, transformers' own generate)
and its logits within LOGIT_TOL with our reference and torch backends, and with triton under the interpreter on
a CPU (one request, two tokens, the prefill's last-position logits); a mixed batch (rows with and without an
image, different image sizes) equals each row run alone; every cell of the compatibility matrix does what it
says (works and equals the unmitigated tokens at zero strength, or refuses with its reason).
"""

from __future__ import annotations

import pytest
import torch
from test_generate import _stock_generate
from tinyworld import FAMILIES as GENERATE_FAMILIES
from tinyworld import make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.kernels.context import use_plan
from clearsight.kernels.plan import AttentionPlan

# one line per family: a new family's tiny model is walked by every test here once it is listed
FAMILIES = (
    "tiny-llava",
    "tiny-llava-next",
    "tiny-qwen2-vl",
    "tiny-llava-onevision",
    "tiny-qwen2.5-vl",
    "tiny-internvl3",
    "tiny-gemma3",
    "tiny-qwen3-vl",
    "tiny-smolvlm",
    "tiny-instructblip",
)
# the families whose saved checkpoints need more than AutoProcessor (no torchvision here) or a new adapter
SAVED_FAMILIES = ("tiny-llava-onevision", "tiny-qwen2.5-vl", "tiny-internvl3", "tiny-gemma3", "tiny-qwen3-vl",
                  "tiny-smolvlm", "tiny-instructblip")
LOGIT_TOL = {"torch": 1e-5, "reference": 2e-5, "triton": 2e-5}  # absolute, float32 (logits of magnitude ~10)
# the Triton interpreter is slow (seconds per forward): one request, two tokens per family; two left-padded rows
# for families whose attention reaches kernel features that tests/kernels/test_triton_e2e.py does not (Gemma 3:
# sliding window, image block, query scaling)
TRITON_PADDED = ("tiny-gemma3",)
TRITON_ELSEWHERE = ("tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl")  # test_triton_e2e.py: triton == reference
TRITON_FAMILIES = tuple(f for f in FAMILIES if f not in TRITON_ELSEWHERE)
PROMPTS = ["what is in the picture?", "describe the image please", "is there a red circle?"]


def _requests():
    sizes = [(40, 50), (64, 30), (32, 32)]
    return [{"prompt": PROMPTS[i], "image": make_image(i, sizes[i])} for i in range(3)]


def _empty_plan(lvlm, batch) -> AttentionPlan:
    """A plan with no edits, holding what the family's own mask does (adapter.prepare_plan), as a batch builds it."""
    adapter = lvlm.adapter
    plan = AttentionPlan(num_layers=adapter.num_layers, num_heads=adapter.num_heads,
                         segment=adapter.segments(batch), layouts=adapter.row_layouts(batch))
    adapter.prepare_plan(plan)
    return plan


def _prefill_logits(lvlm, batch, plan: AttentionPlan | None) -> torch.Tensor:
    with torch.inference_mode(), use_plan(plan):
        return lvlm.model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_plan_same_tokens_and_logits_as_stock(family):
    """torch and reference: greedy tokens and prefill logits of a 3-row batch (the families of test_generate.py
    have this check there); triton: the test below."""
    lvlm = tiny(family)
    requests = _requests()
    if family not in GENERATE_FAMILIES:
        expected, batch = _stock_generate(lvlm, requests, 6)
        assert any(len(t) >= 3 for t in expected)  # the comparison is not vacuous
        assert all(lay.image_spans for lay in lvlm.adapter.row_layouts(batch))
        lvlm.set_backend("sdpa")
        stock, mask = _prefill_logits(lvlm, batch, None), batch["attention_mask"].bool()
        for backend in ("torch", "reference"):
            lvlm.set_backend(backend)
            ours = [r.token_ids for r in generate(lvlm, requests, decode=DecodeSpec(max_new_tokens=6))]
            assert ours == expected, backend
            logits = _prefill_logits(lvlm, batch, _empty_plan(lvlm, batch))
            assert (logits - stock).abs()[mask].max().item() < LOGIT_TOL[backend], backend


def test_gemma3_window_and_image_block_matter():
    """The tiny Gemma 3's sliding window (6 keys) and bidirectional image block both change its logits, so the
    stock-equality above proves our backends execute them: without the block in the plan, or with the window
    dropped, the reference backend's logits move away from stock's."""
    from clearsight.kernels.plan import AttentionPlan as Plan

    lvlm = tiny("tiny-gemma3")
    texts = [lvlm.adapter.chat_prompt(p, True) for p in PROMPTS[:2]]
    batch = lvlm.adapter.encode(texts, [make_image(1, (40, 50)), make_image(2, (64, 30))])
    assert batch["input_ids"].shape[1] > 2 * lvlm.adapter.text_config.sliding_window  # the window cuts keys
    lvlm.set_backend("sdpa")
    stock = _prefill_logits(lvlm, batch, None)
    mask = batch["attention_mask"].bool()
    lvlm.set_backend("reference")
    try:
        exact = _prefill_logits(lvlm, batch, _empty_plan(lvlm, batch))
        causal = _prefill_logits(lvlm, batch, Plan(num_layers=lvlm.adapter.num_layers,
                                                   num_heads=lvlm.adapter.num_heads,
                                                   segment=lvlm.adapter.segments(batch),
                                                   layouts=lvlm.adapter.row_layouts(batch)))
        original = Plan.windowed
        Plan.windowed = lambda self, allowed, window: allowed  # the window ignored
        try:
            unwindowed = _prefill_logits(lvlm, batch, _empty_plan(lvlm, batch))
        finally:
            Plan.windowed = original
    finally:
        lvlm.set_backend("torch")
    assert (exact - stock).abs()[mask].max().item() < LOGIT_TOL["reference"]
    assert (causal - stock).abs()[mask].max().item() > 1e-2
    assert (unwindowed - stock).abs()[mask].max().item() > 1e-2


@pytest.mark.parametrize("family", TRITON_FAMILIES)
def test_triton_empty_plan_same_tokens_and_logits_as_stock(family):
    """The triton backend (the interpreter on a CPU) on one request: the stock greedy tokens, and the stock logits
    of the prefill's last position (read at the output head during the engine's own prefill: the interpreter's
    time grows with the tokens, so the prompt is not run twice)."""
    from clearsight.kernels import triton_attention

    if not triton_attention.INTERPRET and not torch.cuda.is_available():
        pytest.skip("triton kernels need TRITON_INTERPRET=1 on a CPU (set by tests/conftest.py)")
    lvlm = tiny(family)
    requests = _requests()[:2] if family in TRITON_PADDED else _requests()[1:2]  # [1]: the smallest image
    expected, batch = _stock_generate(lvlm, requests, 2)
    assert all(len(t) == 2 for t in expected)  # the comparison is not vacuous: a prefill and a decode step
    with torch.inference_mode():
        stock = lvlm.model(**batch).logits[:, -1]
    heads = []
    handle = lvlm.model.get_output_embeddings().register_forward_hook(lambda m, a, out: heads.append(out[:, -1]))
    lvlm.set_backend("triton")
    try:
        ours = [r.token_ids for r in generate(lvlm, requests, decode=DecodeSpec(max_new_tokens=2))]
    finally:
        handle.remove()
        lvlm.set_backend("torch")
    assert ours == expected
    assert len(heads) == 2  # the prefill's and the decode step's
    assert (heads[0] - stock).abs().max().item() < LOGIT_TOL["triton"]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_solo_runs(family):
    lvlm = tiny(family)
    requests = [*_requests()[:2], {"prompt": "describe the image please", "image": None}]
    decode = DecodeSpec(max_new_tokens=6)
    batched = [r.token_ids for r in generate(lvlm, requests, decode=decode)]
    solo = [generate(lvlm, [r], decode=decode)[0].token_ids for r in requests]
    assert batched == solo
    assert all(solo)


# each matrix row's configurations: its default (what the matrix cell is about) and its zero strength (None: the
# method has no strength, e.g. a plan for a trained checkpoint); tiny models have no VAR sink table, so sink_dims
DEFAULTS: dict[str, dict] = {"var": {"sink_dims": [3]}, "causalmm:level=vision": {"level": "vision"},
                             "carve": {"probe_tokens": 2},  # short probes: the cell is about whether it runs
                             "carve:final=refined": {"probe_tokens": 2, "final": "refined"}}
ZERO: dict[str, dict | None] = {
    "none": {}, "vcd": {"alpha": 0.0}, "m3id": {"lam": 0.0}, "pai": {"alpha": 0.0, "gamma": 1.0},
    "agla": {"alpha": 0.0}, "vhr": {"alpha": 1.0}, "var": {"p": 0.0, "sink_dims": [3]}, "mma": None,
    "causalmm": {"gamma": 0.0}, "causalmm:level=vision": {"gamma": 0.0, "level": "vision"}, "cca": None,
    "imbalanced": {"alpha": 0.0, "beta": 0.0},
    "inter": {"k": None},  # never adds the interaction; the beta cut keeps the greedy token
    "carve": None, "carve:final=refined": None,  # no strength: it re-asks with a refined view
}
# what each refusal says (the mitigation's own error), for the cells the matrix marks refused
REFUSAL = {"cca": "cca is not supported", "mma": "mma is not supported", "imbalanced": "CLS",
           "causalmm:level=vision": "CLIP-style", "agla": "attention matcher is not supported",
           "carve": "carve is not supported|carve:final=both asks about two images",
           "carve:final=refined": "carve is not supported"}


def _spec(config: str, fields: dict) -> dict:
    return {"name": config.split(":")[0], **fields}


@pytest.mark.filterwarnings("ignore::UserWarning")  # untrained-checkpoint warnings of cca / mma on random weights
@pytest.mark.parametrize("family", FAMILIES)
def test_the_matrix_says_what_each_mitigation_does(family):
    from clearsight.errors import InputError
    from clearsight.mitigations.compat import REQUIREMENTS, WORKS, compatibility_matrix

    lvlm = tiny(family)
    matrix = compatibility_matrix()
    assert set(ZERO) == set(REQUIREMENTS)  # every row of the matrix is walked
    request = [{"prompt": PROMPTS[0], "image": make_image(5, (32, 32))}]
    decode = DecodeSpec(max_new_tokens=2)
    plain = generate(lvlm, request, decode=decode)[0].token_ids
    assert plain
    for config, row in matrix.items():
        verdict = row[lvlm.adapter.family]
        default = _spec(config, DEFAULTS.get(config, {}))
        if verdict != WORKS:
            with pytest.raises(InputError, match=REFUSAL[config]):
                generate(lvlm, request, mitigations=[default], decode=decode)
            continue
        if REQUIREMENTS[config] or ZERO[config] is None:  # the verdict depends on the family, or no zero strength
            assert generate(lvlm, request, mitigations=[default], decode=decode)[0].token_ids, config
        if ZERO[config] is not None:
            zero = generate(lvlm, request, mitigations=[_spec(config, ZERO[config])], decode=decode)[0].token_ids
            assert zero == plain, config


def test_models_matrix_flag_prints_the_generated_matrix(capsys):
    from clearsight.cli import main
    from clearsight.mitigations.compat import matrix_markdown
    from clearsight.models.adapters import ADAPTERS

    assert main(["models", "--matrix"]) == 0
    out = capsys.readouterr().out
    assert matrix_markdown() in out
    assert all(a.family in out for a in ADAPTERS)


def test_every_family_is_walked():
    """FAMILIES has a tiny model of every adapter in the matrix (a new adapter needs its line there)."""
    from clearsight.models.adapters import ADAPTERS

    assert {tiny(f).adapter.family for f in FAMILIES} == {a.family for a in ADAPTERS}


def test_docs_matrix_is_the_generated_one():
    from pathlib import Path

    from clearsight.mitigations.compat import matrix_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "mitigations.md").read_text(encoding="utf-8")
    assert matrix_markdown() in doc  # regenerate the table in docs/mitigations.md when the adapters change


@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_a_saved_checkpoint_loads_with_an_image_processor_and_same_tokens(family, tmp_path):
    from clearsight import load_model

    lvlm = tiny(family)
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))  # no torchvision here: the image-only processor stands in for the stock one
    assert loaded.adapter.family == lvlm.adapter.family
    request = [{"prompt": PROMPTS[1], "image": make_image(7, (40, 50))}]
    decode = DecodeSpec(max_new_tokens=4)
    assert generate(loaded, request, decode=decode)[0].token_ids == generate(lvlm, request, decode=decode)[0].token_ids


def test_onevision_vision_level_counterfactual_batches_like_solo():
    """CausalMM's vision-level branch hooks OneVision's SigLIP feature layer; images with different tile
    counts sit at the right rows of the tower's batch (vision_tiles_per_image), so a batch equals solo runs."""
    lvlm = tiny("tiny-llava-onevision")
    requests = [{"prompt": PROMPTS[0], "image": make_image(1, (64, 30))},
                {"prompt": PROMPTS[1], "image": make_image(2, (60, 60))}]
    batch = lvlm.adapter.encode([lvlm.adapter.chat_prompt("x", True)] * 2, [r["image"] for r in requests])
    assert len(set(lvlm.adapter.vision_tiles_per_image(batch))) == 2  # the rows differ in tiles
    decode = DecodeSpec(max_new_tokens=6)
    mit = [{"name": "causalmm", "level": "vision", "gamma": 3.0}]
    plain = [r.token_ids for r in generate(lvlm, requests, decode=decode)]
    batched = [r.token_ids for r in generate(lvlm, requests, mitigations=mit, decode=decode)]
    solo = [generate(lvlm, [r], mitigations=mit, decode=decode)[0].token_ids for r in requests]
    assert batched == solo
    assert batched != plain  # the counterfactual acts


def test_qwen3_vl_layer_input_hooks_see_deepstack_features():
    """DeepStack adds vision features to the image tokens after each of the first decoder layers (inside the
    model's forward): a layer-input hook (VAR reads its sinks there) sees the previous layer's output plus those
    features, at the image tokens and nowhere else, as the next layer does."""
    lvlm = tiny("tiny-qwen3-vl")
    adapter = lvlm.adapter
    batch = adapter.encode([adapter.chat_prompt(PROMPTS[0], True)], [make_image(3, (40, 50))])
    image = batch["input_ids"][0] == adapter.image_token_id
    outputs, inputs = {}, {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.clone()))
               for i, layer in enumerate(adapter.decoder_layers)]
    try:
        with torch.inference_mode(), adapter.hook_layer_inputs(lambda i, h: inputs.__setitem__(i, h.clone())):
            lvlm.model(**batch)
    finally:
        for h in handles:
            h.remove()
    stacked = len(lvlm.model.config.vision_config.deepstack_visual_indexes)
    assert 0 < stacked < adapter.num_layers
    for i in range(1, adapter.num_layers):
        added = (inputs[i] - outputs[i - 1])[0]
        assert added[~image].abs().max().item() == 0.0, i
        if i <= stacked:
            assert added[image].ne(0).any(dim=-1).all(), i  # every image token got its feature
        else:
            assert added[image].abs().max().item() == 0.0, i


def test_smolvlm_spans_per_tile_global_first_and_real_tiles_only():
    """SmolVLM: one 3x3 span per tile and per global image, the global one first (it covers the whole image),
    tiles after it in reading order; encode keeps only the real tiles, and the model's logits equal those of
    the processor's own padded layout (the stock path)."""
    lvlm = tiny("tiny-smolvlm")
    adapter, tok = lvlm.adapter, lvlm.adapter.tokenizer
    images = [make_image(1, (40, 50)), None, make_image(2, (64, 30))]  # 2x2 tiles, no image, 1x2 tiles
    texts = [adapter.chat_prompt(PROMPTS[i], im is not None) for i, im in enumerate(images)]
    batch = adapter.encode(texts, images)
    layouts = adapter.row_layouts(batch)
    assert [len(lay.image_spans) for lay in layouts] == [5, 0, 3]
    assert adapter.vision_tiles_per_image(batch) == [5, 3]
    assert batch["pixel_values"].shape[:2] == (8, 1)
    for ids, lay in zip(batch["input_ids"], layouts):
        markers = [tok.convert_ids_to_tokens(int(ids[s - 1])) for s, _ in lay.image_spans]
        tiles = [m for m in markers[1:]]
        assert markers[:1] == ["<global-img>"] * bool(markers)
        assert tiles == sorted(tiles) and all(m.startswith("<row_") for m in tiles)
        assert all(e - s == 9 and g == (3, 3) for (s, e), g in zip(lay.image_spans, lay.grids))
        assert all((ids[s:e] == adapter.image_token_id).all() for s, e in lay.image_spans)
    tok.padding_side = "left"
    stock = lvlm.processor(text=texts, images=[[im] if im else [] for im in images], return_tensors="pt",
                           padding=True)
    assert stock["pixel_values"].shape[:2] == (3, 5)  # padded with all-zero tiles
    assert torch.equal(stock["input_ids"], batch["input_ids"])
    lvlm.set_backend("sdpa")
    with torch.inference_mode():
        ours = lvlm.model(**batch).logits
        theirs = lvlm.model(**{k: v for k, v in stock.items() if isinstance(v, torch.Tensor)}).logits
    lvlm.set_backend("torch")
    assert torch.equal(ours, theirs)
    slices = adapter.image_pixel_slices(batch)
    assert torch.equal(batch["pixel_values"][slices[1]].squeeze(1), stock["pixel_values"][2, :3])


def test_smolvlm_vision_level_counterfactual_batches_like_solo():
    """CausalMM's vision-level branch hooks SmolVLM's last SigLIP-style layer; each image's tiles (2x2 + global,
    1x2 + global) are its own rows of the tower's batch, so a batch equals solo runs, and the branch acts."""
    lvlm = tiny("tiny-smolvlm")
    requests = [{"prompt": PROMPTS[0], "image": make_image(1, (40, 50))},
                {"prompt": PROMPTS[1], "image": make_image(2, (64, 30))}]
    decode = DecodeSpec(max_new_tokens=4)
    mit = [{"name": "causalmm", "level": "vision", "gamma": 3.0}]
    plain = [r.token_ids for r in generate(lvlm, requests, decode=decode)]
    batched = [r.token_ids for r in generate(lvlm, requests, mitigations=mit, decode=decode)]
    solo = [generate(lvlm, [r], mitigations=mit, decode=decode)[0].token_ids for r in requests]
    assert batched == solo
    assert batched != plain


def test_instructblip_refuses_grid_maps_and_several_images_in_one_line():
    """InstructBLIP's image tokens are Q-Former queries: CARVE refuses as AGLA's attention matcher does (the
    matrix walk checks that too), INTER's template-only prompt removal refuses without a chat template, and two
    images in one row (a mitigation's re-query; its queries come first, one block) are refused."""
    from clearsight.errors import InputError

    lvlm = tiny("tiny-instructblip")
    assert lvlm.adapter.row_layouts(lvlm.adapter.encode([PROMPTS[0]], [make_image(1)]))[0].grids == ((1, 8),)
    decode = DecodeSpec(max_new_tokens=2)
    request = [{"prompt": PROMPTS[0], "image": make_image(1)}]
    with pytest.raises(InputError, match="carve is not supported for instructblip"):
        generate(lvlm, request, mitigations=["carve"], decode=decode)
    # no chat template: INTER's template-only prompt removal has no image slot to keep (its default works)
    with pytest.raises(InputError, match="use prompt_removal=question"):
        generate(lvlm, request, mitigations=[{"name": "inter", "prompt_removal": "template"}], decode=decode)
    with pytest.raises(InputError, match="one image per prompt"):
        lvlm.adapter.encode([PROMPTS[0]], [[make_image(1), make_image(2)]])
    with pytest.raises(InputError, match="one image per prompt"):
        lvlm.adapter.chat_prompt(PROMPTS[0], 2)


def test_internvl_tiles_and_the_thumbnail_grid():
    """InternVL: each image's span is its tiles x 16 tokens, its pixels are its tiles, and the grid that covers the
    whole image (grid_start: the last tile) is the thumbnail, i.e. the image processed without tiling."""
    from clearsight.models.adapters import InternVLAdapter

    lvlm = tiny("tiny-internvl3")
    adapter = lvlm.adapter
    assert isinstance(adapter, InternVLAdapter)
    images = [make_image(1, (70, 40)), make_image(2, (32, 32))]
    batch = adapter.encode([adapter.chat_prompt(PROMPTS[0], True)] * 2, images)
    tiles = adapter.vision_tiles_per_image(batch)
    assert tiles[0] > 1 and tiles[1] == 1 and sum(tiles) == batch["pixel_values"].shape[0]
    layouts = adapter.row_layouts(batch)
    for lay, n in zip(layouts, tiles):
        ((s, e),), (grid,) = lay.image_spans, lay.grids
        assert grid == (4, 4) and e - s == n * 16
        assert adapter.grid_start((s, e), grid) == (e - 16 if n > 1 else s)
    whole = adapter.processor.image_processor(images[0], crop_to_patches=False, return_tensors="pt")
    thumbnail = batch["pixel_values"][adapter.image_pixel_slices(batch)[0]][-1]
    assert torch.allclose(thumbnail, whole["pixel_values"][0], atol=1e-5)
    assert not torch.allclose(batch["pixel_values"][0], whole["pixel_values"][0], atol=1e-2)  # tile 1 is not it


@pytest.mark.parametrize("mits", [(), ("pai",)], ids=["none", "pai"])
def test_gemma3_joined_request_gets_its_solo_tokens(mits):
    """Continuous batching on Gemma 3: a request joins another's batch after 2 tokens (the plans' prompt masks,
    holding each row's image block, are left-padded and concatenated; every layer's cache keeps every key) and
    both get their solo tokens, past the sliding window."""
    from test_engine import DECODE, A, B, joined, solo

    from clearsight.engine import Engine

    eng = Engine(tiny("tiny-gemma3"))
    try:
        ra, rb, most = joined(eng, A, B, 2, mits, mits)
    finally:
        eng.close(timeout=120)
    assert most == 2
    assert len(ra.token_ids) == DECODE.max_new_tokens
    assert ra.token_ids == solo("tiny-gemma3", A, mits).token_ids
    assert rb.token_ids == solo("tiny-gemma3", B, mits).token_ids


def test_gemma3_compiled_step_falls_back_to_eager_and_says_why():
    """transformers' StaticCache keeps only the window in sliding layers, while the plan indexes every key: a
    compile request on Gemma 3 decodes eagerly (same tokens) and says why."""
    lvlm = tiny("tiny-gemma3")
    request = _requests()[:1]
    decode = DecodeSpec(max_new_tokens=3)
    comp = generate(lvlm, request, decode=decode, compile=True)[0]
    assert comp.token_ids == generate(lvlm, request, decode=decode)[0].token_ids
    assert comp.decode_step.startswith("eager (the model has sliding-window layers"), comp.decode_step
