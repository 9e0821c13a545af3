"""Table 3 — peer comparison: DSMR against x-transformers' recurrent memory (Transformer-XL style).

Same model size, segment and memory length, trained the same way: the piece streamed segment by
segment with recurrent memory, one AdamW step per segment, each configuration in its own process.

The two memories differ in what they keep:

* DSMR caches each layer's **keys and values after rotation**; a segment attends over them
  directly, so memory costs attention FLOPs only.
* x-transformers (``TransformerWrapper(max_mem_len=M)``, ``return_mems=True`` / ``mems=``) caches
  each layer's **input hidden states** and re-projects them to keys and values in every segment,
  so memory also costs K/V projection FLOPs (and their weight-gradient work) per segment.
  Rotary positions are relative within the window (memory at negative positions).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, List, Tuple

from bench.common import PeakMemory, Section, Table, fmt, mib, precision_text, spread, worker_main
from bench.model_level import MODEL, measure as measure_dsmr, setting


def peer_memory(quick: bool) -> int:
    return 1024 if quick else 2048


def build_xtransformers(vocab_size: int, mem_len: int, model: dict):
    """A TransformerWrapper matching DSMRModel: pre-norm RMSNorm, no biases, GELU MLP, full-dim rotary,
    tied embeddings, no absolute positions (same parameter count)."""
    import torch
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    head_dim = model["d_model"] // model["n_heads"]
    return TransformerWrapper(
        num_tokens=vocab_size,
        max_seq_len=model["segment_len"],
        max_mem_len=mem_len,
        use_abs_pos_emb=False,
        tie_embedding=True,
        attn_layers=Decoder(
            dim=model["d_model"],
            depth=model["n_layers"],
            heads=model["n_heads"],
            ff_mult=model["d_ff"] // model["d_model"],
            rotary_pos_emb=True,
            rotary_emb_dim=head_dim,
            attn_flash=True,  # F.scaled_dot_product_attention
            ff_no_bias=True,
            use_rmsnorm=True,
        ),
    )


def autocast(precision: str):
    """bf16 autocast on CPU, or nothing for fp32 (as the DSMR side's TrainConfig(autocast=True))."""
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stream_train(step: Callable, reset: Callable, ids, segment_len: int, n_segments: int,
                 warmup: int = 1) -> List[float]:
    """Stream ``n_segments`` segments of ``ids`` through ``step(x, y)``; returns each step's seconds.

    The same protocol as the DSMR side's ``bench.model_level.time_steps``: ``warmup`` segments on
    a state that is then reset, then one timed step per segment.
    """
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)

    def seg(i):
        lo = i * segment_len
        return ids[None, lo:lo + segment_len], ids[None, lo + 1:lo + segment_len + 1]  # (1, S) each

    for i in range(warmup):
        step(*seg(i))
    reset()
    times = []
    for i in range(n_segments):
        x, y = seg(i)
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    return times


def xt_trainer(model, precision: str, lr: float = 3e-4):
    """(step, reset, mems_getter) for streaming training of a TransformerWrapper with AdamW."""
    import torch
    import torch.nn.functional as F

    # The same fused AdamW step as dsmr's trainer, so the ratio measures the models, not the optimizers.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    box = {"mems": None}

    def step(x, y):
        with autocast(precision):
            logits, box["mems"] = model(x, mems=box["mems"], return_mems=True)  # mems detached
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def reset():
        box["mems"] = None

    return step, reset, lambda: box["mems"]


def measure(cfg: dict) -> dict:
    """Worker: one configuration (``impl`` = "dsmr" or "x-transformers")."""
    if cfg["impl"] == "dsmr":
        return measure_dsmr(cfg)
    import numpy as np

    ids = np.load(cfg["piece"])
    n_tokens = cfg["n_segments"] * cfg["model"]["segment_len"]
    mem = PeakMemory()
    mem.start()
    model = build_xtransformers(cfg["vocab_size"], cfg["mem_len"], cfg["model"])
    step, reset, mems = xt_trainer(model, cfg["precision"])
    times = stream_train(step, reset, ids, cfg["model"]["segment_len"], cfg["n_segments"])
    peak = mem.peak_bytes()
    state_bytes = sum(t.numel() * t.element_size() for t in (mems() or []))
    return {
        "tokens_per_s": n_tokens / sum(times),
        "peak_bytes": peak,
        "state_bytes": state_bytes,
        "segment_times": times,
        "n_tokens": n_tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "mem_method": mem.method,
    }


