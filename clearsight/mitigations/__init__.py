"""Mitigations: one module per method, each registered under its name."""

from clearsight.mitigations import none  # noqa: F401  (registers the baseline)
from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.registry import (
    REGISTRY,
    describe_mitigations,
    mitigation_type,
    parse_mitigation,
    parse_mitigations,
    register,
)

__all__ = [
    "MAIN", "REGISTRY", "Branch", "Mitigation", "RequestContext", "describe_mitigations", "mitigation_type",
    "parse_mitigation", "parse_mitigations", "register",
]
