"""Bad input ends in one line, `error: ...`, exit status 2, naming the field and the fix, with nothing written;
the Python API raises the same messages as InputError (issue 11's bad-input sweep)."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image
from tinyworld import blank_png, make_image, tiny

from clearsight import DecodeSpec, GenerationRequest, InputError, generate, load_model, stream_generate
from clearsight.cli import main
from clearsight.decoding.generate import MAX_IMAGE_PIXELS, as_decode, check_context, load_image
from clearsight.kernels.plan import PlanConflictError
from clearsight.mitigations import REGISTRY, parse_mitigation, parse_mitigations, registry
from clearsight.mitigations.m3id import m3id_weight

LIMIT = "more than the limit of 67,108,864 (8192 x 8192, clearsight.decoding.generate.MAX_IMAGE_PIXELS): " \
        "downscale it first"


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _refused(capsys, *argv) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr (no traceback); returns that line."""
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI loads a model: the input must be refused before."""
    import clearsight.models.loader as loader

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load_model", refuse)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    blank_png(path, 20000, 20000)  # 400 megapixels, about 200 KB on disk
    assert path.stat().st_size < 1_000_000
    return path


# ----------------------------------------------------------------------------------------- 1. images
def test_pixel_limit_is_64_megapixels():
    assert MAX_IMAGE_PIXELS == 8192 * 8192 < Image.MAX_IMAGE_PIXELS  # below PIL's own warning threshold


def test_decompression_bomb_cli(capsys, bomb, no_model_load):
    line = _refused(capsys, "generate", "--model", "builtin:tiny-llava", "--image", bomb, "--prompt", "x")
    assert line == f"error: --image: '{bomb}' has 400,000,000 pixels, {LIMIT}"


def test_decompression_bomb_api_and_pixel_limits(bomb, tmp_path):
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError) as exc:
        generate(lvlm, [{"prompt": "x", "image": str(bomb)}])
    assert str(exc.value) == f"request 0: image: '{bomb}' has 400,000,000 pixels, {LIMIT}"
    # past our limit, below PIL's warning: the size from the header, before decoding
    big = tmp_path / "big.png"
    blank_png(big, 9000, 8000)
    with pytest.raises(InputError) as exc:
        load_image(big)
    assert str(exc.value) == f"image: '{big}' is 9000 x 8000 pixels, {LIMIT}"
    # in PIL's warning range (89-179 MP): PIL's warning becomes the same error, and nothing is printed
    warned = tmp_path / "warned.png"
    blank_png(warned, 10000, 10000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as exc:
            load_image(warned, "--image")
    assert str(exc.value) == f"--image: '{warned}' has 100,000,000 pixels, {LIMIT}" and not seen
    # a PIL image passed in is held to the same limit
    with pytest.raises(InputError) as exc:
        generate(lvlm, [{"prompt": "x", "image": Image.new("1", (9000, 8000))}])
    assert str(exc.value) == f"request 0: image: the image is 9000 x 8000 pixels, {LIMIT}"
    # exactly at the limit is fine (header only: not decoded here)
    edge = tmp_path / "edge.png"
    blank_png(edge, 8192, 8192)
    with Image.open(edge) as im:
        assert im.size[0] * im.size[1] == MAX_IMAGE_PIXELS


def test_empty_image_is_refused(tmp_path):
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError) as exc:
        generate(lvlm, [{"prompt": "describe it", "image": Image.new("RGB", (0, 0))}])
    assert str(exc.value) == ("request 0: image: the image is 0 x 0 pixels, empty: give an image of at least "
                              "1 x 1 pixels")
    with pytest.raises(InputError, match="the image is 0 x 5 pixels, empty"):
        load_image(Image.new("RGB", (0, 5)))
    zero = tmp_path / "zero.png"  # a PNG header saying 0 x 0: PIL cannot read it
    blank_png(zero, 0, 0)
    with pytest.raises(InputError) as exc:
        load_image(zero)
    assert str(exc.value) == f"image: '{zero}' is not an image PIL can read (UnidentifiedImageError)"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_bomb_in_a_pope_image_folder(capsys, bomb, tmp_path):
    """The eval CLI: one line, exit 2; the good item before it is cached, nothing for the bomb."""
    images = tmp_path / "images"
    images.mkdir()
    make_image(0).save(images / "ok.png")
    shutil.copy(bomb, images / "bomb.png")
    questions = tmp_path / "pope_random.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": name, "text": "Is there a circle?",
                                             "label": "yes"}) + "\n" for i, name in ((1, "ok.png"), (2, "bomb.png"))))
    out = tmp_path / "out"
    line = _refused(capsys, "eval", "pope", "--model", "builtin:tiny-llava", "--files", f"random={questions}",
                    "--image-dir", images, "--splits", "random", "--output", out, "--batch-size", "1",
                    "--no-progress")
    # request 1: the item's place in the system's work (it was its place in a batch of --batch-size)
    assert line == f"error: request 1: image: '{images / 'bomb.png'}' has 400,000,000 pixels, {LIMIT}"
    cached = _lines(out / "generations.jsonl")
    assert [r["sample_id"].split("/")[2] for r in cached] == ["1"]  # question 1 only: nothing for the bomb
    assert not (out / "results.json").exists()


def test_bomb_in_a_chair_image_folder(capsys, bomb, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(bomb, images / "bomb.png")
    instances, captions = tmp_path / "instances.json", tmp_path / "captions.json"
    instances.write_text(json.dumps({"images": [{"id": 7, "file_name": "bomb.png"}], "annotations": [],
                                     "categories": []}))
    captions.write_text(json.dumps({"images": [{"id": 7, "file_name": "bomb.png"}], "annotations": []}))
    out = tmp_path / "out"
    line = _refused(capsys, "eval", "chair", "--model", "builtin:tiny-llava", "--instances", instances,
                    "--captions", captions, "--image-dir", images, "--n-images", "1", "--max-new-tokens", "4",
                    "--output", out, "--no-progress")
    assert line == f"error: request 0: image: '{images / 'bomb.png'}' has 400,000,000 pixels, {LIMIT}"
    assert _lines(out / "generations.jsonl") == [] and not (out / "results.json").exists()


# ----------------------------------------------------------------------------------------- 2. conflicts
CCA_MMA = ("mitigations 'cca' and 'mma' cannot be combined in one request: both set the attention mask (cca makes the "
           "image block ring-causal; mma lets image queries see the question); drop one of them")
VAR_IMBALANCED = ("mitigations 'var' and 'imbalanced' cannot be combined in one request: both set the attention "
                  "segments (var marks its attention sinks in the per-layer key segments; imbalanced relabels the "
                  "image keys per layer as local, summary or text); drop one of them")
IMBALANCED_CAUSALMM = ("mitigations 'imbalanced' and 'causalmm' cannot be combined in one request: causalmm sets the "
                       "attention counterfactual of rows imbalanced edits (causalmm replaces the attention over the "
                       "image keys of its counterfactual row), and imbalanced relabels the unselected image keys of "
                       "those rows as text, so the counterfactual would miss them; drop one of them")


@pytest.mark.parametrize(("a", "b", "message"), [("cca", "mma", CCA_MMA), ("var", "imbalanced", VAR_IMBALANCED),
                                                 ("imbalanced", "causalmm", IMBALANCED_CAUSALMM)])
def test_conflicting_mitigations_cli_before_loading(capsys, tmp_path, a, b, message, no_model_load):
    line = _refused(capsys, "generate", "--image", "docs/example.png", "--prompt", "x", "-m", a, "-m", b)
    assert line == f"error: {message}"
    out = tmp_path / "out"
    line = _refused(capsys, "eval", "pope", "--system", f"{a}+{b}", "--limit", "1", "--output", out, "--no-progress")
    assert line == f"error: eval options: systems.0.mitigations: {message}"
    job = tmp_path / "job.toml"
    job.write_text(f'output = "{out}"\n[[systems]]\nmitigations = ["{a}", "{b}"]\n[[benchmarks]]\nkind = "pope"\n')
    line = _refused(capsys, "eval", "run", job, "--no-progress")
    assert line == f"error: job file '{job}': systems.0.mitigations: {message}"
    assert not out.exists()  # nothing written
    with pytest.raises(PlanConflictError) as exc:
        parse_mitigations([a, b])
    assert isinstance(exc.value, InputError) and str(exc.value) == message


def test_runtime_conflict_is_one_line_too(capsys, monkeypatch):
    """The plan's own check (the safety net under the static one) is an InputError: one line, exit 2."""
    monkeypatch.setattr(registry, "check_compatible", lambda mitigations: None)
    line = _refused(capsys, "generate", "--model", "builtin:tiny-llava", "--image", "docs/example.png", "--prompt",
                    "x", "-m", "cca", "-m", "mma", "--max-new-tokens", "1")
    assert line == ("error: 'mma' and 'cca' both set the attention mask (row 0); they cannot be combined in one "
                    "request: drop one of them")


