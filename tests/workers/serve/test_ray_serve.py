"""The Serve application for real: local Ray, the HTTP proxy on loopback, two model deployments (the demo
model twice: ``shapes`` on the torch backend, ``shapes-ref`` on the reference backend) behind the gateway,
with an API key. One session-scoped cluster (started once, torn down at the end); the in-process Engine is
the oracle. The replica-kill test runs last in this module: it replaces ``shapes``' replica."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from clearsight import DecodeSpec
from clearsight.workers.schemas import ServeSettings

from .servehelp import MODEL, T, chat_body

ray = pytest.importorskip("ray")
serve_app = pytest.importorskip("clearsight.workers.app")

KEY = "test-key-3f9a"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Describe the image.", "Is there a heart?", "What colour is the star?", "Is there a cross?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    config = serve_app.ServeConfig(
        models=[serve_app.ServedModel(name="shapes", source=MODEL, threads=1, cpus_per_replica=1),
                serve_app.ServedModel(name="shapes-ref", source=MODEL, backend="reference", threads=1,
                                      cpus_per_replica=1)],
        settings=ServeSettings(api_key=KEY))
    try:
        url = serve_app.start(config, host="127.0.0.1", port=free_port(), num_cpus=4)
        yield url
    finally:
        serve_app.stop()


def oracle(engine, image, prompt="Describe the image.", mitigations=(), backend=None, n=8):
    return engine.generate([{"prompt": prompt, "image": image}], list(mitigations), DecodeSpec(max_new_tokens=n),
                           backend=backend, timeout=T)[0].text


def test_openai_client_over_serve(server, engine, example_image, example_url):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    messages = chat_body("shapes", "Describe the image.", example_url)["messages"]
    for model, backend in (("shapes", None), ("shapes-ref", "reference")):
        want = oracle(engine, example_image, mitigations=["pai"], backend=backend)
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                             extra_body={"mitigations": ["pai"]})
        assert out.choices[0].message.content == want
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                                extra_body={"mitigations": ["pai"]})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_two_models_routed_by_name(server, example_url):
    models = httpx.get(server + "/v1/models", headers=AUTH, timeout=T).json()["data"]
    assert {m["id"]: m["backend"] for m in models} == {"shapes": "torch", "shapes-ref": "reference"}
    assert all(m["family"] == "llava" for m in models)
    for name, backend in (("shapes", "torch"), ("shapes-ref", "reference")):
        r = httpx.post(server + "/v1/generate", headers=AUTH, timeout=T,
                       json={"model": name, "prompt": "Is there a heart?", "image": example_url,
                             "decode": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        assert r.json()["backend"] == backend  # the replica that answered runs that model's backend
    r = httpx.post(server + "/v1/generate", headers=AUTH, json={"model": "nope", "prompt": "hi"}, timeout=T)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_auth_through_the_proxy(server):
    assert httpx.get(server + "/healthz", timeout=T).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server + "/v1/models", headers=headers, timeout=T)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    # bad input through the proxy: a 4xx in OpenAI's shape, never a 5xx
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=T,
                   json=chat_body("shapes", "hi", max_tokens=2, mitigations=["var:zz=1"]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "mitigations"


def test_bounded_load_64_requests_16_threads(server, engine, example_image, example_url):
    want = {p: oracle(engine, example_image, prompt=p, n=4) for p in PROMPTS}
    jobs = [(PROMPTS[i % len(PROMPTS)], ("shapes", "shapes-ref")[i % 2]) for i in range(64)]

    def one(job):
        prompt, model = job
        with httpx.Client(timeout=T) as http:
            r = http.post(server + "/v1/chat/completions", headers=AUTH,
                          json=chat_body(model, prompt, example_url, max_tokens=4))
        return prompt, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    errors = [(s, b) for _, s, b in results if s != 200]
    assert not errors, errors[:3]
    assert all(b["choices"][0]["message"]["content"] == want[p] for p, _, b in results)


def stream_and_kill(server: str, body: dict, pid: int) -> list[dict]:
    """Stream ``body``; SIGKILL ``pid`` once the first token is out (hundreds to go). The events received."""
    events: list[dict] = []
    with httpx.Client(timeout=T) as http, http.stream("POST", server + "/v1/generate", headers=AUTH, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 1:
                os.kill(pid, signal.SIGKILL)
    return events


def test_replica_killed_mid_run_is_replaced(server, engine, example_image, example_url):
    handle = ray.serve.get_deployment_handle(serve_app.deployment_name(0), app_name=serve_app.APP_NAME)
    pid = handle.pid.remote().result(timeout_s=T)
    long = {"model": "shapes", "prompt": "Describe the image.", "image": example_url,
            "decode": {"max_new_tokens": 400, "ignore_eos": True}}
    # a non-streamed request in flight on the replica when it dies
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, server + "/v1/generate", headers=AUTH, json=long, timeout=T)
        for _ in range(600):
            load = handle.stats.remote().result(timeout_s=T)
            if load["requests"] + load["waiting"] >= 1:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first request never reached the replica")
        events = stream_and_kill(server, {**long, "stream": True}, pid)
        answer = held.result(timeout=T)
    assert answer.status_code == 503 and answer.headers.get("Retry-After"), answer.text
    assert answer.json()["error"]["code"] == "worker_unavailable"
    # the request in flight ends with a clean, retryable error event (not a hang, not a 500 page)
    assert "result" not in events[-1]
    assert events[-1]["error"]["code"] == "worker_unavailable", events[-1]
    # Serve replaces the replica; requests succeed again (requests sent meanwhile wait for it or get a 503)
    want = oracle(engine, example_image, n=4)
    for _ in range(120):
        r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=T,
                       json=chat_body("shapes", "Describe the image.", example_url, max_tokens=4))
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    assert handle.pid.remote().result(timeout_s=T) != pid


def test_no_thread_left_behind():
    # the streaming clients' threads ended with their requests (the cluster itself is stopped by the fixture)
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
