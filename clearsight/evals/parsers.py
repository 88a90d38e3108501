"""Yes/no answer parsers (reference/evals.md section 1.5): POPE's official rule and its two variants.

Shared by every yes/no benchmark (POPE, the shapes world's partner questions, AMBER's discriminative
part); MME's official rule is its own (``clearsight.evals.metrics.mme``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from clearsight.evals.errors import EvalInputError

Label = Literal["yes", "no"]

def parse_pope(text: str) -> Label:
    """Official POPE ``evaluate.py`` (= LLaVA ``eval_pope.py``): text before the first period, commas
    removed, split on single spaces; "no" iff a token is exactly ``No``, ``not`` or ``no``; else "yes".
    Never unparsed, by design of the official rule (refusals count as yes, section 1.5)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_negation(text: str) -> Label:
    """OPERA/HALC ``pope_eval.py``: periods and commas removed from the whole output; "no" iff a token is
    ``No``/``not``/``no``/``NO`` or ends with ``n't``; else "yes"."""
    words = text.replace(".", "").replace(",", "").split(" ")
    if any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words):
        return "no"
    return "yes"


def parse_strict(text: str) -> Label | None:
    """lmms-eval ``pope``: lowercase + strip, then exact ``yes``/``no``; anything else is unparsed (None)."""
    t = text.strip().lower()
    return t if t in ("yes", "no") else None  # type: ignore[return-value]


PARSERS: dict[str, Callable[[str], Label | None]] = {
    "pope": parse_pope,
    "negation": parse_negation,
    "strict": parse_strict,
}


def get_parser(name: str) -> Callable[[str], Label | None]:
    if name not in PARSERS:
        raise EvalInputError(f"unknown POPE parser {name!r}; use one of {', '.join(PARSERS)}")
    return PARSERS[name]
