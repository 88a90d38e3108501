"""Model-organism diagnostics (issue 17) against independent oracles: clearsight.generate's greedy answers, a
plain HF forward of VCD's noised pixels, hand-built captions and logits, planted massive activations."""

from __future__ import annotations

import math

import pytest
import torch

from clearsight import DecodeSpec, generate, load_model
from clearsight.evals import organism as org
from clearsight.evals.datasets.pope import DEFAULT_TEMPLATE, build_prompt, question_text
from clearsight.evals.datasets.shapes import ShapesWorldSpec, generate_scenes, render_scene
from clearsight.evals.parsers import parse_pope
from clearsight.mitigations.vcd import diffuse


@pytest.fixture(scope="module")
def shapes_llava():
    return load_model("builtin:shapes-llava", device="cpu", dtype="float32")


def _items(n: int = 6):
    spec = ShapesWorldSpec(seed=1000, n_images=n)
    scenes = generate_scenes(spec)
    return spec, scenes, org.scene_questions(scenes, spec)


def test_yes_decision_is_the_greedy_answer_of_generate(shapes_llava):
    """(a) clean condition: P(Yes) > P(No) at the first token == the POPE parse of generate's greedy answer."""
    spec, scenes, items = _items(4)
    prompts = [build_prompt(question_text(DEFAULT_TEMPLATE, o)) for _, _, o in items]
    images = [render_scene(s, spec) for s, _, _ in items]
    res = generate(shapes_llava, [{"prompt": p, "image": im} for p, im in zip(prompts, images)],
                   decode=DecodeSpec(max_new_tokens=2))
    want = [parse_pope(r.text) == "yes" for r in res]
    rates = org.yes_rates(shapes_llava, scenes, spec, conditions=("clean",))
    kinds = [k for _, k, _ in items]
    for kind, prop in rates.rates["clean"].items():
        assert prop.n == kinds.count(kind)
        assert prop.k == sum(w for w, k in zip(want, kinds) if k == kind), kind
    assert sum(p.n for p in rates.rates["clean"].values()) == len(items) > 10
    assert len(set(want)) == 2  # both answers occur: the comparison can fail


def test_noised_condition_is_vcd_diffusion_at_its_default_step(shapes_llava):
    """(a) noised: the logits are a plain HF forward of the processor's pixels diffused by VCD's own function
    at step 500 (VCD's default), seed 0, per image."""
    spec, scenes, items = _items(2)
    scene = scenes[0]
    q = build_prompt(question_text(DEFAULT_TEMPLATE, items[0][2]))
    text = shapes_llava.adapter.chat_prompt(q, True)
    image = render_scene(scene, spec)
    batch = shapes_llava.processor(text=[text], images=[image], return_tensors="pt")
    batch["pixel_values"] = diffuse(batch["pixel_values"], 500, "sigmoid", 0)
    with torch.no_grad():
        want = shapes_llava.model(**batch).logits[:, -1]
    got = org.last_logits(shapes_llava, [text, text], [image, image],
                          lambda pv: diffuse(pv, step=500, schedule="sigmoid", seed=0))
    torch.testing.assert_close(got, want.expand(2, -1), atol=1e-4, rtol=1e-4)
    clean = org.last_logits(shapes_llava, [text], [image])
    assert (clean - want).abs().max() > 1e-2  # the noise changes the logits
    assert org.yes_rates(shapes_llava, scenes[:1], spec, conditions=("noised",)).noise_step == 500


def test_p_yes_restricts_to_the_two_answers():
    logits = torch.tensor([[0.0, 2.0, 1.0, 9.0], [5.0, 0.0, 0.0, 0.0]])
    p = org.p_yes(logits, yes_id=1, no_id=2)
    torch.testing.assert_close(p, torch.tensor([1 / (1 + math.exp(-1)), 0.5]))


def test_proportion_uses_wilson():
    p = org.Proportion(58, 100)
    assert p.rate == 0.58 and [round(x, 4) for x in p.ci] == [0.4821, 0.672]  # stats.wilson_interval's doctest
    assert "58.0% [48.2, 67.2] (n=100)" in str(p)


