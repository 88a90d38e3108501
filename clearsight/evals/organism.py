"""Model-organism diagnostics (issue 17): does a model have the mechanisms the mitigations act on?

Plain forwards of the unmitigated model (through its adapter: the chat template, the processor, one
forward), no mitigation code except VAR's own sink calibration, which the issue names as the judge of
sinks. Four diagnostics, each on held-out scenes of a shapes world:

(a) prior under diffusion noise: the first-token answer to "Is there a {shape} in the image?" (POPE's
    prompt) for the partner question set (``metrics.partner``: the absent partner of a present shape,
    another absent shape, a present one) on the clean image and on the image diffused to VCD's default
    step (``mitigations.vcd.diffuse``, the very function VCD's branch applies). A prior that survives
    where the evidence does not (Leng et al. 2024, Sec. 3) shows as noised partner yes-rate > clean;
(b) text-side prior: the same questions without the image (the row M3ID and PAI's guidance contrast
    with), and caption continuation without the image: after the caption text names an object, is the
    next object the model names that object's partner, against a control (another not-yet-named shape,
    in the same contexts: its base rate);
(c) sinks and massive activations (Sun et al. 2024; Kang et al. 2025 Sec. 3): ``var.calibrate_sink_dims``
    on a few prefills, and per layer the largest ``|x_d| / rms(x)`` of the layer input (at most
    ``sqrt(hidden)``, so VAR's tau = 20 needs hidden > 400);
(d) depth: the language model's number of layers.

A yes is "P(Yes) > P(No)" at the first answer token (the greedy answer when it is Yes or No, which it is on
the shapes models); each rate is a proportion with its Wilson interval (``evals.stats``).

    python -m clearsight.evals.organism --model builtin:shapes-llava --scenes 200
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from clearsight.evals.datasets.pope import DEFAULT_TEMPLATE, build_prompt, question_text
from clearsight.evals.datasets.shapes import Scene, ShapesWorldSpec, generate_scenes, organism_spec, render_scene
from clearsight.evals.metrics.partner import KINDS, build_partner_questions, partner_map
from clearsight.evals.stats import mcnemar_exact, wilson_interval
from clearsight.mitigations.var import calibrate_sink_dims, normalized_abs
from clearsight.mitigations.vcd import VCD, diffuse

CAPTION_PROMPT = "Please describe this image in detail."  # CHAIR's prompt, as the shapes models were trained
CONDITIONS = ("clean", "noised", "no image")

# VAR's sink threshold for the organism's hidden size 192. VAR's tau = 20 (Kang et al. 2025) is for hidden sizes of
# ~4096, where one dimension above it holds >= 400 / 4096 ~ 10% of a token's squared norm; here |x_d / rms(x)| <=
# sqrt(192) = 13.9, so 20 cannot be reached. tau = 8 means one dimension holds >= 64 / 192 = 1/3 of the token's
# squared norm (a Gaussian vector's largest |x_d| / rms is ~3.2 at this size): stricter than the 10% equivalent.
SINK_TAU = 8.0


@dataclass(frozen=True)
class Proportion:
    """k of n, with its Wilson (1927) 95% interval."""

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def __str__(self) -> str:
        lo, hi = self.ci
        return f"{100 * self.rate:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={self.n})"


# ----------------------------------------------------------------------------------- plain forwards
def yes_no_ids(tokenizer: Any) -> tuple[int, int]:
    """First token ids of "Yes" and "No" (the answers the POPE parser reads)."""
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("No", add_special_tokens=False)["input_ids"]
    if not yes or not no or yes[0] == no[0]:
        raise ValueError("the tokenizer does not tell 'Yes' from 'No' at the first token")
    return yes[0], no[0]


def _by_length(lvlm: Any, texts: Sequence[str], images: Sequence[Image.Image | None]) -> list[list[int]]:
    """Indices grouped by token length, so each group runs without padding (positions stay exact)."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, (t, im) in enumerate(zip(texts, images)):
        groups.setdefault((lvlm.adapter.count_tokens(t), im is not None), []).append(i)
    return list(groups.values())