PAIRS = [[a, b] for a, b in itertools.combinations(sorted(set(REGISTRY) - {"none"}), 2)]
PARAMETER_CASES = [["var:p=0", "imbalanced"], ["causalmm:level=vision", "imbalanced"],
                   ["causalmm:layers=1", "imbalanced:head_spread=0"], ["imbalanced:alpha=0,beta=0", "causalmm"],
                   ["var:layers=1", "imbalanced:layers=2|3"], ["var:layers=2", "imbalanced:layers=2|3"],
                   ["causalmm:level=multimodal", "imbalanced"], ["mma", "cca"], ["var", "imbalanced"],
                   ["imbalanced", "causalmm"]]


def _static_refuses(combo: list[str]) -> bool:
    try:
        parse_mitigations(combo)
    except PlanConflictError:
        return True
    return False


def _runtime_refuses(combo: list[str], monkeypatch) -> bool:
    lvlm = tiny("tiny-llava")
    with monkeypatch.context() as m:
        m.setattr(registry, "check_compatible", lambda mitigations: None)
        try:
            generate(lvlm, [{"prompt": "what is in the picture?", "image": make_image(1)}], combo,
                     DecodeSpec(max_new_tokens=1))
        except PlanConflictError:
            return True
    return False


def _refused_by_rule(combo: list[str]) -> bool:
    """Refused by a mitigation's own ``refuses`` rule (a decision about what it means to combine them, e.g.
    carve:final=both asks with two images), not by conflicting plan edits: no runtime plan to compare with."""
    a, b = (parse_mitigation(c) for c in combo)
    return a.refuses(b) is not None or b.refuses(a) is not None