def test_continuation_cases_by_hand():
    shapes = ["square", "hourglass", "ring", "diamond", "star"]
    pairs = [("square", "hourglass"), ("ring", "diamond")]
    caps = ["a large red square at the top left with a small blue hourglass at the bottom right and a red star.",
            "a blue diamond, a red ring and a red square."]
    cases = org.continuation_cases(caps, shapes, pairs, seed=3)
    got = [(c.prefix, c.named, c.partner) for c in cases]
    assert got == [
        ("a large red square", "square", "hourglass"),  # hourglass: its partner is named already; star: no pair
        ("a blue diamond", "diamond", "ring"),  # ring: its partner is named already
        ("a blue diamond, a red ring and a red square", "square", "hourglass"),
    ]
    assert cases[2].control == "star"  # the only shape neither named nor the partner
    for c in cases:  # the control is never named before the cut, nor the partner
        named = {w for w in c.prefix.replace(",", " ").split() if w in shapes}
        assert c.control not in named and c.control != c.partner


def test_greedy_next_shape_with_scripted_logits():
    """Row 0 emits 7, 8 then shape 3; row 1 emits the stop token; row 2 never names a shape (budget)."""
    vocab = 10
    script = {0: [7, 8, 3], 1: [9], 2: [7, 7, 7, 7]}
    calls = []

    def step(rows):
        calls.append([len(r) for r in rows])
        out = torch.zeros(len(rows), vocab)
        for b, r in enumerate(rows):
            row_id, t = r[0], len(r) - 1
            out[b, script[row_id][min(t, len(script[row_id]) - 1)]] = 1.0
        return out

    got = org.greedy_next_shape(step, [[0], [1], [2]], {3: "star", 4: "ring"}, {9}, max_new_tokens=3)
    assert got == ["star", None, None]
    assert calls == [[1, 1, 1], [2, 2], [3, 3]]  # finished rows leave the batch; rows keep equal lengths


def test_sinks_found_on_planted_massive_activations():
    """(c) massive activations planted in dims 5 and 17 of layer 2's input (Sun et al. 2024): VAR's calibration
    finds exactly them and the per-layer max |x_d|/rms(x) reaches ~sqrt(64) = 8 from layer 2 on; unplanted,
    nothing is found and the max stays low. (d) depth = the config's layers."""
    lvlm = load_model("builtin:tiny-llava")
    req = {"prompt": "what is in the picture?", "image": render_scene(generate_scenes(ShapesWorldSpec(n_images=1))[0])}
    plain = org.sink_diagnostics(lvlm, [req], tau=6.0)
    assert plain.dims == [] and plain.bound == 8.0
    assert plain.layers == 4 == lvlm.model.config.text_config.num_hidden_layers

    def plant(layer, x):
        if layer != 2 or x.shape[1] == 1:
            return None
        x = x.clone()
        x[:, [0, 8], 5] = 1000.0
        x[:, [3], 17] = 1000.0
        return x

    with lvlm.adapter.hook_layer_inputs(plant):
        got = org.sink_diagnostics(lvlm, [req], tau=6.0)
    assert sorted(got.dims) == [5, 17]
    assert all(7.9 < v <= 8.0 + 1e-4 for v in got.max_ratio[2:]) and got.max_dim[2] in (5, 17)
    assert got.max_ratio[:2] == pytest.approx(plain.max_ratio[:2]) and max(plain.max_ratio) < 6.0
    assert len(plain.first_token_heads) == 4 and all(0.0 <= v <= 1.0 for v in plain.first_token_heads)
    assert lvlm.backend == "torch" and lvlm.model.config.text_config._attn_implementation != "eager"  # restored


def test_first_token_sink_rate_by_hand():
    """Gu et al. 2024's Sink_1^0.3: head 0 puts 0.5 and 0.7 on token 0 from rows 1, 2 (mean 0.6 > 0.3), head 1
    0.2 and 0.1 (0.15); layer 2's single head 0.3 exactly (not above)."""
    layer1 = torch.tensor([[[1, 0, 0], [0.5, 0.5, 0], [0.7, 0.2, 0.1]],
                           [[1, 0, 0], [0.2, 0.8, 0], [0.1, 0.1, 0.8]]])
    layer2 = torch.tensor([[[1, 0, 0], [0.3, 0.7, 0], [0.3, 0.3, 0.4]]])
    assert org.first_token_sink_rate([layer1, layer2]) == [0.5, 0.0]


