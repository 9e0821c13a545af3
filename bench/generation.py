"""Table 4 — generation: tokens/s against the hardware's limits, time to first token, per-token
latency up to 64k tokens, memory, and x-transformers' cached generation as the peer.

Sampling runs through ``dsmr.generate.generate`` / ``generate_samples``: the prompt is primed
segment by segment through ``model.forward`` (the training-speed path), then every token goes
through the static-cache decode engine (``dsmr/decode.py``). Every configuration runs in its own
process (peak RSS is its own), with its own torch thread count (1, or every logical CPU).

Four tables:

* **rates**: the ``tiny`` and ``small`` preset shapes, batch 1 and 8, 1 thread and all threads,
  caches at their bound (prompt = longest horizon + a segment). Beside the measured tokens/s:
  the reference path (``engine=False``: ``model.forward`` per token) in the same process, and two
  limits measured in the same process: FLOPs per token over a sgemm rate, and bytes read per step
  (weights once per step + every lane's visible keys/values) over the read rate of a buffer of
  that size. A decode step does ~1 FLOP per byte it reads while a core sustains ~10-15 sgemm
  FLOPs per byte it can read, so the memory limit is the one a decode step can approach;
  the x-transformers rows run the same shapes (same heads, head dim, MLP, tied embeddings, RMSNorm,
  rotary) through ``AutoregressiveWrapper.generate(cache_kv=True)`` with a window of
  ``max_seq_len`` = the longest horizon + a segment.
* **time to first token** after a 4k- and a 32k-token prompt (the piece repeated to length).
* **per-token latency** over 4k / 16k / 64k sampled tokens (``small`` shape): first vs last 10%.
* grammar-constrained sampling against free sampling, back to back in one process.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import List, Tuple

# `python bench/generation.py` puts bench/ first on sys.path; the helpers are imported as `bench.*`.
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PeakMemory, Section, Table, current_rss, mib, plt_agg, trimmed_rss, worker_main

N_BINS = 200  # per-token latency is averaged into this many position bins for the plot
SHAPES = ("tiny", "small")  # dsmr.config.PRESETS


def shape(name: str) -> dict:
    """The preset's model fields and its two-scale horizons."""
    from dsmr import schedules as sch
    from dsmr.config import PRESETS

    p = dict(PRESETS[name])
    spec = p.pop("schedule")
    return {"model": p, "horizons": sch.parse(spec, p["n_layers"]), "schedule": spec}


def lengths(quick: bool) -> List[int]:
    return [1024, 4096] if quick else [4096, 16384, 65536]


def ttft_prompts(quick: bool) -> List[int]:
    return [1024, 4096] if quick else [4096, 32768]


def _threads(spec) -> int:
    return (os.cpu_count() or 1) if spec == "all" else int(spec)


# ----------------------------------------------------------------------------------------------
# Worker helpers


def _build(cfg: dict):
    import torch

    from dsmr import DSMRConfig, DSMRModel

    torch.manual_seed(0)
    return DSMRModel(DSMRConfig(vocab_size=cfg["vocab_size"], horizons=cfg["horizons"], **cfg["model"])).eval()


def _prompt(cfg: dict, n: int) -> list:
    """The first ``n`` ids of the piece, repeated when the piece is shorter."""
    import numpy as np

    ids = np.load(cfg["piece"])
    return [int(t) for t in np.resize(ids, n)]


class _Stamps:
    """Time stamps at the end of the prompt pass and of every engine step (patched in this
    worker process only, once: use :func:`_stamps`): what generate does between them is sampling
    and feeding back."""

    def __init__(self):
        import dsmr.decode as dec

        self.prompt_end, self.steps = None, []
        real_prompt, real_step = dec.prompt_state, dec.DecodeEngine.step
        box = self

        def prompt_state(*a, **kw):
            out = real_prompt(*a, **kw)
            box.prompt_end = time.perf_counter()
            return out

        def step(self, tokens):
            out = real_step(self, tokens)
            box.steps.append(time.perf_counter())
            return out

        dec.prompt_state, dec.DecodeEngine.step = prompt_state, step

    def clear(self):
        self.prompt_end, self.steps = None, []


