"""Conversion specs by name: the `FamilySpec` of a model family or converter name.

A family registered in `ms_mm.registry` names its adapter module (`Family.adapter`), whose module-level
`SPEC` (a `convert.spec.FamilySpec`) any name of the family (family, model_id, converter) finds. A
module in `adapters/` with a `SPEC` and no family record (a converter alone) is found too, by its
module or converter name. Modules are imported lazily, by name, the one named after the family
first, so a broken sibling adapter cannot break the others (its import error is reported only if
the name asked for is not found).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Tuple

from convert.spec import FamilySpec
from ms_mm import registry

__all__ = ["get_spec", "known_specs", "UnknownFamilyError"]

_CACHE: Dict[str, FamilySpec] = {}


class UnknownFamilyError(KeyError):
    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


def _load(module_name: str):
    mod = importlib.import_module(f"adapters.{module_name}")
    spec = getattr(mod, "SPEC", None)
    if isinstance(spec, FamilySpec):
        _CACHE[spec.family] = spec
        return spec
    return None


def known_specs() -> Tuple[List[FamilySpec], Dict[str, str]]:
    """All importable family specs, and {module: error} for adapters that failed to import."""
    errors = {}
    adapters = importlib.import_module("adapters")   # by name: family modules are never imported statically
    for info in pkgutil.iter_modules(adapters.__path__):
        if info.name in ("spec",) or info.name.startswith("_"):
            continue
        try:
            _load(info.name)
        except Exception as e:  # noqa: BLE001 - reported to the user, never swallowed silently
            errors[info.name] = f"{type(e).__name__}: {e}"
    return sorted(_CACHE.values(), key=lambda s: s.family), errors


def get_spec(name: str) -> FamilySpec:
    """Spec by family ("qwen2_5_vl") or converter name ("Qwen2_5_VLConverter")."""
    if isinstance(name, FamilySpec):
        return name
    try:
        family = registry.get(name)
    except registry.UnknownFamilyError:
        family = None
    if family is not None and family.adapter:
        spec = family.spec()
        _CACHE[spec.family] = spec
        return spec
    for spec in _CACHE.values():
        if name in (spec.family, spec.converter):
            return spec
    if name.isidentifier() and name.islower():
        try:
            spec = _load(name)
            if spec is not None:
                return spec
        except ModuleNotFoundError as e:
            if e.name != f"adapters.{name}":
                raise
    specs, errors = known_specs()
    for spec in specs:
        if name in (spec.family, spec.converter):
            return spec
    listing = ", ".join(f"{s.converter} ({s.family})" for s in specs) or "none"
    msg = f"unknown converter or model family {name!r}; known: {listing}"
    if errors:
        msg += "; adapters that failed to import: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
    raise UnknownFamilyError(msg)
