"""What the HTTP gateway talks to: one model, as an async stream of JSON-safe event dicts.

``EngineBackend`` owns (or is given) an ``Engine``; it runs in-process (tests, ``TestClient``) and inside
each Serve replica (``app.ModelWorker``). ``RemoteBackend`` reaches a replica through a Serve
``DeploymentHandle``. The gateway sees the same events from both:

- ``{"type": "start", "prompt_tokens": n}``: the request was accepted (it is queued in the Engine);
- ``{"type": "token", "token_id": i, "text": "..."}``: one token;
- ``{"type": "done", "token_id": i, "text": "...", "result": {...}, "prompt_tokens": n}``: the last token
  (as the Engine's last ``TokenEvent``) and the result (``GenerationResult.to_dict`` + JSON-safe statistics);
- ``{"type": "error", "status": 4xx/5xx, "message": "...", "param": ..., "code": ...}``: the end, failed.

Errors travel as events, not exceptions, so nothing depends on pickling exception classes across Ray and
the gateway can answer with a proper status before the first byte of a stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, is_dataclass
from typing import Any, Protocol

from clearsight.config import ModelSpec
from clearsight.engine import Engine
from clearsight.errors import ClearsightError, EngineBusy, EngineClosed, InputError
from clearsight.kernels.plan import StatsRequest
from clearsight.mitigations import REGISTRY

log = logging.getLogger("clearsight.workers")


class Backend(Protocol):
    """One model behind the gateway."""

    async def describe(self) -> dict[str, Any]: ...

    def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


def error_event(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message, "param": param, "code": code}


def jsonable_stats(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Engine's statistics (tensors, dataclasses, int keys) as plain JSON values (nested lists)."""
    if stats is None:
        return None

    def conv(v: Any) -> Any:
        if hasattr(v, "tolist"):
            return v.tolist()
        if is_dataclass(v) and not isinstance(v, type):
            return conv(asdict(v))
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        return v

    return conv(stats)


def _param_of(message: str) -> str | None:
    """The field an InputError names first ('decode: max_new_tokens: ...' -> 'decode')."""
    head = message.split(":", 1)[0].strip()
    return head if head and " " not in head else None


class EngineBackend:
    """One Engine as a Backend. ``model``: an Engine (shared, not closed here), or what ``Engine`` loads."""

    def __init__(self, model: Engine | ModelSpec | str, *, max_prompt_tokens: int | None = None,
                 **engine_kwargs: Any) -> None:
        self._owned = not hasattr(model, "submit")  # an Engine (or a stand-in) is shared, not closed here
        self.engine: Engine = model if not self._owned else Engine(model, **engine_kwargs)  # type: ignore[assignment]
        self.max_prompt_tokens = max_prompt_tokens

    async def describe(self) -> dict[str, Any]:
        lvlm = self.engine.lvlm
        return {"source": lvlm.spec.source, "family": lvlm.adapter.family, "backend": self.engine.backend,
                "max_context": lvlm.adapter.max_context, "mitigations": sorted(REGISTRY)}

    def prompt_tokens(self, prompt: str, image: Any) -> int:
        """The exact prompt length, image tokens expanded (the processor runs once, as the prefill will)."""
        adapter = self.engine.lvlm.adapter
        ids = adapter.encode([adapter.chat_prompt(prompt, image is not None)], [image])["input_ids"]
        return int(ids.shape[-1])

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one request (``payload``: prompt, image (PIL or None), mitigations, decode dict, stats dict,
        backend, seed, id); yields the events of the module docstring."""
        handle = None
        try:
            request = {"prompt": payload["prompt"], "image": payload.get("image"), "id": payload.get("id"),
                       "seed": payload.get("seed"), "mitigations": payload.get("mitigations")}
            stats = payload.get("stats")
            stats_req = None if not stats else StatsRequest(
                segment_mass=bool(stats.get("segment_mass")), last_row=bool(stats.get("last_row")),
                layers=None if stats.get("layers") is None else frozenset(stats["layers"]))
            try:
                n_prompt = await asyncio.to_thread(self.prompt_tokens, request["prompt"], request["image"])
            except ClearsightError:
                raise
            except Exception as exc:  # the processor refused the input (e.g. an image the family cannot take)
                raise InputError(f"the model's processor refused the request ({exc.__class__.__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            if self.max_prompt_tokens is not None and n_prompt > self.max_prompt_tokens:
                yield error_event(400, f"the prompt is {n_prompt} tokens (image tokens included), more than the "
                                  f"limit of {self.max_prompt_tokens}: shorten it", "messages", "prompt_too_long")
                return
            handle = self.engine.submit(request, (), payload.get("decode"), stats=stats_req,
                                        backend=payload.get("backend"))
            yield {"type": "start", "prompt_tokens": n_prompt}
            async for ev in handle:
                if ev.result is not None:
                    result = {**ev.result.to_dict(), "stats": jsonable_stats(ev.result.stats),
                              "backend": payload.get("backend") or self.engine.backend}
                    yield {"type": "done", "token_id": ev.token_id, "text": ev.text, "result": result,
                           "prompt_tokens": n_prompt}
                    return
                yield {"type": "token", "token_id": ev.token_id, "text": ev.text}
        except EngineBusy as exc:
            yield error_event(429, str(exc), None, "engine_busy")
        except EngineClosed as exc:
            yield error_event(503, f"{exc}: retry", None, "worker_unavailable")
        except InputError as exc:
            msg = str(exc)
            yield error_event(400, msg, _param_of(msg), "invalid_request")
        except ClearsightError as exc:
            yield error_event(400, str(exc), None, "invalid_request")
        except Exception:  # a bug: logged here with its traceback, never sent to the client
            log.exception("request failed")
            yield error_event(500, "internal error while generating (see the server log)", None, "internal_error")
        finally:
            if handle is not None and not handle.done:
                handle.cancel()  # the client went away (the stream was closed early)

    def close(self) -> None:
        if self._owned:
            self.engine.close()


class RemoteBackend:
    """A model deployment (``app.ModelWorker``) reached through a Serve ``DeploymentHandle``.

    A replica that dies mid-request ends the stream with a 503 event (retryable): Serve replaces the
    replica, and the client's retry lands on a live one.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._info: dict[str, Any] | None = None

    async def describe(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.handle.describe.remote()
        return self._info

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        try:
            async for event in self.handle.options(stream=True).stream.remote(payload):
                yield event
        except (RayError, RayServeException) as exc:
            log.warning("model worker failed mid-request: %s", exc.__class__.__name__)
            yield error_event(503, "the model worker serving this request failed or is restarting: retry the "
                              "request", None, "worker_unavailable")