@torch.no_grad()
def last_logits(lvlm: Any, texts: Sequence[str], images: Sequence[Image.Image | None],
                pixel_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                batch_size: int = 32) -> torch.Tensor:
    """Next-token logits after each chat-formatted text (its image, or None): [N, vocab], float32.

    ``pixel_transform`` is applied to each image's processed pixel tensor alone ([1, C, H, W]), as a
    mitigation's branch applies it to its row (VCD's noise: every image gets the noise of the seed).
    """
    out = torch.empty(len(texts), lvlm.model.config.get_text_config().vocab_size)
    adapter = lvlm.adapter
    for group in _by_length(lvlm, texts, images):
        for s in range(0, len(group), batch_size):
            idx = group[s:s + batch_size]
            batch = adapter.encode([texts[i] for i in idx], [images[i] for i in idx])
            if pixel_transform is not None and "pixel_values" in batch:
                pv = batch["pixel_values"]
                batch["pixel_values"] = torch.cat([pixel_transform(pv[j:j + 1]) for j in range(pv.shape[0])])
            batch = {k: v.to(lvlm.device) for k, v in batch.items()}
            logits = adapter.forward(**batch).logits[:, -1].float().cpu()
            out[idx] = logits
    return out


def p_yes(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """P(Yes) restricted to {Yes, No}: softmax over the two logits -> [N]."""
    return torch.softmax(logits[:, [yes_id, no_id]].float(), -1)[:, 0]


# ----------------------------------------------------------------------------------- (a) + (b) yes-rates
@dataclass
class YesRates:
    """Yes-rates of the partner question set per condition (clean / noised / no image) and kind."""

    rates: dict[str, dict[str, Proportion]]
    mean_p_yes: dict[str, dict[str, float]]
    noise_step: int
    answers: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> yes per question (paired)
    kinds: np.ndarray = field(default_factory=lambda: np.array([]))  # the kind of each question

    def paired_p(self, a: str, b: str, kind: str) -> float:
        """Exact McNemar p of condition ``a`` vs ``b`` on the same questions of ``kind``."""
        sel = self.kinds == kind
        return mcnemar_exact(self.answers[a][sel], self.answers[b][sel])[0]


def scene_questions(scenes: Sequence[Scene], spec: ShapesWorldSpec, seed: int = 0
                    ) -> list[tuple[Scene, str, str]]:
    """(scene, kind, object) of the partner question set of ``scenes`` (``metrics.partner``)."""
    by_file = {s.file_name: s for s in scenes}
    gt = [{"image": s.file_name, "objects": s.object_names} for s in scenes]
    qs = build_partner_questions(gt, spec.partner_pairs, spec.shapes, seed=seed)
    return [(by_file[q.question.image], q.kind, q.object) for q in qs]


def yes_rates(lvlm: Any, scenes: Sequence[Scene], spec: ShapesWorldSpec,
              noise_step: int | None = None, conditions: Sequence[str] = CONDITIONS) -> YesRates:
    """(a) and (b): partner / other-absent / present yes-rates on the clean image, on the image diffused to
    ``noise_step`` (default: VCD's) with VCD's schedule and seed, and with no image at all."""
    step = VCD.model_fields["noise_step"].default if noise_step is None else noise_step
    vcd = VCD(noise_step=step)
    items = scene_questions(scenes, spec)
    yes_id, no_id = yes_no_ids(lvlm.adapter.tokenizer)
    prompts = [build_prompt(question_text(DEFAULT_TEMPLATE, obj)) for _, _, obj in items]
    images = {s.file_name: render_scene(s, spec) for s in {id(s): s for s, _, _ in items}.values()}
    rates: dict[str, dict[str, Proportion]] = {}
    means: dict[str, dict[str, float]] = {}
    answers: dict[str, np.ndarray] = {}
    kinds = np.array([k for _, k, _ in items])
    for cond in conditions:
        has_image = cond != "no image"
        texts = [lvlm.adapter.chat_prompt(p, has_image) for p in prompts]
        ims = [images[s.file_name] if has_image else None for s, _, _ in items]
        transform = None
        if cond == "noised":
            def transform(pv: torch.Tensor) -> torch.Tensor:
                return diffuse(pv, step=vcd.noise_step, schedule=vcd.schedule, seed=vcd.seed)
        p = p_yes(last_logits(lvlm, texts, ims, transform), yes_id, no_id).numpy()
        rates[cond] = {k: Proportion(int((p[kinds == k] > 0.5).sum()), int((kinds == k).sum()))
                       for k in KINDS if (kinds == k).any()}
        means[cond] = {k: float(p[kinds == k].mean()) for k in KINDS if (kinds == k).any()}
        answers[cond] = p > 0.5
    return YesRates(rates, means, step, answers, kinds)


# ----------------------------------------------------------------------------------- (b) caption continuation
@dataclass(frozen=True)
class ContinuationCase:
    """A caption cut right after the word naming ``named``; ``partner`` and ``control`` not named yet."""

    prefix: str
    named: str
    partner: str
    control: str


def continuation_cases(captions: Sequence[str], shapes: Sequence[str], pairs: Sequence[Sequence[str]],
                       seed: int = 0) -> list[ContinuationCase]:
    """Every cut of every caption after a shape word whose partner is not named before it. The control is a
    shape drawn (seeded) among those neither named so far nor the partner: its rate is the base rate of
    naming one particular not-yet-named shape next in the same contexts.

    >>> continuation_cases(["a red square, a blue ring and a red star."], ["square", "ring", "star", "circle",
    ...                    "hourglass"], [("square", "hourglass"), ("circle", "star")])[0].prefix
    'a red square'
    """
    partners = partner_map(pairs)
    rng = random.Random(f"{seed}:continuation")
    out = []
    for cap in captions:
        words = cap.replace(",", " ,").replace(".", " .").split()
        named: list[str] = []
        for i, w in enumerate(words):
            if w not in shapes:
                continue
            named.append(w)
            mate = partners.get(w)
            if mate is None or mate in named:
                continue
            pool = [s for s in shapes if s not in named and s != mate]
            if not pool:
                continue
            prefix = " ".join(words[:i + 1]).replace(" ,", ",").replace(" .", ".")
            out.append(ContinuationCase(prefix, w, mate, rng.choice(pool)))
    return out


def greedy_next_shape(step: Callable[[list[list[int]]], torch.Tensor], rows: list[list[int]],
                      shape_ids: dict[int, str], stop_ids: set[int], max_new_tokens: int) -> list[str | None]:
    """Greedy-decode each row (all of one length) until a shape word (-> its name) or a stop token / the
    budget (-> None). ``step(rows)`` returns the next-token logits [B, vocab] of rows of equal length."""
    rows = [list(r) for r in rows]
    found: list[str | None] = [None] * len(rows)
    live = list(range(len(rows)))
    for _ in range(max_new_tokens):
        if not live:
            break
        nxt = step([rows[i] for i in live]).argmax(-1).tolist()
        still = []
        for i, t in zip(live, nxt):
            if t in shape_ids:
                found[i] = shape_ids[t]
            elif t not in stop_ids:
                rows[i].append(t)
                still.append(i)
        live = still
    return found


@dataclass
class Continuation:
    """(b) caption continuation without the image: next object named = partner vs = control."""

    partner: Proportion
    control: Proportion
    cases: int
    p_value: float = 1.0  # exact McNemar (stats.mcnemar_exact): partner vs control hits, paired over the cases


@torch.no_grad()
def caption_continuation(lvlm: Any, scenes: Sequence[Scene], spec: ShapesWorldSpec,
                         max_new_tokens: int = 16, max_cases: int = 400) -> Continuation:
    """Text only (no image): the chat prompt with CHAIR's caption prompt, the scene's training-style caption
    cut after an object, then greedy decoding until the next shape word."""
    tok = lvlm.adapter.tokenizer
    shape_ids = {tok.convert_tokens_to_ids(s): s for s in spec.shapes}
    shape_ids.pop(tok.unk_token_id, None)
    cases = continuation_cases([s.caption for s in scenes], spec.shapes, spec.partner_pairs)[:max_cases]
    head = lvlm.adapter.chat_prompt(CAPTION_PROMPT, False)
    rows = [tok(f"{head} {c.prefix}")["input_ids"] for c in cases]
    stop = set(lvlm.adapter.eos_token_ids) | {tok.pad_token_id}

    def step(batch: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(batch, device=lvlm.device)
        return lvlm.adapter.forward(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float().cpu()

    nxt: list[str | None] = [None] * len(cases)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r), []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), 64):
            part = idx[s:s + 64]
            for i, name in zip(part, greedy_next_shape(step, [rows[i] for i in part], shape_ids, stop,
                                                       max_new_tokens)):
                nxt[i] = name
    n = len(cases)
    hit_p = [x == c.partner for x, c in zip(nxt, cases)]
    hit_c = [x == c.control for x, c in zip(nxt, cases)]
    return Continuation(Proportion(sum(hit_p), n), Proportion(sum(hit_c), n), n, mcnemar_exact(hit_c, hit_p)[0])


