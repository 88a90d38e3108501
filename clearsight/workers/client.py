"""``Client``: a clearsight server (``clearsight serve``) with the Engine's ``generate`` / ``stream`` signature,
so evals and the dashboard can point at a server instead of a local model.

It speaks the native endpoint (``POST /v1/generate``): one HTTP request per generation request, sent
concurrently (the server's Engine batches them). Results are the Engine's types: ``GenerationResult`` and
``TokenEvent``; attention statistics come back as tensors (``segment_mass[layer]``: a tensor,
``last_row[layer]``: a list of tensors, ``layout``: a ``RowLayout``), as the Engine returns them.
Errors: 4xx -> ``InputError`` (the server's one-line message), 429 -> ``EngineBusy``, 503 and other 5xx or a
lost connection -> ``ServerUnavailable`` (retry).
"""

from __future__ import annotations

import base64
import io
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
from PIL import Image

from clearsight.config import DecodeSpec, GenerationRequest
from clearsight.decoding.generate import GenerationResult, TokenEvent, as_decode, as_request, load_image
from clearsight.engine import merge_queue
from clearsight.errors import ClearsightError, EngineBusy, InputError
from clearsight.kernels.plan import RowLayout, StatsRequest

_END = object()


class ServerUnavailable(ClearsightError):
    """The server (or the model worker serving the request) failed or is restarting: retry the request."""


