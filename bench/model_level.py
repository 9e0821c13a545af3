"""Table 2 — memory schedules at model level: training throughput and peak memory.

Every schedule trains the same model on the same long piece with the streaming trainer's own
code: ``dsmr.train.setup`` builds the run, its ``LaneBatcher`` cuts the piece, and each timed
step is one ``dsmr.train.train_step`` (``stream_segment`` forward, backward, AdamW) per segment. Each schedule runs in its own process (``python -m bench.model_level --worker JSON``)
so that its peak memory is its own: peak RSS minus the RSS right before the model is built.

All non-full schedules are set to the same recurrent-state budget (the two-scale schedule's sum
of horizons, via ``dsmr.schedules.at_budget``), so they differ only in *where* the memory sits.
"""
from __future__ import annotations

import time
from typing import List, Tuple

from bench.common import (PeakMemory, Section, Table, fmt, mib, model_precision, plt_agg, precision_text, spread,
                          worker_main)

# The model every model-level table uses (the peer and generation tables too). Sized so that a
# full-memory run over a 16k-token piece fits the default run's time budget on 2 CPU cores.
MODEL = dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, segment_len=512)


# The `small` preset (dsmr.config.PRESETS) as the issue's paper-comparison row: 8 lanes of a 16k piece.
SMALL = dict(n_layers=6, d_model=256, n_heads=8, n_kv_heads=4, segment_len=512)


def small_setting(quick: bool) -> dict:
    """Lanes, segments and the two-scale schedule of the `small` preset rows (one round: ~4 min)."""
    if quick:
        return dict(lanes=2, n_segments=8, long=2048, short=256, n_long=3, precision=model_precision())
    return dict(lanes=8, n_segments=32, long=4096, short=512, n_long=2, precision=model_precision())


def setting(quick: bool) -> dict:
    """Piece length and schedule sizes of a run. Quick mode streams fewer segments, shorter horizons."""
    if quick:
        return dict(n_segments=8, long=2048, short=256, precision=model_precision())
    return dict(n_segments=32, long=4096, short=512, precision=model_precision())


# ----------------------------------------------------------------------------------------------
# Schedules