# ----------------------------------------------------------------------------------- (c) sinks, (d) depth
@dataclass
class Sinks:
    """(c) VAR's calibration and the per-layer largest |x_d| / rms(x) of the layer inputs."""

    dims: list[int]
    report: str
    tau: float
    max_ratio: list[float]  # per layer, over tokens and dimensions
    max_dim: list[int]  # the dimension where it occurs
    bound: float  # sqrt(hidden size): no ratio can exceed it
    layers: int = 0
    first_token_heads: list[float] = field(default_factory=list)  # per layer: share of heads sinking on token 0
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def sink_diagnostics(lvlm: Any, requests: Sequence[dict[str, Any]], tau: float = SINK_TAU) -> Sinks:
    """VAR's ``calibrate_sink_dims`` on ``requests`` (its default layers 2..L-2), and per layer the largest
    ``|x_d| / rms(x)`` over the prefill tokens of the layer input (``var.normalized_abs``), over all requests."""
    import clearsight.decoding  # noqa: F401  (registers the default probe that calibrate_sink_dims runs)

    cal = calibrate_sink_dims(lvlm, list(requests), tau=tau)
    adapter = lvlm.adapter
    n = adapter.num_layers
    best = [0.0] * n
    where = [-1] * n

    def grab(layer: int, x: torch.Tensor) -> None:
        z = normalized_abs(x[0])  # [T, hidden]
        v, flat = z.flatten().max(0)
        if float(v) > best[layer]:
            best[layer], where[layer] = float(v), int(flat) % z.shape[-1]

    requests = [dict(r, image=Image.open(r["image"]).convert("RGB")) if isinstance(r.get("image"), str) else r
                for r in requests]
    for req in requests:
        with adapter.hook_layer_inputs(grab):
            last_logits(lvlm, [adapter.chat_prompt(req["prompt"], req.get("image") is not None)], [req.get("image")])
    return Sinks(cal.dims, cal.report(), tau, best, where, math.sqrt(adapter.hidden_size), n,
                 sink_attention(lvlm, requests))


