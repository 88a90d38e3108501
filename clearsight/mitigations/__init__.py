"""Mitigations: one module per method, each registering its spec class under its name.

Every module of this package is imported here, so adding a method is adding a file.
"""

import importlib
import pkgutil

from clearsight.mitigations.base import MAIN, Branch, Mitigation, Probe, RequestContext, probe_for
from clearsight.mitigations.registry import (
    REGISTRY,
    describe_mitigations,
    mitigation_type,
    parse_mitigation,
    parse_mitigations,
    register,
)

_INFRASTRUCTURE = {"base", "registry"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _INFRASTRUCTURE and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "MAIN", "REGISTRY", "Branch", "Mitigation", "Probe", "RequestContext", "describe_mitigations",
    "mitigation_type", "parse_mitigation", "parse_mitigations", "probe_for", "register",
]
