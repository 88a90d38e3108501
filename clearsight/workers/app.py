"""The Ray Serve application: one deployment per model (each replica one Engine), one FastAPI gateway.

``build_application(config)`` gives the Serve ``Application``; ``app_builder`` is the same for
``serve run clearsight.workers.app:app_builder models=...`` and Serve config files (docs/serving.md);
``run_server`` is what ``clearsight serve`` runs. No ``@serve.batch``: the Engine batches continuously, so a
replica takes many requests at once (``max_ongoing_requests``) and hands them all to its Engine.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve import Application

from clearsight.config import DEFAULT_MODEL, DType, ModelSpec
from clearsight.workers.api import build_app
from clearsight.workers.backend import EngineBackend, RemoteBackend
from clearsight.workers.schemas import Limits, ServeSettings

log = logging.getLogger("clearsight.workers")
APP_NAME = "clearsight"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServedModel(BaseModel):
    """One model deployment: what to load and how many replicas, on what resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="the `model` of requests")
    source: str = Field(min_length=1, description="local path, cached HF id or builtin:<name>")
    replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int | None = Field(None, ge=1, le=1024, description="above replicas: Serve autoscales between them")
    gpus_per_replica: float = Field(0.0, ge=0.0, le=64.0)
    cpus_per_replica: float = Field(1.0, ge=0.0, le=1024.0)
    device: str | None = Field(None, description="None: cuda when the replica has a GPU, else cpu")
    dtype: DType = "auto"
    backend: str | None = None
    max_queue: int = Field(256, ge=1, description="requests waiting in a replica's Engine (429 past it)")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica takes at once (its Engine batches)")
    threads: int | None = Field(None, ge=1, description="torch threads in the replica (None = torch's default)")

    @model_validator(mode="after")
    def _range(self) -> ServedModel:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas}): give at least "
                             "as many")
        return self

    def deployment_options(self, index: int) -> dict[str, Any]:
        """Serve options of this model's deployment: a fixed replica count, or autoscaling up to max_replicas
        (by requests in flight per replica: the Engine batches, so a replica takes many before it is busy)."""
        options: dict[str, Any] = {
            "name": deployment_name(index), "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_gpus": self.gpus_per_replica, "num_cpus": self.cpus_per_replica},
        }
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {"min_replicas": self.replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": max(1, self.max_ongoing_requests // 2)}
        else:
            options["num_replicas"] = self.replicas
        return options

    def spec(self) -> ModelSpec:
        device = self.device or ("cuda" if self.gpus_per_replica > 0 else "cpu")
        return ModelSpec(source=self.source, device=device, dtype=self.dtype, backend=self.backend)


class ServeConfig(BaseModel):
    """The whole application: the models and the gateway's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ServedModel] = Field(min_length=1)
    settings: ServeSettings = ServeSettings()
    gateway_max_ongoing_requests: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _unique(self) -> ServeConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique, {', '.join(dup)} is given twice: name them NAME=SOURCE")
        return self


@serve.deployment
class ModelWorker:
    """One replica: one Engine on one model (its GPU share is the deployment's ``num_gpus``)."""

    def __init__(self, model: dict[str, Any], max_prompt_tokens: int | None = None) -> None:
        served = ServedModel.model_validate(model)
        if served.threads is not None:
            import torch

            torch.set_num_threads(served.threads)
        self.backend = EngineBackend(served.spec(), max_prompt_tokens=max_prompt_tokens, max_queue=served.max_queue)

    async def describe(self) -> dict[str, Any]:
        return await self.backend.describe()

    async def stream(self, payload: dict[str, Any]):
        async for event in self.backend.stream(payload):
            yield event

    def stats(self) -> dict[str, int]:
        """The Engine's load: requests waiting and in flight, rows, tokens (``Engine.stats``)."""
        return self.backend.engine.stats()

    def pid(self) -> int:
        """This replica's process id (the fault tests kill it)."""
        return os.getpid()

    def check_health(self) -> None:
        # a dead engine thread cannot serve: failing the check makes Serve replace this replica
        if not self.backend.engine._thread.is_alive():
            raise RuntimeError("the engine thread stopped")

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


@serve.deployment
@serve.ingress()
class Gateway:
    """The HTTP ingress: routes each request to its model's deployment by the request's ``model``."""

    def __init__(self, handles: dict[str, Any], settings: dict[str, Any]) -> None:
        self.handles = handles
        self.settings = ServeSettings.model_validate(settings)

    def __serve_build_asgi_app__(self) -> Any:
        return build_app({name: RemoteBackend(h) for name, h in self.handles.items()}, self.settings)


def deployment_name(index: int) -> str:
    return f"model-{index}"


def build_application(config: ServeConfig) -> Application:
    """The Serve application of ``config``: model deployments ``model-0``, ``model-1``, ... behind ``Gateway``."""
    handles = {}
    for i, m in enumerate(config.models):
        handles[m.name] = ModelWorker.options(**m.deployment_options(i)).bind(
            m.model_dump(), config.settings.limits.max_prompt_tokens)
    return Gateway.options(
        max_ongoing_requests=config.gateway_max_ongoing_requests, ray_actor_options={"num_cpus": 0},
    ).bind(handles, config.settings.model_dump())


def parse_model_arg(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` or ``SOURCE`` (named by itself) -> (name, source)."""
    name, sep, source = text.partition("=")
    if sep and name and "/" not in name:
        return name.strip(), source.strip()
    return text.strip(), text.strip()


class BuilderArgs(BaseModel):
    """The ``args`` of ``serve run clearsight.workers.app:app_builder`` (or of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    models: str | list[str] = DEFAULT_MODEL
    replicas: int = 1
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    device: str | None = None
    backend: str | None = None
    threads: int | None = None
    api_key: str | None = None
    limits: dict[str, Any] = {}
    image_url_allow: list[str] = []

    @field_validator("models")
    @classmethod
    def _split(cls, v: str | list[str]) -> list[str]:
        return [s for s in (v.split(",") if isinstance(v, str) else v) if s.strip()]


def config_from(models: list[str], *, replicas: int = 1, max_replicas: int | None = None,
                gpus_per_replica: float = 0.0,
                cpus_per_replica: float = 1.0, device: str | None = None, backend: str | None = None,
                threads: int | None = None, api_key: str | None = None, limits: dict[str, Any] | None = None,
                image_url_allow: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """A validated ServeConfig (pydantic ValidationError on bad values)."""
    served = []
    for text in models:
        name, source = parse_model_arg(text)
        served.append(ServedModel(name=name, source=source, replicas=replicas, max_replicas=max_replicas,
                                  gpus_per_replica=gpus_per_replica,
                                  cpus_per_replica=cpus_per_replica, device=device, backend=backend, threads=threads))
    settings = ServeSettings(api_key=api_key, limits=Limits(**(limits or {})), image_url_allow=tuple(image_url_allow))
    return ServeConfig(models=served, settings=settings)


def app_builder(args: dict[str, Any]) -> Application:
    """For ``serve run clearsight.workers.app:app_builder models=a=builtin:shapes-llava,b=... replicas=2``.
    The API key comes from ``api_key`` or the ``CLEARSIGHT_API_KEY`` environment variable."""
    a = BuilderArgs.model_validate(args)
    return build_application(config_from(
        a.models, replicas=a.replicas, max_replicas=a.max_replicas, gpus_per_replica=a.gpus_per_replica,
        cpus_per_replica=a.cpus_per_replica,
        device=a.device, backend=a.backend, threads=a.threads,
        api_key=a.api_key or os.environ.get("CLEARSIGHT_API_KEY"),
        limits=a.limits, image_url_allow=a.image_url_allow))


def loopback_warning(host: str, api_key: str | None) -> str | None:
    if host in LOOPBACK or api_key:
        return None
    return (f"WARNING: serving on {host} (beyond this machine) WITHOUT an API key: anyone who can reach this port "
            "can run the models. Set --api-key or CLEARSIGHT_API_KEY, or bind 127.0.0.1.")


def start(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, num_gpus: int | None = None, blocking_ready: bool = True) -> str:
    """Start (or join, with ``address``) Ray, run the application, and return its URL."""
    import ray

    if not ray.is_initialized():
        if address in (None, "local"):
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     log_to_driver=False)
        else:
            ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def stop() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def run_server(config: ServeConfig, *, host: str, port: int, address: str | None) -> int:
    """Start, print the URL and a curl example, wait for Ctrl-C (SIGINT) or SIGTERM, shut down cleanly."""
    import sys

    warning = loopback_warning(host, config.settings.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    stopping = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = start(config, host=host, port=port, address=address)
        auth = ' -H "Authorization: Bearer $CLEARSIGHT_API_KEY"' if config.settings.api_key else ""
        model = config.models[0].name
        print(f"clearsight serving {', '.join(m.name for m in config.models)} at {url}", flush=True)
        print(f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
              f"\"max_tokens\": 16}}'", flush=True)
        print("Ctrl-C to stop.", flush=True)
        while not stopping.wait(0.5):
            pass
        print("shutting down...", file=sys.stderr, flush=True)
    finally:
        stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
