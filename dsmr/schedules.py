"""Per-layer memory horizons ("schedules") and their recurrent-state budget.

A schedule is a plain list with one entry per layer: ``None`` keeps the whole history of the
piece, an int keeps that many most recent tokens, 0 keeps none. Layer 0 is the lowest.

    >>> two_scale(6, 64, 8, 2)
    [64, 64, 8, 8, 8, 8]

The command line names schedules as ``family:key=value,...``, e.g.
``two_scale:long=4096,short=512,n_long=2`` (see :func:`parse`).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence

from .checks import check_int

Horizon = Optional[int]


def _check_n(n: int) -> None:
    check_int("number of layers", n, 1)


def _check_h(name: str, h) -> None:
    check_int(name, h, 0)


def full(n: int) -> List[Horizon]:
    """Every layer keeps the whole history: ``[None] * n``."""
    _check_n(n)
    return [None] * n


def none(n: int) -> List[Horizon]:
    """No memory in any layer: ``[0] * n``. The control every memory schedule is measured against:
    each segment sees only itself (plus nothing carried from earlier segments)."""
    _check_n(n)
    return [0] * n


def uniform(n: int, m: int) -> List[Horizon]:
    """Every layer keeps ``m`` tokens."""
    _check_n(n)
    _check_h("m", m)
    return [m] * n


def two_scale(n: int, long: int, short: int, n_long: int) -> List[Horizon]:
    """The lowest ``n_long`` layers keep ``long`` tokens, the rest ``short`` (the paper's schedule)."""
    _check_n(n)
    _check_h("long", long)
    _check_h("short", short)
    if not 0 <= n_long <= n:
        raise ValueError(f"n_long must lie in [0, {n}], got {n_long}")
    return [long] * n_long + [short] * (n - n_long)


def reverse_two_scale(n: int, long: int, short: int, n_long: int) -> List[Horizon]:
    """The mirror of :func:`two_scale`: the *top* ``n_long`` layers keep ``long`` tokens."""
    return list(reversed(two_scale(n, long, short, n_long)))


def progressive(n: int, low: int, high: int, ascending: bool = True) -> List[Horizon]:
    """Horizons interpolated geometrically from ``low`` (layer 0) to ``high`` (top), or reversed."""
    _check_n(n)
    _check_h("low", low)
    _check_h("high", high)
    if n == 1:
        hs = [high]
    elif low == 0:
        hs = [round(high * i / (n - 1)) for i in range(n)]
    else:
        hs = [round(low * (high / low) ** (i / (n - 1))) for i in range(n)]
    return hs if ascending else hs[::-1]


def selective(n: int, m: int, layers: Sequence[int]) -> List[Horizon]:
    """Binary horizons: the listed ``layers`` keep ``m`` tokens, every other layer none."""
    _check_n(n)
    _check_h("m", m)
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"selective layers must lie in [0, {n}), got {bad}")
    chosen = set(layers)
    return [m if i in chosen else 0 for i in range(n)]


def perceiver_ar_like(n: int, long: int) -> List[Horizon]:
    """Only the first layer has memory (``long`` tokens), as in Perceiver AR's cross-attend-once."""
    _check_n(n)
    _check_h("long", long)
    return [long] + [0] * (n - 1)


FAMILIES: Dict[str, Callable[..., List[Horizon]]] = {
    "full": full,
    "none": none,
    "uniform": uniform,
    "two_scale": two_scale,
    "reverse_two_scale": reverse_two_scale,
    "progressive": progressive,
    "selective": selective,
    "perceiver_ar_like": perceiver_ar_like,
}


def validate(horizons: Sequence[Horizon], n_layers: int) -> List[Horizon]:
    """Check a schedule against a model depth; returns it as a list. Raises ``ValueError``."""
    horizons = list(horizons)
    if len(horizons) != n_layers:
        raise ValueError(f"schedule has {len(horizons)} horizons but the model has {n_layers} layers")
    for i, h in enumerate(horizons):
        check_int(f"horizon of layer {i}", h, 0, allow_none=True)
    return horizons


def _parse_value(key: str, text: str):
    text = text.strip()
    if key == "layers":
        return [int(t) for t in text.replace("+", " ").replace(";", " ").split()]
    if key == "ascending":
        if text.lower() in ("1", "true", "yes", "up"):
            return True
        if text.lower() in ("0", "false", "no", "down"):
            return False
        raise ValueError(f"ascending must be true/false, got {text!r}")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"schedule parameter {key} must be an int, got {text!r}") from None