def first_token_sink_rate(attentions: Sequence[torch.Tensor], eps: float = 0.3) -> list[float]:
    """Gu et al. 2024 (Eq. 1, "Sink_1^eps"): per layer, the share of heads whose attention to the first token,
    averaged over the query rows after it, exceeds ``eps``. attentions: per layer [heads, Lq, Lk] probabilities.

    >>> a = torch.tensor([[[1.0, 0.0], [0.9, 0.1]], [[1.0, 0.0], [0.2, 0.8]]])  # 2 heads, 2 tokens
    >>> first_token_sink_rate([a], eps=0.3)
    [0.5]
    """
    return [float((a[:, 1:, 0].float().mean(-1) > eps).float().mean()) for a in attentions]


@torch.no_grad()
def sink_attention(lvlm: Any, requests: Sequence[dict[str, Any]], eps: float = 0.3) -> list[float]:
    """Per layer, ``first_token_sink_rate`` averaged over ``requests`` (their prefill attention probabilities,
    from the model's eager attention; the backend is restored afterwards)."""
    adapter = lvlm.adapter
    before = lvlm.backend
    lvlm.model.set_attn_implementation({"text_config": "eager"})
    try:
        rates = np.zeros(adapter.num_layers)
        for req in requests:
            image = req.get("image")
            batch = adapter.encode([adapter.chat_prompt(req["prompt"], image is not None)], [image])
            out = adapter.forward(**{k: v.to(lvlm.device) for k, v in batch.items()}, output_attentions=True)
            rates += np.array(first_token_sink_rate([a[0] for a in out.attentions], eps))
    finally:
        lvlm.set_backend(before)
    return [float(r) for r in rates / max(1, len(requests))]