def image_data_url(image: Image.Image | str | Path) -> str:
    """A PNG data URL of a PIL image or an image file (checked as ``generate`` checks it)."""
    im = load_image(image)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _stats_from_json(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    import torch

    out: dict[str, Any] = dict(stats)
    if isinstance(stats.get("segment_mass"), dict):
        out["segment_mass"] = {int(k): torch.tensor(v) for k, v in stats["segment_mass"].items()}
    if isinstance(stats.get("last_row"), dict):
        out["last_row"] = {int(k): [torch.tensor(x) for x in v] for k, v in stats["last_row"].items()}
    if isinstance(stats.get("layout"), dict):
        lay = stats["layout"]
        out["layout"] = RowLayout(pad=lay["pad"], image_spans=tuple(tuple(s) for s in lay.get("image_spans", ())),
                                  grids=tuple(tuple(g) for g in lay.get("grids", ())))
    return out


def _result_from_json(body: dict[str, Any]) -> GenerationResult:
    return GenerationResult(text=body["text"], token_ids=list(body["token_ids"]), finish_reason=body["finish_reason"],
                            prompt=body["prompt"], id=body.get("id"), mitigations=list(body.get("mitigations") or []),
                            timings=dict(body.get("timings") or {}), stats=_stats_from_json(body.get("stats")))


def _raise_for(status: int, body: Any) -> None:
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else str(body)[:200]
    if status == 429:
        raise EngineBusy(f"server busy: {message}")
    if 400 <= status < 500:
        raise InputError(message)
    raise ServerUnavailable(f"server error {status}: {message}")


class Client:
    """A clearsight server at ``url`` (e.g. ``http://127.0.0.1:8000``), as an Engine.

    ``model``: the served model to use (default: the first one ``GET /v1/models`` lists). ``http_client``:
    an ``httpx.Client`` to send with (tests pass an in-process one); by default one is made and closed by
    ``close()``.
    """

    def __init__(self, url: str, api_key: str | None = None, *, model: str | None = None, timeout: float = 600.0,
                 http_client: httpx.Client | None = None, max_concurrency: int = 16) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owned = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._url = url.rstrip("/")
        self._headers = headers
        self._model = model
        self.max_concurrency = max_concurrency

    # ------------------------------------------------------------------ plumbing
    def _get(self, path: str) -> Any:
        try:
            r = self._http.get(self._url + path, headers=self._headers)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"{self._url}: {exc.__class__.__name__}: {exc}") from None
        body = r.json()
        if r.status_code != 200:
            _raise_for(r.status_code, body)
        return body

    def models(self) -> list[dict[str, Any]]:
        """The served models (``GET /v1/models``): id, family, source, backend, mitigations."""
        return self._get("/v1/models")["data"]

    @property
    def model(self) -> str:
        if self._model is None:
            models = self.models()
            if not models:
                raise ServerUnavailable(f"{self._url} serves no model")
            self._model = models[0]["id"]
        return self._model

    def _body(self, request: GenerationRequest | dict[str, Any] | str, mitigations: Any, decode: DecodeSpec | None,
              stats: StatsRequest | None, backend: str | None, stream: bool) -> dict[str, Any]:
        req = as_request(request)
        mits = req.mitigations if req.mitigations is not None else list(mitigations)
        body: dict[str, Any] = {
            "model": self.model, "prompt": req.prompt, "id": req.id, "seed": req.seed,
            "mitigations": [m if isinstance(m, str | dict) else m.model_dump() for m in mits],
            "decode": json.loads(as_decode(decode).model_dump_json()), "backend": backend, "stream": stream,
        }
        if req.image is not None:
            body["image"] = image_data_url(req.image)
        if stats is not None:
            body["stats"] = {"segment_mass": stats.segment_mass, "last_row": stats.last_row,
                             "layers": None if stats.layers is None else sorted(stats.layers)}
        return {k: v for k, v in body.items() if v is not None}

    def _one(self, body: dict[str, Any], timeout: float | None) -> GenerationResult:
        try:
            r = self._http.post(self._url + "/v1/generate", json=body, headers=self._headers,
                                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"{self._url}: {exc.__class__.__name__}: {exc}") from None
        try:
            data = r.json()
        except ValueError:
            raise ServerUnavailable(f"server error {r.status_code}: not a JSON answer") from None
        if r.status_code != 200:
            _raise_for(r.status_code, data)
        return _result_from_json(data)

    def _events(self, body: dict[str, Any], index: int) -> Iterator[TokenEvent]:
        try:
            with self._http.stream("POST", self._url + "/v1/generate", json=body, headers=self._headers) as r:
                if r.status_code != 200:
                    r.read()
                    _raise_for(r.status_code, r.json())
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        return
                    item = json.loads(data)
                    if "error" in item:
                        _raise_for(503 if item["error"].get("code") == "worker_unavailable" else 500, item)
                    result = _result_from_json(item["result"]) if "result" in item else None
                    yield TokenEvent(request=index, token_id=item["token_id"], text=item["text"], result=result)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"{self._url}: {exc.__class__.__name__}: {exc}") from None

    # ------------------------------------------------------------------ the Engine's API
    def generate(self, requests: Sequence[GenerationRequest | dict[str, Any] | str], mitigations: Sequence[Any] = (),
                 decode: DecodeSpec | None = None, *, stats: StatsRequest | None = None, backend: str | None = None,
                 timeout: float | None = None) -> list[GenerationResult]:
        """As ``Engine.generate``: every request (sent concurrently), results in request order; the first error
        is raised."""
        bodies = [self._body(r, mitigations, decode, stats, backend, False) for r in requests]
        if len(bodies) <= 1:
            return [self._one(b, timeout) for b in bodies]
        with ThreadPoolExecutor(min(self.max_concurrency, len(bodies))) as pool:
            futures = [pool.submit(self._one, b, timeout) for b in bodies]
            return [f.result() for f in futures]

    def stream(self, requests: Sequence[GenerationRequest | dict[str, Any] | str], mitigations: Sequence[Any] = (),
               decode: DecodeSpec | None = None, *, stats: StatsRequest | None = None,
               backend: str | None = None) -> Iterator[TokenEvent]:
        """As ``Engine.stream``: the events of all the requests as they come (``event.request`` = index in
        ``requests``); each request's last event carries its result."""
        bodies = [self._body(r, mitigations, decode, stats, backend, True) for r in requests]
        if len(bodies) == 1:
            yield from self._events(bodies[0], 0)
            return
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stop = threading.Event()

        def pump(i: int, body: dict[str, Any]) -> None:
            try:
                for ev in self._events(body, i):
                    if stop.is_set():
                        return
                    q.put(ev)
                q.put(_END)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                q.put(exc)

        threads = [threading.Thread(target=pump, args=(i, b), daemon=True) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        try:
            yield from merge_queue(q, len(threads), _END)
        finally:
            stop.set()

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
