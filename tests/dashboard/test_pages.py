"""Each dashboard page through Streamlit's AppTest (no browser, no server): Compare on the demo model with two
systems, Jobs running a tiny local job to the end, Evals on that job's result folder."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from clearsight.dashboard.settings import ENV  # noqa: E402
from clearsight.evals.datasets.shapes import SHAPES, ShapesWorldSpec, generate_scenes  # noqa: E402

VIEWS = Path(__file__).resolve().parents[2] / "clearsight" / "dashboard" / "views"
MARK = re.compile(r":(green|red)\[\*\*([^*]+)\*\*\]")


def _single(word: str) -> str | None:
    """The shape a word names (singular, or an -s / -es plural), or None."""
    for w in (word, word[:-1], word[:-2]):
        if w in SHAPES and (w == word or word in (w + "s", w + "es")):
            return w
    return None


def _shape_words(text: str) -> list[str]:
    """Independent oracle of the objects in a demo-model caption: its words that are shape names (the model's
    vocabulary holds the canonical names only)."""
    return [s for s in map(_single, re.findall(r"[a-z]+", text.lower())) if s is not None]


def _caption(image_element) -> str:
    return " ".join(i.caption for i in image_element.proto.imgs)


def test_compare_two_systems(monkeypatch):
    monkeypatch.setenv(ENV, json.dumps({"model": "builtin:shapes-llava"}))
    at = AppTest.from_file(str(VIEWS / "compare.py"), default_timeout=180).run()
    assert not at.exception and not at.error
    at.number_input(key="max_new").set_value(30)
    at.multiselect(key="sys1_mits").set_value(["vcd"])
    at.button(key="run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]

    outputs = at.session_state["compare"]["outputs"]
    assert [o.label for o in outputs] == ["none", "vcd"]
    assert all(o.result is not None and o.text for o in outputs)
    assert [s.value for s in at.subheader] == ["none", "vcd"]
    # the ground truth of the page's scene, generated here independently of the page
    spec = ShapesWorldSpec(n_images=1, seed=int(at.number_input(key="seed").value))
    truth = set(generate_scenes(spec)[0].object_names)
    texts = [m.value for m in at.markdown if MARK.search(m.value) and "in the ground truth" not in m.value]
    assert len(texts) == 2
    for md, out in zip(texts, outputs):
        marks = MARK.findall(md)
        assert [_single(w.lower()) for _, w in marks] == _shape_words(out.text)  # every object marked, in order
        for colour, word in marks:
            assert (colour == "green") == (_single(word.lower()) in truth), (word, truth)

    # one heatmap per system over the image, and its grid: the model's 8 x 8 image tokens
    heatmaps = [im for im in at.get("image") if "attention on the image" in _caption(im)]
    assert len(heatmaps) == 2
    grids = [d.value for d in at.dataframe if d.value.shape == (8, 8)]
    assert len(grids) == 2
    # the grid against a plain formula on the recorded statistics: last rows' image keys, mean of heads,
    # tokens and layers
    stats = outputs[0].result.stats
    (start, end), = stats["layout"].image_spans
    per_layer = [np.mean([r.numpy().mean(0)[start:end] for r in rows], 0) for rows in stats["last_row"].values()]
    np.testing.assert_allclose(grids[0].to_numpy(), np.mean(per_layer, 0).reshape(8, 8), atol=1e-4)
    # per-token view: one row per generated token, masses in [0, 1]
    tokens = [d.value for d in at.dataframe if list(d.value.columns) == ["token", "image mass"]]
    assert len(tokens) == 2 and len(tokens[0]) >= len(outputs[0].result.token_ids)
    assert tokens[0]["image mass"].between(0, 1).all()

    at.select_slider(key="layer").set_value(2).run()  # one layer instead of the average
    assert not at.exception
    assert any("(2)" in _caption(im) for im in at.get("image"))


def test_compare_shows_a_bad_parameter_in_the_page(monkeypatch):
    monkeypatch.setenv(ENV, json.dumps({"model": "builtin:shapes-llava"}))
    at = AppTest.from_file(str(VIEWS / "compare.py"), default_timeout=60).run()
    at.multiselect(key="sys1_mits").set_value(["m3id"]).run()
    # threshold is gt=0 (exclusive): the widget allows 0, pydantic refuses it, the page says so
    at.number_input(key="sys1_m3id_threshold").set_value(0.0).run()
    assert any("threshold" in e.value for e in at.error)
    assert at.button(key="run").disabled


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """Jobs page: start a tiny local job from the form (2 systems, 2 POPE questions per split, 1 CHAIR image)
    and rerun the page until it shows the job finished."""
    runs = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV, json.dumps({"runs": str(runs)}))
    at = AppTest.from_file(str(VIEWS / "jobs.py"), default_timeout=60).run()
    assert not at.exception
    at.text_input(key="name").input("tiny")
    at.text_area(key="systems").input("none\npai")
    at.number_input(key="pope").set_value(2)
    at.number_input(key="chair").set_value(1)
    at.number_input(key="tokens").set_value(24)
    at.button[0].click().run()
    assert not at.error, [e.value for e in at.error]
    assert at.success and "started" in at.success[0].value
    state = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # a bound on waiting, not an assertion on time
        at.run()
        states = [m.value for m in at.markdown if "(local)" in m.value]
        state = states[0] if states else None
        if state and ("**done**" in state or "**failed**" in state):
            break
        time.sleep(1)
    yield at, runs / "tiny", state
    mp.undo()


def test_jobs_runs_a_local_job_to_the_end(finished_job):
    at, folder, state = finished_job
    assert state is not None and "**done**" in state, (state, [c.value for c in at.code])
    assert (folder / "results.json").is_file()
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["state"] == "done"
    # the job is the one the form described: its two systems, 2 POPE questions in each of the three splits
    results = json.loads((folder / "results.json").read_text())
    assert [s["name"] for s in results["systems"]] == ["none", "pai"]
    for system in results["systems"]:
        assert {k: m["n"] for k, m in system["pope"]["splits"].items()} == {
            "random": 2, "popular": 2, "adversarial": 2}, system["pope"]
    assert any(b.label == "Open in Evals" for b in at.button)


def test_evals_renders_the_result_folder(finished_job, monkeypatch):
    _, folder, _ = finished_job
    monkeypatch.setenv(ENV, json.dumps({"runs": str(folder.parent)}))
    at = AppTest.from_file(str(VIEWS / "evals.py"), default_timeout=120).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    results = json.loads((folder / "results.json").read_text())
    tables = {s.value: d.value for s, d in zip(at.subheader, at.dataframe)}
    pope = tables["POPE"]
    assert len(pope) == 2 * 3  # systems x splits
    for system in results["systems"]:
        for split, m in system["pope"]["splits"].items():
            row = pope[(pope["system"] == system["name"]) & (pope["split"] == split)].iloc[0]
            assert row["accuracy"] == pytest.approx(m["accuracy"]) and row["n"] == 2
    assert tables["CHAIR"]["chair_i"].tolist() == pytest.approx([s["chair"]["chair_i"] for s in results["systems"]])
    assert {_caption(im) for im in at.get("image")} >= {"figures.png"}

    # the per-sample browser: 3 x 2 POPE questions + 1 caption; hallucinations counted independently from the
    # generation cache (a "yes" to a "no" question, a caption naming a shape not in the image)
    samples = at.dataframe[-1].value
    assert len(samples) == 7
    gt = {str(k): set(v) for k, v in json.loads((folder / "chair_ground_truth.json").read_text())["objects"].items()}
    labels = {}
    for split in ("random", "popular", "adversarial"):
        for line in Path(results["data_files"][["random", "popular", "adversarial"].index(split)]["path"]).open():
            q = json.loads(line)
            labels[(split, str(q["question_id"]))] = q["label"]
    expected = set()
    for line in (folder / "generations.jsonl").read_text().splitlines():
        rec = json.loads(line)
        parts = rec["sample_id"].split("/")
        if parts[0] == "pope":
            wrong_yes = rec["output"].strip().lower().startswith("yes") and labels[(parts[1], parts[2])] == "no"
        else:
            wrong_yes = any(w not in gt[parts[1]] for w in _shape_words(rec["output"]))
        if wrong_yes:
            expected.add(rec["sample_id"])
    at.selectbox(key="f_who").select("any").run()
    assert set(at.dataframe[-1].value["sample"]) == expected


def test_app_navigates_between_pages(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, json.dumps({"runs": str(tmp_path)}))
    at = AppTest.from_file(str(VIEWS.parent / "app.py"), default_timeout=180).run()
    assert not at.exception and [t.value for t in at.title] == ["Compare"]
    at.switch_page(str(VIEWS / "evals.py")).run()
    assert not at.exception and [t.value for t in at.title] == ["Evals"]
    assert "No result folders" in at.info[0].value
