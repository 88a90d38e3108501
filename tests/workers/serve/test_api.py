"""The HTTP API in-process (FastAPI's TestClient, no Ray) on the demo model's real Engine: the unmodified
``openai`` client and the native endpoint get what ``Engine.generate`` gives for the same request; every
limit and bad input is a 4xx in OpenAI's error shape naming the field."""

from __future__ import annotations

import base64

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from clearsight import DecodeSpec, StatsRequest
from clearsight.errors import EngineBusy
from clearsight.mitigations import describe_mitigations
from clearsight.workers import Client
from clearsight.workers.api import build_app
from clearsight.workers.backend import EngineBackend
from clearsight.workers.schemas import Limits, ServeSettings

from .servehelp import T, chat_body, data_url, png_header_only

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def http(engine):
    with TestClient(build_app({"shapes": EngineBackend(engine)})) as client:
        yield client


def oracle(engine, image, mitigations=(), **decode):
    return engine.generate([{"prompt": PROMPT, "image": image}], list(mitigations),
                           DecodeSpec(**{"max_new_tokens": 8, **decode}), timeout=T)[0]


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ------------------------------------------------------------------------------------------- the openai client


@pytest.mark.parametrize("mitigations", [[], ["pai"], ["vcd:alpha=1"]])
def test_openai_client_same_text_as_engine(http, engine, example_image, example_url, mitigations):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    body = chat_body("shapes", PROMPT, example_url)
    want = oracle(engine, example_image, mitigations)
    out = client.chat.completions.create(model="shapes", messages=body["messages"], max_tokens=8, temperature=0,
                                         extra_body={"mitigations": mitigations})
    assert out.choices[0].message.content == want.text
    assert out.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert out.usage.completion_tokens == len(want.token_ids)
    assert out.usage.prompt_tokens > 64  # the image alone is 8 x 8 tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="shapes", messages=body["messages"], max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"mitigations": mitigations}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_sampling_seed_stop_and_system_message(http, engine, example_image, example_url):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    body = chat_body("shapes", PROMPT, example_url)
    sampled = oracle(engine, example_image, do_sample=True, temperature=0.7, top_p=0.9, seed=5)
    out = client.chat.completions.create(model="shapes", messages=body["messages"], max_completion_tokens=8,
                                         temperature=0.7, top_p=0.9, seed=5)
    assert out.choices[0].message.content == sampled.text
    stopped = oracle(engine, example_image, stop=(","))
    out = client.chat.completions.create(model="shapes", messages=body["messages"], max_tokens=8, stop=[","])
    assert out.choices[0].message.content == stopped.text and out.choices[0].finish_reason == "stop"
    # a system message is put before the user's text, as one prompt
    with_system = engine.generate([{"prompt": "Be brief.\n\n" + PROMPT, "image": example_image}], (),
                                  DecodeSpec(max_new_tokens=8), timeout=T)[0]
    out = client.chat.completions.create(model="shapes", max_tokens=8,
                                         messages=[{"role": "system", "content": "Be brief."}, *body["messages"]])
    assert out.choices[0].message.content == with_system.text


def test_native_generate_token_ids_and_statistics(http, engine, example_image, example_url):
    stats = StatsRequest(segment_mass=True, last_row=True, layers=frozenset({1}))
    want = engine.generate([{"prompt": PROMPT, "image": example_image}], ["pai"], DecodeSpec(max_new_tokens=3),
                           stats=stats, timeout=T)[0]
    r = http.post("/v1/generate", json={"model": "shapes", "prompt": PROMPT, "image": example_url,
                                        "mitigations": ["pai"], "decode": {"max_new_tokens": 3},
                                        "stats": {"segment_mass": True, "last_row": True, "layers": [1]}})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["token_ids"] == want.token_ids and got["text"] == want.text
    assert got["mitigations"] == want.mitigations and got["backend"] == engine.backend
    assert set(got["timings"]) >= {"prefill_s", "decode_s", "latency_s"}
    mass = torch.tensor(got["stats"]["segment_mass"]["1"])
    torch.testing.assert_close(mass, want.stats["segment_mass"][1].float(), rtol=1e-5, atol=1e-6)
    assert len(got["stats"]["last_row"]["1"]) == len(want.stats["last_row"][1])
    assert got["stats"]["layout"]["image_spans"] == [list(s) for s in want.stats["layout"].image_spans]


