"""``model.widths`` of every family: a family's defaults updated by the user's overrides, checked
against them here, so that a wrong width is a clear error instead of a silently different
network (a 2-entry ResNet neck builds, with output stride 8 instead of 4) or a stack trace from
inside a conv constructor."""

from __future__ import annotations


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check(key: str, value, default, free_length: bool, nullable: bool) -> None:
    if value is None and nullable:
        return
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)) and all(_positive_int(item) for item in value):
            if len(value) > 0 if free_length else len(value) == len(default):
                return
        count = "a list of" if free_length else f"{len(default)}"
        expected = f"{count} positive integers (default {list(default)})"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return
        expected = f"a positive number (default {default})"
    else:
        if _positive_int(value):
            return
        expected = f"a positive integer (default {default})"
    if nullable:
        expected += " or null"
    raise ValueError(f"model.widths.{key}: expected {expected}, got {value!r}")


def merge_widths(
    defaults: dict,
    widths: dict | None,
    *,
    free_lengths: tuple[str, ...] = (),
    nullable: tuple[str, ...] = (),
) -> dict:
    """``defaults`` updated by ``widths``. Every key must be one of the defaults'; a value must
    have its default's shape: a positive integer, a positive number (float defaults), or a list
    of positive integers as long as the default's (any non-empty length for the keys in
    ``free_lengths``). Keys in ``nullable`` also take None (the family derives them). Raises
    ValueError naming the key, what was expected and what was given."""
    if widths is not None and not isinstance(widths, dict):
        raise ValueError(f"model.widths: expected a mapping of width names, got {widths!r}")
    unknown = sorted(set(widths or {}) - set(defaults))
    if unknown:
        raise ValueError(f"model.widths: unknown keys {unknown}; known keys: {sorted(defaults)}")
    merged = {**defaults, **(widths or {})}
    for key, value in (widths or {}).items():
        _check(key, value, defaults[key], key in free_lengths, key in nullable)
    return merged
