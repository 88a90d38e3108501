"""The demo job (``make demo``): POPE (3 splits plus the partner question set) and CHAIR on held-out shapes
scenes for the demo model, unmitigated and with every implemented mitigation at its defaults (except those
marked ``in_demo = False``: CARVE, whose two 32-token probes per request would dominate the job's time)."""

from __future__ import annotations

import sys

from clearsight.config import DEFAULT_MODEL as DEMO_MODEL
from clearsight.evals.job import EvalJob, parse_job

FALLBACK_MODEL = "builtin:tiny-llava"

# Sizes (issue 16): >= 600 partner questions give the partner yes-rate (~58%) a Wilson 95% CI half-width
# <= 4 points (1.96 sqrt(0.58 x 0.42 / 600) = 3.9).
PER_SPLIT = 120
N_IMAGES = 50
PARTNER = 600


def demo_model() -> str:
    from clearsight.models.shipped import shapes_llava_path

    if (shapes_llava_path() / "config.json").is_file():
        return DEMO_MODEL
    print(f"demo: {DEMO_MODEL} weights are not installed; using {FALLBACK_MODEL} (random weights)", file=sys.stderr)
    return FALLBACK_MODEL


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
    return parse_job({
        "systems": demo_systems(model),
        "benchmarks": [
            {"kind": "pope", "data": "builtin:shapes", "limit": per_split, "partner": partner},
            {"kind": "chair", "data": "builtin:shapes", "n_images": n_images, "max_new_tokens": 48},
        ],
        "output": output,
        "batch_size": 32,
        "executor": executor,
        "workers": workers,
    }, where="demo job")
