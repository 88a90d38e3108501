"""The HTTP API as a FastAPI app, built around injectable backends (``build_app``).

Under Ray Serve the gateway deployment builds it with ``RemoteBackend``s (one per model deployment); tests
and ``benchmarks/serve_load.py`` build it with ``EngineBackend``s and call it in-process (``TestClient``).

Every error is a 4xx (or a 429 / 503 to retry) in OpenAI's error shape,
``{"error": {"message", "type", "param", "code"}}``, naming the field; a 500 says only "internal error"
(the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clearsight.decoding.generate import as_decode
from clearsight.errors import InputError
from clearsight.mitigations import describe_mitigations, parse_mitigations
from clearsight.workers.backend import Backend
from clearsight.workers.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    GenerateRequest,
    ImagePart,
    Limits,
    ServeSettings,
    TextPart,
    unsupported_fields,
)

log = logging.getLogger("clearsight.workers")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class APIError(Exception):
    """An error answer: status, one-line message naming the field, the field, a machine code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None and status in (429, 503) else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------- images


def decode_image(url: str, field: str, limits: Limits, allow: tuple[str, ...] = ()) -> Image.Image:
    """A checked RGB image from a data URL (or an allow-listed URL); APIError 400 naming ``field`` otherwise.

    The byte limit is checked on the base64 text before decoding, the pixel limit on the header before
    the pixels are decoded (decompression bombs).
    """
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise APIError(400, f"{field}: a data URL must be base64: data:image/png;base64,<data>", field,
                           "invalid_image")
        if len(data) * 3 // 4 > limits.max_image_bytes + 3:
            raise APIError(400, f"{field}: the image is about {len(data) * 3 // 4:,} bytes, more than the limit of "
                           f"{limits.max_image_bytes:,}: send a smaller image", field, "image_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{field}: the data URL is not valid base64", field, "invalid_image") from None
    else:
        raw = _fetch_allowed(url, field, limits, allow)
    if len(raw) > limits.max_image_bytes:
        raise APIError(400, f"{field}: the image is {len(raw):,} bytes, more than the limit of "
                       f"{limits.max_image_bytes:,}: send a smaller image", field, "image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=_IMAGE_FORMATS) as im:  # reads the header only
                w, h = im.size
                if w <= 0 or h <= 0:
                    raise APIError(400, f"{field}: the image is {w} x {h} pixels, empty", field, "invalid_image")
                if w * h > limits.max_image_pixels:
                    raise APIError(400, f"{field}: the image is {w} x {h} pixels, more than the limit of "
                                   f"{limits.max_image_pixels:,} pixels: downscale it", field, "image_too_large")
                return im.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(400, f"{field}: the image has more pixels than the limit of {limits.max_image_pixels:,}: "
                       "downscale it", field, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise APIError(400, f"{field}: not an image this server reads ({', '.join(_IMAGE_FORMATS)}; "
                       f"{exc.__class__.__name__})", field, "invalid_image") from None


def _fetch_allowed(url: str, field: str, limits: Limits, allow: tuple[str, ...]) -> bytes:
    """Read an image URL that the allow-list names (off by default: no server-side fetch)."""
    if not any(url.startswith(prefix) for prefix in allow):
        raise APIError(400, f"{field}: only data URLs (data:image/png;base64,...) are accepted; this server does not "
                       "fetch http(s) or file URLs unless its image URL allow-list names them", field,
                       "image_url_not_allowed")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path)).resolve()
        # the resolved path must still lie under an allowed folder (no ../ or symlink escape)
        roots = [Path(unquote(urlparse(p).path)).resolve() for p in allow if p.startswith("file://")]
        if not any(path == r or r in path.parents for r in roots) or not path.is_file():
            raise APIError(400, f"{field}: {url} is not a file under an allowed folder", field, "image_url_not_allowed")
        if path.stat().st_size > limits.max_image_bytes:
            raise APIError(400, f"{field}: the image is more than {limits.max_image_bytes:,} bytes", field,
                           "image_too_large")
        return path.read_bytes()
    if parsed.scheme in ("http", "https"):
        import httpx2 as httpx

        try:
            with httpx.stream("GET", url, timeout=10.0, follow_redirects=False) as r:
                if r.status_code != 200:
                    raise APIError(400, f"{field}: fetching the image gave HTTP {r.status_code}", field,
                                   "image_fetch_failed")
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > limits.max_image_bytes:
                        raise APIError(400, f"{field}: the image is more than {limits.max_image_bytes:,} bytes",
                                       field, "image_too_large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise APIError(400, f"{field}: fetching the image failed ({exc.__class__.__name__})", field,
                           "image_fetch_failed") from None
    raise APIError(400, f"{field}: unsupported URL scheme {parsed.scheme!r}", field, "image_url_not_allowed")