def test_python_client_same_as_engine(http, engine, example_image):
    reqs = [{"prompt": PROMPT, "image": example_image}, {"prompt": "Is there a heart?", "image": example_image}]
    decode = DecodeSpec(max_new_tokens=6)
    want = engine.generate(reqs, ["pai"], decode, timeout=T)
    with Client("http://testserver", http_client=http) as client:
        got = client.generate(reqs, ["pai"], decode)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.text for g in got] == [w.text for w in want]
        events = list(client.stream(reqs, ["pai"], decode))
        engine_events = list(engine.stream(reqs, ["pai"], decode))
        for i in range(2):
            mine = [(e.token_id, e.text) for e in events if e.request == i]
            theirs = [(e.token_id, e.text) for e in engine_events if e.request == i]
            assert mine == theirs
            assert [e.finished for e in events if e.request == i][-1]
        stats = StatsRequest(segment_mass=True, layers=frozenset({2}))
        [r] = client.generate([reqs[0]], decode=DecodeSpec(max_new_tokens=2), stats=stats)
        [w] = engine.generate([reqs[0]], decode=DecodeSpec(max_new_tokens=2), stats=stats, timeout=T)
        torch.testing.assert_close(r.stats["segment_mass"][2], w.stats["segment_mass"][2].float())
        assert r.stats["layout"] == w.stats["layout"]


def test_listing_routes(http, engine):
    assert http.get("/healthz").json()["status"] == "ok"
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["shapes"]
    assert models[0]["family"] == engine.lvlm.adapter.family
    assert set(models[0]["mitigations"]) == {m["name"] for m in describe_mitigations()}
    served = {m["name"]: m for m in http.get("/v1/mitigations").json()["data"]}
    var = {p["name"]: p["default"] for p in served["var"]["parameters"]}
    expected = {p["name"]: p["default"] for p in next(m for m in describe_mitigations() if m["name"] == "var")
                ["parameters"]}
    assert var.keys() == expected.keys() and var["p"] == expected["p"]


# ------------------------------------------------------------------------------------------- auth


def test_auth_every_route_but_healthz(engine, example_url):
    app = build_app({"shapes": EngineBackend(engine)}, ServeSettings(api_key="s3cret"))
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 200
        for path in ("/v1/models", "/v1/mitigations", "/openapi.json"):
            assert_error(http.get(path), 401, code="invalid_api_key")
            assert_error(http.get(path, headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(http.get(path, headers={"Authorization": "Basic s3cret"}), 401)
            assert http.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert_error(http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT)), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http,
                          max_retries=0).models.list()
        assert openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=http).models.list()


# ------------------------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def tight(engine):
    limits = Limits(max_body_bytes=200_000, max_image_bytes=20_000, max_image_pixels=128 * 128, max_tokens=16,
                    default_max_tokens=4, max_stop=2, max_mitigations=2)
    app = build_app({"shapes": EngineBackend(engine, max_prompt_tokens=90)}, ServeSettings(limits=limits))
    with TestClient(app) as http:
        yield http


def test_limits_each_a_named_4xx(tight, example_url):
    def chat(**extra):
        return tight.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, example_url, **extra))

    assert chat(max_tokens=2).status_code == 200  # the example passes every limit
    # body size, with and without a Content-Length that says so
    assert_error(tight.post("/v1/chat/completions", json=chat_body("shapes", "x" * 300_000)), 413,
                 code="body_too_large")
    assert_error(tight.post("/v1/chat/completions", content=iter([b"{" + b" " * 250_000 + b"}"]),
                            headers={"content-type": "application/json"}), 413)
    # decoded image bytes
    noise = Image.frombytes("RGB", (120, 120), bytes((i * 7919) % 251 for i in range(120 * 120 * 3)))
    err = assert_error(tight.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, data_url(noise, "BMP"))),
                       400, code="image_too_large")
    assert err["param"] == "messages.0.content.1.image_url.url"
    # pixels, from the header (a 100000 x 100000 "bomb" of a few bytes)
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(100_000, 100_000)).decode()
    assert_error(tight.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, bomb)), 400,
                 code="image_too_large")
    assert_error(tight.post("/v1/chat/completions",
                            json=chat_body("shapes", PROMPT, data_url(Image.new("RGB", (200, 100))))), 400,
                 code="image_too_large")
    # image count
    body = chat_body("shapes", PROMPT, example_url)
    body["messages"][0]["content"].append(body["messages"][0]["content"][1])
    assert_error(tight.post("/v1/chat/completions", json=body), 400, "messages", "too_many_images")
    # prompt tokens (image tokens included)
    assert_error(chat(max_tokens=2, messages=[{"role": "user", "content": "word " * 100}]), 400, "messages",
                 "prompt_too_long")
    # max_tokens, stop strings, mitigations
    assert_error(chat(max_tokens=17), 400, "max_tokens", "max_tokens_too_large")
    assert_error(chat(max_completion_tokens=17), 400, "max_completion_tokens")
    assert_error(chat(stop=["a", "b", "c"]), 400, "stop")
    assert_error(chat(mitigations=["var", "pai", "vcd"]), 400, "mitigations", "too_many_mitigations")
    assert_error(chat(mitigations=["nope"]), 400, "mitigations", "invalid_mitigation")
    err = assert_error(chat(mitigations=["var:zz=1"]), 400, "mitigations", "invalid_mitigation")
    assert "zz" in err["message"]
    assert_error(chat(mitigations=[{"name": "vcd", "alpha": "many"}]), 400, "mitigations")
    # native endpoint: the same limits
    assert_error(tight.post("/v1/generate", json={"model": "shapes", "prompt": PROMPT, "image": bomb}), 400,
                 "image", "image_too_large")
    assert_error(tight.post("/v1/generate", json={"model": "shapes", "prompt": PROMPT,
                                                  "decode": {"max_new_tokens": 99}}), 400, "decode")
    assert_error(tight.post("/v1/generate", json={"model": "shapes", "prompt": PROMPT,
                                                  "decode": {"temperature": -1}}), 400, "decode")
    assert_error(tight.post("/v1/generate", json={"model": "shapes", "prompt": PROMPT, "backend": "nope"}), 400)


