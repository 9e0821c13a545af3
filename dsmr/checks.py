"""The one integer check every user-facing argument of ``dsmr`` goes through."""
from __future__ import annotations


def check_int(name: str, value, minimum: int = 0, *, allow_none: bool = False):
    """Return ``value`` if it is an int ``>= minimum`` (or None with ``allow_none``); else ValueError.

    ``bool`` is refused although it is an ``int`` subclass: ``batch_lanes=True`` is a mistake,
    not 1. ``name`` is what the message calls the argument (e.g. "horizon of layer 3").
    """
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}{expected}, got {value!r}")
    return value
