"""The dashboard's logic functions against hand-computed values (no Streamlit, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clearsight.cli import main
from clearsight.dashboard import compare as cmp
from clearsight.dashboard import jobs as jb
from clearsight.dashboard.results import Sample, SystemAnswer, filter_samples
from clearsight.errors import InputError
from clearsight.kernels.plan import RowLayout


def test_fields_come_from_the_pydantic_model_with_bounds():
    var = {f.name: f for f in cmp.mitigation_fields("var")}
    assert (var["p"].kind, var["p"].default, var["p"].minimum, var["p"].maximum) == ("float", 0.6, 0.0, 1.0)
    assert var["p_semantics"].kind == "choice" and var["p_semantics"].choices == ("paper", "code")
    assert var["layers"].kind == "text" and var["layers"].default is None
    vcd = {f.name: f for f in cmp.mitigation_fields("vcd")}
    assert (vcd["noise_step"].kind, vcd["noise_step"].default, vcd["noise_step"].minimum) == ("int", 500, 0.0)
    assert {f.name: f.kind for f in cmp.mitigation_fields("vhr")}["outlier_filter"] == "bool"


def test_build_system_enforces_bounds_and_names_the_field():
    s = cmp.build_system("mine", {"var": {"p": 0.4, "layers": cmp.text_value("1, 2", None)}})
    assert s.mitigations == [{"name": "var", "p": 0.4, "layers": [1, 2]}]
    with pytest.raises(InputError, match=r"^mine: .*var.*p: .*less than or equal to 1"):
        cmp.build_system("mine", {"var": {"p": 1.5}})
    assert cmp.text_value("", 7) == 7 and cmp.text_value("0.5", None) == 0.5
    assert cmp.text_value("a|b", None) == ["a", "b"]


def test_marking_against_ground_truth():
    text = "a red square, two blue stars and a green house."
    mentions = cmp.mark_objects(text, ["square", "star"])
    assert [(m.node, m.present) for m in mentions] == [("square", True), ("star", True), ("house", False)]
    md = cmp.marked_markdown(text, mentions)
    assert ":green[**square**]" in md and ":green[**stars**]" in md and ":red[**house**]" in md
    assert cmp.parse_objects("Squares, stars, tree") == ["square", "star", "tree"]


def _stats(rows: list[torch.Tensor], start: int, grid: tuple[int, int]) -> dict:
    """Two layers of last rows ([heads, keys] per forward); layer 1 = layer 0 doubled."""
    n = grid[0] * grid[1]
    return {"layout": RowLayout(0, ((start, start + n),), (grid,)), "last_row": {0: rows, 1: [2 * r for r in rows]}}


def test_attention_grid_and_token_mass_by_hand():
    # 2 heads, 8 keys: 2 text keys, a 2 x 3 image grid at keys 2..7; two forwards (two tokens).
    f0 = torch.tensor([[0.4, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
                       [0.0, 0.4, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0]])
    f1 = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                       [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    stats = _stats([f0, f1], 2, (2, 3))
    # layer 0: heads averaged per forward -> f0: [.35,.05,.05,.05,.05,.05], f1: [0,0,0,0,0,.5]; tokens averaged
    want0 = np.array([[0.175, 0.025, 0.025], [0.025, 0.025, 0.275]])
    np.testing.assert_allclose(cmp.attention_grid(stats, 0), want0)
    np.testing.assert_allclose(cmp.attention_grid(stats, 1), 2 * want0)
    np.testing.assert_allclose(cmp.attention_grid(stats), 1.5 * want0)  # mean of the two layers
    np.testing.assert_allclose(cmp.attention_grid(stats, 0, n_tokens=1),
                               [[0.35, 0.05, 0.05], [0.05, 0.05, 0.05]])
    # image mass per token, layer 0: (0.6 + 0.6) / 2 = 0.6 and (1.0 + 0) / 2 = 0.5
    np.testing.assert_allclose(cmp.token_image_mass(stats, 2, 0), [0.6, 0.5])
    np.testing.assert_allclose(cmp.token_image_mass(stats, 2), [0.9, 0.75])
    with pytest.raises(InputError, match="layer 5 not recorded"):
        cmp.attention_grid(stats, 5)
    img = cmp.overlay(cmp.shapes_scene(1).image, cmp.attention_grid(stats), size=96)
    assert img.size == (96, 96)


def test_filter_samples():
    def sample(sid, bench, gold, answers):
        return Sample(sid, bench, "", "p", None, gold, answers)

    a = sample("p1", "pope", "no", {"x": SystemAnswer("Yes", True, parsed="yes"), "y": SystemAnswer("No", False,
                                                                                                 parsed="no")})
    b = sample("p2", "pope", "yes", {"x": SystemAnswer("Yes", False, parsed="yes"),
                                     "y": SystemAnswer("Yes", False, parsed="yes")})
    assert [s.sample_id for s in filter_samples([a, b], disagree=True)] == ["p1"]
    assert [s.sample_id for s in filter_samples([a, b], hallucinating="x")] == ["p1"]
    assert filter_samples([a, b], hallucinating="y") == []
    assert len(filter_samples([a, b], benchmark="chair")) == 0


def test_job_form_validation(tmp_path):
    job = jb.job_from_form({"name": "j", "systems": ["none", "mine=var:p=0.4+vhr"], "pope_limit": 3}, tmp_path)
    assert [s.label for s in job.systems] == ["none", "mine"] and job.systems[1].mitigations == ["var:p=0.4", "vhr"]
    with pytest.raises(InputError, match="pope_limit"):
        jb.job_from_form({"name": "j", "systems": ["none"], "pope_limit": 0}, tmp_path)
    with pytest.raises(InputError, match="no benchmark"):
        jb.job_from_form({"name": "j", "systems": ["none"], "pope_limit": None}, tmp_path)
    with pytest.raises(InputError, match="var"):
        jb.job_from_form({"name": "j", "systems": ["var:p=7"], "pope_limit": 2}, tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        jb.start_local(tmp_path / "missing.toml", tmp_path)


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "0"], "--port: 0 is not a TCP port"),
    (["--url", "ftp://x"], "--url: 'ftp://x' is not an http(s) URL"),
    (["--runs", "FILE"], "is a file, not a folder"),
    (["--timeout", "-1"], "--timeout: Input should be greater than 0"),
])
def test_cli_bad_arguments(argv, message, capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert main(["dashboard", *[str(tmp_path / "f") if a == "FILE" else a for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