def schedule_list(n_layers: int, long: int, short: int) -> List[Tuple[str, list]]:
    """(label, horizons) for every family; all but ``full`` at the two-scale schedule's budget."""
    from dsmr import schedules as sch

    n_long = max(1, n_layers // 2)
    two = sch.two_scale(n_layers, long, short, n_long)
    total = sum(two)
    return [
        ("full", sch.full(n_layers)),
        (f"two_scale (long={long}, short={short}, n_long={n_long})", two),
        (f"reverse_two_scale (long={long}, short={short}, n_long={n_long})",
         sch.reverse_two_scale(n_layers, long, short, n_long)),
        ("uniform (at budget)", sch.at_budget("uniform", n_layers, total)),
        ("progressive ascending (at budget, low=short)",
         sch.at_budget("progressive", n_layers, total, low=short, ascending=True)),
        ("progressive descending (at budget, low=short)",
         sch.at_budget("progressive", n_layers, total, low=short, ascending=False)),
        (f"selective (at budget, layers 0+{n_layers // 2})",
         sch.at_budget("selective", n_layers, total, layers=[0, n_layers // 2])),
        ("perceiver_ar_like (at budget)", sch.at_budget("perceiver_ar_like", n_layers, total)),
    ]


# ----------------------------------------------------------------------------------------------
# Streaming training with the package's own trainer


def trainer_run(ids, vocab_size: int, horizons, model: dict, precision: str, n_segments: int, lanes: int = 1):
    """``(run, batches)``: a :func:`dsmr.train.setup` run and the piece's first segments.

    ``ids`` starts with BOS; the first ``n_segments * segment_len`` inputs are cut by the trainer's
    own ``LaneBatcher``, the same piece in each of ``lanes`` lanes (token values do not change the
    timing; every lane streams a whole piece with its own memory). TrainConfig defaults except lr 3e-4, no warmup, no clipping (the peer's
    step has none either), CPU, bf16 autocast when ``precision`` is bf16.
    """
    import torch

    from dsmr import DSMRConfig
    from dsmr.stream import Vocab
    from dsmr.train import TrainConfig, setup

    S = model["segment_len"]
    torch.manual_seed(0)
    cfg = DSMRConfig(vocab_size=vocab_size, horizons=horizons, **model)
    train_cfg = TrainConfig(out_dir="unused", batch_lanes=lanes, max_steps=n_segments + 1, lr=3e-4, warmup_steps=0,
                            grad_clip=0.0, seed=0, shuffle=False, device="cpu", autocast=precision == "bf16",
                            plot=False)
    bos = int(ids[0])
    # Any in-vocab id serves as EOS and pad: they are one target and no input of the timed segments.
    pieces = [ids[1:n_segments * S]] * lanes
    run = setup(cfg, train_cfg, pieces, Vocab(vocab_size, bos, bos, bos))
    return run, [run.batcher.next_batch() for _ in range(n_segments)]


def time_steps(run, batches, warmup: int = 1) -> List[float]:
    """Seconds of each :func:`dsmr.train.train_step` over ``batches``, one segment per step.

    ``warmup`` steps run first on a state that is then reset, so one-time costs (oneDNN primitive
    creation, allocator growth, AdamW state) do not land in the first timed segment.
    """
    from dsmr.train import train_step

    for b in batches[:warmup]:
        train_step(run, [b])
    run.state = run.raw_model.init_state(len(batches[0].inputs))
    times = []
    for b in batches:
        t0 = time.perf_counter()
        train_step(run, [b])
        times.append(time.perf_counter() - t0)
    return times


def measure(cfg: dict) -> dict:
    """Worker: train one DSMR schedule over the piece with the trainer's step; throughput and peak memory."""
    import numpy as np

    from dsmr import schedules as sch

    ids = np.load(cfg["piece"])
    lanes = cfg.get("lanes", 1)
    n_tokens = cfg["n_segments"] * cfg["model"]["segment_len"] * lanes
    mem = PeakMemory()
    mem.start()  # right before building the model: torch, the data and the piece are loaded
    run, batches = trainer_run(ids, cfg["vocab_size"], cfg["horizons"], cfg["model"], cfg["precision"],
                               cfg["n_segments"], lanes)
    times = time_steps(run, batches)
    peak = mem.peak_bytes()
    m = cfg["model"]
    head_dim = m["d_model"] // m["n_heads"]
    bud = sch.budget(cfg["horizons"], piece_len=n_tokens // lanes, segment_len=m["segment_len"],
                     n_kv_heads=m.get("n_kv_heads") or m["n_heads"], head_dim=head_dim,
                     bytes_per_elem=2 if cfg["precision"] == "bf16" else 4)
    return {
        "tokens_per_s": n_tokens / sum(times),
        "peak_bytes": peak,
        "state_bytes": run.state.nbytes(),
        "budget_slots": bud["slots"],
        "budget_bytes": bud["bytes"],
        "segment_times": times,
        "n_tokens": n_tokens,
        "params": run.raw_model.num_params(),
        "mem_method": mem.method,
    }


# ----------------------------------------------------------------------------------------------
# Section


def plan(quick: bool, piece: dict, piece_path: str) -> List[dict]:
    """One worker configuration per schedule, then the `small` preset's two-scale and full rows."""
    from dsmr import schedules as sch

    s, sm = setting(quick), small_setting(quick)
    n = SMALL["n_layers"]
    small = [
        {"label": f"small: {label}", "group": "small", "horizons": h, "model": SMALL, "lanes": sm["lanes"],
         "vocab_size": piece["vocab_size"], "piece": piece_path, "n_segments": sm["n_segments"],
         "precision": sm["precision"], "rounds": 1}
        for label, h in (("full", sch.full(n)),
                         (f"two_scale (long={sm['long']}, short={sm['short']}, n_long={sm['n_long']})",
                          sch.two_scale(n, sm["long"], sm["short"], sm["n_long"])))
    ]
    return [
        {
            "label": label,
            "horizons": horizons,
            "model": MODEL,
            "vocab_size": piece["vocab_size"],
            "piece": piece_path,
            "n_segments": s["n_segments"],
            "precision": s["precision"],
        }
        for label, horizons in schedule_list(MODEL["n_layers"], s["long"], s["short"])
    ] + small


def rows_from(results: List[Tuple[dict, object]]) -> List[dict]:
    """Table rows with ratios to ``full`` from the same run."""
    from dsmr import schedules as sch

    rows = []
    for cfg, res in results:
        row = {"schedule": cfg["label"], "horizons": sch.describe(cfg["horizons"])}
        if res.ok:
            d = res.data
            row.update({
                "KV budget (slots/lane)": d["budget_slots"],
                "KV state MiB (end of piece)": mib(d["state_bytes"]),
                "tokens/s": d["tokens_per_s"],
                "tokens/s over rounds": spread(d),
                "peak MiB": mib(d["peak_bytes"]),
                "load (1 min) after": d.get("load_1min_end"),
                "process wall s": res.wall_s,
            })
        else:
            row["note"] = res.error[:160]
        rows.append(row)
    full = next((r for r in rows if r["schedule"].endswith("full") and "tokens/s" in r), None)
    for r in rows:
        if full and "tokens/s" in r:
            r["throughput vs full"] = r["tokens/s"] / full["tokens/s"]
            r["peak memory vs full"] = r["peak MiB"] / full["peak MiB"]
    return rows


def findings(rows: List[dict], setting_desc: str) -> str:
    """The short paragraph comparing two-scale with full memory against the paper's headline."""
    two = next((r for r in rows if r["schedule"].startswith("two_scale") and "tokens/s" in r), None)
    full = next((r for r in rows if r["schedule"] == "full" and "tokens/s" in r), None)
    if not (two and full):
        return "**Findings.** The two-scale or full run failed; no comparison this run."
    mem_less = 100 * (1 - two["peak memory vs full"])
    thr = 100 * (two["throughput vs full"] - 1)
    thr_text = f"{abs(thr):.0f}% {'more' if thr >= 0 else 'less'} training throughput"
    mem_text = f"{abs(mem_less):.0f}% {'less' if mem_less >= 0 else 'more'} peak memory"
    best = max((r for r in rows if "tokens/s" in r), key=lambda r: r["tokens/s"])
    lean = min((r for r in rows if "peak MiB" in r), key=lambda r: r["peak MiB"])
    return (
        f"**Findings.** On this CPU ({setting_desc}), two-scale has **{mem_text}** and "
        f"**{thr_text}** than full memory "
        f"({fmt(two['peak MiB'])} vs {fmt(full['peak MiB'])} MiB, {fmt(two['tokens/s'])} vs "
        f"{fmt(full['tokens/s'])} tokens/s). The paper reports about 59% less memory and 36% more "
        "throughput on a GPU over MAESTRO with a larger model and longer pieces; the size of the "
        "gap depends on how long the full-memory state grows (here it ends at the piece length "
        "in every layer) relative to the fixed cost of weights, optimizer state and one "
        f"segment's activations. Fastest schedule this run: {best['schedule']}; leanest: "
        f"{lean['schedule']}. At equal budget the schedules differ by where the memory sits, "
        "so their throughput and memory are close; what separates them is quality (perplexity "
        "and long-range use), which this table does not measure."
    )


def _plot(results, path) -> bool:
    plt = plt_agg()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for cfg, res in results:
        if res.ok and cfg.get("group") != "small":
            t = res.data["segment_times"]
            seg = cfg["model"]["segment_len"]
            ax.plot([(i + 1) * seg for i in range(len(t))], [1e3 * x for x in t], label=cfg["label"], lw=1.2)
    ax.set_xlabel("tokens streamed (end of segment)")
    ax.set_ylabel("ms per training step (fwd+bwd+AdamW, one segment)")
    ax.set_title("Training step time along the piece, per schedule (fastest round per segment)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def small_table(results, quick: bool) -> List[str]:
    """Markdown: the `small` preset's two-scale vs full rows, with the paper's ratios beside them."""
    sm = small_setting(quick)
    rows = rows_from(results)
    cols = ["schedule", "horizons", "KV state MiB (end of piece)", "tokens/s", "throughput vs full", "peak MiB",
            "peak memory vs full", "load (1 min) after", "process wall s", "note"]
    two = next((r for r in rows if "two_scale" in r["schedule"] and "throughput vs full" in r), None)
    n_tok = sm["n_segments"] * SMALL["segment_len"]
    out = [
        "## The `small` preset: two-scale vs full memory",
        "",
        f"- model: the `small` preset ({SMALL['n_layers']} layers, d_model {SMALL['d_model']}, {SMALL['n_heads']} "
        f"query / {SMALL['n_kv_heads']} KV heads, d_ff {4 * SMALL['d_model']}, segment {SMALL['segment_len']}), "
        f"{precision_text(sm['precision'])}, {sm['lanes']} lanes each streaming the first {n_tok:,} tokens of the piece "
        f"(one `train_step` per segment over all lanes), one round; other settings as above",
        "",
        Table(cols, rows).markdown(),
        "",
    ]
    if two:
        out.append(f"Two-scale vs full at the `small` preset: **{two['throughput vs full']:.2f}x training tokens/s, "
                   f"{two['peak memory vs full']:.2f}x peak memory** (the paper, on a GPU with longer pieces: "
                   "1.36x and 0.41x).")
    return out


def render(results, quick: bool, piece: dict, out_dir, rounds: int) -> Section:
    s = setting(quick)
    small = [(c, r) for c, r in results if c.get("group") == "small"]
    results = [(c, r) for c, r in results if c.get("group") != "small"]
    rows = rows_from(results)
    cols = ["schedule", "horizons", "KV budget (slots/lane)", "KV state MiB (end of piece)", "tokens/s",
            "throughput vs full", "peak MiB", "peak memory vs full", "tokens/s over rounds",
            "load (1 min) after", "process wall s", "note"]
    table = Table(cols, rows)
    n_tokens = s["n_segments"] * MODEL["segment_len"]
    ok = [r for _, r in results if r.ok]
    params = ok[0].data["params"] if ok else None
    method = ok[0].data["mem_method"] if ok else ""
    setting_desc = (
        f"{MODEL['n_layers']} layers, d_model {MODEL['d_model']}, {MODEL['n_heads']} heads, segment "
        f"{MODEL['segment_len']}, {precision_text(s['precision'])}, {n_tokens:,}-token piece, batch 1"
    )
    md = [
        "## Configuration",
        "",
        f"- model: DSMRModel, {MODEL['n_layers']} layers, d_model {MODEL['d_model']}, {MODEL['n_heads']} heads "
        f"(head dim {MODEL['d_model'] // MODEL['n_heads']}), d_ff {MODEL['d_ff']}, segment {MODEL['segment_len']}, "
        f"vocab {piece['vocab_size']}, {fmt(params)} parameters, op backend auto (torch on CPU)",
        f"- precision: {s['precision']} autocast (`torch.autocast('cpu', dtype=torch.bfloat16)`), fp32 weights and AdamW"
        if s["precision"] == "bf16" else f"- precision: {precision_text(s['precision'])}",
        f"- piece: {piece['source']}; the first {n_tokens:,} tokens ({s['n_segments']} segments) are "
        "streamed, batch 1, one `dsmr.train.train_step` per segment (forward via `dsmr.stream.stream_segment`, "
        "backward, AdamW lr 3e-4, no clipping), state carried across segments",
        "- one warm-up segment on a throw-away state first; tokens/s = streamed tokens / sum of step times",
        f"- {rounds} round(s): every schedule runs once per round in its own process (rounds alternate the "
        "order); with several rounds, tokens/s = streamed tokens / sum over segments of that segment's fastest "
        "step across rounds (other processes only ever slow a step down), and `tokens/s over rounds` shows each "
        "round's own value; `load (1 min) after` is the machine's load average when the process ended (above "
        "the core count means other processes competed for the CPU)",
        f"- peak memory: {method}; each schedule runs in its own process",
        "- KV budget = sum of per-layer horizons (`dsmr.schedules.budget`, full = piece length per layer); "
        "all schedules but full are set to the two-scale budget with `dsmr.schedules.at_budget`",
        "- ratios: this run's value divided by this run's full-memory value",
        "",
        "## Results",
        "",
        table.markdown(),
        "",
        findings(rows, setting_desc),
        "",
        *(small_table(small, quick) if small else []),
    ]
    if piece.get("synthetic"):
        md.insert(0, f"> **Note:** {piece['source']}\n")
    sec = Section("schedules", "Memory schedules at model level: training throughput and peak memory",
                  "\n".join(md), table.csv())
    if _plot(results, out_dir / "schedules.png"):
        sec.plots.append("schedules.png")
    return sec


if __name__ == "__main__":
    worker_main(measure)
