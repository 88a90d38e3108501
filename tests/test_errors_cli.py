"""Bad input gets one line naming the problem; the CLI prints it and exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from tinyworld import tiny

from clearsight import DecodeSpec, InputError, generate, load_model
from clearsight.cli import main
from clearsight.mitigations import parse_mitigation


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "missing.png", "--prompt", "x"], "file 'missing.png' does not exist"),
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "x", "-m", "nonexistent"], "unknown mitigation 'nonexistent': choose one of"),
        (["--prompt", "x", "-m", "none:alpha=1"], "mitigation 'none': alpha: unknown parameter"),
        (["--prompt", "x", "-m", "none:alpha"], "parameter 'alpha' is not key=value"),
        (["--prompt", "x", "--model", "builtin:nope"], "unknown builtin model 'nope'"),
        (["--prompt", "x", "--model", "./no/such/dir"], "model path './no/such/dir' does not exist"),
        (["--prompt", "x", "--model", "someorg/not-cached-model"], "not in the local HF cache"),
        (["--prompt", "x", "--model", "builtin:tiny-llama", "--image", "IMAGE"], "text-only model and cannot take"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens: Input should be greater than or equal to 1"),
        (["--prompt", "x", "--backend", "nope"], "unknown attention backend 'nope'"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p"),
    ],
)
def test_generate_errors_are_one_line(capsys, image_file, argv, message):
    argv = [str(image_file) if a == "IMAGE" else a for a in argv]
    rc, out, err = _cli(capsys, "generate", *argv)
    assert rc == 2
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_not_an_image_file(capsys, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    rc, _, err = _cli(capsys, "generate", "--image", str(bad), "--prompt", "x")
    assert rc == 2 and "is not an image PIL can read" in err
    rc, _, err = _cli(capsys, "generate", "--image", str(tmp_path), "--prompt", "x")
    assert rc == 2 and "is not a file" in err


def test_checkpoint_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="has no config.json"):
        load_model(str(tmp_path))


def test_python_api_errors():
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError, match="no requests"):
        generate(lvlm, [])
    with pytest.raises(InputError, match="prompt is empty"):
        generate(lvlm, [{"prompt": ""}])
    with pytest.raises(InputError, match="image must be a file path or a PIL image"):
        generate(lvlm, [{"prompt": "x", "image": 3}])
    with pytest.raises(InputError, match="unknown mitigation"):
        generate(lvlm, ["x"], ["bogus"])
    with pytest.raises(InputError, match="given twice"):
        parse_mitigation("none") and generate(lvlm, ["x"], ["none", "none"], DecodeSpec(max_new_tokens=1))


def test_saved_checkpoint_loads_through_the_hf_path(tmp_path):
    """A builtin saved with save_pretrained loads back from its folder and generates the same tokens."""
    lvlm = tiny("tiny-llava")
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.adapter.family == "llava"
    decode = DecodeSpec(max_new_tokens=6)
    assert generate(again, ["what is in the picture?"], decode=decode)[0].token_ids == \
        generate(lvlm, ["what is in the picture?"], decode=decode)[0].token_ids


def test_cli_generate_json_models_mitigations(capsys, image_file):
    rc, out, _ = _cli(capsys, "generate", "--image", str(image_file), "--prompt", "what is it?",
                      "--max-new-tokens", "4", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["finish_reason"] in ("length", "eos") and len(data["token_ids"]) <= 4
    assert data["backend"] == "torch" and data["decode"]["max_new_tokens"] == 4
    rc, out, _ = _cli(capsys, "models", "--json")
    names = [b["name"] for b in json.loads(out)["builtins"]]
    assert {"builtin:tiny-llava", "builtin:tiny-llava-next", "builtin:tiny-qwen2-vl"} <= set(names)
    rc, out, _ = _cli(capsys, "mitigations", "--json")
    assert "none" in [m["name"] for m in json.loads(out)]


def test_module_entry_point_and_version():
    out = subprocess.run([sys.executable, "-m", "clearsight", "--version"], capture_output=True, text=True)
    # the version installed from pyproject.toml (the project's one record of it)
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert out.returncode == 0 and out.stdout == f"clearsight {project['version']}\n", out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--prompt", "x", "--max-new-tokens", "abc"],
         "error: clearsight generate: argument --max-new-tokens: invalid int value: 'abc'"),
        (["generate"], "error: clearsight generate: the following arguments are required: --prompt"),
        (["bogus"], "error: clearsight: argument command: invalid choice: 'bogus'"),
        (["eval", "pope", "--limit", "x"], "error: clearsight eval pope: argument --limit: invalid int value"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, message):
    # argparse's own error() prints the usage block before the message: the project's shape is one line.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "usage:" not in err
