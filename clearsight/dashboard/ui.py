"""Streamlit helpers shared by the pages: the one backend per process (``st.cache_resource``), the settings."""

from __future__ import annotations

from typing import Any

import streamlit as st

from clearsight.dashboard.settings import DashboardSettings, settings_from_env


def settings() -> DashboardSettings:
    return settings_from_env()


@st.cache_resource(show_spinner="Loading the model (once per dashboard process)...")
def backend(source_json: str) -> Any:
    """The Engine (model loaded once per process, shared by every session: the Engine is thread-safe) or
    the Client of a ``clearsight serve`` URL. Keyed by the settings' JSON so a test with other settings gets
    its own."""
    s = DashboardSettings.model_validate_json(source_json)
    if s.url is not None:
        from clearsight.workers.client import Client

        client = Client(s.url, api_key=s.api_key)
        client.model  # noqa: B018 - asks the server now, so an unreachable URL fails here, visibly
        return client
    from clearsight.engine import Engine

    return Engine(s.source, max_requests=16)


def show_error(exc: BaseException) -> None:
    """An error as one line in the page (never a traceback for a user error)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    st.error(f"error: {text}")