PLAN_CASES = [c for c in PAIRS + PARAMETER_CASES if not _refused_by_rule(c)]


@pytest.mark.parametrize("combo", PLAN_CASES, ids=["+".join(c) for c in PLAN_CASES])
def test_static_check_agrees_with_the_plan(combo, monkeypatch):
    """The declared plan edits refuse exactly the pairs the runtime plan refuses (the oracle)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained-checkpoint and sink-calibration warnings of the tiny model
        assert _static_refuses(combo) == _runtime_refuses(combo, monkeypatch)


def test_the_known_conflicts_are_the_only_pairs():
    refused = {tuple(c) for c in PAIRS if _static_refuses(c)}
    by_rule = {tuple(c) for c in PAIRS if _refused_by_rule(c)}
    assert by_rule == {tuple(sorted(("carve", other))) for other in set(REGISTRY) - {"none", "carve"}}
    assert refused - by_rule == {("cca", "mma"), ("causalmm", "imbalanced"), ("imbalanced", "var")}
    assert not any(_static_refuses(["carve:final=refined", other]) for other in set(REGISTRY) - {"none", "carve"})


# ----------------------------------------------------------------------------------------- 3. context
def test_prompt_past_the_context_is_refused_before_any_forward(monkeypatch):
    lvlm = tiny("tiny-llava")
    assert lvlm.adapter.max_context == 1024 == lvlm.adapter.text_config.max_position_embeddings
    calls = []
    monkeypatch.setattr(lvlm.model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError) as exc:
        generate(lvlm, ["circle " * 100_000])  # 100k tokens
    assert str(exc.value) == ("request 0: prompt is 100004 tokens and max_new_tokens is 64, past the model's context "
                              "of 1024 tokens: shorten the prompt or lower max_new_tokens")
    with pytest.raises(InputError) as exc:
        stream_generate(lvlm, ["x", "circle " * 20], decode={"max_new_tokens": 1001})  # at the call, before a token
    assert str(exc.value) == ("request 1: prompt is 24 tokens and max_new_tokens is 1001, past the model's context of "
                              "1024 tokens: shorten the prompt or lower max_new_tokens")
    # with an image, the text alone is a lower bound ...
    with pytest.raises(InputError, match="request 0: prompt is at least 6 tokens and max_new_tokens is 1024, past"):
        generate(lvlm, [{"prompt": "x", "image": make_image(0)}], decode={"max_new_tokens": 1024})
    # ... and the exact count, the image's tokens expanded, is checked before the prefill
    n = int(lvlm.adapter.encode([lvlm.adapter.chat_prompt("x", True)], [make_image(0)])["attention_mask"].sum())
    assert n > 6
    with pytest.raises(InputError) as exc:
        generate(lvlm, [{"prompt": "x", "image": make_image(0)}], decode={"max_new_tokens": 1024 - 6})
    assert str(exc.value) == (f"request 0: prompt is {n} tokens and max_new_tokens is 1018, past the model's context "
                              "of 1024 tokens: shorten the prompt or lower max_new_tokens")
    assert not calls


def test_max_new_tokens_past_the_context_cli(capsys):
    line = _refused(capsys, "generate", "--model", "builtin:tiny-llava", "--prompt", "x", "--max-new-tokens", "2000")
    assert line == ("error: request 0: prompt is 5 tokens and max_new_tokens is 2000, past the model's context of 1024 "
                    "tokens: shorten the prompt or lower max_new_tokens")


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"])
def test_token_count_precheck_is_exact_for_text(family):
    """The pre-check counts a text prompt's tokens as the processor does, so it never refuses a prompt that fits."""
    adapter = tiny(family).adapter
    for prompt in ("x", "what is in the picture? " * 7):
        text = adapter.chat_prompt(prompt, False)
        assert adapter.count_tokens(text) == adapter.encode([text], [None])["input_ids"].shape[1]
    text = adapter.chat_prompt("x", True)
    assert adapter.count_tokens(text) <= int(adapter.encode([text], [make_image(2)])["attention_mask"].sum())
    n, context = adapter.count_tokens(adapter.chat_prompt("x", False)), adapter.max_context
    check_context(tiny(family), 0, n, DecodeSpec(max_new_tokens=context - n))  # exactly the context: allowed
    with pytest.raises(InputError, match="past the model's context"):
        check_context(tiny(family), 0, n, DecodeSpec(max_new_tokens=context - n + 1))