_STAMPS: List[_Stamps] = []


def _stamps() -> _Stamps:
    """The process's one :class:`_Stamps`, cleared."""
    if not _STAMPS:
        _STAMPS.append(_Stamps())
    _STAMPS[0].clear()
    return _STAMPS[0]


def _sample(model, prompt, n, batch, threads, **kw):
    from dsmr.generate import generate, generate_samples

    common = dict(temperature=1.0, seed=0, eos_id=None, stop_at_eos=False, threads=threads, **kw)
    if batch == 1:
        return [generate(model, prompt, n, **common)]
    return generate_samples(model, prompt, n, batch, **common)


def matmul_rate(threads: int) -> float:
    """fp32 GEMM FLOP/s on this process's threads (512 x 512 x 512, best of 5 x 20)."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(5):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / 20)
    return 2 * 512 ** 3 / best


def memory_rate(nbytes: int) -> float:
    """Bytes/s a sum reads from an fp32 buffer of ``nbytes`` (a decode step's working set: the
    rate the caches and memory deliver for data of that size, read once per step), best of 10."""
    import torch

    x = torch.ones(max(int(nbytes) // 4, 2 ** 18))
    x.sum()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def step_cost(cfg: dict, batch: int) -> Tuple[float, float]:
    """(FLOPs per token, bytes read per decode step of ``batch`` lanes) in the steady state.

    FLOPs: the GEMMs per token (qkv, out, MLP, head) plus attention over the visible slots (a
    layer of horizon h sees h + 1 .. h + S keys across a segment: h + (S + 1) / 2 on average).
    Bytes: every weight matrix once per step (fp32) plus each lane's visible keys and values.
    """
    m, S, V = cfg["model"], cfg["model"]["segment_len"], cfg["vocab_size"]
    d, H, Hkv = m["d_model"], m["n_heads"], m.get("n_kv_heads") or m["n_heads"]
    D, ff = d // H, m.get("d_ff") or 4 * d
    weights = m["n_layers"] * (d * (H + 2 * Hkv) * D + H * D * d + 2 * d * ff) + d * V
    visible = sum(h + (S + 1) / 2 for h in cfg["horizons"])  # the bench's horizons are finite
    flops = 2 * weights + 4 * H * D * visible
    bytes_ = 4 * weights + batch * 4 * 2 * Hkv * D * visible
    return flops, bytes_


# ----------------------------------------------------------------------------------------------
# Workers


def measure(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(_threads(cfg["threads"]))
    return {"rate": measure_rate, "peer": measure_peer, "ttft": measure_ttft, "flat": measure_flat}[cfg["kind"]](cfg)


def measure_rate(cfg: dict) -> dict:
    """Decode tokens/s of the engine and of the reference path, and the two limits."""
    import torch

    threads, B = torch.get_num_threads(), cfg["batch"]
    stamps = _stamps()
    mem = PeakMemory()
    mem.start()
    model = _build(cfg)
    prompt = _prompt(cfg, cfg["prompt_len"])
    with torch.inference_mode():
        _sample(model, prompt[:64], 8, B, threads)  # warm-up: first-call allocations, oneDNN primitives
        stamps.clear()
        _sample(model, prompt, cfg["n_new"], B, threads)
        t_end = time.perf_counter()
        rate = B * cfg["n_new"] / (t_end - stamps.prompt_end)
        stamps.clear()
        _sample(model, prompt, cfg["ref_new"], B, threads, engine=False)
        ref = B * cfg["ref_new"] / (time.perf_counter() - stamps.prompt_end)
    peak = mem.peak_bytes()
    flops, bytes_ = step_cost(cfg, B)
    mm, bw = matmul_rate(threads), memory_rate(bytes_)
    return {"tokens_per_s": rate, "ref_tokens_per_s": ref, "threads": threads, "peak_bytes": peak,
            "flops_per_token": flops, "bytes_per_step": bytes_, "matmul_flops": mm, "mem_bytes_per_s": bw,
            "arith_limit": mm / flops, "mem_limit": B * bw / bytes_, "mem_method": mem.method}


def build_xtransformers(vocab_size: int, model: dict, max_seq_len: int):
    """An x-transformers decoder of the same shape: heads, KV heads, head dim, MLP width, RMSNorm,
    full-dim rotary, no biases, tied embeddings, no absolute positions."""
    import torch
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    torch.manual_seed(0)
    d, H = model["d_model"], model["n_heads"]
    net = TransformerWrapper(
        num_tokens=vocab_size, max_seq_len=max_seq_len, use_abs_pos_emb=False, tie_embedding=True,
        attn_layers=Decoder(dim=d, depth=model["n_layers"], heads=H, attn_kv_heads=model.get("n_kv_heads") or H,
                            attn_dim_head=d // H, ff_mult=(model.get("d_ff") or 4 * d) // d, rotary_pos_emb=True,
                            rotary_emb_dim=d // H, attn_flash=True, ff_no_bias=True, use_rmsnorm=True),
    )
    return AutoregressiveWrapper(net).eval()


def measure_peer(cfg: dict) -> dict:
    """x-transformers' cached generation: decode tokens/s = extra tokens / extra time over a
    1-token call (which holds the prompt pass)."""
    import torch

    B, ctx = cfg["batch"], cfg["prompt_len"]
    mem = PeakMemory()
    mem.start()
    wrapper = build_xtransformers(cfg["vocab_size"], cfg["model"], ctx)
    prompt = torch.tensor(_prompt(cfg, ctx))[None].expand(B, -1).contiguous()
    ident = lambda logits, **kw: logits  # noqa: E731 - plain sampling, as the dsmr rows
    with torch.inference_mode():
        wrapper.generate(prompt[:, :64], 8, filter_logits_fn=ident, cache_kv=True)
        t0 = time.perf_counter()
        wrapper.generate(prompt, 1, filter_logits_fn=ident, cache_kv=True)
        t1 = time.perf_counter()
        wrapper.generate(prompt, 1 + cfg["n_new"], filter_logits_fn=ident, cache_kv=True)
        t2 = time.perf_counter()
    n_params = sum(p.numel() for p in wrapper.parameters())
    return {"tokens_per_s": B * cfg["n_new"] / ((t2 - t1) - (t1 - t0)), "threads": torch.get_num_threads(),
            "peak_bytes": mem.peak_bytes(), "params": n_params, "ttft_s": t1 - t0}


def measure_ttft(cfg: dict) -> dict:
    """Time to first token: ``generate(model, prompt, 1)`` after a ``prompt_len``-token prompt."""
    import torch

    from dsmr.generate import generate

    mem = PeakMemory()
    mem.start()
    model = _build(cfg)
    prompt = _prompt(cfg, cfg["prompt_len"])
    threads = torch.get_num_threads()
    with torch.inference_mode():
        generate(model, prompt[:model.config.segment_len + 3], 2, seed=0, threads=threads)  # warm-up
        t0 = time.perf_counter()
        generate(model, prompt, 1, seed=0, threads=threads)
        ttft = time.perf_counter() - t0
    return {"ttft_s": ttft, "prompt_tokens_per_s": cfg["prompt_len"] / ttft, "threads": threads,
            "peak_bytes": mem.peak_bytes()}


def grammar_rates(model, prompt: list, n: int, threads: int) -> dict:
    """Decode tokens/s of ``n`` tokens with and without the piano grammar, back to back in one process."""
    import torch

    from dsmr.grammar import TokenGrammar
    from dsmr.tokenizer import build_tokenizer

    grammar = TokenGrammar(build_tokenizer("piano"))
    out = {}
    for key, g in (("no_grammar", None), ("grammar", grammar)):
        stamps = _stamps()
        with torch.inference_mode():
            res = _sample(model, prompt, n, 1, threads, grammar=g)[0]
        out[f"{key}_tokens_per_s"] = len(res["new_tokens"]) / (time.perf_counter() - stamps.prompt_end)
    return out


def measure_flat(cfg: dict) -> dict:
    """Prime with the prompt, sample ``n_new`` tokens, time every token (end of one engine step
    to the end of the next: sampling, feeding back, the segment-boundary copy)."""
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    stamps = _stamps()
    mem = PeakMemory()
    mem.start()
    model = _build(cfg)
    prompt = _prompt(cfg, cfg["prompt_len"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = _sample(model, prompt, cfg["n_new"], 1, threads)[0]
    t_end = time.perf_counter()
    peak = mem.peak_bytes()
    end_rss = current_rss() - mem.baseline
    trimmed = trimmed_rss()
    per_token = [b - a for a, b in zip([stamps.prompt_end] + stamps.steps[:-1], stamps.steps)]
    n = len(per_token)
    tenth = max(1, n // 10)
    first, last = per_token[:tenth], per_token[-tenth:]
    bins = np.array_split(np.asarray(per_token), min(N_BINS, n))
    rate, prompt_s = len(out["new_tokens"]) / (t_end - stamps.prompt_end), stamps.prompt_end - t0
    rates = grammar_rates(model, prompt, cfg["grammar_tokens"], threads) if cfg.get("grammar_tokens") else {}
    return rates | {
        "n_new": len(out["new_tokens"]),
        "tokens_per_s": rate,
        "prompt_s": prompt_s,
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
        "threads": threads,
        "mem_method": mem.method,
    }


# ----------------------------------------------------------------------------------------------
# Plan and tables


def plan(quick: bool, piece: dict, piece_path: str) -> List[dict]:
    common = {"vocab_size": piece["vocab_size"], "piece": piece_path}
    out = []
    for name in SHAPES:
        sh = shape(name)
        bound = max(sh["horizons"]) + sh["model"]["segment_len"]  # every cache at its bound
        base = common | sh | {"shape": name, "prompt_len": bound}
        for threads in (1, "all"):
            for B in (1, 8):
                out.append(base | {"kind": "rate", "label": f"{name} B={B} threads={threads}", "batch": B,
                                   "threads": threads, "n_new": (256 if quick else 1024) // (1 if B == 1 else 4),
                                   "ref_new": 32 if quick else 128})
        for B in (1, 8):
            out.append(base | {"kind": "peer", "label": f"x-transformers {name} B={B}", "batch": B, "threads": 1,
                               "n_new": 32 if quick else 128})
        for P in ttft_prompts(quick):
            out.append(base | {"kind": "ttft", "label": f"{name} TTFT {P}", "prompt_len": P, "threads": 1})
    sh = shape("small")
    bound = max(sh["horizons"]) + sh["model"]["segment_len"]
    for n in lengths(quick):
        out.append(common | sh | {
            "kind": "flat", "label": f"small {n:,} tokens", "shape": "small", "n_new": n, "prompt_len": bound,
            "threads": 1,
            # Grammar cost: the shortest length also samples this many tokens with and without the grammar.
            "grammar_tokens": min(n, 2048) if n == min(lengths(quick)) and piece["vocab_size"] == 255 else 0,
        })
    return out


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
    fig.suptitle("Per-token latency vs position, small shape, two-scale caches; "
                 "shaded: first and last 10%, bars: their means", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _rate_rows(results) -> list:
    rows = []
    for cfg, res in results:
        if cfg["kind"] not in ("rate", "peer"):
            continue
        row = {"table": "rates", "model": cfg["shape"], "implementation": "dsmr engine" if cfg["kind"] == "rate"
               else "x-transformers (cache_kv)", "batch": cfg["batch"]}
        if res.ok:
            d = res.data
            row.update({"threads": d["threads"], "tokens/s": d["tokens_per_s"], "peak MiB": mib(d["peak_bytes"]),
                        "process wall s": res.wall_s})
            if cfg["kind"] == "rate":
                row.update({
                    "tokens/s model.forward path": d["ref_tokens_per_s"],
                    "engine / forward path": d["tokens_per_s"] / d["ref_tokens_per_s"],
                    "MFLOP/token": d["flops_per_token"] / 1e6,
                    "MB read/step": d["bytes_per_step"] / 1e6,
                    "arithmetic-limited tokens/s": d["arith_limit"],
                    "memory-limited tokens/s": d["mem_limit"],
                    "% of the tighter limit": 100 * d["tokens_per_s"] / min(d["arith_limit"], d["mem_limit"]),
                    "sgemm GFLOP/s": d["matmul_flops"] / 1e9,
                    "read GB/s": d["mem_bytes_per_s"] / 1e9,
                })
        else:
            row["note"] = res.error[:160]
        rows.append(row)
    return rows


def render(results: List[Tuple[dict, object]], quick: bool, piece: dict, out_dir, threads: int) -> Section:
    rate_cols = ["model", "implementation", "batch", "threads", "tokens/s", "tokens/s model.forward path",
                 "engine / forward path", "arithmetic-limited tokens/s", "memory-limited tokens/s",
                 "% of the tighter limit", "MFLOP/token", "MB read/step", "sgemm GFLOP/s", "read GB/s", "peak MiB",
                 "process wall s", "note"]
    rates = Table(rate_cols, _rate_rows(results))

    ttft_rows = []
    for cfg, res in results:
        if cfg["kind"] != "ttft":
            continue
        row = {"table": "ttft", "model": cfg["shape"], "prompt tokens": cfg["prompt_len"]}
        if res.ok:
            d = res.data
            row.update({"threads": d["threads"], "time to first token s": d["ttft_s"],
                        "prompt tokens/s": d["prompt_tokens_per_s"], "peak MiB": mib(d["peak_bytes"])})
        else:
            row["note"] = res.error[:160]
        ttft_rows.append(row)
    ttft = Table(["model", "prompt tokens", "threads", "time to first token s", "prompt tokens/s", "peak MiB", "note"],
                 ttft_rows)

    flat_rows, flat_results = [], []
    for cfg, res in results:
        if cfg["kind"] != "flat":
            continue
        flat_results.append((cfg, res))
        row = {"table": "latency", "model": cfg["shape"], "tokens sampled": cfg["n_new"]}
        if res.ok:
            d = res.data
            row.update({
                "threads": d["threads"],
                "tokens/s": d["tokens_per_s"],
                "peak MiB": mib(d["peak_bytes"]),
                "MiB at end after malloc_trim": mib(d["end_trimmed_bytes"]),
                "ms/token first 10%": d["first10_ms"],
                "ms/token last 10%": d["last10_ms"],
                "last / first (mean)": d["last10_ms"] / d["first10_ms"],
                "last / first (median)": d["last10_median_ms"] / d["first10_median_ms"],
                "p99 ms/token": d["p99_ms"],
                "largest cache per layer (slots)": "/".join(str(c) for c in d["max_capacity"] or []),
                "tokens/s grammar": d.get("grammar_tokens_per_s"),
                "tokens/s no grammar (same run)": d.get("no_grammar_tokens_per_s"),
                "prompt s": d["prompt_s"],
                "process wall s": res.wall_s,
            })
        else:
            row["note"] = res.error[:160]
        flat_rows.append(row)
    flat = Table(["model", "tokens sampled", "threads", "tokens/s", "peak MiB", "MiB at end after malloc_trim",
                  "ms/token first 10%", "ms/token last 10%", "last / first (mean)", "last / first (median)",
                  "p99 ms/token", "largest cache per layer (slots)", "tokens/s grammar",
                  "tokens/s no grammar (same run)", "prompt s", "process wall s", "note"], flat_rows)

    shapes_md = "; ".join(
        f"`{n}`: {s['model']['n_layers']} layers x {s['model']['d_model']}, {s['model']['n_heads']} heads "
        f"({s['model']['n_kv_heads']} KV), segment {s['model']['segment_len']}, {s['schedule']}"
        for n, s in ((n, shape(n)) for n in SHAPES))
    md = [
        "## Configuration",
        "",
        f"- models: the preset shapes ({shapes_md}), vocab {piece['vocab_size']}, untrained weights, fp32; "
        "dsmr.generate.generate (batch 1) / generate_samples (batch 8), temperature 1, seed 0, no grammar unless "
        f"stated, never stopping at EOS; prompts from {piece['source']} (repeated to length when longer)",
        "- rates: prompt = longest horizon + one segment (every cache at its bound); tokens/s = sampled tokens / "
        "time after the prompt pass (sampling included); `model.forward path` = the same call with "
        "`engine=False` (the pre-engine decode loop) in the same process; limits measured in the same process: "
        "`arithmetic-limited` = fp32 sgemm FLOP/s (512^3) / FLOPs per token, `memory-limited` = read rate x "
        "batch / bytes read per step (all fp32 weights once + every lane's visible keys and values, steady-state average; the read rate is a "
        "sum's over a buffer of that many bytes, so it is the rate of whichever cache level holds a step's working "
        "set); `% of the tighter limit` says how far from the hardware a row is",
        "- x-transformers rows: `AutoregressiveWrapper.generate(cache_kv=True)`, the same shape (heads, KV heads, "
        "head dim, MLP, RMSNorm, rotary, tied embeddings), `max_seq_len` = longest horizon + a segment (its cached "
        "window slides over every layer), plain sampling; tokens/s from the time of a (1 + N)-token call minus a "
        "1-token call",
        "- time to first token: `generate(model, prompt, 1)` wall time (prompt pass segment by segment through "
        "model.forward, engine set-up, first draw), after a warm-up call",
        "- latency: `small` shape, batch 1; per-token time = end of one engine step to the end of the next "
        "(sampling, feeding back, the segment-boundary cache copy); first/last 10% = mean over the first/last "
        "tenth of the sampled tokens",
        "- every row in its own process; peak memory = peak RSS minus RSS before building the model; "
        f"`threads` = torch intra-op threads of that process (all = {os.cpu_count()} logical CPUs here; "
        f"run.py's --generation-threads={threads} sets only the worker environment)",
        "",
        "## Tokens/s",
        "",
        rates.markdown(),
        "",
        "## Time to first token",
        "",
        ttft.markdown(),
        "",
        "## Per-token latency up to 64k tokens, memory, grammar",
        "",
        flat.markdown(),
    ]
    csv_cols = ["table"] + list(dict.fromkeys(rate_cols + ttft.columns + flat.columns))
    csv = Table(csv_cols, rates.rows + ttft.rows + flat.rows).csv()
    sec = Section("generation", "Generation: tokens/s against the hardware's limits, time to first token, "
                  "latency, memory", "\n".join(md), csv)
    if _plot(flat_results, out_dir / "generation.png"):
        sec.plots.append("generation.png")
    return sec


def main(argv=None) -> int:
    """``python bench/generation.py [--quick] [--only tiny,small] [--kinds rate,ttft]``: run this section's
    configurations in worker processes and print the tables (nothing is written to bench/results)."""
    import argparse
    import tempfile

    from bench import piece as piece_mod
    from bench.common import run_worker

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kinds", default="rate,peer,ttft,flat")
    p.add_argument("--only", default=",".join(SHAPES), help="shapes")
    p.add_argument("--timeout", type=float, default=1200.0)
    args = p.parse_args(argv)
    kinds, only = set(args.kinds.split(",")), set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="dsmr-gen-"))
    piece = piece_mod.resolve(16385, tmp / "piece.npy")
    cfgs = [c for c in plan(args.quick, piece, str(tmp / "piece.npy")) if c["kind"] in kinds and c["shape"] in only]
    results = []
    for c in cfgs:
        res = run_worker("bench.generation", c, 1, args.timeout)
        print(f"{c['label']}: {res.data if res.ok else res.error}", file=sys.stderr, flush=True)
        results.append((c, res))
    print(render(results, args.quick, piece, tmp, 1).markdown)
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(measure)
    else:
        sys.exit(main())