def test_bad_requests_each_a_named_400(http, example_url, tmp_path):
    def chat(**extra):
        return http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, example_url, **extra))

    assert_error(chat(n=2), 400, "n", "unsupported_parameter")
    assert_error(chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools")
    assert_error(chat(logprobs=True), 400, "logprobs")
    assert_error(chat(frequency_penalty=1.0), 400, "frequency_penalty")
    assert_error(chat(response_format={"type": "json_object"}), 400, "response_format")
    assert_error(chat(colour="blue"), 400, "colour")
    assert_error(chat(temperature=5), 400, "temperature")
    assert_error(http.post("/v1/chat/completions", json=chat_body("other", PROMPT)), 404, "model", "model_not_found")
    assert_error(chat(max_tokens=4, max_completion_tokens=5), 400, "max_tokens")
    assert_error(http.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}),
                 400)
    assert_error(http.post("/v1/chat/completions", json={"model": "shapes", "messages": []}), 400, "messages")
    assert_error(http.post("/v1/chat/completions", json={"model": "shapes", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}), 400, "messages")
    assert_error(http.post("/v1/chat/completions", json={"model": "shapes", "messages": [
        {"role": "user", "content": "   "}]}), 400, "messages", "empty_prompt")
    # images: data URLs only, unless allow-listed; what is sent must be an image
    for url in ("https://example.org/cat.png", f"file://{tmp_path}/x.png", "data:image/png,rawbytes"):
        assert_error(http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, url)), 400,
                     "messages.0.content.1.image_url.url")
    assert_error(http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, "data:image/png;base64,@@@")),
                 400, code="invalid_image")
    not_image = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    assert_error(http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, not_image)), 400,
                 code="invalid_image")
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.put("/v1/models"), 405)


def test_file_urls_only_under_an_allowed_folder(engine, example_image, tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    example_image.save(allowed / "a.png")
    example_image.save(tmp_path / "outside.png")
    app = build_app({"shapes": EngineBackend(engine)}, ServeSettings(image_url_allow=(f"file://{allowed}/",)))
    with TestClient(app) as http:
        ok = http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, f"file://{allowed}/a.png",
                                                              max_tokens=2))
        assert ok.status_code == 200, ok.text
        for url in (f"file://{allowed}/../outside.png", f"file://{tmp_path}/outside.png",
                    f"file://{allowed}/missing.png"):
            assert_error(http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, url)), 400,
                         code="image_url_not_allowed")


def test_queue_full_is_429_with_retry_after(engine):
    class BusyEngine:  # the real Engine's model, a full queue
        lvlm, backend = engine.lvlm, engine.backend

        def submit(self, *args, **kwargs):
            raise EngineBusy("the engine's queue is full (1 requests waiting): retry later")

    app = build_app({"shapes": EngineBackend(BusyEngine())}, ServeSettings(retry_after_s=2))
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, max_tokens=2))
        assert_error(r, 429, code="engine_busy")
        assert r.headers["Retry-After"] == "2"
        r = http.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, max_tokens=2, stream=True))
        assert_error(r, 429)  # before the stream starts: a status, not an event
        with pytest.raises(EngineBusy), Client("http://testserver", http_client=http) as client:
            client.generate(["hello"])


def test_http_urls_only_under_an_allowed_prefix(engine, example_image, tmp_path):
    from pydantic import ValidationError

    for prefix in ("https://images.example.org", "ftp://x/", "/data/"):  # a host prefix must end its host
        with pytest.raises(ValidationError, match="ending with a slash"):
            ServeSettings(image_url_allow=(prefix,))
    import functools
    import http.server
    import threading

    (tmp_path / "ok").mkdir()
    example_image.save(tmp_path / "ok" / "a.png")
    example_image.save(tmp_path / "b.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{site.server_address[1]}"
        app = build_app({"shapes": EngineBackend(engine)}, ServeSettings(image_url_allow=(f"{base}/ok/",)))
        try:
            with TestClient(app) as client:
                ok = client.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, f"{base}/ok/a.png",
                                                                        max_tokens=2))
                assert ok.status_code == 200, ok.text
                assert_error(client.post("/v1/chat/completions", json=chat_body("shapes", PROMPT, f"{base}/b.png")),
                             400, code="image_url_not_allowed")
                assert_error(client.post("/v1/chat/completions",
                                         json=chat_body("shapes", PROMPT, f"{base}/ok/missing.png")),
                             400, code="image_fetch_failed")
        finally:
            site.shutdown()