# ----------------------------------------------------------------------------------------- 4. parameters
@pytest.mark.parametrize(("spec", "field", "params"), [
    ("pai:alpha=inf", "alpha", "alpha, gamma, cut, layers"),
    ("vhr:alpha=inf", "alpha", "alpha, layers, outlier_filter, outlier_std, text_pass"),
    ("m3id:lam=inf", "lam", "lam, threshold, max_weight"),
    ("var:rho=nan", "rho", "p, p_semantics, rho, min_image_mass, tau, sink_dims, layers"),
])
def test_non_finite_parameters_cli(capsys, spec, field, params, no_model_load):
    line = _refused(capsys, "generate", "--prompt", "x", "-m", spec)
    name = spec.split(":")[0]
    assert line == f"error: mitigation '{name}': {field}: Input should be a finite number (parameters: {params})"


FLOAT_FIELDS = [(name, field) for name, cls in sorted(REGISTRY.items()) for field, info in cls.model_fields.items()
                if "float" in str(info.annotation)]


@pytest.mark.parametrize(("name", "field"), FLOAT_FIELDS, ids=[f"{n}.{f}" for n, f in FLOAT_FIELDS])
def test_every_float_parameter_must_be_finite(name, field):
    for bad in ("inf", "-inf", "nan"):
        with pytest.raises(InputError, match=f"{field}: Input should be a finite number"):
            parse_mitigation(f"{name}:{field}={bad}")
        with pytest.raises(InputError, match=f"{field}: Input should be a finite number"):
            parse_mitigation({"name": name, field: float(bad)})


def test_parameter_given_twice(capsys, no_model_load):
    line = _refused(capsys, "generate", "--prompt", "x", "-m", "var:p=0.4,p=0.5")
    assert line == "error: mitigation 'var:p=0.4,p=0.5': parameter 'p' given twice: give it once"
    assert parse_mitigation("var:p=0.4,rho=0.5").p == 0.4


