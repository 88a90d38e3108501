"""Schema-driven fuzzing of the OpenAPI schema (schemathesis): valid and invalid requests to every operation,
on the demo model's real Engine (new tokens capped at 2 so valid requests are cheap). Not one 5xx; every
error is OpenAI-shaped, with no stack trace."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from clearsight.workers.api import build_app
from clearsight.workers.backend import EngineBackend
from clearsight.workers.schemas import Limits, ServeSettings

EXAMPLES = 80  # per operation with a body and generation mode: 2 x 2 x 80 = 320 requests, plus the GETs


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_5xx_and_openai_shaped_errors(engine, mode):
    app = build_app({"shapes": EngineBackend(engine)},
                    ServeSettings(limits=Limits(max_tokens=2, default_max_tokens=2, max_prompt_tokens=256)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: Counter = Counter()
    with TestClient(app):
        for result in schema.get_all_operations():
            op = result.ok()
            if op.method.upper() != "POST" and mode == GenerationMode.NEGATIVE:
                continue  # no parameters, no body: nothing to make invalid
            examples = EXAMPLES if op.method.upper() == "POST" else 30

            @given(case=op.as_strategy(generation_mode=mode), served=st.booleans())
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case, served):
                if served and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                    case.body["model"] = "shapes"  # half the requests reach the model, not only the 404
                r = case.call()
                seen[(case.operation.path, r.status_code)] += 1
                assert r.status_code < 500, (case.body, r.text)
                assert "Traceback" not in r.text
                if r.status_code >= 400:
                    err = r.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text

            run()
    total = sum(seen.values())
    assert total >= 2 * EXAMPLES, seen  # both modes together: >= 320 generated requests
    # the fuzzing reached the model: some generations succeeded, some were refused by it
    if mode == GenerationMode.POSITIVE:
        assert seen[("/v1/chat/completions", 200)] + seen[("/v1/generate", 200)] > 0, seen
    print(mode, total, dict(seen))
