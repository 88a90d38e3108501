"""The serving examples of README.md and docs/serving.md run: blocks fenced as ```bash serve and ```python serve
need a running server, so they run against one started here (the HTTP API over the demo model's Engine,
served by uvicorn on a free loopback port, no Ray: the examples test the API, test_ray_serve.py tests Serve).
Their ``http://127.0.0.1:8000`` is replaced by that server's URL."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time

import pytest
import uvicorn
from PIL import Image

from clearsight import DecodeSpec
from clearsight.config import DEFAULT_MODEL
from clearsight.workers.api import build_app
from clearsight.workers.backend import EngineBackend

from .servehelp import ROOT, T

DOCS = ("README.md", "docs/serving.md")
URL = "http://127.0.0.1:8000"


def blocks(lang: str) -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        out += [(doc, i, b) for i, b in enumerate(re.findall(rf"```{lang} serve\n(.*?)```", text, flags=re.S))]
    return out


PYTHON, BASH = blocks("python"), blocks("bash")


def test_the_docs_have_serving_examples():
    assert len([b for b in PYTHON if b[0] == "README.md"]) >= 2 and [b for b in BASH if b[0] == "README.md"]
    assert all(URL in code for _, _, code in PYTHON + BASH)


@pytest.fixture(scope="module")
def server_url(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app({DEFAULT_MODEL: EngineBackend(engine)})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + T
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the example server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(T)
    assert not thread.is_alive()


def _described(engine, mitigations: list[str]) -> str:
    """The in-process answer to the examples' chat request: "Describe the image." on docs/example.png, 16
    tokens."""
    image = Image.open(ROOT / "docs" / "example.png").convert("RGB")
    return engine.generate([{"prompt": "Describe the image.", "image": image}], mitigations,
                           DecodeSpec(max_new_tokens=16), timeout=T)[0].text


def _in_process(engine, code: str) -> list[str]:
    """What an example must print, computed by the in-process Engine (no HTTP) for the requests it makes: the
    texts of its ``generate`` and ``stream`` calls, found from the example's own prompts, mitigations and
    token budgets (an example this does not recognise fails the test rather than passing unchecked)."""
    image = Image.open(ROOT / "docs" / "example.png").convert("RGB")
    want = []
    if "chat.completions.create" in code:  # the OpenAI client: one VCD reply, then an unmitigated stream
        assert '"Describe the image."' in code and 'max_tokens=16' in code and '"vcd:alpha=1"' in code
        want += [_described(engine, ["vcd:alpha=1"]), _described(engine, [])]
    if "print(r.text, r.token_ids" in code:  # the native client: PAI on a question, 8 tokens, printed with its ids
        assert '"Is there a heart?"' in code and '["pai"]' in code and "max_new_tokens=8" in code
        [r] = engine.generate([{"prompt": "Is there a heart?", "image": image}], ["pai"],
                              DecodeSpec(max_new_tokens=8), timeout=T)
        want.append(f"{r.text} {r.token_ids}")
    if "server.stream(" in code:
        assert '["Describe the image."]' in code and "max_new_tokens=8" in code
        want.append(engine.generate(["Describe the image."], [], DecodeSpec(max_new_tokens=8), timeout=T)[0].text)
    assert want, "an example this test does not know how to check"
    return want


@pytest.mark.parametrize(("doc", "index", "code"), PYTHON, ids=[f"{d}#{i}" for d, i, _ in PYTHON])
def test_python_serving_examples_print_the_in_process_answers(doc, index, code, server_url, engine, monkeypatch,
                                                              capsys):
    monkeypatch.chdir(ROOT)
    exec(compile(code.replace(URL, server_url), f"{doc} python serve block {index}", "exec"), {})
    out = capsys.readouterr().out
    for text in _in_process(engine, code):  # each answer over HTTP is the Engine's own
        assert text and text in out, (text, out)


@pytest.mark.parametrize(("doc", "index", "code"), BASH, ids=[f"{d}#{i}" for d, i, _ in BASH])
def test_bash_serving_examples_answer_as_in_process(doc, index, code, server_url, engine):
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code.replace(URL, server_url)], cwd=ROOT,
                       capture_output=True, text=True, timeout=T)
    assert r.returncode == 0, r.stderr
    replies, rest = [], r.stdout.strip()
    while rest:  # the curl lines' JSON documents, one after another
        obj, end = json.JSONDecoder().raw_decode(rest)
        replies.append(obj)
        rest = rest[end:].strip()
    assert "builtin:shapes-llava" in [m["id"] for m in replies[0]["data"]]  # the model list
    [answer] = [o["choices"][0]["message"]["content"] for o in replies if o.get("object") == "chat.completion"]
    assert '"max_tokens": 16' in code and '"mitigations": ["vcd:alpha=1"]' in code and "Describe the image." in code
    assert answer == _described(engine, ["vcd:alpha=1"])  # the Engine's own VCD answer
