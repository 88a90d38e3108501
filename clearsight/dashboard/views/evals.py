"""Evals: a result folder's metrics, its report's plots, and a per-sample browser with filters.

The logic lives in ``clearsight.dashboard.results``; this page only draws.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from clearsight.dashboard import results as res
from clearsight.dashboard.compare import marked_markdown
from clearsight.dashboard.ui import settings, show_error
from clearsight.errors import ClearsightError

st.title("Evals")
cfg = settings()
folders = res.result_folders(cfg.runs)
opened = st.session_state.pop("open_results", None)  # set by the Jobs page's "Open in Evals"
options = [str(f) for f in folders]
if opened and opened not in options:
    options.insert(0, opened)
if not options:
    st.info(f"No result folders under `{cfg.runs}` yet: run a job on the Jobs page or `clearsight eval run`, "
            "or type a folder below.")
choice = st.selectbox("Result folder", options, index=options.index(opened) if opened else 0,
                      key="evals_folder") if options else None
typed = st.text_input("...or a folder path", key="evals_path")
folder = Path(typed.strip()) if typed.strip() else (Path(choice) if choice else None)
if folder is None:
    st.stop()

try:
    results = res.load_results(folder)
except ClearsightError as exc:
    show_error(exc)
    st.stop()

systems = [s.name for s in results.systems]
st.caption(f"`{folder}`: {len(systems)} systems: {', '.join(systems)}")
tab_metrics, tab_plots, tab_samples = st.tabs(["Metrics", "Plots", "Samples"])

with tab_metrics:
    for title, table in res.metric_tables(results).items():
        st.subheader(title)
        st.dataframe(table, hide_index=True)
    report = res.report_markdown(folder)
    if report:
        with st.expander("report.md (verdict, CIs, differences from the baseline)"):
            st.markdown(report)

with tab_plots:
    pngs = res.plots(folder)
    if not pngs:
        st.info("This folder has no plots (matplotlib missing when it was written?): `clearsight report` redraws them.")
    for png in pngs:
        st.image(str(png), caption=png.name)

with tab_samples:
    try:
        samples = res.load_samples(folder)
    except ClearsightError as exc:
        show_error(exc)
        samples = []
    c1, c2, c3 = st.columns(3)
    kinds = sorted({s.benchmark for s in samples})
    bench = c1.selectbox("Benchmark", ["all", *kinds], key="f_bench")
    who = c2.selectbox("Hallucinating", ["(no filter)", "any", *systems], key="f_who",
                       help="POPE: a yes to an absent object; CHAIR: a mention of an object not in the image")
    disagree = c3.checkbox("Systems disagree", key="f_disagree")
    shown = res.filter_samples(samples, benchmark=None if bench == "all" else bench, disagree=disagree,
                               hallucinating=None if who == "(no filter)" else who)
    st.caption(f"{len(shown)} of {len(samples)} samples (✗ marks a hallucination)")
    st.dataframe(res.sample_table(shown, systems), hide_index=True, height=260)
    if shown:
        pick = st.selectbox("Sample", [s.sample_id for s in shown], key="f_sample")
        sample = next(s for s in shown if s.sample_id == pick)
        left, right = st.columns([1, 2])
        with left:
            if sample.image and Path(sample.image).is_file():
                st.image(sample.image, width=192)
        with right:
            st.markdown(f"**Prompt:** {sample.prompt}")
            gold = sample.gold if isinstance(sample.gold, str) else ", ".join(sample.gold) or "none"
            st.markdown(f"**Gold:** {gold}")
            for name, answer in sample.answers.items():
                if sample.benchmark == "chair":
                    text = marked_markdown(answer.output, answer.mentions)
                else:
                    colour = "red" if answer.parsed != sample.gold else "green"
                    text = f":{colour}[**{answer.output or '(empty)'}**]"
                st.markdown(f"**{name}**: {text}")