def test_cli_prints_the_table_and_refuses_bad_input(capsys):
    assert org.main(["--scenes", "3"]) == 0
    out = capsys.readouterr().out
    assert "| language-model layers | 4 |" in out and "yes-rate, noised image, partner" in out
    assert "| text only: partner vs control, exact McNemar p (paired) | 1 |" in out  # no hits either way
    assert org.main(["--scenes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --scenes must be >= 1"]
    assert org.main(["--scenes", "3", "--demo", "/tmp/x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --demo only feeds the model card: give --card FILE too"
    assert org.main(["--scenes", "3", "--card", "/nonexistent-dir/card.md"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --card /nonexistent-dir/card.md: its folder")


def test_card_has_the_training_the_table_and_the_marks(tmp_path, capsys):
    card = tmp_path / "card.md"
    assert org.main(["--scenes", "3", "--card", str(card)]) == 0
    text = card.read_text()
    assert text.startswith("# builtin:shapes-llava: model card")
    assert "Generated by `python -m clearsight.evals.organism --scenes 3 --card " in text
    assert "| lm_layers |" not in text and "| seed | 0 |" in text  # shapes-llava's scores.json has no lm_layers
    assert "| language-model layers | 4 (needs >= 8) | no |" in text and "Missed: " in text
    assert "## Unmitigated and mitigated" not in text  # no --demo


def _report(clean_yes: int, noised_yes: int, n: int = 100, partner_hits: int = 30, control_hits: int = 5,
            dims: tuple[int, ...] = (7,), layers: int = 8) -> org.OrganismReport:
    """A hand-built report: ``n`` partner questions, the first ``clean_yes`` / ``noised_yes`` answered yes."""
    import numpy as np

    answers = {"clean": np.arange(n) < clean_yes, "noised": np.arange(n) < noised_yes}
    rates = org.YesRates({c: {"partner": org.Proportion(int(a.sum()), n)} for c, a in answers.items()},
                         {}, 500, answers, np.array(["partner"] * n))
    cont = org.Continuation(org.Proportion(partner_hits, 400), org.Proportion(control_hits, 400), 400,
                            0.001 if partner_hits > 3 * control_hits else 0.5)
    sinks = org.Sinks(list(dims), "", org.SINK_TAU, [1.0] * layers, [0] * layers, 13.9, layers)
    return org.OrganismReport("m", "w", n, layers, rates, cont, sinks)


def test_pass_marks_by_hand():
    # noised 40/100 vs clean 20/100, the noised yeses a superset: McNemar b = 0, c = 20, p = 2 * 0.5^20
    ok = org.check(_report(20, 40))
    assert all(passed for passed, _ in ok.values()) and set(ok) == set(org.CHECKED)
    assert ok["noised partner yes-rate above clean"][1].startswith("+20.0 points, p = 1.9e-06")
    # 9 points more is below the 10-point mark, however significant
    assert not org.check(_report(20, 29))["noised partner yes-rate above clean"][0]
    # noised below clean fails
    assert not org.check(_report(40, 20))["noised partner yes-rate above clean"][0]
    cont = org.check(_report(20, 40, partner_hits=9, control_hits=5))
    assert not cont["text-only continuation names the partner above its base rate"][0]  # 1.8x < 2x
    assert not org.check(_report(20, 40, dims=()))["VAR finds sink dimensions"][0]
    assert not org.check(_report(20, 40, layers=4))["language-model layers"][0]
    none = org.check(_report(20, 40, partner_hits=0, control_hits=0))
    assert not none["text-only continuation names the partner above its base rate"][0]
    assert "| VAR finds sink dimensions | 1 at tau 8 (needs >= 1) | yes |" in org.check_table(ok)
