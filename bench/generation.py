"""Table 4 — generation: tokens/s, memory and per-token latency of sampling with bounded caches.

Sampling runs through ``dsmr.generate.generate`` (prompt primed segment by segment, then one token
at a time with ``model(tok, state, truncate=False)`` and ``state.truncate(horizons)`` at every
segment boundary), so every layer's cache holds at most ``horizon + segment`` slots and the cost
of a token must not grow with its position. We time each token with a forward hook on the model
(the time between the ends of consecutive forward calls: sampling + feeding the token back), and
compare the mean time per token over the first and the last 10% of the generated tokens.

Each length runs in its own process, so its peak memory (peak RSS minus RSS before building
the model) is its own; with bounded caches it should not grow with the number of tokens.
"""
from __future__ import annotations

import statistics
import time
from typing import List, Tuple

from bench.common import PeakMemory, Section, Table, current_rss, fmt, mib, plt_agg, trimmed_rss, worker_main
from bench.model_level import MODEL

N_BINS = 200  # per-token latency is averaged into this many position bins for the plot


def lengths(quick: bool) -> List[int]:
    return [1024, 4096] if quick else [4096, 16384, 65536]


def schedule(quick: bool):
    """A bounded two-scale schedule (same shape as the schedules table)."""
    from dsmr import schedules as sch

    long, short = (2048, 256) if quick else (4096, 512)
    return sch.two_scale(MODEL["n_layers"], long, short, MODEL["n_layers"] // 2)


def grammar_rates(model, prompt: list, n: int) -> dict:
    """Decode tokens/s of ``n`` tokens with and without the piano grammar, back to back in one process.

    Both runs exclude the prompt pass (timed from the end of the prompt's last forward); the grammar
    is the demo tokenizer's (``build_tokenizer("piano")``, vocab 255 like the bench piece).
    """
    import torch

    from dsmr.generate import generate
    from dsmr.grammar import TokenGrammar
    from dsmr.tokenizer import build_tokenizer

    grammar = TokenGrammar(build_tokenizer("piano"))
    n_prompt_calls = -(-len(prompt) // model.config.segment_len)
    out = {}
    for key, g in (("no_grammar", None), ("grammar", grammar)):
        stamps: List[float] = []
        hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
        with torch.inference_mode():
            res = generate(model, prompt, n, temperature=1.0, seed=0, eos_id=None, stop_at_eos=False, grammar=g)
        t_end = time.perf_counter()
        hook.remove()
        out[f"{key}_tokens_per_s"] = len(res["new_tokens"]) / (t_end - stamps[n_prompt_calls - 1])
    return out


def measure(cfg: dict) -> dict:
    """Worker: prime with the prompt, sample ``n_new`` tokens, time every token."""
    import numpy as np
    import torch

    from dsmr import DSMRConfig, DSMRModel
    from dsmr.generate import generate

    ids = np.load(cfg["piece"])
    prompt = [int(t) for t in ids[: cfg["prompt_len"]]]
    mem = PeakMemory()
    mem.start()
    torch.manual_seed(0)
    model = DSMRModel(DSMRConfig(vocab_size=cfg["vocab_size"], horizons=cfg["horizons"], **cfg["model"])).eval()
    stamps: List[float] = []
    hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = generate(model, prompt, cfg["n_new"], temperature=1.0, seed=0, eos_id=None, stop_at_eos=False)
    t_end = time.perf_counter()
    hook.remove()
    peak = mem.peak_bytes()
    end_rss = current_rss() - mem.baseline
    trimmed = trimmed_rss()
    n_prompt_calls = -(-len(prompt) // cfg["model"]["segment_len"])
    prompt_done = stamps[n_prompt_calls - 1]
    # Per-token cycle: end of one forward to the end of the next (sample + feed back + truncate).
    per_token = [b - a for a, b in zip(stamps[n_prompt_calls - 1:], stamps[n_prompt_calls:])]
    n = len(per_token)
    tenth = max(1, n // 10)
    first, last = per_token[:tenth], per_token[-tenth:]
    bins = np.array_split(np.asarray(per_token), min(N_BINS, n))
    rates = grammar_rates(model, prompt, cfg["grammar_tokens"]) if cfg.get("grammar_tokens") else {}
    return rates | {
        "n_new": len(out["new_tokens"]),
        "tokens_per_s": len(out["new_tokens"]) / (t_end - prompt_done),
        "prompt_s": prompt_done - t0,
        "peak_bytes": peak,
        "end_bytes": end_rss,
        "end_trimmed_bytes": None if trimmed is None else trimmed - mem.baseline,
        "first10_ms": 1e3 * statistics.fmean(first),
        "last10_ms": 1e3 * statistics.fmean(last),
        "first10_median_ms": 1e3 * statistics.median(first),
        "last10_median_ms": 1e3 * statistics.median(last),
        "p99_ms": 1e3 * float(np.percentile(per_token, 99)),
        "bins_ms": [1e3 * float(b.mean()) for b in bins],
        "max_capacity": out.get("max_capacity"),
        "mem_method": mem.method,
    }


def plan(quick: bool, piece: dict, piece_path: str) -> List[dict]:
    return [
        {
            "label": f"{n:,} tokens",
            "n_new": n,
            # The prompt fills every cache to its bound (longest horizon + a segment), so the first and
            # the last 10% of the sampled tokens both measure the steady state.
            "prompt_len": max(schedule(quick)) + MODEL["segment_len"],
            "horizons": schedule(quick),
            "model": MODEL,
            "vocab_size": piece["vocab_size"],
            "piece": piece_path,
            # Grammar cost: the shortest length also samples this many tokens with and without the grammar.
            "grammar_tokens": min(n, 2048) if n == min(lengths(quick)) and piece["vocab_size"] == 255 else 0,
        }
        for n in lengths(quick)
    ]


def _plot(results, path) -> bool:
    """One panel per length: per-token latency (bin means) vs position, first/last 10% shaded."""
    plt = plt_agg()
    ok = [(cfg, res) for cfg, res in results if res.ok]
    if plt is None or not ok:
        return False
    fig, axes = plt.subplots(1, len(ok), figsize=(4.2 * len(ok), 3.6), sharey=True, squeeze=False)
    for ax, (cfg, res) in zip(axes[0], ok):
        d, n = res.data, cfg["n_new"]
        b = d["bins_ms"]
        step = n / len(b)
        ax.plot([(i + 0.5) * step for i in range(len(b))], b, lw=0.8, color="tab:blue")
        for lo, hi, val, color in ((0, 0.1 * n, d["first10_ms"], "tab:green"), (0.9 * n, n, d["last10_ms"], "tab:red")):
            ax.axvspan(lo, hi, color=color, alpha=0.12)
            ax.hlines(val, lo, hi, color=color, lw=2)
        ax.set_title(f"{n:,} tokens: last/first 10% = {d['last10_ms'] / d['first10_ms']:.2f}", fontsize=9)
        ax.set_xlabel("index of the sampled token")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per token (bin mean)")
    fig.suptitle("Per-token latency vs position with bounded caches (two-scale); "
                 "shaded: first and last 10%, bars: their means", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _memory_note(rows) -> str:
    """Read peak RSS against RSS after malloc_trim over the sampled lengths."""
    ok = [r for r in rows if r.get("peak MiB") is not None and r.get("MiB at end after malloc_trim") is not None]
    if len(ok) < 2:
        return ""
    peaks = [r["peak MiB"] for r in ok]
    trimmed = [r["MiB at end after malloc_trim"] for r in ok]
    return (
        f"**Memory.** Peak RSS ranges from {fmt(min(peaks))} to {fmt(max(peaks))} MiB over the lengths "
        f"({', '.join(fmt(p) for p in peaks)} MiB in table order); RSS after `malloc_trim` stays at "
        f"{fmt(min(trimmed))}–{fmt(max(trimmed))} MiB. The caches are bounded (largest cache per layer is the "
        "same for every length), and decoding appends each token's key/value in place into a per-layer buffer "
        "with spare room (`DSMRAttention` under `no_grad`; the buffer is re-allocated only when full, with room "
        "for as many tokens again), so no step copies or re-allocates the cache. The difference between peak "
        "and trimmed RSS is freed heap glibc keeps (the prompt pass, per-token temporaries), not live tensors"
        + (
            f"; peak RSS grows {fmt(peaks[-1] / peaks[0])}x from the shortest to the longest run."
            if peaks[0] > 0 else "."
        )
    )


def render(results: List[Tuple[dict, object]], quick: bool, piece: dict, out_dir, threads: int) -> Section:
    from dsmr import schedules as sch

    rows = []
    for cfg, res in results:
        row = {"tokens sampled": cfg["n_new"]}
        if res.ok:
            d = res.data
            row.update({
                "prompt s": d["prompt_s"],
                "load (1 min) after": d.get("load_1min_end"),
                "tokens/s": d["tokens_per_s"],
                "peak MiB": mib(d["peak_bytes"]),
                "MiB at end": mib(d["end_bytes"]),
                "MiB at end after malloc_trim": mib(d["end_trimmed_bytes"]),
                "ms/token first 10%": d["first10_ms"],
                "ms/token last 10%": d["last10_ms"],
                "last / first (mean)": d["last10_ms"] / d["first10_ms"],
                "last / first (median)": d["last10_median_ms"] / d["first10_median_ms"],
                "p99 ms/token": d["p99_ms"],
                "largest cache per layer (slots)": "/".join(str(c) for c in d["max_capacity"] or []),
                "tokens/s grammar": d.get("grammar_tokens_per_s"),
                "tokens/s no grammar (same run)": d.get("no_grammar_tokens_per_s"),
                "process wall s": res.wall_s,
            })
        else:
            row["note"] = res.error[:160]
        rows.append(row)
    cols = ["tokens sampled", "tokens/s", "peak MiB", "MiB at end", "MiB at end after malloc_trim", "ms/token first 10%", "ms/token last 10%",
            "last / first (mean)", "last / first (median)", "p99 ms/token", "largest cache per layer (slots)",
            "tokens/s grammar", "tokens/s no grammar (same run)", "prompt s", "load (1 min) after", "process wall s", "note"]
    table = Table(cols, rows)
    hz = schedule(quick)
    md = [
        "## Configuration",
        "",
        f"- model: the schedules table's DSMRModel ({MODEL['n_layers']} layers, d_model {MODEL['d_model']}, "
        f"{MODEL['n_heads']} heads, segment {MODEL['segment_len']}, vocab {piece['vocab_size']}), untrained weights, "
        f"fp32, eval mode, batch 1; schedule two_scale {sch.describe(hz)}: caches bounded by horizon + segment",
        f"- sampling: dsmr.generate.generate, temperature 1, seed 0, never stopping at EOS; prompt = the first "
        f"{max(hz) + MODEL['segment_len']:,} tokens (longest horizon + one segment, so every cache starts at its "
        f"bound and first vs last 10% compares steady states) of {piece['source']}",
        "- grammar columns (shortest length only): min(length, 2,048) more tokens sampled twice, back to back in "
        "the same process, without and with `grammar=` the piano tokenizer (dsmr/grammar.py masks every token "
        "MidiTok's tokens_errors would count); their ratio is the grammar's cost per token",
        "- per-token time = time between the ends of consecutive model forwards (sampling, feeding the "
        "token back, and the segment-boundary truncation), from a forward hook; tokens/s = tokens / decode time",
        "- first/last 10% = mean time per token over the first and the last tenth of the sampled tokens; "
        "a ratio near 1 means the cost per token does not grow with position",
        "- each length in its own process; peak memory = peak RSS minus RSS before building the model; "
        "`MiB at end after malloc_trim` = the same process's RSS after `gc.collect()` and glibc's "
        "`malloc_trim(0)`: what remains once the C allocator hands back freed heap (see the note below)",
        f"- torch threads: {threads} (`--generation-threads`; batch-1 decoding is a chain of small ops, where a "
        "second thread saves little and stalls whenever another process holds a core)",
        "",
        "## Results",
        "",
        table.markdown(),
    ]
    md += ["", _memory_note(rows)]
    sec = Section("generation", "Generation with bounded caches: throughput, memory, per-token latency",
                  "\n".join(md), table.csv())
    if _plot(results, out_dir / "generation.png"):
        sec.plots.append("generation.png")
    return sec


if __name__ == "__main__":
    worker_main(measure)
