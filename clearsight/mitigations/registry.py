"""Mitigation registry: name -> spec class, and parsing from the CLI (``name:key=value,...``) or dicts."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, ValidationError

from clearsight.errors import InputError, pydantic_message
from clearsight.kernels.plan import PlanConflictError
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
            if key.strip() in params:
                raise InputError(f"mitigation '{spec}': parameter '{key.strip()}' given twice: give it once")
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


def parse_mitigations(specs: Any) -> list[Mitigation]:
    """A list of mitigations (each as ``parse_mitigation`` takes it; a single one is a list of one) -> validated
    specs, ``none`` dropped. Refuses a method given twice and methods that cannot be combined (before any model
    is loaded: ``check_compatible``)."""
    if specs is None:
        specs = []
    elif isinstance(specs, str | dict | Mitigation):
        specs = [specs]  # one mitigation, not its letters or keys
    elif not isinstance(specs, list | tuple):
        raise InputError(f"mitigations must be a list of names, name:key=value strings, dicts or specs; "
                         f"got {type(specs).__name__}")
    parsed = [parse_mitigation(s) for s in specs]
    names = [m.name for m in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"mitigation {', '.join(dupes)} given twice in one request: give it once")
    kept = [m for m in parsed if m.name != "none"]
    check_compatible(kept)
    return kept


def _meet(a: Mitigation, b: Mitigation) -> bool:
    """Whether ``a`` and ``b`` can write the plan for the same row and layer in some model (see ``Mitigation``)."""
    if a.plan_rows == "own" and b.plan_rows == "own":
        return False
    la, lb = a.plan_layers(), b.plan_layers()
    if isinstance(la, int) and isinstance(lb, int):
        return True  # both run to the model's last layer
    if isinstance(la, int) or isinstance(lb, int):
        first, given = (la, lb) if isinstance(la, int) else (lb, la)
        assert isinstance(first, int) and not isinstance(given, int)
        return any(layer >= first for layer in given)
    return bool(la & lb)


def conflict_between(a: Mitigation, b: Mitigation) -> str | None:
    """Why ``a`` and ``b`` cannot be combined in one request, from their declared plan edits (and their own
    ``refuses`` rules); None if they can."""
    for first, second in ((a, b), (b, a)):
        why = first.refuses(second)
        if why is not None:
            return why
    if not (a.edits_plan() and b.edits_plan()) or not _meet(a, b):
        return None
    for field in a.plan_fields:
        if field in b.plan_fields:
            return (f"both set the attention {field} ({a.name} {a.plan_fields[field]}; "
                    f"{b.name} {b.plan_fields[field]})")
    for first, second in ((a, b), (b, a)):
        for field, why in first.refuses_plan_fields.items():
            if field in second.plan_fields:
                return (f"{second.name} sets the attention {field} of rows {first.name} edits "
                        f"({second.name} {second.plan_fields[field]}), and {first.name} {why}")
    if a.abs_bias_rows is not None and b.abs_bias_rows is not None and a.abs_bias_rows != b.abs_bias_rows:
        return (f"both boost image-key scores, on different query rows ({a.name}: {a.abs_bias_rows}; "
                f"{b.name}: {b.abs_bias_rows})")
    return None


def check_compatible(mitigations: list[Mitigation]) -> None:
    """Refuse two mitigations whose plan edits cannot be combined in one request: a PlanConflictError (an
    InputError) naming both and why, before any model is loaded."""
    for i, a in enumerate(mitigations):
        for b in mitigations[i + 1:]:
            why = conflict_between(a, b)
            if why is not None:
                raise PlanConflictError(f"mitigations '{a.name}' and '{b.name}' cannot be combined in one request: "
                                        f"{why}; drop one of them")


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


