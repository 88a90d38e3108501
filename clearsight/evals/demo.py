"""The demo job (``make demo``): POPE (3 splits plus the partner question set) and CHAIR on held-out shapes
scenes for the demo model, unmitigated and with every implemented mitigation at its defaults (except those
marked ``in_demo = False``: CARVE, whose two 32-token probes per request would dominate the job's time).

The demo model is ``builtin:shapes-organism`` (issue 17: a model of the shapes world built to have the
mechanisms the methods act on, docs/demo-model.md), measured on its own world; where its weights are not
installed, ``builtin:shapes-llava``, then a random-weight tiny LLaVA."""

from __future__ import annotations

import sys

from clearsight.evals.job import EvalJob, parse_job

DEMO_MODELS = ("builtin:shapes-organism", "builtin:shapes-llava")  # first installed wins
FALLBACK_MODEL = "builtin:tiny-llava"
# the world a shipped model was trained for, held out (another seed): its demo data
DEMO_DATA = {"builtin:shapes-organism": "builtin:shapes-organism"}
# caption budget per world: the organism's captions name size, colour, shape and position (~60 tokens for 6 objects)
CAPTION_TOKENS = {"builtin:shapes": 48, "builtin:shapes-organism": 96}

# Sizes (issue 16): >= 600 partner questions give the partner yes-rate (~58%) a Wilson 95% CI half-width
# <= 4 points (1.96 sqrt(0.58 x 0.42 / 600) = 3.9).
PER_SPLIT = 120
N_IMAGES = 50
PARTNER = 600


def demo_model() -> str:
    from clearsight.models.shipped import shipped_model_path

    for model in DEMO_MODELS:
        if (shipped_model_path(model) / "config.json").is_file():
            return model
    print(f"demo: no shipped weights installed ({', '.join(DEMO_MODELS)}); using {FALLBACK_MODEL} (random weights)",
          file=sys.stderr)
    return FALLBACK_MODEL


def demo_data(model: str) -> str:
    """The built-in world the demo measures ``model`` on: the organism world for ``builtin:shapes-organism``,
    else ``builtin:shapes``."""
    return DEMO_DATA.get(model, "builtin:shapes")


def demo_systems(model: str) -> list[dict]:
    from clearsight.mitigations import REGISTRY

    systems = [{"name": "none", "model": model}]
    for name, cls in sorted(REGISTRY.items()):
        if name == "none" or name.startswith("test-") or not cls.in_demo:
            continue
        systems.append({"name": name, "model": model, "mitigations": [name], **getattr(cls, "demo_overrides", {})})
    return systems


def demo_job(output: str = "runs/demo", model: str | None = None, per_split: int = PER_SPLIT,
             n_images: int = N_IMAGES, partner: int = PARTNER, executor: str = "local", workers: int = 1) -> EvalJob:
    model = model or demo_model()
    data = demo_data(model)
    return parse_job({
        "systems": demo_systems(model),
        "benchmarks": [
            {"kind": "pope", "data": data, "limit": per_split, "partner": partner},
            {"kind": "chair", "data": data, "n_images": n_images, "max_new_tokens": CAPTION_TOKENS.get(data, 48)},
        ],
        "output": output,
        "batch_size": 32,
        "executor": executor,
        "workers": workers,
    }, where="demo job")
