"""builtin:shapes-llava: the shipped demo checkpoint loads like any HF checkpoint, answers a fixed
scene correctly, its model card records held-out scores that meet the targets, and part of them is
reproduced live."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from clearsight import DecodeSpec, generate, load_model
from clearsight.evals.datasets.shapes import PARTNER_PAIRS, SHAPES, ShapesWorldSpec, generate_scenes, render_scene
from clearsight.evals.parsers import parse_pope
from clearsight.models.shipped import shapes_llava_path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = shapes_llava_path()
SCENE_SEED, SCENE_INDEX = 4242, 0  # a fixed held-out scene (training used seeds 0 and 1)
PARTNER = {a: b for a, b in PARTNER_PAIRS} | {b: a for a, b in PARTNER_PAIRS}

@pytest.fixture(scope="module")
def lvlm():
    return load_model("builtin:shapes-llava")


@pytest.fixture(scope="module")
def scene():
    spec = ShapesWorldSpec(n_images=SCENE_INDEX + 1, seed=SCENE_SEED)
    sc = generate_scenes(spec)[SCENE_INDEX]
    return sc, render_scene(sc, spec)


def _ask(lvlm, image, prompt: str, max_new_tokens: int = 4) -> str:
    decode = DecodeSpec(max_new_tokens=max_new_tokens)
    return generate(lvlm, [{"prompt": prompt, "image": image}], decode=decode)[0].text


def test_checkpoint_files_and_size():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "MODEL_CARD.md", "scores.json"):
        assert (WEIGHTS / name).is_file(), name
    assert (WEIGHTS / "chat_template.jinja").is_file()
    assert (WEIGHTS / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    assert not list(WEIGHTS.glob("*.bin")) and not list(WEIGHTS.glob("*.pt"))


def test_loads_as_llava_with_8x8_grid(lvlm):
    assert type(lvlm.model).__name__ == "LlavaForConditionalGeneration"
    assert lvlm.adapter.family == "llava"
    vc = lvlm.model.config.vision_config
    assert (vc.image_size, vc.patch_size) == (96, 12)
    assert lvlm.model.config.image_seq_length == 64
    assert lvlm.model.config.text_config.model_type == "llama"
    q = "Is there a star in the image?"
    assert lvlm.adapter.chat_prompt(q, has_image=True) == f"USER: <image>\n{q} ASSISTANT:"


def test_fixed_scene_yes_no(lvlm, scene):
    sc, image = scene
    present = sc.object_names[0]
    absent = next(s for s in SHAPES if s not in sc.object_names and PARTNER[s] not in sc.object_names)
    yes = _ask(lvlm, image, f"Is there a {present} in the image?\nAnswer the question using a single word or phrase.")
    no = _ask(lvlm, image, f"Is there a {absent} in the image?\nAnswer the question using a single word or phrase.")
    assert yes == "Yes" and parse_pope(yes) == "yes", (present, yes)
    assert no == "No" and parse_pope(no) == "no", (absent, no)


def test_fixed_scene_answers_parse_and_caption(lvlm, scene):
    sc, image = scene
    ans = _ask(lvlm, image, f"Is there a {sc.object_names[0]} in the image?\nAnswer the question using a single word "
               "or phrase.")
    assert ans in ("Yes", "No"), ans
    cap = _ask(lvlm, image, "Please describe this image in detail.", max_new_tokens=40)
    assert cap.startswith("a ") and cap.endswith("."), cap
    assert any(name in cap for name in sc.object_names), (sc.caption, cap)


def _scores() -> dict:
    return json.loads((WEIGHTS / "scores.json").read_text())


def test_model_card_records_held_out_scores_and_chair_targets():
    scores = _scores()
    pope, chair, tr = scores["pope"], scores["chair"], scores["training"]
    assert tr["eval_seed"] != tr["seed"] and not tr["quick"]
    assert set(pope) == {"random", "popular", "adversarial"}
    assert all(m["invalid_answers"] == 0 for m in pope.values())
    assert chair["chair_i"] > 0
    assert chair["recall"] >= 0.60
    assert chair["fluent_fraction"] >= 0.9
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    assert f"{pope['random']['accuracy']:.3f}" in card and f"CHAIR_i {chair['chair_i']:.3f}" in card


def test_model_card_pope_targets():
    scores = _scores()
    pope = scores["pope"]
    assert pope["random"]["accuracy"] >= 0.85
    assert pope["adversarial"]["accuracy"] < pope["random"]["accuracy"]
    assert all(scores["thresholds_met"].values())
    chair = scores["chair"]  # the recorded flags are the recorded numbers against the targets
    assert scores["thresholds_met"] == {
        "pope_random_accuracy>=0.85": pope["random"]["accuracy"] >= 0.85,
        "pope_adversarial<random": pope["adversarial"]["accuracy"] < pope["random"]["accuracy"],
        "chair_i>0": chair["chair_i"] > 0, "chair_recall>=0.60": chair["recall"] >= 0.60}


def test_held_out_pope_live_with_margins(lvlm):
    """Part of the recorded POPE score is reproduced live on held-out scenes (same seed and recipe)."""
    from clearsight.evals.datasets.pope import PopeGenerationConfig, build_prompt, generate_pope_questions
    from clearsight.evals.metrics.pope import pope_metrics

    spec = ShapesWorldSpec(n_images=40, seed=_scores()["training"]["eval_seed"])
    scenes = generate_scenes(spec)
    images = {s.file_name: render_scene(s, spec) for s in scenes}
    gt = [{"image": s.file_name, "objects": s.object_names, "image_id": s.image_id} for s in scenes]
    qs = generate_pope_questions(gt, "random", PopeGenerationConfig(img_num=None, seed=spec.seed, dataset="shapes"))
    res = generate(lvlm, [{"prompt": build_prompt(q.text), "image": images[q.image]} for q in qs],
                   decode=DecodeSpec(max_new_tokens=3), max_batch=64)
    acc = pope_metrics([q.label for q in qs], [parse_pope(r.text) for r in res]).accuracy
    assert acc >= 0.80, acc  # recorded on all 200 scenes: >= 0.85 (0.86 on these 40 when shipped)


def test_co_occurrence_prior_shows_as_partner_hallucination(lvlm):
    """The language prior at work: asked about the absent partner of a present shape, the model says yes
    far more often than about another absent shape (shipped: about 0.50 vs 0.10 on these scenes)."""
    import random

    from clearsight.evals.datasets.pope import build_prompt

    spec = ShapesWorldSpec(n_images=100, seed=_scores()["training"]["eval_seed"])
    rng = random.Random(0)
    asked = []
    for sc in generate_scenes(spec):
        image, names = render_scene(sc, spec), set(sc.object_names)
        for obj in sorted(names):
            if PARTNER[obj] not in names:
                other = rng.choice([s for s in SHAPES if s not in names and PARTNER[s] not in names])
                asked += [("partner", PARTNER[obj], image), ("other", other, image)]
    res = generate(lvlm, [{"prompt": build_prompt(f"Is there a {q} in the image?"), "image": im} for _, q, im in asked],
                   decode=DecodeSpec(max_new_tokens=3), max_batch=64)
    yes = {k: [parse_pope(r.text) == "yes" for (kind, _, _), r in zip(asked, res) if kind == k]
           for k in ("partner", "other")}
    rate = {k: sum(v) / len(v) for k, v in yes.items()}
    assert len(yes["partner"]) >= 40 and rate["partner"] >= rate["other"] + 0.15, rate


def test_quick_training_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("train_shapes_llava", ROOT / "scripts" / "train_shapes_llava.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "sl"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "processor_config.json", "scores.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "scores.json").read_text())
    assert scores["training"]["quick"] and set(scores["pope"]) == {"random", "popular", "adversarial"}


def test_quick_training_organism_smoke(tmp_path):
    """builtin:shapes-organism's recipe (--recipe organism): the organism world (long captions: their words are in
    the vocabulary), a deeper language model, one image token per grid cell, text-only caption rows; --quick, no
    evaluation; a flag given on the command line overrides the recipe's."""
    spec = importlib.util.spec_from_file_location("train_shapes_llava", ROOT / "scripts" / "train_shapes_llava.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "org"
    argv = ["--recipe", "organism", "--quick", "--stage2-caption-text-prob", "0.5", "--out", str(out)]
    assert mod.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 8
    assert cfg["vision_config"]["patch_size"] == 24 and cfg["image_seq_length"] == 16  # 4 x 4 image tokens
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"far", "upper", "small", "large", "with"} <= set(vocab)
    tr = json.loads((out / "scores.json").read_text())["training"]
    assert tr["world"] == "organism" and tr["lm_layers"] == 8 and tr["stage2_caption_text_prob"] == 0.5
    assert tr["patch_size"] == 24 and tr["noise_fraction"] == 0.0 and tr["recipe"] == "organism"
