"""The `eval chair` / `eval crosscheck` CLIs and their options, and `--dtype` / `--device` (issue 22)."""

from __future__ import annotations

import json

import pytest
import torch

import clearsight.models.loader as loader
from clearsight.cli import main

TINY = "builtin:tiny-llava"

pytestmark = pytest.mark.usefixtures("shapes_cache")  # tests/evals/conftest.py: one world per session


def test_eval_chair_cli_options_reach_the_job(tmp_path, capsys):
    out = tmp_path / "chair"
    argv = ["eval", "chair", "--model", TINY, "--n-images", "2", "--image-seed", "3", "--max-new-tokens", "5",
            "--system", "none", "--system", "v=vcd:alpha=2", "--sample", "--temperature", "1.3", "--top-p", "0.9",
            "--seed", "4", "--dtype", "float32", "--batch-size", "3", "--output", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "CHAIR" in printed and str(out.resolve()) in printed
    job = json.loads((out / "job.json").read_text())
    [bench] = job["benchmarks"]
    assert (bench["kind"], bench["n_images"], bench["seed"], bench["max_new_tokens"]) == ("chair", 2, 3, 5)
    assert job["batch_size"] == 3
    assert [s["name"] or "none" for s in job["systems"]] == ["none", "v"]
    for s in job["systems"]:
        assert s["model"] == TINY and s["dtype"] == "float32"
        assert s["decode"] == {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 4}
    assert job["systems"][1]["mitigations"] == ["vcd:alpha=2"]
    results = json.loads((out / "results.json").read_text())
    assert len(results["chair_image_ids"]) == 2
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["n_tokens"] <= 5 for r in records)  # 2 systems x 2 images


def test_eval_crosscheck_cli_ranks_the_systems(tmp_path, capsys):
    out = tmp_path / "cc"
    argv = ["eval", "crosscheck", "--model", TINY, "--n-images", "2", "--max-new-tokens", "4", "--system", "none",
            "--system", "m3id", "--scorer", "implicit", "--output", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    job = json.loads((out / "job.json").read_text())
    assert [b["kind"] for b in job["benchmarks"]] == ["chair", "crosscheck"]
    assert job["benchmarks"][1]["scorer"] == "implicit"
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["crosscheck"]["ranking"]) == ["m3id", "none"]
    assert "CrossCheck" in capsys.readouterr().out


def test_dtype_and_device_flags_load_the_model_so(monkeypatch, capsys):
    loaded = []
    real = loader.load_model

    def spy(spec, *a, **k):
        lvlm = real(spec, *a, **k)
        loaded.append((spec, lvlm))
        return lvlm

    monkeypatch.setattr(loader, "load_model", spy)
    assert main(["generate", "--model", TINY, "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "bfloat16",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    [(spec, lvlm)] = loaded
    assert (spec.dtype, spec.device) == ("bfloat16", "cpu")
    assert next(lvlm.model.parameters()).dtype == torch.bfloat16 and lvlm.device.type == "cpu"
    assert main(["generate", "--model", TINY, "--prompt", "hi", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "gpu0" in err[0]