# ----------------------------------------------------------------------------------- all of it
@dataclass
class OrganismReport:
    model: str
    world: str
    scenes: int
    layers: int
    rates: YesRates
    continuation: Continuation
    sinks: Sinks

    def table(self) -> str:
        r = self.rates.rates
        lines = [f"## Model-organism diagnostics: {self.model} on {self.scenes} held-out scenes ({self.world} world)",
                 "", "| diagnostic | value |", "|---|---|"]
        for cond in r:
            for kind in r[cond]:
                lines.append(f"| yes-rate, {cond} image, {kind} | {r[cond][kind]} |"
                             if cond != "no image" else f"| yes-rate, no image, {kind} | {r[cond][kind]} |")
        c = self.continuation
        lines += [f"| text only: next object named = partner | {c.partner} |",
                  f"| text only: next object named = control (base rate) | {c.control} |",
                  f"| text only: partner vs control, exact McNemar p (paired) | {c.p_value:.2g} |",
                  f"| VAR sink dims (tau {self.sinks.tau:g}) | {self.sinks.dims or 'none'} |",
                  "| max abs(x_d)/rms(x) per layer input (bound sqrt(H) = "
                  f"{self.sinks.bound:.1f}) | {', '.join(f'{v:.1f}' for v in self.sinks.max_ratio)} |",
                  "| share of heads with mean attention > 0.3 on the first token, per layer (Gu et al. 2024) | "
                  f"{', '.join(f'{v:.2f}' for v in self.sinks.first_token_heads)} |",
                  f"| language-model layers | {self.layers} |"]
        lines += ["", f"Noised = VCD's diffusion at step {self.rates.noise_step} (sigmoid schedule, seed 0). "
                  "Rates: P(Yes) > P(No) at the first answer token, Wilson 95% intervals."]
        return "\n".join(lines)


# The organism's pass marks (issue 17), fixed from the words before the model was measured: the noised
# partner yes-rate "clearly above" the clean one (>= 10 points, paired exact McNemar p < 0.01); the text-only
# partner continuation "well above its base rate" (>= 2x the control's, paired p < 0.01); at least one VAR
# sink dimension at the documented tau; >= 8 language-model layers.
THRESHOLDS: dict[str, float] = {
    "noised_minus_clean_partner_min": 0.10,
    "noised_vs_clean_p_max": 0.01,
    "continuation_partner_over_control_min": 2.0,
    "continuation_p_max": 0.01,
    "sink_dims_min": 1,
    "layers_min": 8,
}


CHECKED = ("noised partner yes-rate above clean", "text-only continuation names the partner above its base rate",
           "VAR finds sink dimensions", "language-model layers")