# ---------------------------------------------------------------------------------------------- requests


def chat_prompt(messages: list[ChatMessage], limits: Limits) -> tuple[str, str | None, str | None]:
    """(prompt, image URL or None, the image's field) of a chat. One user turn (after optional system
    messages) is its text; a longer conversation is flattened to ``Role: text`` lines (the model's chat template
    is applied to the result, as to any prompt)."""
    if len(messages) > limits.max_messages:
        raise APIError(400, f"messages: {len(messages)} messages, more than the limit of {limits.max_messages}",
                       "messages", "too_many_messages")
    images: list[tuple[str, str]] = []
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        texts = []
        if isinstance(m.content, str):
            texts.append(m.content)
        elif m.content is not None:
            for j, part in enumerate(m.content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif isinstance(part, ImagePart):
                    if m.role != "user":
                        raise APIError(400, f"messages.{i}.content.{j}: images are accepted in user messages only",
                                       f"messages.{i}.content.{j}", "invalid_image")
                    images.append((part.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
        turns.append(("system" if m.role == "developer" else m.role, "\n".join(t for t in texts if t)))
    if len(images) > limits.max_images:
        raise APIError(400, f"messages: {len(images)} images, more than the limit of {limits.max_images} per request",
                       "messages", "too_many_images")
    if turns[-1][0] != "user":
        raise APIError(400, "messages: the last message must be the user's", "messages", "invalid_messages")
    system = [t for r, t in turns if r == "system" and t]
    rest = [(r, t) for r, t in turns if r != "system"]
    if len(rest) == 1:
        prompt = "\n\n".join([*system, rest[0][1]]) if rest[0][1] else ""
    else:
        prompt = "\n".join(f"{r.capitalize()}: {t}" for r, t in turns if t)
    if not prompt.strip():
        raise APIError(400, "messages: the user message has no text: give the question or instruction",
                       "messages", "empty_prompt")
    url, field = images[0] if images else (None, None)
    return prompt, url, field


def check_mitigations(specs: Any, limits: Limits, field: str = "mitigations") -> list[Any] | None:
    """The specs as given (validated here, parsed again by the worker), or None."""
    if specs is None:
        return None
    specs = [specs] if isinstance(specs, str) else list(specs)
    if len(specs) > limits.max_mitigations:
        raise APIError(400, f"{field}: {len(specs)} mitigations, more than the limit of {limits.max_mitigations}",
                       field, "too_many_mitigations")
    try:
        parse_mitigations(specs)
    except (InputError, ValueError) as exc:
        raise APIError(400, f"{field}: {str(exc).splitlines()[0]}", field, "invalid_mitigation") from None
    except Exception as exc:  # noqa: BLE001 - a spec of the wrong type (a number, a nested list, ...)
        raise APIError(400, f"{field}: not a mitigation spec ({exc.__class__.__name__}): give names like 'var' or "
                       "'vcd:alpha=1', or objects like {'name': 'pai'}", field, "invalid_mitigation") from None
    return specs


def checked_decode(fields: dict[str, Any], limits: Limits, field: str) -> dict[str, Any]:
    n = fields.get("max_new_tokens")
    if isinstance(n, int) and not isinstance(n, bool) and n > limits.max_tokens:
        raise APIError(400, f"{field}: {n} new tokens asked, more than this server's limit of {limits.max_tokens}",
                       field, "max_tokens_too_large")
    stop = fields.get("stop") or ()
    if isinstance(stop, list | tuple) and len(stop) > limits.max_stop:
        raise APIError(400, f"stop: {len(stop)} stop strings, more than the limit of {limits.max_stop}", "stop",
                       "too_many_stop")
    try:
        return as_decode(fields).model_dump()
    except InputError as exc:
        raise APIError(400, str(exc).replace("decode: ", f"{field}: ", 1), field, "invalid_decode") from None


def chat_decode(req: ChatCompletionRequest, limits: Limits) -> dict[str, Any]:
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ: give one of them", "max_tokens",
                       "invalid_decode")
    n = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    sample = bool(req.temperature)  # 0 or omitted: greedy (clearsight's default; OpenAI's default is 1)
    fields: dict[str, Any] = {"max_new_tokens": n, "do_sample": sample, "ignore_eos": req.ignore_eos}
    if sample:
        fields["temperature"] = req.temperature
        if req.top_p is not None:
            fields["top_p"] = req.top_p
    if req.seed is not None:
        fields["seed"] = req.seed
    if req.stop is not None:
        fields["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    spec = checked_decode(fields, limits, field)
    return spec


# ---------------------------------------------------------------------------------------------- the app


def build_app(backends: Mapping[str, Backend], settings: ServeSettings | None = None) -> Guard:
    """The API over ``backends`` (public model name -> Backend)."""
    settings = settings or ServeSettings()
    limits = settings.limits
    app = FastAPI(title="clearsight", version="1", description="OpenAI-compatible chat completions with "
                  "hallucination mitigations, and clearsight's native generate endpoint.")
    app.state.backends = dict(backends)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, settings.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [] if first.get("type") == "json_invalid" else [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field: remove it (see GET /openapi.json for the accepted fields)"
        if first.get("type") in ("json_invalid", "model_attributes_type") or not loc:
            msg = f"the body is not a valid JSON request ({msg})"
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        return error_response(400, f"{param}: {msg}{more}" if param else msg + more, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal error (see the server log)", None, "internal_error")

    def backend_of(name: str) -> Backend:
        backend = app.state.backends.get(name)
        if backend is None:
            raise APIError(404, f"model: {name!r} is not served here; served: {', '.join(sorted(app.state.backends))}"
                           " (GET /v1/models)", "model", "model_not_found")
        return backend

    async def start(backend: Backend, payload: dict[str, Any]) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
        """The first event of a request (an error event raises APIError) and the stream of the rest."""
        events = backend.stream(payload).__aiter__()
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise APIError(503, "the model worker ended the request without an answer: retry", None,
                           "worker_unavailable") from None
        if first["type"] == "error":
            raise APIError(first["status"], first["message"], first.get("param"), first.get("code"))
        return first, events

    async def collect(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
        try:
            async for ev in events:
                if ev["type"] == "done":
                    return ev
                if ev["type"] == "error":
                    raise APIError(ev["status"], ev["message"], ev.get("param"), ev.get("code"))
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        raise APIError(503, "the model worker ended the request without an answer: retry", None, "worker_unavailable")

    @app.get("/healthz", summary="liveness (no auth)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(app.state.backends)}

    @app.get("/v1/models", summary="the models served, with their family and the mitigations they accept")
    async def models() -> dict[str, Any]:
        data = []
        for name, backend in sorted(app.state.backends.items()):
            info = await backend.describe()
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "clearsight", **info})
        return {"object": "list", "data": data}

    @app.get("/v1/mitigations", summary="every mitigation with its parameters and defaults")
    async def mitigations() -> dict[str, Any]:
        return {"object": "list", "data": json.loads(json.dumps(describe_mitigations(), default=str))}

    @app.post("/v1/chat/completions", summary="OpenAI chat completions (text + one image as a data URL)")
    async def chat(req: ChatCompletionRequest) -> Any:
        for param, why in unsupported_fields(req):
            raise APIError(400, f"{param}: {why}", param, "unsupported_parameter")
        backend = backend_of(req.model)
        prompt, url, field = chat_prompt(req.messages, limits)
        mits = check_mitigations(req.mitigations, limits)
        decode = chat_decode(req, limits)
        image = None if url is None else await asyncio.to_thread(
            decode_image, url, field or "image_url", limits, settings.image_url_allow)
        payload = {"prompt": prompt, "image": image, "mitigations": mits if mits is not None else [],
                   "decode": decode}
        first, events = await start(backend, payload)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = first.get("prompt_tokens", 0)
        if not req.stream:
            done = await collect(events)
            result = done["result"]
            n_out = len(result["token_ids"])
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                 "finish_reason": _FINISH.get(result["finish_reason"], "stop"), "logprobs": None}],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                              "total_tokens": n_prompt + n_out},
                    "mitigations": result["mitigations"]}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return _data(body)

        def on_token(ev: dict[str, Any]) -> list[str]:
            return [chunk({"content": ev["text"]})] if ev["text"] else []

        def on_done(ev: dict[str, Any]) -> list[str]:
            result = ev["result"]
            out = [chunk({"content": ev["text"]})] if ev.get("text") else []
            out.append(chunk({}, _FINISH.get(result["finish_reason"], "stop")))
            if include_usage:
                n_out = len(result["token_ids"])
                out.append(_data({"id": rid, "object": "chat.completion.chunk", "created": created,
                                  "model": req.model, "choices": [],
                                  "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                            "total_tokens": n_prompt + n_out}}))
            return out

        return _sse(events, on_token, on_done, first=chunk({"role": "assistant", "content": ""}))

    @app.post("/v1/generate", summary="native: one request as the Engine takes it; token ids, timings, statistics")
    async def generate(req: GenerateRequest) -> Any:
        backend = backend_of(req.model)
        mits = check_mitigations(req.mitigations, limits)
        decode = checked_decode(dict(req.decode or {}), limits, "decode")
        image = None if req.image is None else await asyncio.to_thread(
            decode_image, req.image, "image", limits, settings.image_url_allow)
        payload = {"prompt": req.prompt, "image": image, "mitigations": mits, "decode": decode, "id": req.id,
                   "seed": req.seed, "backend": req.backend,
                   "stats": None if req.stats is None else req.stats.model_dump()}
        first, events = await start(backend, payload)
        n_prompt = first.get("prompt_tokens", 0)
        if not req.stream:
            done = await collect(events)
            return {**done["result"], "model": req.model, "usage": {"prompt_tokens": n_prompt,
                    "completion_tokens": len(done["result"]["token_ids"])}}

        def on_token(ev: dict[str, Any]) -> list[str]:
            return [_data({"token_id": ev["token_id"], "text": ev["text"]})]

        def on_done(ev: dict[str, Any]) -> list[str]:
            n_out = len(ev["result"]["token_ids"])
            body = {**ev["result"], "model": req.model,
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out}}
            return [_data({"token_id": ev["token_id"], "text": ev["text"], "result": body})]

        return _sse(events, on_token, on_done)

    return Guard(app, settings)


class Guard:
    """ASGI middleware in front of the app: the bearer token (every route but /healthz) and the body limit.

    The body is read here, up to the limit, before the app sees it, so an oversized body is a 413 however it
    is sent (with or without Content-Length).
    """

    def __init__(self, app: FastAPI, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings
        self._key = settings.api_key.encode() if settings.api_key else None
        self.state = app.state  # the FastAPI app's state (backends), for whoever holds the guarded app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._key is not None and scope.get("path") != "/healthz":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            # constant time in the key: no timing oracle on how much of a guessed key was right
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                await _send(scope, send, error_response(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", None,
                    "invalid_api_key"))
                return
        limit = self.settings.limits.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"the request body is more than the limit of {limit:,} bytes: send a smaller "
                                 "image or prompt", None, "body_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send(scope, send, too_big)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _send(scope, send, too_big)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _sse(events: Any, on_token: Callable[[dict[str, Any]], list[str]], on_done: Callable[[dict[str, Any]], list[str]],
         first: str | None = None) -> StreamingResponse:
    """Server-sent events of one request: ``first``, its token and done events as the route renders them, an
    error as OpenAI's error body, then ``[DONE]``; the event stream is closed however the client leaves."""

    async def body() -> AsyncIterator[str]:
        if first is not None:
            yield first
        try:
            async for ev in events:
                if ev["type"] == "token":
                    for line in on_token(ev):
                        yield line
                elif ev["type"] == "done":
                    for line in on_done(ev):
                        yield line
                    break
                elif ev["type"] == "error":
                    yield _data(error_body(ev["status"], ev["message"], ev.get("param"), ev.get("code")))
                    break
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _send(scope: dict[str, Any], send: Any, response: JSONResponse) -> None:
    await response(scope, _no_receive, send)


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}