def test_parameter_ranges_that_used_to_crash():
    assert m3id_weight(10_000, 1.0) == m3id_weight(30, 1.0) < float("inf")  # lam * t saturates: no OverflowError
    lvlm = tiny("tiny-llava")
    req = {"prompt": "what is in the picture?", "image": make_image(1)}
    with pytest.raises(InputError) as exc:
        generate(lvlm, [req], ["imbalanced:local_layer=100"], DecodeSpec(max_new_tokens=1))
    assert str(exc.value).startswith("imbalanced: local_layer=100 is out of range: the vision tower has ")
    for spec in ("vcd:seed=-1", f"causalmm:seed={2**63}"):
        with pytest.raises(InputError, match="seed: .* is out of range: give a seed from 0 to 2\\*\\*63-1"):
            parse_mitigation(spec)
    out = generate(lvlm, [req], [f"causalmm:seed={2**63 - 1}"], DecodeSpec(max_new_tokens=1))  # + layer wraps
    assert len(out[0].token_ids) == 1


# ----------------------------------------------------------------------------------------- 5. checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "ckpt"
    lvlm = tiny("tiny-llava")
    lvlm.model.save_pretrained(folder)
    lvlm.processor.save_pretrained(folder)
    return folder


def _damaged(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(saved, folder)
    return folder


def test_checkpoint_with_malformed_config(capsys, saved, tmp_path):
    folder = _damaged(saved, tmp_path)
    (folder / "config.json").write_text('{\n  "model_type": "llava",\n  "text_config": {\n    oops\n')
    line = _refused(capsys, "generate", "--model", folder, "--prompt", "x")
    assert line == (f"error: model folder '{folder}': config.json is not valid JSON (Expecting property name enclosed "
                    "in double quotes: line 4 column 5): fix or re-save the checkpoint")


def test_checkpoint_with_unknown_model_type(capsys, saved, tmp_path):
    import transformers

    folder = _damaged(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "foo"}))
    line = _refused(capsys, "generate", "--model", folder, "--prompt", "x")
    assert line == (f"error: model folder '{folder}': config.json's model_type 'foo' is not one transformers knows "
                    f"(transformers {transformers.__version__}): fix config.json, or use a transformers that "
                    "supports it")


