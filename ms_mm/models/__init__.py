"""ms_mm.models: one package per model family — everything that is that family's (config readers,
Cells, host-side inputs, processing, parallelize plan, family record, tiny default and demo data).
Engines reach these packages only through `ms_mm.registry`, by name.

This package itself holds only what every family's config shares: `check_int`, the integer-field
check of their ``validate()`` methods (a family imports it from here; it imports no family)."""

__all__ = ["check_int"]


def check_int(obj, name: str, prefix: str, minimum: int = 1) -> int:
    """``getattr(obj, name)`` when it is an int (a bool is not) of at least `minimum`; otherwise a
    ValueError naming the field and the rule: ``"<prefix>.<name>: must be a positive int, got 0"``
    (minimum 1), ``"... a non-negative int ..."`` (minimum 0), ``"... an int >= m ..."`` otherwise."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rule = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{prefix}.{name}: must be {rule}, got {value!r}")
    return value