def check(report: OrganismReport, thresholds: dict[str, float] = THRESHOLDS) -> dict[str, tuple[bool, str]]:
    """Each diagnostic against its threshold: name -> (passed, measured value in words)."""
    r = report.rates
    out: dict[str, tuple[bool, str]] = {}
    if "clean" in r.rates and "noised" in r.rates:
        gain = r.rates["noised"]["partner"].rate - r.rates["clean"]["partner"].rate
        p = r.paired_p("clean", "noised", "partner")
        out["noised partner yes-rate above clean"] = (
            gain >= thresholds["noised_minus_clean_partner_min"] and p < thresholds["noised_vs_clean_p_max"],
            f"{100 * gain:+.1f} points, p = {p:.2g} (needs >= "
            f"{100 * thresholds['noised_minus_clean_partner_min']:.0f}, p < {thresholds['noised_vs_clean_p_max']:g})")
    c = report.continuation
    ratio = c.partner.k / c.control.k if c.control.k else (math.inf if c.partner.k else math.nan)
    said = f"{ratio:.1f}x the control" if c.control.k else f"partner named {c.partner.k} times, control never"
    out["text-only continuation names the partner above its base rate"] = (
        ratio >= thresholds["continuation_partner_over_control_min"] and c.p_value < thresholds["continuation_p_max"],
        f"{said}, p = {c.p_value:.2g} (needs >= "
        f"{thresholds['continuation_partner_over_control_min']:g}x, p < {thresholds['continuation_p_max']:g})")
    out["VAR finds sink dimensions"] = (
        len(report.sinks.dims) >= thresholds["sink_dims_min"],
        f"{len(report.sinks.dims)} at tau {report.sinks.tau:g} (needs >= {thresholds['sink_dims_min']:g})")
    out["language-model layers"] = (report.layers >= thresholds["layers_min"],
                                    f"{report.layers} (needs >= {thresholds['layers_min']:g})")
    return out


def check_table(results: dict[str, tuple[bool, str]]) -> str:
    lines = ["| diagnostic | measured | passes |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'no'} |" for name, (ok, value) in results.items()]
    return "\n".join(lines)


def diagnose(lvlm: Any, spec: ShapesWorldSpec, n_scenes: int = 200, sink_requests: int = 8,
             tau: float = SINK_TAU, model_name: str = "") -> OrganismReport:
    """All four diagnostics on ``n_scenes`` scenes of ``spec`` (use a seed the model was not trained on)."""
    spec = spec.model_copy(update={"n_images": n_scenes})
    scenes = generate_scenes(spec)
    reqs = [{"prompt": CAPTION_PROMPT, "image": render_scene(s, spec)} for s in scenes[:sink_requests]]
    return OrganismReport(model_name, spec.name, n_scenes, lvlm.adapter.num_layers, yes_rates(lvlm, scenes, spec),
                          caption_continuation(lvlm, scenes, spec), sink_diagnostics(lvlm, reqs, tau))


