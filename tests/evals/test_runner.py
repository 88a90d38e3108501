"""The eval runner end to end: tiny model x builtin:shapes, resume after SIGKILL, scoring without a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clearsight.evals.cache import GenerationCache
from clearsight.evals.errors import EvalInputError
from clearsight.evals.job import load_job, parse_job
from clearsight.evals.runner import run_job, score_from_cache

TINY = "builtin:tiny-llava"  # the tests' fast model (a job's default is the demo model)
SYSTEMS = [
    {"name": "base", "model": TINY},
    {"name": "sampled", "model": TINY, "decode": {"do_sample": True, "seed": 3, "temperature": 1.2}},
    {"name": "next", "model": "builtin:tiny-llava-next"},
]


pytestmark = pytest.mark.usefixtures("shapes_cache")  # tests/evals/conftest.py: one world per session


def _job(out: Path, **kw):
    data = {"systems": SYSTEMS, "output": str(out), "batch_size": 4,
            "benchmarks": [{"kind": "pope", "limit": 6}, {"kind": "chair", "n_images": 6, "max_new_tokens": 16},
                           {"kind": "crosscheck"}]}
    data.update(kw)
    return parse_job(data)


def test_end_to_end_three_systems(tmp_path):
    t0 = time.perf_counter()
    results = run_job(_job(tmp_path), progress=None)
    elapsed = time.perf_counter() - t0
    assert {s.name for s in results.systems} == {"base", "sampled", "next"}
    for s in results.systems:
        assert set(s.pope.splits) == {"random", "popular", "adversarial"}
        assert all(m.n == 6 for m in s.pope.splits.values())
        assert s.chair.n_captions == 6
    assert set(results.crosscheck.scores) == {"base", "sampled", "next"}
    assert sorted(results.crosscheck.ranking) == ["base", "next", "sampled"]
    scores = results.crosscheck.scores  # best (least hallucination) first, ties by name
    assert results.crosscheck.ranking == sorted(scores, key=lambda s: (scores[s], s))
    files = {p.name for p in tmp_path.iterdir()}
    # no system named 'none' and no baseline given: figures with CIs, no differences (so no forest plots)
    assert {"results.json", "report.md", "generations.jsonl", "job.json", "figures.png"} <= files
    assert not any(f.startswith("forest_") for f in files)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["pope_parser"] == "pope" and len(data["chair_image_ids"]) == 6
    assert all(len(f["sha256"]) == 64 for f in data["data_files"])
    assert "torch" in data["package_versions"]
    assert {s["decode"]["batch_size"] for s in data["systems"]} == {4}  # the job's, not DecodeSpec's default
    # 3 systems x (18 POPE + 6 CHAIR) generations, each cached exactly once
    assert len(GenerationCache(tmp_path / "generations.jsonl")) == 72
    print(f"end-to-end eval: {elapsed:.1f} s")


def test_rerun_is_served_from_cache_and_rescoring_needs_no_model(tmp_path, monkeypatch):
    job = _job(tmp_path, benchmarks=[{"kind": "pope", "limit": 3}, {"kind": "chair", "n_images": 3,
                                                                       "max_new_tokens": 8}])
    first = run_job(job, progress=None)
    size = (tmp_path / "generations.jsonl").stat().st_size

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("clearsight.models.loader.load_model", no_model)
    again = run_job(job, progress=None)  # everything cached: no model loads
    assert (tmp_path / "generations.jsonl").stat().st_size == size
    rescored = score_from_cache(job)
    for a, b, c in zip(first.systems, again.systems, rescored.systems):
        assert a.pope == b.pope == c.pope and a.chair == b.chair == c.chair


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_killed_run_resumes_to_the_same_cache_and_metrics(tmp_path):
    job_data = {"systems": SYSTEMS[:2], "batch_size": 2,
                "benchmarks": [{"kind": "pope", "limit": 4}, {"kind": "chair", "n_images": 3, "max_new_tokens": 12}]}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for d in (whole, killed):
        d.mkdir()
        (d / "job.json").write_text(json.dumps({**job_data, "output": str(d)}))
    run_job(load_job(whole / "job.json"), progress=None)

    cmd = [sys.executable, "-m", "clearsight", "eval", "run", str(killed / "job.json"), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache_file = killed / "generations.jsonl"
    deadline = time.time() + 120
    while len(_lines(cache_file)) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(_lines(cache_file))
    assert 8 <= n_before < 30, "the run was not killed in the middle"  # 2 systems x (12 POPE + 3 CHAIR)
    with open(cache_file, "a") as f:  # the record being written when the process died
        f.write('{"key": "abc", "system": {"model": "x"}, "sample_')
    with pytest.warns(UserWarning, match="dropped truncated/invalid last line"):
        run_job(load_job(killed / "job.json"), progress=None)

    a = {json.loads(x)["key"]: json.loads(x)["output"] for x in _lines(whole / "generations.jsonl")}
    rows = [json.loads(x) for x in _lines(cache_file)]
    b = {r["key"]: r["output"] for r in rows}
    assert len(rows) == len(b) == len(a)  # nothing missing, nothing duplicated
    assert a == b
    ra = json.loads((whole / "results.json").read_text())["systems"]
    rb = json.loads((killed / "results.json").read_text())["systems"]
    assert ra == rb


def test_bad_input_errors_and_nothing_half_written(tmp_path, shapes_cache):
    with pytest.raises(EvalInputError, match="unknown split 'bogus'"):
        parse_job({"systems": [{}], "benchmarks": [{"kind": "pope", "splits": ["bogus"]}]})
    with pytest.raises(EvalInputError, match="unknown mitigation 'nope'"):
        parse_job({"systems": [{"mitigations": ["nope"]}], "benchmarks": [{"kind": "pope"}]})
    with pytest.raises(EvalInputError, match="crosscheck scores the CHAIR captions"):
        parse_job({"systems": [{}, {"name": "b"}], "benchmarks": [{"kind": "crosscheck"}]})
    with pytest.raises(EvalInputError, match="both named 'none'"):
        parse_job({"systems": [{}, {}], "benchmarks": [{"kind": "pope"}]})
    bad = tmp_path / "job.toml"
    bad.write_text("systems = [\n")
    with pytest.raises(EvalInputError, match="is not valid TOML"):
        load_job(bad)
    # an empty POPE file: a one-line error, and no results written
    empty = tmp_path / "coco_pope_random.json"
    empty.write_text("")
    out = tmp_path / "out"
    job = parse_job({"systems": [{"model": TINY}], "output": str(out),
                     "benchmarks": [{"kind": "pope", "data": None, "files": {"random": str(empty)},
                                     "splits": ["random"]}]})
    with pytest.raises(EvalInputError):
        run_job(job, progress=None)
    assert not (out / "results.json").exists()
    # a POPE file naming an image that is not there
    qfile = tmp_path / "coco_pope_popular.json"
    qfile.write_text(json.dumps({"question_id": 1, "image": "missing.png", "text": "Is there a cat?",
                                 "label": "yes"}) + "\n")
    job = parse_job({"systems": [{"model": TINY}], "output": str(out),
                     "benchmarks": [{"kind": "pope", "data": None, "files": {"popular": str(qfile)},
                                     "image_dir": str(tmp_path), "splits": ["popular"]}]})
    with pytest.raises(EvalInputError, match="missing.png"):
        run_job(job, progress=None)
    assert not (out / "results.json").exists()


def test_job_files_in_three_formats(tmp_path):
    data = {"systems": [{"name": "a"}], "benchmarks": [{"kind": "pope", "limit": 2}], "output": "x"}
    (tmp_path / "j.json").write_text(json.dumps(data))
    (tmp_path / "j.yaml").write_text("systems:\n  - name: a\nbenchmarks:\n  - kind: pope\n    limit: 2\noutput: x\n")
    (tmp_path / "j.toml").write_text(
        'output = "x"\n[[systems]]\nname = "a"\n[[benchmarks]]\nkind = "pope"\nlimit = 2\n')
    jobs = [load_job(tmp_path / f"j.{ext}") for ext in ("json", "yaml", "toml")]
    assert jobs[0] == jobs[1] == jobs[2]


def test_cli_eval_and_report(tmp_path, capsys):
    from clearsight.cli import main

    out = tmp_path / "pope"
    rc = main(["eval", "pope", "--limit", "2", "--output", str(out), "--system", "none", "--no-progress"])
    assert rc == 0
    assert "## POPE" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "| none |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not an eval output folder" in capsys.readouterr().err


def test_pope_from_lmms_lab_parquet(tmp_path):
    """The parquet layout (images embedded) runs through the same runner; images land beside the results."""
    import io

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from tinyworld import make_image

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        make_image(seed).save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({
        "question_id": ["1", "2", "3", "4"],
        "question": ["Is there a cat in the image?", "Is there a dog in the image?",
                     "Is there a car in the image?", "Is there a bus in the image?"],
        "answer": ["yes", "no", "no", "yes"],
        "image_source": ["img_a", "img_a", "img_b", "img_b"],
        "image": [{"bytes": png(i // 2), "path": None} for i in range(4)],
        "category": ["random", "random", "popular", "popular"],
    })
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    job = parse_job({"systems": [{"model": TINY}], "output": str(out),
                     "benchmarks": [{"kind": "pope", "data": None, "parquet": [str(path)],
                                     "splits": ["random", "popular"]}]})
    results = run_job(job, progress=None)
    assert {s: m.n for s, m in results.systems[0].pope.splits.items()} == {"random": 2, "popular": 2}
    assert sorted(p.name for p in (out / "pope_images").iterdir()) == ["img_a", "img_b"]
    assert json.loads((out / "results.json").read_text())["data_files"][0]["layout"] == "lmms-lab-parquet"
    bad = parse_job({"systems": [{"model": TINY}], "output": str(out),
                     "benchmarks": [{"kind": "pope", "data": None, "parquet": [str(path)],
                                     "splits": ["adversarial"]}]})
    with pytest.raises(EvalInputError, match="no questions of split 'adversarial'"):
        run_job(bad, progress=None)


@pytest.mark.parametrize("scorer", ["judge", "implicit"])
def test_crosscheck_judge_and_implicit_scorers(tmp_path, scorer, monkeypatch):
    from clearsight.evals.executor import LocalExecutor
    from clearsight.evals.metrics.crosscheck import split_sentences

    real_generate = LocalExecutor.generate_tasks  # the checks are a second round of work through the executor

    def answers_no(self, tasks, on_result):
        """The captions are generated for real; every sentence check is answered "No"."""
        def patched(task, record):
            if "sentence" in task.item.prompt.lower():
                record["output"] = "No"
            on_result(task, record)

        real_generate(self, tasks, patched)

    monkeypatch.setattr(LocalExecutor, "generate_tasks", answers_no)
    job = _job(tmp_path, systems=SYSTEMS[:2],
               benchmarks=[{"kind": "chair", "n_images": 3, "max_new_tokens": 24},
                           {"kind": "crosscheck", "scorer": scorer}])
    results = run_job(job, progress=None)
    cc = results.crosscheck
    assert cc.scorer.startswith(scorer) and set(cc.scores) == {"base", "sampled"}
    cache = GenerationCache(tmp_path / "generations.jsonl")
    for system in ("base", "sampled"):
        captions = [r["output"] for r in cache if r["system_name"] == system]
        assert all(isinstance(r["system"], dict) and "decode" in r["system"] for r in cache)
        assert cc.n_sentences[system] == sum(len(split_sentences(c)) for c in captions)
        # every sentence score is 0, 0.5 or 1, averaged over evidence systems and sentences
        assert 0.0 <= cc.scores[system] <= 1.0
        # "No" to every check: the judge ("is it supported?") scores each sentence 1, the implicit check
        # ("does it contain an error?") 0 (SelfCheckGPT prompt / CrossCheck implicit mapping)
        assert cc.scores[system] == (1.0 if scorer == "judge" else 0.0)


def test_example_job_file_is_valid():
    job = load_job(Path(__file__).resolve().parents[2] / "examples" / "shapes_eval.toml")
    assert [s.label for s in job.systems] == ["none", "var+vhr", "vcd (sampled)"]
    assert job.systems[2].decode_for(16).do_sample


def test_model_identity_follows_the_weights(tmp_path, monkeypatch):
    """A cache entry is reused only for the same weights: a retrained shipped checkpoint (same version)
    or a local folder whose weights changed gets a new identity; code-built builtins go by the version."""
    import clearsight.models.shipped as shipped
    from clearsight.evals.job import SystemSpec
    from clearsight.evals.runner import model_identity

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    monkeypatch.setattr(shipped, "shipped_path", lambda name: folder)  # every shipped checkpoint reads this folder
    shipped_before = model_identity(SystemSpec(model="builtin:shapes-llava"))
    local_before = model_identity(SystemSpec(model=str(folder)))
    (folder / "model.safetensors").write_bytes(b"\x01" * 64)  # same size, new weights
    os.utime(folder / "model.safetensors", ns=(1, 10**18))  # a new modification time, whatever the clock
    assert model_identity(SystemSpec(model="builtin:shapes-llava")) != shipped_before
    (folder / "model.safetensors").write_bytes(b"\x01" * 65)
    assert model_identity(SystemSpec(model=str(folder))) != local_before
    assert model_identity(SystemSpec(model="builtin:tiny-llava")).startswith("builtin:tiny-llava@clearsight-")
    # the organism is shipped weights too: keyed by their contents, not the version
    assert model_identity(SystemSpec(model="builtin:shapes-organism")) == \
        model_identity(SystemSpec(model="builtin:shapes-llava")).replace("shapes-llava", "shapes-organism")


def test_statistics_and_partner_rows_are_recomputed_from_the_cache_alone(tmp_path, monkeypatch):
    """Issue 16: `clearsight report DIR` recomputes every CI, p-value and verdict from the cache, with no
    model, and gets the same numbers; the printed verdict is the one results.json supports."""
    from clearsight.cli import main
    from clearsight.evals.report import EvalResults
    from clearsight.evals.verdict import render_verdict

    job = parse_job({"systems": [{"name": "none", "model": TINY},
                                 {"name": "other", "model": "builtin:tiny-llava-next"}],
                     "benchmarks": [{"kind": "pope", "limit": 4, "partner": 3},
                                    {"kind": "chair", "n_images": 3, "max_new_tokens": 8}],
                     "output": str(tmp_path), "batch_size": 4, "stats": {"seed": 7, "resamples": 300}})
    first = run_job(job, progress=None)
    st = first.stats
    assert st.baseline == "none" and st.seed == 7 and st.resamples == 300
    metrics = {(d.benchmark, d.metric, d.split) for d in st.differences}
    assert {("pope", "accuracy", "random"), ("pope", "f1", "adversarial"), ("pope", "partner_yes", "partner"),
            ("pope", "present_yes", "partner"), ("chair", "chair_i", None), ("chair", "partner_share", None)} <= metrics
    assert all(d.system == "other" and d.low <= d.estimate <= d.high for d in st.differences if d.low is not None)
    assert first.systems[0].partner.n["partner"] >= 3
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stats"]["seed"] == 7 and data["stats"]["resamples"] == 300

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("clearsight.models.loader.load_model", no_model)
    (tmp_path / "results.json").unlink()
    assert main(["report", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["stats"] == data["stats"]
    assert [s["partner"] for s in again["systems"]] == [s["partner"] for s in data["systems"]]
    verdict = render_verdict(EvalResults.model_validate(again))
    assert verdict and verdict in (tmp_path / "report.md").read_text()


def test_two_benchmarks_of_one_kind_need_names_and_keep_apart(tmp_path):
    """Two POPE entries: refused unnamed; named, their sample ids, results and statistics stay apart."""
    with pytest.raises(EvalInputError, match="two benchmarks are both named 'pope'"):
        parse_job({"systems": [{}], "benchmarks": [{"kind": "pope"}, {"kind": "pope", "splits": ["random"]}]})
    job = parse_job({"systems": [{"name": "none", "model": TINY}], "output": str(tmp_path),
                     "benchmarks": [{"kind": "pope", "limit": 2, "splits": ["random"]},
                                    {"kind": "pope", "name": "pope-strict", "limit": 3, "splits": ["random"],
                                     "parser": "strict"}]})
    results = run_job(job, progress=None)
    s = results.systems[0]
    assert s.pope.splits["random"].n == 2 and s["pope-strict"].splits["random"].n == 3
    assert s["pope-strict"].parser == "strict"
    assert {f.benchmark for f in results.stats.figures} == {"pope", "pope-strict"}
    ids = {r["sample_id"].split("/")[0] for r in GenerationCache(tmp_path / "generations.jsonl")}
    assert ids == {"pope", "pope-strict"}
    md = (tmp_path / "report.md").read_text()
    assert "## POPE (parser: `pope`)" in md and "## POPE `pope-strict` (parser: `strict`)" in md
