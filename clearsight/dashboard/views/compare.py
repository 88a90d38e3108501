"""Compare: several systems (mitigation sets) on one image and prompt, side by side, as they stream.

The logic lives in ``clearsight.dashboard.compare``; this page only draws widgets and results.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import streamlit as st
from PIL import Image

from clearsight.config import DecodeSpec
from clearsight.dashboard import compare as cmp
from clearsight.dashboard.ui import backend, settings, show_error
from clearsight.errors import ClearsightError

DEFAULT_SYSTEMS = [("none", []), ("vcd", ["vcd"]), ("pai", ["pai"]), ("vhr", ["vhr"])]

st.title("Compare")
cfg = settings()
st.caption(f"Model: `{cfg.source}`" + (" (server)" if cfg.url else " (in this process)"))

# ---------------------------------------------------------------------------------------------- the image
left, right = st.columns([2, 1])
with left:
    kind = st.radio("Image", ["Shapes scene", "Upload", "Path"], horizontal=True, key="image_kind")
    image: Image.Image | None = None
    gt_default = ""
    try:
        if kind == "Shapes scene":
            # seed 56: the demo model names a hexagon and a trapezoid (a partner pair) that are not there
            seed = st.number_input("Scene seed", min_value=0, max_value=2**31 - 1, value=56, step=1, key="seed",
                                   help="a shapes-world scene generated from this seed, with its ground truth")
            scene = cmp.shapes_scene(int(seed))
            image, gt_default = scene.image, ", ".join(scene.ground_truth)
        elif kind == "Upload":
            up = st.file_uploader("Image file", type=["png", "jpg", "jpeg"], key="upload")
            if up is not None:
                image = Image.open(io.BytesIO(up.getvalue())).convert("RGB")
        else:
            path = st.text_input("Image path", key="image_path")
            if path.strip():
                from clearsight.decoding.generate import load_image

                image = load_image(path.strip(), "image path")
    except (ClearsightError, OSError) as exc:
        show_error(exc)
    gt_text = st.text_input("Ground-truth objects (comma-separated)", value=gt_default, key=f"gt_{kind}",
                            help="objects in the image: mentioned objects outside this list are marked red")
    prompt = st.text_input("Prompt", value=cmp.DEFAULT_PROMPT, key="prompt")
    c1, c2 = st.columns(2)
    max_new = c1.number_input("Max new tokens", min_value=1, max_value=512, value=40, step=1, key="max_new")
    n_systems = c2.number_input("Systems", min_value=1, max_value=4, value=2, step=1, key="n_systems")
with right:
    if image is not None:
        st.image(image, caption="input", width=192)

# ---------------------------------------------------------------------------------------------- the systems


def field_widget(f: cmp.FieldInfo, key: str) -> Any:
    """A widget for one pydantic field: its default shown, ge/le bounds enforced by the widget."""
    label, helptext = f.name, f.description or None
    if f.kind == "bool":
        return st.checkbox(label, value=bool(f.default), key=key, help=helptext)
    if f.kind == "choice":
        return st.selectbox(label, f.choices, index=list(f.choices).index(f.default), key=key, help=helptext)
    if f.kind == "float":
        return st.number_input(label, min_value=f.minimum, max_value=f.maximum, value=float(f.default),
                               step=0.05, format="%.3f", key=key, help=helptext)
    if f.kind == "int":
        lo = None if f.minimum is None else int(f.minimum)
        hi = None if f.maximum is None else int(f.maximum)
        return st.number_input(label, min_value=lo, max_value=hi, value=int(f.default), step=1, key=key,
                               help=helptext)
    text = st.text_input(label, value="" if f.default is None else str(f.default), key=key,
                         help=(helptext or "") + " (empty: default; lists as 1,2,3)")
    return cmp.text_value(text, f.default)


systems: list[cmp.SystemSpec] = []
errors: list[str] = []
cols = st.columns(int(n_systems))
for i, col in enumerate(cols):
    label0, mits0 = DEFAULT_SYSTEMS[i % len(DEFAULT_SYSTEMS)]
    with col, st.container(border=True):
        label = st.text_input("System", value=label0, key=f"sys{i}_label")
        names = st.multiselect("Mitigations", cmp.mitigation_names(), default=mits0, key=f"sys{i}_mits")
        chosen: dict[str, dict[str, Any]] = {}
        for name in names:
            with st.expander(f"{name} parameters"):
                chosen[name] = {f.name: field_widget(f, f"sys{i}_{name}_{f.name}") for f in cmp.mitigation_fields(name)}
        try:
            systems.append(cmp.build_system(label.strip() or f"system {i + 1}", chosen))
        except ClearsightError as exc:
            errors.append(str(exc))
            show_error(exc)

run = st.button("Run", type="primary", disabled=bool(errors) or image is None, key="run")

# ---------------------------------------------------------------------------------------------- running
if run:
    st.session_state.pop("compare", None)
    try:
        engine = backend(cfg.model_dump_json())
        gt = cmp.parse_objects(gt_text)
        decode = DecodeSpec(max_new_tokens=int(max_new))
    except Exception as exc:  # noqa: BLE001 - a model that fails to load or a server that cannot be reached
        show_error(exc)
        st.stop()
    live = st.empty()  # the streaming view, replaced by the results below once the run ends
    with live.container():
        holders = []
        for col, s in zip(st.columns(len(systems)), systems):
            with col:
                st.markdown(f"**{s.label}**")
                holders.append(st.empty())
        progress = st.progress(0.0, text="generating...")
    outputs: list[cmp.SystemOutput] = []
    try:
        for idx, _event, outputs in cmp.run_compare(engine, image, prompt, systems, decode, timeout=cfg.timeout):
            if idx >= 0:
                holders[idx].markdown(outputs[idx].text + " ▌")
            done = sum(o.done for o in outputs)
            progress.progress(done / len(outputs), text=f"{done}/{len(outputs)} systems finished")
    except ClearsightError as exc:
        show_error(exc)
    live.empty()
    st.session_state["compare"] = {"outputs": outputs, "image": image, "gt": gt, "labels": [s.label for s in systems]}

# ---------------------------------------------------------------------------------------------- results
state = st.session_state.get("compare")
if state and state["outputs"]:
    outputs, gt, shown_image = state["outputs"], state["gt"], state["image"]
    st.markdown("Objects: :green[**in the ground truth**], :red[**not in it (hallucinated)**]. Ground truth: "
                + (", ".join(gt) if gt else "none given"))
    first = next((o.result.stats for o in outputs if o.result is not None and o.result.stats), None)
    layers = cmp.attention_layers(first) if first else []
    layer_choice = st.select_slider("Attention layer", options=["average", *layers], value="average",
                                    key="layer") if layers else "average"
    layer = None if layer_choice == "average" else int(layer_choice)
    res_cols = st.columns(len(outputs))
    for col, out in zip(res_cols, outputs):
        with col:
            st.subheader(out.label)
            if out.error is not None:
                st.error(f"error: {out.error}")
                continue
            mentions = cmp.mark_objects(out.text, gt)
            st.markdown(cmp.marked_markdown(out.text, mentions))
            hallucinated = sorted({m.node for m in mentions if not m.present})
            st.caption(f"{len(mentions)} object mentions, hallucinated: {', '.join(hallucinated) or 'none'}")
            stats = out.result.stats if out.result is not None else None
            if stats and shown_image is not None:
                try:
                    grid = cmp.attention_grid(stats, layer)
                    n = len(out.result.token_ids)
                    st.image(cmp.overlay(shown_image, grid), caption=f"attention on the image ({layer_choice})",
                             width=288)
                    with st.expander(f"grid values ({grid.shape[0]} x {grid.shape[1]})"):
                        st.dataframe(pd.DataFrame(grid).round(4))
                    mass = cmp.token_image_mass(stats, n, layer)
                    tokens = [t for t in out.tokens[:len(mass)]]
                    st.dataframe(pd.DataFrame({"token": tokens, "image mass": mass}), hide_index=True, height=240,
                                 column_config={"image mass": st.column_config.ProgressColumn(
                                     "image attention mass", min_value=0.0, max_value=1.0, format="%.3f")})
                except ClearsightError as exc:
                    show_error(exc)
