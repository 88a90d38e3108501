"""What ``clearsight dashboard`` hands the Streamlit app: one pydantic model, passed through the environment
(``streamlit run`` starts the app's script in its own process, so the CLI cannot pass objects)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clearsight.config import DEFAULT_MODEL
from clearsight.errors import InputError, pydantic_message

ENV = "CLEARSIGHT_DASHBOARD"


class DashboardSettings(BaseModel):
    """``model``: a model source run in-process by an Engine; or ``url``: a ``clearsight serve`` server
    (then no model is loaded here). ``runs``: the folder of eval result folders (Evals and Jobs pages)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    url: str | None = None
    api_key: str | None = None
    runs: Path = Path("runs")
    timeout: float = Field(120.0, gt=0, description="seconds a Compare run may take before it is reported stuck")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL: give the server's address, e.g. http://127.0.0.1:8000")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DashboardSettings:
        if self.model is not None and self.url is not None:
            raise ValueError("give either --model (run it here) or --url (a clearsight serve server), not both")
        return self

    @property
    def source(self) -> str:
        return self.url if self.url is not None else (self.model or DEFAULT_MODEL)

    def to_env(self) -> dict[str, str]:
        return {ENV: self.model_dump_json()}


def settings_from_env() -> DashboardSettings:
    """The settings ``clearsight dashboard`` set (defaults when the app is started another way, e.g. tests)."""
    text = os.environ.get(ENV)
    try:
        return DashboardSettings.model_validate(json.loads(text)) if text else DashboardSettings()
    except (ValidationError, ValueError) as exc:
        msg = pydantic_message(exc, ENV) if isinstance(exc, ValidationError) else f"{ENV}: {exc}"
        raise InputError(msg) from None
