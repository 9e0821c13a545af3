"""The schedule study's report: ``study.csv``, ``study.md`` (table, configuration, finding) and ``study.png``.

The finding is written from the numbers by :func:`finding`: it ranks the schedules, takes the
spread between the seeds of the rows trained twice as the noise, says which differences lie
within it, states every comparison against full memory (``full``) and against no memory (the
``none`` control), and says plainly when memory does not pay (when no schedule with memory beats
``none`` by more than that noise; and, separately, whether full memory beats the schedule with
the least KV state). It then splits each schedule's distance to ``none`` in two, from the same
weights evaluated with their memory wiped at every segment start::

    NLL(row) - NLL(none) = [NLL(row, memory wiped) - NLL(none)]  -  [NLL(row, memory wiped) - NLL(row)]
                           what training with memory did to the     what the memory gives at
                           weights (judged without memory)          inference

so a memory schedule that loses to ``none`` is seen to lose either because its memory gives
nothing or because its weights got worse than ``none``'s at what both can do.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoint import atomic_write_text

CSV_COLUMNS = ("schedule", "seed", "horizons", "n_kv_heads", "kv_slots", "kv_mib", "val_ppl", "val_nll",
               "val_nll_per_note", "krcu_reset_at", "krcu_auc", "krcu_mean", "krcu_pieces", "krcu_long_reset_at",
               "krcu_long_auc", "krcu_long_mean", "krcu_long_pieces", "tokens_per_s", "peak_mib", "train_tokens",
               "steps", "best_step", "val_nll_nomem", "nll_offset_0-15", "nll_offset_0-15_nomem",
               "nll_offset_64+", "nll_offset_64+_nomem")
OFFSET_COLUMNS = {"nll_offset_0-15": ("offsets", "0-15"), "nll_offset_0-15_nomem": ("offsets_nomem", "0-15"),
                  "nll_offset_64+": ("offsets", "64+"), "nll_offset_64+_nomem": ("offsets_nomem", "64+")}
KRCU_FLOOR = 0.01  # nats/token: a mean increase below this is "no measurable use" of the wiped context
KRCU_PREFIXES = ("krcu", "krcu_long")


def _num(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def csv_text(rows: Sequence[dict]) -> str:
    """The CSV of the rows (one per schedule and seed), columns :data:`CSV_COLUMNS`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    fmts = {"kv_mib": ".4f", "val_ppl": ".4f", "val_nll": ".5f", "val_nll_per_note": ".5f", "krcu_auc": ".4f",
            "krcu_mean": ".6f", "krcu_long_auc": ".4f", "krcu_long_mean": ".6f", "tokens_per_s": ".1f",
            "peak_mib": ".1f", "val_nll_nomem": ".5f", **{c: ".5f" for c in OFFSET_COLUMNS}}
    for r in rows:
        vals = {**r, "horizons": r.get("horizons_text", r.get("horizons"))}
        vals.update({c: (r.get(key) or {}).get(lab) for c, (key, lab) in OFFSET_COLUMNS.items()})
        w.writerow([_num(vals.get(c), fmts[c]) if c in fmts else ("" if vals.get(c) is None else vals[c])
                    for c in CSV_COLUMNS])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# the finding