def parse(spec: str, n_layers: int) -> List[Horizon]:
    """Build a schedule from its command-line form.

    ``"full"``, ``"uniform:m=512"``, ``"two_scale:long=4096,short=512,n_long=2"``,
    ``"progressive:low=64,high=4096,ascending=false"``, ``"selective:m=1024,layers=0+3"``,
    ``"perceiver_ar_like:long=4096"``, ``"none"`` (no memory: every horizon 0), or an explicit
    list ``"64,64,8,8,none,0"``. Inside a list ``none`` (or ``full``) is one whole-history layer;
    the word ``none`` alone is the no-memory family (write ``full`` for whole history everywhere).
    """
    spec = spec.strip()
    family, _, rest = spec.partition(":")
    if family not in FAMILIES:
        # An explicit per-layer list.
        if "," in spec or spec.isdigit():
            hs = [None if t.strip().lower() in ("none", "full") else _parse_value("h", t) for t in spec.split(",")]
            return validate(hs, n_layers)
        raise ValueError(f"unknown schedule family {family!r}; choose from {sorted(FAMILIES)} or a list like 64,64,8")
    fn = FAMILIES[family]
    kwargs = {}
    if rest:
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"schedule parameter {item!r} must look like key=value")
            kwargs[key] = _parse_value(key, val)
    params = [p for p in inspect.signature(fn).parameters if p != "n"]
    unknown = set(kwargs) - set(params)
    if unknown:
        raise ValueError(f"{family} takes {params}, not {sorted(unknown)}")
    try:
        return validate(fn(n_layers, **kwargs), n_layers)
    except TypeError as e:
        raise ValueError(f"{family} needs parameters {params}: {e}") from None


def budget(
    horizons: Sequence[Horizon],
    *,
    piece_len: Optional[int] = None,
    segment_len: int = 0,
    n_kv_heads: int = 1,
    head_dim: int = 1,
    batch: int = 1,
    bytes_per_elem: int = 2,
) -> dict:
    """Recurrent KV state of a schedule.

    ``None`` horizons (whole history) count as ``piece_len`` tokens and finite ones at most that;
    without ``piece_len`` whole-history layers make the budget unbounded (``slots = inf``). ``segment_len`` caps nothing; it is reported so
    the attention span per query (memory + segment) can be read off.

    Returns a dict: ``slots`` (sum of horizons: KV slots per lane), ``per_layer`` (list),
    ``bytes`` (K and V for all lanes: ``2 * slots * n_kv_heads * head_dim * batch * bytes_per_elem``),
    ``max_span`` (the longest memory + segment any query attends over).
    """
    per_layer = []
    for i, h in enumerate(horizons):
        if h is None:
            per_layer.append(float("inf") if piece_len is None else int(piece_len))
        else:
            _check_h(f"horizon of layer {i}", h)
            # A layer never holds more than the piece it has seen.
            per_layer.append(int(h) if piece_len is None else min(int(h), int(piece_len)))
    slots = sum(per_layer)
    nbytes = 2 * slots * n_kv_heads * head_dim * batch * bytes_per_elem
    return {
        "slots": slots,
        "per_layer": per_layer,
        "bytes": nbytes,
        "max_span": (max(per_layer) if per_layer else 0) + segment_len,
    }


def at_budget(family: str, n: int, total: int, **fixed) -> List[Horizon]:
    """A schedule of ``family`` whose horizons sum to (at most, as close as possible) ``total``.

    One free size is solved for, the rest are taken from ``fixed``:

    * ``uniform``: ``m = total // n``.
    * ``two_scale`` / ``reverse_two_scale``: give ``short`` and ``n_long``; ``long`` is solved.
    * ``progressive``: give ``low`` (and ``ascending``); ``high`` is found by bisection.
    * ``selective``: give ``layers``; ``m = total // len(layers)``.
    * ``perceiver_ar_like``: ``long = total``.

    Lets schedules be compared at equal recurrent-state budget.
    """
    _check_n(n)
    _check_h("total", total)
    if family == "uniform":
        return uniform(n, total // n)
    if family in ("two_scale", "reverse_two_scale"):
        short, n_long = fixed.get("short", 0), fixed.get("n_long", 1)
        if n_long < 1:
            raise ValueError("n_long must be >= 1 to solve for long")
        long = (total - short * (n - n_long)) // n_long
        if long < short:
            raise ValueError(f"total {total} is too small for short={short} on {n - n_long} layers")
        return FAMILIES[family](n, long, short, n_long)
    if family == "progressive":
        low, asc = fixed.get("low", 0), fixed.get("ascending", True)
        if low * n > total:
            raise ValueError(f"total {total} is below n * low = {n * low}; lower low")
        lo, hi = low, max(low, total)
        while lo < hi:  # largest high whose sum <= total
            mid = (lo + hi + 1) // 2
            if sum(progressive(n, low, mid, asc)) <= total:
                lo = mid
            else:
                hi = mid - 1
        return progressive(n, low, lo, asc)
    if family == "selective":
        layers = fixed.get("layers", [0])
        layers = [layers] if isinstance(layers, int) else list(layers)
        return selective(n, total // max(1, len(layers)), layers)
    if family == "perceiver_ar_like":
        return perceiver_ar_like(n, total)
    raise ValueError(f"at_budget supports uniform, two_scale, reverse_two_scale, progressive, selective, perceiver_ar_like; got {family!r}")


def describe(horizons: Sequence[Horizon]) -> str:
    """Compact text form, e.g. ``[4096x2, 512x4]``."""
    parts, prev, count = [], object(), 0
    for h in list(horizons) + [object()]:
        if h == prev:
            count += 1
            continue
        if count:
            label = "all" if prev is None else str(prev)
            parts.append(label if count == 1 else f"{label}x{count}")
        prev, count = h, 1
    return "[" + ", ".join(parts) + "]"