def plan(quick: bool, piece: dict, piece_path: str) -> List[dict]:
    """DSMR uniform vs x-transformers at the same memory length; full memory too in the default run."""
    from dsmr import schedules as sch

    s = setting(quick)
    n_tokens = s["n_segments"] * MODEL["segment_len"]
    M = peer_memory(quick)
    base = {"model": MODEL, "vocab_size": piece["vocab_size"], "piece": piece_path,
            "n_segments": s["n_segments"], "precision": s["precision"]}
    memories = [(f"M = {M}", M)] + ([] if quick else [(f"whole piece ({n_tokens:,})", None)])
    out = []
    for label, m in memories:
        mem_len = m if m is not None else n_tokens
        horizons = sch.uniform(MODEL["n_layers"], m) if m is not None else sch.full(MODEL["n_layers"])
        out.append({**base, "impl": "dsmr", "memory": label, "horizons": horizons,
                    "label": f"DSMR schedules.uniform(n, {m})" if m is not None else "DSMR schedules.full(n)"})
        out.append({**base, "impl": "x-transformers", "memory": label, "mem_len": mem_len,
                    "label": f"x-transformers max_mem_len={mem_len}"})
    return out


def render(results: List[Tuple[dict, object]], quick: bool, piece: dict, rounds: int) -> Section:
    import importlib.metadata

    s = setting(quick)
    rows = []
    for cfg, res in results:
        row = {"memory": cfg["memory"], "implementation": cfg["label"]}
        if res.ok:
            d = res.data
            row.update({"parameters": d["params"], "tokens/s": d["tokens_per_s"], "peak MiB": mib(d["peak_bytes"]),
                        "recurrent state MiB (end)": mib(d["state_bytes"]), "tokens/s over rounds": spread(d),
                        "load (1 min) after": d.get("load_1min_end"), "process wall s": res.wall_s})
        else:
            row["note"] = res.error[:160]
        rows.append(row)
    # Ratios DSMR / x-transformers within each memory length, from this run.
    for r in rows:
        peer = next((p for p in rows if p["memory"] == r["memory"] and p is not r), None)
        if r["implementation"].startswith("DSMR") and peer and "tokens/s" in r and "tokens/s" in peer:
            r["throughput DSMR / x-transformers"] = r["tokens/s"] / peer["tokens/s"]
            r["peak memory DSMR / x-transformers"] = r["peak MiB"] / peer["peak MiB"]
    cols = ["memory", "implementation", "parameters", "tokens/s", "peak MiB", "recurrent state MiB (end)",
            "throughput DSMR / x-transformers", "peak memory DSMR / x-transformers", "tokens/s over rounds",
            "load (1 min) after", "process wall s", "note"]
    table = Table(cols, rows)
    n_tokens = s["n_segments"] * MODEL["segment_len"]
    try:
        xt_version = importlib.metadata.version("x-transformers")
    except importlib.metadata.PackageNotFoundError:
        xt_version = "not installed"
    md = [
        "## Configuration",
        "",
        f"- both: {MODEL['n_layers']} layers, d_model {MODEL['d_model']}, {MODEL['n_heads']} heads, d_ff {MODEL['d_ff']}, "
        f"segment {MODEL['segment_len']}, vocab {piece['vocab_size']}, RMSNorm pre-norm, no biases, GELU MLP, tied "
        f"embeddings, rotary over the full head dim; {precision_text(s['precision'])}; fused AdamW (lr 3e-4) step per segment, batch 1",
        f"- piece: {piece['source']}; first {n_tokens:,} tokens ({s['n_segments']} segments), one warm-up segment first",
        "- DSMR: `DSMRModel` with `schedules.uniform(n_layers, M)` (or `full`): caches rotated keys/values per layer",
        f"- x-transformers {xt_version}: `TransformerWrapper(max_mem_len=M, attn_layers=Decoder(rotary_pos_emb=True, "
        "attn_flash=True, ...))`, called as `logits, mems = model(x, mems=mems, return_mems=True)`: caches hidden "
        "states and re-projects them to keys/values in every segment",
        "- each configuration in its own process; peak memory = peak RSS minus RSS before building the model",
        f"- {rounds} round(s), alternating order; with several rounds tokens/s uses each segment's fastest step "
        "across rounds (as in the schedules table), `tokens/s over rounds` shows each round's own value",
        "",
        "## Results",
        "",
        table.markdown(),
        "",
        _reading(rows),
    ]
    if piece.get("synthetic"):
        md.insert(0, f"> **Note:** {piece['source']}\n")
    return Section("peer", "Peer comparison: DSMR vs x-transformers recurrent memory", "\n".join(md), table.csv())


def _reading(rows) -> str:
    parts = []
    for r in rows:
        if "throughput DSMR / x-transformers" in r:
            parts.append(
                f"at {r['memory']}, DSMR runs at {fmt(r['throughput DSMR / x-transformers'])}x the "
                f"throughput of x-transformers with {fmt(r['peak memory DSMR / x-transformers'])}x its peak memory"
            )
    if not parts:
        return ""
    return ("**Reading.** " + "; ".join(parts) + ". By design, x-transformers re-projects all M cached hidden "
            "states to keys and values in every layer and segment (extra projection FLOPs and weight-gradient "
            "work proportional to M), while DSMR reads its cached keys and values as they are.")


if __name__ == "__main__":
    worker_main(measure)