def _groups(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        out.setdefault(r["schedule"], []).append(r)
    return out


def _mean(rs: Sequence[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _spread(rs: Sequence[dict], key: str) -> float:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return max(vals) - min(vals) if len(vals) > 1 else 0.0


def _names(items) -> str:
    return ", ".join(items)


def _noise_sentence(groups, noise) -> str:
    twice = {k: rs for k, rs in groups.items() if len(rs) > 1}
    if not twice:
        return "Every schedule trained with one seed only, so there is no noise estimate: no difference below can be called real."
    parts = [f"{k}'s {len(rs)} seeds differ by {_spread(rs, 'val_ppl'):.3f}" for k, rs in twice.items()]
    return (f"Seed noise: {_names(parts)} in validation perplexity, so differences up to {noise:.3f} "
            f"are within the two-seed noise.")


_REF_NAMES = {"full": "full memory (", "none": "no memory (none, "}


def _against(groups, ppl, noise, ref: str) -> Optional[str]:
    """Every other schedule's perplexity against ``ref``'s (``full`` or ``none``): within / beyond the noise."""
    if ref not in ppl:
        return None
    pf, eps = ppl[ref], noise or 0.0
    same, better, worse = [], [], []
    for k, p in ppl.items():
        if k == ref:
            continue
        d = p - pf
        (same if abs(d) <= eps else better if d < 0 else worse).append(f"{k} ({d:+.3f})")
    parts = []
    if same:
        parts.append(f"within the noise: {_names(same)}")
    if better:
        parts.append(f"better beyond the noise: {_names(better)}")
    if worse:
        parts.append(f"worse beyond the noise: {_names(worse)}")
    if not parts:
        return None
    return f"Against {_REF_NAMES[ref]}perplexity {pf:.3f}), " + "; ".join(parts) + "."


def _memory_pays_vs_none(groups, ppl, noise) -> Optional[str]:
    """The headline: does any schedule with memory beat the no-memory control beyond the noise?"""
    if "none" not in ppl:
        return None
    pn = ppl["none"]
    mem = {k: p for k, p in ppl.items() if k != "none"}
    if not mem:
        return None
    best = min(mem, key=mem.get)
    beyond = [k for k, p in mem.items() if pn - p > (noise or 0.0)]
    if beyond and noise is not None:
        names = _names(f"{k} ({pn - mem[k]:.3f} better)" for k in beyond)
        return (f"Memory pays at this scale: {names} beat{'s' if len(beyond) == 1 else ''} the no-memory control "
                f"(none, perplexity {pn:.3f}) by more than the seed noise ({noise:.3f}).")
    if beyond:
        return (f"Memory may pay: {_names(beyond)} score better than the no-memory control (none, perplexity "
                f"{pn:.3f}), but with one seed per row there is no noise estimate to tell it from chance.")
    tail = ("the no-memory control is better than every schedule with memory" if mem[best] > pn else
            f"the best, {best} ({mem[best]:.3f}), is {mem[best] - pn:+.3f} from it")
    bar = f"by more than the seed noise ({noise:.3f})" if noise is not None else \
        "(one seed per row: no noise estimate)"
    return (f"Memory does not pay at this scale: no schedule with memory beats the no-memory control (none, "
            f"perplexity {pn:.3f}) {bar}; {tail}.")


def _more_memory(groups, ppl, noise) -> Optional[str]:
    """Full memory against the schedule with the least KV state (``none`` aside: it has no memory)."""
    if "full" not in ppl:
        return None
    kv = {k: _mean(rs, "kv_mib") for k, rs in groups.items()}
    others = [k for k in ppl if k not in ("full", "none") and kv.get(k) is not None and kv[k] < kv["full"]]
    if not others:
        return None
    low = min(others, key=lambda k: (kv[k], ppl[k]))
    gain = ppl[low] - ppl["full"]  # > 0: full memory is better
    # With a no-memory row the headline is about memory at all; this one is about more of it.
    head = "More memory" if "none" in ppl else "Memory"
    where = (f"full memory ({kv['full']:.2f} MiB of KV state per lane at the end of a 16k-token piece) vs "
             f"{low} ({kv[low]:.2f} MiB): perplexity {ppl['full']:.3f} vs {ppl[low]:.3f}")
    if gain > (noise or 0.0):
        tail = "more than the seed noise" if noise else "with no noise estimate to compare against"
        return f"{head} pays at this scale: {where}, a gain of {gain:.3f}, {tail}."
    if gain < 0:
        return f"{head} does not pay at this scale: {where}; the extra memory makes perplexity worse, not better."
    within = f"within the seed noise ({noise:.3f})" if noise else "no gain"
    return f"{head} does not pay at this scale: {where}, a difference {within}."


def _verdict(d: float, noise) -> str:
    return "within the seed noise" if abs(d) <= (noise or 0.0) else ("better" if d < 0 else "worse") + \
        " beyond the seed noise"


def _fhcr(groups, ppl, noise) -> Optional[str]:
    if "fhcr" not in ppl or "full" not in ppl:
        return None
    kf, kc = _mean(groups["full"], "kv_mib"), _mean(groups["fhcr"], "kv_mib")
    d = ppl["fhcr"] - ppl["full"]
    text = (f"FHCR keeps the full horizon in {kc / kf:.0%} of full memory's KV bytes; its perplexity "
            f"{ppl['fhcr']:.3f} is {d:+.3f} from full's, {_verdict(d, noise)}")
    if "none" in ppl:
        dn = ppl["fhcr"] - ppl["none"]
        text += f", and {dn:+.3f} from no memory's, {_verdict(dn, noise)}"
    return text + "."


def _by_label(groups, a: str, b: str, key: str) -> Optional[List[Tuple[str, float]]]:
    """``[(label, a's seed-mean NLL minus b's)]`` over the labels of ``key`` every row of both has."""
    if a not in groups or b not in groups:
        return None
    labels = [k for k in (groups[b][0].get(key) or {}) if all(k in (r.get(key) or {}) for r in groups[a] + groups[b])]
    return [(k, _seed_mean_label(groups[a], key, k) - _seed_mean_label(groups[b], key, k)) for k in labels] or None


def _by_position(groups, a: str = "two_scale", b: str = "full") -> Optional[str]:
    """Where ``a``'s NLL per token differs from ``b``'s, by position bucket (seed means)."""
    diffs = _by_label(groups, a, b, "buckets")
    if not diffs:
        return None
    parts = ", ".join(f"{d:+.4f} at {k}" for k, d in diffs)
    return f"By position in the piece, {a}'s NLL per token minus {b}'s is {parts} (nats/token, seed means)."


def _krcu(groups, prefix: str = "krcu") -> Optional[str]:
    """KRCU at one reset point: largest and smallest increase, the seeds' noise, and each row against ``none``."""
    mean = {k: _mean(rs, f"{prefix}_mean") for k, rs in groups.items()}
    auc = {k: _mean(rs, f"{prefix}_auc") for k, rs in groups.items()}
    mean = {k: v for k, v in mean.items() if v is not None}
    if not mean:
        return None
    first = next(r for rs in groups.values() for r in rs if r.get(f"{prefix}_mean") is not None)
    R, n = first.get(f"{prefix}_reset_at"), first.get(f"{prefix}_pieces")
    where = "at R" if R is None else f"at R = {R}" + (f", {n} piece{'s' if n != 1 else ''}" if n else "")
    hi, lo = max(mean, key=mean.get), min(mean, key=mean.get)
    text = (f"KRCU (memory wiped {where}): the largest NLL increase after R is {hi}'s ({mean[hi]:+.4f} nats/token, "
            f"area {auc[hi]:.2f}), the smallest {lo}'s ({mean[lo]:+.4f}, area {auc[lo]:.2f})")
    noise = max((_spread(rs, f"{prefix}_auc") for rs in groups.values() if len(rs) > 1), default=None)
    if noise is not None:
        text += f"; the seeds' areas differ by up to {noise:.2f}"
        if "full" in auc and "two_scale" in auc:
            d = auc["full"] - auc["two_scale"]
            text += (f", and full's area minus two_scale's is {d:+.2f}, "
                     + ("beyond" if abs(d) > noise else "within") + " that noise")
    text += "."
    if "none" in auc and noise is not None:
        # none carries nothing across segments, so wiping it changes nothing: its area is 0.
        above = [f"{k} ({auc[k] - auc['none']:+.2f})" for k in auc if k != "none" and auc[k] - auc["none"] > noise]
        text += (f" Against no memory (none, area {auc['none']:+.2f}: nothing to wipe), "
                 + (f"beyond that noise: {_names(above)}." if above else
                    "no schedule's area exceeds it by more than that noise."))
    if max(abs(v) for v in mean.values()) < KRCU_FLOOR:
        text += (f" Every schedule's increase stays below {KRCU_FLOOR} nats/token: no schedule makes measurable "
                 "use of the context before R at this scale.")
    return text


def _seed_mean_label(rs: Sequence[dict], key: str, label: str) -> Optional[float]:
    vals = [(r.get(key) or {}).get(label) for r in rs]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _memory_use(groups) -> Optional[str]:
    """What each memory schedule's memory gives at inference: NLL with it wiped minus NLL with it."""
    parts = []
    for k, rs in groups.items():
        if k == "none" or _mean(rs, "val_nll_nomem") is None or _mean(rs, "val_nll") is None:
            continue
        gain = _mean(rs, "val_nll_nomem") - _mean(rs, "val_nll")
        at = []
        for lab in ("0-15", "64+"):
            on, off = _seed_mean_label(rs, "offsets", lab), _seed_mean_label(rs, "offsets_nomem", lab)
            if on is not None and off is not None:
                at.append(f"{off - on:+.4f} at segment offsets {lab}")
        parts.append(f"{k} {gain:+.4f}" + (f" ({', '.join(at)})" if at else ""))
    if not parts:
        return None
    return ("What the memory gives at inference (NLL per token with every layer's memory wiped at each segment "
            "start minus NLL with it, same weights, seed means; > 0: the memory helps): " + "; ".join(parts) + ".")


def _decompose(groups) -> List[str]:
    """Each memory schedule's NLL distance to ``none``, split into weights and memory (module docstring)."""
    if "none" not in groups or _mean(groups["none"], "val_nll") is None:
        return []
    n0 = _mean(groups["none"], "val_nll")
    noise = max((_spread(rs, "val_nll") for rs in groups.values() if len(rs) > 1), default=None)
    parts, worse_weights, useless = [], [], []
    for k, rs in groups.items():
        nll, off = _mean(rs, "val_nll"), _mean(rs, "val_nll_nomem")
        if k == "none" or nll is None or off is None:
            continue
        weights, gain = off - n0, off - nll
        parts.append(f"{k} {nll - n0:+.4f} = {weights:+.4f} (weights) - ({gain:+.4f}) (memory)")
        if noise is not None and weights > noise:
            worse_weights.append(k)
        if noise is not None and gain <= noise:
            useless.append(k)
    if not parts:
        return []
    bar = f"; the seeds' NLL spread (noise) is {noise:.4f}" if noise is not None else ""
    out = ["Each schedule's NLL per token minus none's, split as (its weights with the memory wiped, minus "
           "none's) - (what its memory gives): " + "; ".join(parts) + bar + "."]
    if worse_weights:
        text = ("Training with memory left worse weights: without its memory, " + _names(worse_weights)
                + (" is" if len(worse_weights) == 1 else " are") + " worse than the no-memory control by more "
                "than the noise.")
        # Part of that gap is a segment start with no context at all, which none's weights learned to
        # handle and a memory model's did not need to; far into a segment both models see the same
        # 64+ tokens of their own segment, so the gap there is the weights alone.
        n64 = _seed_mean_label(groups["none"], "offsets", "64+")
        far = []
        for k in worse_weights:
            w64 = _seed_mean_label(groups[k], "offsets_nomem", "64+")
            if n64 is not None and w64 is not None:
                far.append(f"{k} {w64 - n64:+.4f}")
        if far:
            text += (" Part of that is a segment start without any context, which none learned to handle; far into "
                     "a segment (offsets 64+, where both see at least 64 tokens of their own segment) its weights "
                     "without memory against none's: " + ", ".join(far) + " nats/token.")
        out.append(text)
    if useless:
        out.append("Memory that gives nothing at inference (within the noise): " + _names(useless) + ".")
    return out


def _by_offset(groups, a: str, b: str = "none") -> Optional[str]:
    """``a``'s NLL per token minus ``b``'s by segment offset (memory on, seed means), with each offset's share of tokens."""
    diffs = _by_label(groups, a, b, "offsets")
    if not diffs:
        return None
    counts = groups[b][0].get("offset_tokens") or {}
    total = sum(counts.get(k, 0) for k, _ in diffs)
    parts = ", ".join(f"{d:+.4f} at {k}" + (f" ({counts[k] / total:.0%} of tokens)" if total and k in counts else "")
                      for k, d in diffs)
    return f"By offset in the segment (memory on), {a}'s NLL per token minus {b}'s is {parts} (nats/token, seed means)."


def _curve_gap(groups) -> Optional[str]:
    """How each memory schedule's distance to ``none`` in validation perplexity moved during training."""
    def curve(rs):
        at: Dict[int, list] = {}
        for r in rs:
            for step, slots, p in r.get("val_curve") or []:
                at.setdefault(int(step), [int(slots), []])[1].append(float(p))
        # Only evaluations every seed reached (a row still training has fewer).
        return {s: (v[0], float(np.mean(v[1]))) for s, v in at.items() if len(v[1]) == len(rs)}

    if "none" not in groups:
        return None
    base = curve(groups["none"])
    parts = []
    for k, rs in groups.items():
        if k == "none":
            continue
        c = curve(rs)
        steps = sorted(s for s in c if s in base and s > 0)
        if len(steps) < 2:
            continue
        picks = [steps[0], steps[len(steps) // 2], steps[-1]] if len(steps) > 2 else steps
        parts.append(f"{k} " + ", ".join(f"{c[s][1] - base[s][1]:+.3f} at {c[s][0] / 1e6:.2f}M" for s in picks))
    if not parts:
        return None
    return ("Learning curves, validation perplexity minus none's at the same training tokens (seed means): "
            + "; ".join(parts) + ".")


def finding(rows: Sequence[dict]) -> List[str]:
    """Sentences that state what the rows' numbers say (see the module docstring).

    ``rows``: dicts with ``schedule``, ``val_ppl``, ``kv_mib`` and optionally ``krcu_mean``,
    ``krcu_auc``, ``krcu_long_mean``, ``krcu_long_auc``, ``buckets`` (several rows of one schedule
    are its seeds). Means over seeds are compared; the noise is the largest perplexity spread
    between the seeds of one schedule.
    """
    groups = _groups(rows)
    ppl = {k: _mean(rs, "val_ppl") for k, rs in groups.items()}
    ppl = {k: v for k, v in ppl.items() if v is not None}
    if not ppl:
        return ["No row has a validation perplexity yet."]
    noise = max((_spread(rs, "val_ppl") for rs in groups.values() if len(rs) > 1), default=None)
    best, worst = min(ppl, key=ppl.get), max(ppl, key=ppl.get)
    out = [f"Best validation perplexity (mean over seeds): {best} ({ppl[best]:.3f}); worst: {worst} "
           f"({ppl[worst]:.3f}), {ppl[worst] - ppl[best]:.3f} apart.", _noise_sentence(groups, noise)]
    sentences = [_against(groups, ppl, noise, "full"), _against(groups, ppl, noise, "none"),
                 _memory_pays_vs_none(groups, ppl, noise), _more_memory(groups, ppl, noise), _fhcr(groups, ppl, noise),
                 _by_position(groups, "two_scale", "full"), _by_position(groups, "two_scale", "none"),
                 _by_position(groups, "full", "none")]
    sentences += [_krcu(groups, p) for p in KRCU_PREFIXES]
    sentences += [_memory_use(groups)]
    # With few memory schedules every one against none; in the default study's family only the two
    # the README discusses, so the finding stays readable.
    mem = [k for k in groups if k != "none"]
    sentences += [_by_offset(groups, k, "none") for k in (mem if len(mem) <= 3 else ("two_scale", "full"))]
    sentences += _decompose(groups) + [_curve_gap(groups)]
    return out + [s for s in sentences if s]


# ----------------------------------------------------------------------------------------------
# markdown and plot


def _krcu_labels(meta: Optional[dict]) -> List[tuple]:
    """``[(prefix, "KRCU@R")]`` of the reset points the study measured (both, unless the long one is off)."""
    c = (meta or {}).get("config", {})
    out = [("krcu", f"KRCU@{c.get('krcu_reset_at', 'R')}")]
    if c.get("krcu_long_reset_at", 8192) is not None:
        out.append(("krcu_long", f"KRCU@{c.get('krcu_long_reset_at', 8192)}"))
    return out


def _table(rows: Sequence[dict], meta: Optional[dict] = None) -> List[str]:
    krcu = _krcu_labels(meta)
    head = ("| schedule | seed | horizons | KV heads | KV slots @16k | KV MiB/lane @16k | val ppl | val NLL/note | "
            + "".join(f"{lab} area | {lab} mean | " for _, lab in krcu) + "train tok/s | peak MiB |")
    lines = [head, "|" + "|".join(["---"] * (10 + 2 * len(krcu))) + "|"]
    for r in rows:
        cells = "".join(f"{_num(r.get(p + '_auc'), '.2f')} | {_num(r.get(p + '_mean'), '+.4f')} | " for p, _ in krcu)
        lines.append(f"| {r['schedule']} | {r['seed']} | `{r.get('horizons_text', r.get('horizons'))}` | "
                     f"{r.get('n_kv_heads', '')} | {_num(r.get('kv_slots'), ',')} | {_num(r.get('kv_mib'), '.2f')} | "
                     f"{_num(r.get('val_ppl'), '.3f')} | {_num(r.get('val_nll_per_note'), '.4f')} | " + cells +
                     f"{_num(r.get('tokens_per_s'), ',.0f')} | {_num(r.get('peak_mib'), ',.0f')} |")
    return lines


def _by_label_table(rows: Sequence[dict], key: str, fmt: str) -> List[str]:
    labels = list(dict.fromkeys(k for r in rows for k in (r.get(key) or {})))
    lines = ["| schedule | seed | " + " | ".join(labels) + " |", "|" + "|".join(["---"] * (len(labels) + 2)) + "|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['seed']} | " +
                     " | ".join(_num((r.get(key) or {}).get(k), fmt) for k in labels) + " |")
    return lines


def _bucket_tables(rows: Sequence[dict], meta: Optional[dict] = None) -> List[str]:
    lines = _by_label_table(rows, "buckets", ".4f")
    for prefix, lab in _krcu_labels(meta):
        if any(r.get(f"{prefix}_buckets") for r in rows):
            lines += ["", f"{lab}: mean NLL increase (nats/token) by distance after the wipe at R:", ""]
            lines += _by_label_table(rows, f"{prefix}_buckets", "+.4f")
    return lines


def _memory_table(rows: Sequence[dict]) -> List[str]:
    """NLL per token with the memory as trained and wiped at every segment start, overall and by segment offset."""
    if not any(r.get("val_nll_nomem") is not None for r in rows):
        return []
    labels = list(dict.fromkeys(k for r in rows for k in (r.get("offsets") or {})))
    lines = ["", "Memory at inference: validation NLL per token with the memory as trained (on) and with every "
             "layer's memory wiped at each segment start (off; same weights), overall and by the target's offset "
             "in its segment (offset j sees j + 1 tokens of its own segment; older context only through memory):",
             "", "| schedule | seed | on | off | off - on | " + " | ".join(f"{k} on | {k} off" for k in labels) + " |",
             "|" + "|".join(["---"] * (5 + 2 * len(labels))) + "|"]
    for r in rows:
        on, off = r.get("val_nll"), r.get("val_nll_nomem")
        d = None if on is None or off is None else off - on
        cells = " | ".join(f"{_num((r.get('offsets') or {}).get(k), '.4f')} | "
                           f"{_num((r.get('offsets_nomem') or {}).get(k), '.4f')}" for k in labels)
        lines.append(f"| {r['schedule']} | {r['seed']} | {_num(on, '.4f')} | {_num(off, '.4f')} | {_num(d, '+.4f')} | "
                     + cells + " |")
    counts = next((r["offset_tokens"] for r in rows if r.get("offset_tokens")), None)
    if counts:
        total = sum(counts.values())
        lines += ["", "Validation tokens by segment offset: " + ", ".join(
            f"{k} {counts[k]:,} ({counts[k] / total:.1%})" for k in labels if k in counts) + "."]
    return lines


def _curve_table(rows: Sequence[dict]) -> List[str]:
    """Validation perplexity at every evaluation during training (the learning curves)."""
    steps = sorted({int(pt[0]) for r in rows for pt in r.get("val_curve") or []})
    if not steps:
        return []
    slots = {int(pt[0]): int(pt[1]) for r in rows for pt in r.get("val_curve") or []}
    lines = ["", "Learning curves: validation perplexity after N training tokens (lane slots; step in brackets):", "",
             "| schedule | seed | " + " | ".join(f"{slots[s] / 1e6:.2f}M ({s})" for s in steps) + " |",
             "|" + "|".join(["---"] * (len(steps) + 2)) + "|"]
    for r in rows:
        at = {int(pt[0]): pt[2] for pt in r.get("val_curve") or []}
        lines.append(f"| {r['schedule']} | {r['seed']} | " + " | ".join(_num(at.get(s), ".3f") for s in steps) + " |")
    return lines


def _config_lines(meta: dict, rows: Sequence[dict]) -> List[str]:
    c = meta["config"]
    steps = rows[0].get("steps") if rows else None
    model = ", ".join(f"{k}={v}" for k, v in c.get("model", {}).items()) or "as the preset"
    fams = "every family" if not c.get("families") else "the families " + ", ".join(c["families"])
    krcu = meta.get("krcu") or [{"reset_at": c["krcu_reset_at"], "window": c.get("krcu_window") or c["krcu_reset_at"],
                                 "pieces": rows[0].get("krcu_pieces") if rows else "?", "candidates": None}]
    krcu_text = "; ".join(
        f"R = {k['reset_at']}, increase over the next {k['window']} tokens, averaged over {k['pieces']}"
        + (f" of {k['candidates']}" if k.get("candidates") is not None else "") + " pieces"
        for k in krcu)
    vmin = c.get("eval_min_tokens") or 0
    return [
        f"- corpus: `{meta.get('source')}`, pieces per split {meta.get('pieces')}",
        f"- model: preset `{c['preset']}` ({model}); two-scale reference `{c.get('two_scale') or 'the preset schedule'}`; "
        f"{fams}, each at two-scale's budget (sum of horizons) where it has one; `none` keeps no memory",
        f"- training: {steps} optimizer steps of {c['batch_lanes']} lanes per row (the same batches for every "
        f"schedule of one seed; budget {c['train_tokens']:,} lane slots), lr {c['lr']} (warmup {c['warmup_steps']}, "
        f"cosine to {c['min_lr']}), {c['evals']} validations, best checkpoint by validation perplexity",
        f"- seeds: {c['seed']} for every row; {c['noise_seeds']} seeds for {', '.join(c['noise_rows'])}",
        f"- validation: {rows[0].get('val_pieces', '?') if rows else '?'} piece(s)"
        + (f" of at least {vmin:,} tokens" if vmin else "") + ", "
        f"{'whole' if c['eval_max_tokens'] is None else 'the first %d targets of each' % c['eval_max_tokens']} "
        f"({rows[0].get('val_tokens', '?') if rows else '?'} tokens); "
        f"NLL per note = a piece's total NLL / its notes (Pitch and PitchDrum tokens), pooled",
        f"- KRCU: memory of every layer wiped at {krcu_text} of {'/'.join(c['krcu_splits'])} (only pieces with at "
        f"least R + window inputs, so every distance averages the same pieces); area = sum over distance of the "
        f"mean increase (nats), mean = area / window (nats/token; the number to set beside DSMR v3's KRCU-AUC, "
        f"see the README)",
        f"- KV columns: slots and MiB per lane at the end of a {c['kv_piece_len']:,}-token piece "
        f"(K and V, all layers, in the training dtype)",
        f"- machine: {meta.get('cpus')} CPUs, {meta.get('threads')} torch threads, device {c['device']}; started "
        f"{meta.get('started_at')}, ended {meta.get('ended_at')}; load average (1/5/15 min) {meta.get('load_start')} "
        f"at the start, {meta.get('load_end')} at the end. Throughput and peak memory are distorted by other "
        f"processes' load when the load exceeds the CPU count; quality columns are not. Peak MiB on CPU is the "
        f"resident-set growth during the row's training (the first row's also holds the process's one-time "
        f"allocations).",
    ]


def markdown(rows: Sequence[dict], meta: dict) -> str:
    """``study.md``: the table, NLL by position, KRCU by distance, learning curves, configuration and finding."""
    lines = ["# Schedule study", "", "Which per-layer memory schedule keeps quality at a given KV budget, does it "
             "use long context, and does memory pay against none at all? (`dsmr study`)", "",
             "## Finding (generated from the numbers)", ""]
    lines += [f"- {s}" for s in finding(rows)]
    lines += ["", "## Results", ""] + _table(rows, meta)
    lines += ["", "Validation NLL per token by position in the piece:", ""] + _bucket_tables(rows, meta)
    lines += _memory_table(rows)
    lines += _curve_table(rows)
    lines += ["", "## Configuration", ""] + _config_lines(meta, rows) + ["", "![study](study.png)", ""]
    return "\n".join(lines)


def _smoothed(curves: List[np.ndarray], smooth: int):
    """``(x, y)``: the seeds' mean curve (over their common length) as a running mean of ``smooth``."""
    n = min(len(c) for c in curves)
    mean = np.mean([c[:n] for c in curves], axis=0)
    k = max(1, min(smooth, n))
    return np.arange(k - 1, n), np.convolve(mean, np.ones(k) / k, mode="valid")


def plot(rows: Sequence[dict], path: Path, smooth: int = 64) -> Optional[Path]:
    """``study.png``: validation perplexity against KV MiB per lane; KRCU increase against distance (solid:
    the first reset point, dashed: the long one); validation perplexity against training tokens."""
    from .metrics import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(19, 5))
    groups = _groups(rows)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(groups), 2)))
    for (name, rs), color in zip(groups.items(), colors):
        a.scatter([r["kv_mib"] for r in rs], [r["val_ppl"] for r in rs], color=color, label=name, s=40)
        for prefix, style in zip(KRCU_PREFIXES, ("-", "--")):
            curves = [np.asarray(r[f"{prefix}_curve"], dtype=np.float64) for r in rs if r.get(f"{prefix}_curve")]
            if curves:
                R = rs[0].get(f"{prefix}_reset_at")
                b.plot(*_smoothed(curves, smooth), style, color=color,
                       label=name if R is None else f"{name} (R={R})")
        for i, r in enumerate(rs):
            pts = r.get("val_curve") or []
            if pts:
                c.plot([p[1] / 1e6 for p in pts], [p[2] for p in pts], "-o", ms=3, color=color,
                       alpha=1.0 if i == 0 else 0.5, label=name if i == 0 else None)
    a.set_xscale("symlog", linthresh=0.01)
    a.set_xlabel("KV state per lane at the end of a 16k-token piece (MiB)")
    a.set_ylabel("best validation perplexity")
    a.set_title("quality against KV budget")
    b.axhline(0.0, color="k", lw=0.5)
    b.set_xlabel("tokens after the wipe at R")
    b.set_ylabel(f"NLL increase, nats (running mean of {smooth})")
    b.set_title("KRCU: increase against distance")
    c.set_xlabel("training tokens (M lane slots)")
    c.set_ylabel("validation perplexity")
    c.set_title("learning curves (faint: second seed)")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(out_dir, rows: Sequence[dict], meta: dict) -> dict:
    """Write ``study.csv``, ``study.md`` and ``study.png`` under ``out_dir`` (atomically); their paths."""
    out = Path(out_dir)
    csv_path = atomic_write_text(out / "study.csv", csv_text(rows))
    md_path = atomic_write_text(out / "study.md", markdown(rows, meta))
    png = plot(rows, out / "study.png")
    return {"csv": str(csv_path), "markdown": str(md_path), "plot": None if png is None else str(png)}


__all__ = ["CSV_COLUMNS", "csv_text", "finding", "markdown", "plot", "write_report"]
