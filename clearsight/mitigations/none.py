"""The unmitigated baseline."""

from __future__ import annotations

from typing import Literal

from clearsight.mitigations.base import Mitigation
from clearsight.mitigations.registry import register


@register
class NoMitigation(Mitigation):
    name: Literal["none"] = "none"
    summary = "no mitigation: the model's stock behaviour (the baseline every report compares to)"
    kind = "baseline"
