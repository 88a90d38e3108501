"""Mitigation registry: name -> spec class, and parsing from the CLI (``name:key=value,...``) or dicts."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, ValidationError

from clearsight.errors import InputError, pydantic_message
from clearsight.mitigations.base import Mitigation

REGISTRY: dict[str, type[Mitigation]] = {}


def register(cls: type[Mitigation]) -> type[Mitigation]:
    """Class decorator: add a mitigation spec under its ``name`` literal."""
    name = cls.model_fields["name"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__}.name needs a default literal")
    REGISTRY[name] = cls
    return cls


def _known() -> str:
    return ", ".join(sorted(REGISTRY))


def mitigation_type() -> Any:
    """The discriminated union of every registered spec (for config files and request schemas)."""
    classes = tuple(REGISTRY.values())
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007


def parse_value(text: str) -> Any:
    """CLI values: lists as a|b|c, none/null as None, everything else left to pydantic's lax conversion."""
    if text.lower() in ("none", "null"):
        return None
    if "|" in text:
        return [t for t in text.split("|") if t]
    return text


def parse_mitigation(spec: str | dict[str, Any] | Mitigation) -> Mitigation:
    """``"var"``, ``"var:p=0.4,rho=0.8"``, ``{"name": "var", "p": 0.4}`` or a spec -> a validated spec."""
    if isinstance(spec, Mitigation):
        return spec
    if isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise InputError(f"mitigation '{spec}': parameter '{item}' is not key=value")
            params[key.strip()] = parse_value(value.strip())
        data: dict[str, Any] = {"name": name.strip(), **params}
    elif isinstance(spec, dict):
        data = dict(spec)
    else:
        raise InputError(f"a mitigation is a name, name:key=value,... or a dict; got {type(spec).__name__}")
    name = data.get("name")
    if name not in REGISTRY:
        raise InputError(f"unknown mitigation '{name}': choose one of {_known()} (see `clearsight mitigations`)")
    cls = REGISTRY[name]
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(k for k in cls.model_fields if k != "name") or "none"
        raise InputError(pydantic_message(exc, f"mitigation '{name}'") + f" (parameters: {fields})") from None


def parse_mitigations(specs: list[Any] | tuple[Any, ...] | None) -> list[Mitigation]:
    parsed = [parse_mitigation(s) for s in specs or ()]
    names = [m.name for m in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"mitigation {', '.join(dupes)} given twice in one request: give it once")
    return [m for m in parsed if m.name != "none"]


def describe_mitigations() -> list[dict[str, Any]]:
    """Each mitigation with its parameters and defaults (for `clearsight mitigations`)."""
    out = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        params = []
        for field_name, info in cls.model_fields.items():
            if field_name == "name":
                continue
            params.append({
                "name": field_name,
                "type": getattr(info.annotation, "__name__", str(info.annotation)),
                "default": info.default,
                "description": info.description or "",
            })
        out.append({"name": name, "kind": cls.kind, "summary": cls.summary, "parameters": params})
    return out