def test_checkpoint_without_weights(capsys, saved, tmp_path):
    folder = _damaged(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    line = _refused(capsys, "generate", "--model", folder, "--prompt", "x")
    assert line == (f"error: model folder '{folder}' has no weights (*.safetensors or pytorch_model.bin): copy the "
                    "weights into it, or save the model there with save_pretrained")
    assert "HF cache" not in line


def test_checkpoint_with_truncated_safetensors(capsys, saved, tmp_path):
    folder = _damaged(saved, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = _refused(capsys, "generate", "--model", folder, "--prompt", "x")
    assert line == (f"error: model folder '{folder}': model.safetensors is truncated or corrupt ({len(data) // 2:,} "
                    f"bytes, its header expects {len(data):,}): re-copy the file")
    weights.write_bytes(data[:50])
    with pytest.raises(InputError, match=r"model.safetensors is truncated or corrupt \(50 bytes, but its header alone"):
        load_model(str(folder))


def test_intact_checkpoints_pass_the_folder_checks(saved, tmp_path):
    from clearsight.models.loader import check_checkpoint_folder
    from clearsight.models.shipped import shapes_llava_path

    check_checkpoint_folder(saved, "saved")
    check_checkpoint_folder(shapes_llava_path(), "shipped")
    sharded = tmp_path / "sharded"
    tiny("tiny-llava").model.save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    check_checkpoint_folder(sharded, "sharded")


# ----------------------------------------------------------------------------------------- 6. Python API
def test_api_decode_as_a_dict():
    lvlm = tiny("tiny-llava")
    assert as_decode({}) == DecodeSpec() == as_decode(None)
    assert len(generate(lvlm, ["hi"], decode={"max_new_tokens": 2, "ignore_eos": True})[0].token_ids) == 2
    with pytest.raises(InputError) as exc:
        generate(lvlm, ["hi"], decode={"max_new_tokens": 0})
    assert str(exc.value) == "decode: max_new_tokens: Input should be greater than or equal to 1"
    with pytest.raises(InputError) as exc:
        generate(lvlm, ["hi"], decode={"temprature": 0.5})
    assert str(exc.value) == "decode: temprature: unknown parameter"
    with pytest.raises(InputError) as exc:
        generate(lvlm, ["hi"], decode=5)
    assert str(exc.value) == ("decode must be a DecodeSpec or a dict of its fields (e.g. {'max_new_tokens': 16}), "
                              "got int")


def test_api_requests():
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError) as exc:
        generate(lvlm, None)
    assert str(exc.value) == "requests is None: give a prompt, a request dict, or a list of them"
    with pytest.raises(InputError) as exc:
        generate(lvlm, ["fine", 5])
    assert str(exc.value) == ("request 1: a request is a prompt, a dict ({'prompt': ..., 'image': ...}) or a "
                              "GenerationRequest; got int")
    with pytest.raises(InputError) as exc:
        generate("builtin:tiny-llava", ["hi"])
    assert str(exc.value) == "the first argument must be a loaded model (clearsight.load_model(...)), got str"
    one = DecodeSpec(max_new_tokens=3, ignore_eos=True)
    events = list(stream_generate(lvlm, "hi", decode=one))  # one prompt, not its letters
    assert {e.request for e in events} == {0} and events[-1].finished


def test_api_a_single_mitigation_is_one_mitigation():
    lvlm = tiny("tiny-llava")
    req = {"prompt": "what is in the picture?", "image": make_image(3)}
    one = DecodeSpec(max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = generate(lvlm, [req], "var", one)[0]
        listed = generate(lvlm, [req], ["var"], one)[0]
        per_request = generate(lvlm, [{**req, "mitigations": "var"}], decode=one)[0]
    assert alone.mitigations == listed.mitigations == per_request.mitigations == [parse_mitigation("var").describe()]
    assert alone.token_ids == listed.token_ids == per_request.token_ids
    assert parse_mitigations({"name": "vcd", "alpha": 2})[0].alpha == 2
    with pytest.raises(InputError, match="mitigations must be a list"):
        parse_mitigations(3)


SEED_MESSAGE = "seed: 1180591620717411303424 is out of range: give a seed from 0 to 2**63-1 (9223372036854775807)"


def test_api_seeds_are_bounded():
    message = SEED_MESSAGE
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError) as exc:
        generate(lvlm, ["hi"], decode={"seed": 2**70})
    assert str(exc.value) == f"decode: {message}"
    with pytest.raises(InputError) as exc:
        generate(lvlm, [{"prompt": "hi", "seed": 2**70}])
    assert str(exc.value) == f"request 0: {message}"
    with pytest.raises(ValueError, match=r"1180591620717411303424 is out of range"):
        DecodeSpec(seed=2**70)
    with pytest.raises(ValueError, match=r"-1 is out of range"):
        GenerationRequest(prompt="hi", seed=-1)
    assert DecodeSpec(seed=2**63 - 1).seed == 2**63 - 1
    sampled = generate(lvlm, ["hi"], decode={"do_sample": True, "seed": 2**63 - 1, "max_new_tokens": 2})
    assert len(sampled[0].token_ids) <= 2


def test_cli_seeds_are_bounded(capsys, no_model_load):
    line = _refused(capsys, "generate", "--prompt", "x", "--seed", str(2**70))
    assert line == f"error: decoding options: {SEED_MESSAGE}"
    assert _refused(capsys, "generate", "--prompt", "x", "--seed", "-1") == \
        "error: decoding options: seed: -1 is out of range: give a seed from 0 to 2**63-1 (9223372036854775807)"


def test_api_validation_happens_when_stream_generate_is_called():
    """Bad arguments raise when stream_generate is called, not at the first next(); images load with their chunk."""
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError, match="requests is None"):
        stream_generate(lvlm, None)
    with pytest.raises(InputError, match="decode: max_new_tokens"):
        stream_generate(lvlm, ["hi"], decode={"max_new_tokens": -1})
    with pytest.raises(PlanConflictError, match="'cca' and 'mma' cannot be combined"):
        stream_generate(lvlm, ["hi"], ["cca", "mma"])
    events = stream_generate(lvlm, [{"prompt": "hi", "image": Image.new("RGB", (0, 0))}])
    with pytest.raises(InputError, match="request 0: image: the image is 0 x 0 pixels, empty"):
        next(events)
