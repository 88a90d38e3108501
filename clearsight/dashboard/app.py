"""The clearsight dashboard: ``clearsight dashboard`` runs this file with ``streamlit run``.

Three pages (``views/``): Compare (systems side by side on one image, hallucinated objects marked, attention
heatmaps), Evals (result folders: metrics, plots, a per-sample browser) and Jobs (start and follow eval jobs).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

VIEWS = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="clearsight", layout="wide", initial_sidebar_state="expanded")
page = st.navigation([
    st.Page(VIEWS / "compare.py", title="Compare", default=True),
    st.Page(VIEWS / "evals.py", title="Evals"),
    st.Page(VIEWS / "jobs.py", title="Jobs"),
])
page.run()
