"""Jobs: start an eval job (a job file or a small form; locally in the background or on Ray), follow its
progress and logs, open its results in Evals. The logic lives in ``clearsight.dashboard.jobs``."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from clearsight.dashboard import jobs as jb
from clearsight.dashboard.ui import settings, show_error
from clearsight.errors import ClearsightError

st.title("Jobs")
cfg = settings()
runs = Path(cfg.runs)

with st.container(border=True):
    st.subheader("Start a job")
    where = st.radio("Run", ["local (background process)", "Ray cluster"], horizontal=True, key="where")
    address = st.text_input("Ray dashboard address", value="http://127.0.0.1:8265", key="address") \
        if where == "Ray cluster" else None
    source = st.radio("Job", ["form", "job file"], horizontal=True, key="source")
    job_file: Path | None = None
    try:
        if source == "job file":
            path = st.text_input("Job file (.toml / .yaml / .json)", value="examples/shapes_eval.toml", key="job_file")
            job_file = Path(path.strip()) if path.strip() else None
            start = st.button("Start", type="primary", key="start_file")
        else:
            with st.form("job_form"):
                name = st.text_input("Name (the result folder under the runs folder)", value="dashboard_job",
                                     key="name")
                systems = st.text_area("Systems, one per line (none, var, vcd:alpha=1, mine=var:p=0.4+vhr)",
                                       value="none\nvcd", key="systems")
                c1, c2, c3 = st.columns(3)
                pope = c1.number_input("POPE questions per split (0: none)", min_value=0, max_value=5000, value=20,
                                       key="pope")
                chair = c2.number_input("CHAIR images (0: none)", min_value=0, max_value=5000, value=0, key="chair")
                tokens = c3.number_input("CHAIR max new tokens", min_value=1, max_value=8192, value=64, key="tokens")
                start = st.form_submit_button("Start", type="primary")
            if start:
                job = jb.job_from_form({"name": name.strip(), "model": cfg.model or jb.DEFAULT_MODEL,
                                        "systems": jb.form_systems(systems), "pope_limit": int(pope) or None,
                                        "chair_images": int(chair) or None, "max_new_tokens": int(tokens)}, runs)
                job_file = jb.write_job_file(job, runs)
        if start and job_file is not None:
            record = (jb.start_ray(job_file, runs, address or "") if where == "Ray cluster"
                      else jb.start_local(job_file, runs))
            st.success(f"started {record.id}: results in `{record.output}`")
    except ClearsightError as exc:
        show_error(exc)
    except OSError as exc:
        show_error(exc)

records = jb.list_jobs(runs)
if not records:
    st.info(f"No jobs started from the dashboard yet (records in `{jb.jobs_dir(runs)}`).")


@st.fragment(run_every=2.0)
def job_list() -> None:
    """Refreshed every 2 s: status, progress and the log's tail of each job."""
    for rec in jb.list_jobs(runs)[:10]:
        try:
            status = jb.job_status(rec)
        except ClearsightError as exc:
            show_error(exc)
            continue
        prog = status["progress"]
        with st.container(border=True):
            st.markdown(f"**{rec.id}** ({rec.where}): **{status['state']}**, {status['message']}; "
                        f"results: `{rec.output}`")
            if prog and prog.get("total"):
                st.progress(min(prog["done"] / prog["total"], 1.0),
                            text=f"{prog['state']}: {prog['done']}/{prog['total']} generations")
            c1, c2 = st.columns(2)
            if status["state"] == "done" and c1.button("Open in Evals", key=f"open_{rec.id}"):
                st.session_state["open_results"] = rec.output
                st.switch_page(Path(__file__).resolve().parent / "evals.py")
            if status["state"] == "running" and c2.button("Stop", key=f"stop_{rec.id}"):
                jb.stop_job(rec)
            with st.expander("log", expanded=status["state"] == "failed"):
                try:
                    st.code(jb.job_log(rec, 60) or "(empty)", language=None)
                except ClearsightError as exc:
                    show_error(exc)


if records:
    job_list()