def model_card(report: OrganismReport, checks: dict[str, tuple[bool, str]], command: str,
               training: dict[str, Any] | None = None, demo_report: str | None = None,
               tried: str | None = None) -> str:
    """The organism's model card: what was trained, each diagnostic with its figure and pass mark, what was
    tried for the marks missed (``tried``: the model folder's TRIED.md, written by whoever trained it), then
    the demo job's report (unmitigated POPE / CHAIR / partner rates and each mitigation's effect with its CI)."""
    lines = [f"# {report.model}: model card", "",
             f"Generated by `{command}` (rerun it to regenerate this file; do not edit by hand).", ""]
    if training:
        keys = ("world", "lm_layers", "patch_size", "params_m", "safetensors_mb", "seed", "threads",
                "train_seconds", "stage1_steps", "routing_steps", "stage2_steps", "stage3_steps",
                "stage2_caption_text_prob", "noise_fraction", "recipe", "timing_note", "torch", "transformers")
        lines += ["## Training (from scores.json, written by scripts/train_shapes_llava.py)", "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {training[k]} |" for k in keys if k in training]
        lines.append("")
    lines += [report.table(), "", "## Pass marks (`clearsight.evals.organism.THRESHOLDS`, checked by "
              "tests/evals/test_organism_model.py on the shipped weights)", "", check_table(checks), ""]
    missed = [name for name, (ok, _) in checks.items() if not ok]
    if missed:
        lines += [f"Missed: {'; '.join(missed)}.", ""]
        if tried:
            lines += ["## What was tried for the marks missed (TRIED.md beside the weights)", "", tried.strip(), ""]
    if demo_report:
        lines += ["## Unmitigated and mitigated (the demo job on this model and its world)", "",
                  ("\n" + demo_report).replace("\n# ", "\n### ").replace("\n## ", "\n### ").strip(), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clearsight.evals.organism", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:shapes-llava", help="model reference (load_model)")
    ap.add_argument("--world", choices=("shapes", "organism"), default="shapes",
                    help="the world of the held-out scenes: the shipped one or organism_spec's")
    ap.add_argument("--scenes", type=int, default=200, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=1000, help="scene seed (held out: not a training seed)")
    ap.add_argument("--tau", type=float, default=SINK_TAU,
                    help=f"VAR's sink threshold for the calibration (default {SINK_TAU:g}: see SINK_TAU)")
    ap.add_argument("--card", default=None, help="also write the model card (diagnostics, pass marks, and with "
                    "--demo the demo job's report) to this file")
    ap.add_argument("--demo", default=None, metavar="DIR",
                    help="with --card: run the demo job (every mitigation, POPE + partner + CHAIR) into DIR")
    args = ap.parse_args(argv)
    if args.demo and not args.card:
        print("error: --demo only feeds the model card: give --card FILE too", file=sys.stderr)
        return 2
    if args.scenes < 1:
        print("error: --scenes must be >= 1", file=sys.stderr)
        return 2
    from pathlib import Path

    if args.card and not Path(args.card).expanduser().resolve().parent.is_dir():
        print(f"error: --card {args.card}: its folder does not exist; create it or give another path", file=sys.stderr)
        return 2
    from clearsight.errors import InputError
    from clearsight.models.loader import load_model

    try:
        lvlm = load_model(args.model, device="cpu", dtype="float32")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = (organism_spec if args.world == "organism" else ShapesWorldSpec)(seed=args.seed)
    report = diagnose(lvlm, spec, args.scenes, tau=args.tau, model_name=args.model)
    print(report.table())
    checks = check(report)
    print()
    print(check_table(checks))
    if args.card:
        try:
            _write_card(args, report, checks, argv)
        except InputError as e:  # e.g. --demo DIR holds another job's results
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


def _write_card(args: argparse.Namespace, report: OrganismReport, checks: dict[str, tuple[bool, str]],
                argv: Sequence[str] | None) -> None:
    import json
    import shlex
    from pathlib import Path

    from clearsight.evals._io import atomic_write_text
    from clearsight.models.shipped import shipped_model_path

    folder = shipped_model_path(args.model) or Path(args.model).expanduser()
    scores = folder / "scores.json"
    training = json.loads(scores.read_text(encoding="utf-8")).get("training") if scores.is_file() else None
    demo_md = None
    if args.demo:
        from clearsight.evals.demo import demo_job
        from clearsight.evals.runner import run_job

        job = demo_job(output=args.demo, model=args.model)
        run_job(job)
        demo_md = (Path(job.output) / "report.md").read_text(encoding="utf-8")
    words = sys.argv[1:] if argv is None else list(argv)
    command = "python -m clearsight.evals.organism " + shlex.join(words)
    tried = folder / "TRIED.md"
    atomic_write_text(args.card, model_card(report, checks, command, training, demo_md,
                                            tried.read_text(encoding="utf-8") if tried.is_file() else None))
    print(f"wrote {args.card}")


if __name__ == "__main__":
    raise SystemExit(main())
