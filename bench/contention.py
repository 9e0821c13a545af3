"""Table 5 — training beside a busy process: tokens/s idle and with one CPU-bound process running.

A user's machine is rarely idle. torch's OpenMP threads spin at every barrier, so when another
process holds one core, a run that uses every core waits at each barrier for its descheduled
thread. This table runs :func:`dsmr.train.train` — the Python API with its default settings, the
``tiny`` preset, 8 lanes — idle and beside one ``while True: pass`` process, under three thread
policies:

* ``auto`` (the default, :mod:`dsmr.threads`): threads follow the cores other processes leave free;
* every core, fixed (torch's own default, what dsmr did before ``auto``);
* one thread, fixed.

Each configuration runs in its own process; the busy process is started by the worker right
before training and killed right after. tokens/s counts the steps after the first two (one-time
costs: oneDNN primitives, the CPU path calibration, the governor's first one-second window).

A second table does the same for the op alone, called from a user's own loop (no dsmr loop, no
governed block): ``DSMRAttention`` forward + backward on one 512-token segment with a 1024-token
memory, fp32, under ``DSMR_THREADS`` = ``auto`` (the default: every CPU call of the op ticks a
process-wide governor), ``none`` (torch's threads as they are: the op before it governed itself)
and ``1``.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

from bench.common import Section, Table, fmt, worker_main

SKIP = 2  # steps left out of tokens/s (one-time costs)


def setting(quick: bool) -> dict:
    return dict(steps=12 if quick else 40, lanes=8, preset="tiny")


def _pieces(ids, lanes: int, seg: int, steps: int):
    """The piece cut into ``lanes`` sub-pieces long enough that no lane runs dry before ``steps``."""
    body = ids[1:]
    need = (steps + 1) * seg
    per = max(need, len(body) // lanes)
    out = []
    for i in range(lanes):
        start = (i * per) % max(len(body) - per, 1)
        chunk = body[start:start + per]
        while len(chunk) < per:  # a short piece: repeat it; token values do not change the timing
            chunk = list(chunk) + list(body[: per - len(chunk)])
        out.append(chunk)
    return out


OP_SHAPE = dict(d_model=512, n_heads=8, horizon=1024, segment=512)


def measure_op(cfg: dict) -> dict:
    """Worker: a user's loop of ``DSMRAttention`` forward + backward for ``seconds``, optionally beside
    a busy process; per-call times after the first ``warm_s`` seconds (the governor's first window)."""
    import os

    os.environ["DSMR_THREADS"] = str(cfg["policy"])  # read by the op's governor on its first call
    import torch

    from dsmr_kernels import DSMRAttention

    shape = OP_SHAPE
    torch.manual_seed(0)
    attn = DSMRAttention(shape["d_model"], shape["n_heads"], horizon=shape["horizon"])
    x = torch.randn(1, shape["segment"], shape["d_model"])
    _, state = attn(x)
    with torch.no_grad():
        for _ in range(shape["horizon"] // shape["segment"] - 1):
            _, state = attn(x, state)  # memory full: every call attends over 1024 + 512 keys
    busy = None
    times, threads = [], []
    try:
        if cfg["busy"]:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        start = time.perf_counter()
        while time.perf_counter() - start < cfg["seconds"]:
            t0 = time.perf_counter()
            y, _ = attn(x, state)
            y.sum().backward()
            t1 = time.perf_counter()
            if t0 - start >= cfg["warm_s"]:
                times.append(t1 - t0)
                threads.append(torch.get_num_threads())
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    times.sort()
    return {"ms": 1e3 * times[len(times) // 2], "calls": len(times), "threads_seen": sorted(set(threads))}


def measure(cfg: dict) -> dict:
    """Worker: ``dsmr.train.train`` for ``steps`` steps under ``policy``, optionally beside a busy process."""
    if cfg.get("kind") == "op":
        return measure_op(cfg)
    import numpy as np
    import torch

    from dsmr.config import TrainConfig, load_settings
    from dsmr.train import train

    ids = np.load(cfg["piece"])
    settings = load_settings(preset=cfg["preset"])
    model_cfg = settings.model_config(cfg["vocab_size"])
    seg = model_cfg.segment_len
    pieces = [np.asarray(p, dtype=np.int64) for p in _pieces(ids, cfg["lanes"], seg, cfg["steps"])]
    bos = int(ids[0])
    stamps, threads = [], []

    def on_step(step, record):
        stamps.append(time.perf_counter())
        threads.append(torch.get_num_threads())

    busy = None
    with tempfile.TemporaryDirectory() as out:
        tcfg = TrainConfig(out_dir=out, batch_lanes=cfg["lanes"], max_steps=cfg["steps"], eval_every=0,
                           ckpt_every=0, log_every=1, progress=False, plot=False, device="cpu",
                           threads=cfg["policy"], val_split=None)
        try:
            if cfg["busy"]:
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            t0 = time.perf_counter()
            summary = train(model_cfg, tcfg, pieces, None, vocab_size=cfg["vocab_size"], pad_id=bos,
                            bos_id=bos, eos_id=bos, callback=on_step)
            wall = time.perf_counter() - t0
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    tokens_per_step = cfg["lanes"] * seg
    timed = stamps[SKIP:]
    tps = tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])
    return {"tokens_per_s": tps, "train_wall_s": wall, "steps": summary["step"],
            "threads_seen": sorted(set(threads)), "threads_last": threads[-1],
            "start_threads": torch.get_num_threads()}


def plan(quick: bool, piece: dict, piece_path: str, threads: int) -> List[dict]:
    s = setting(quick)
    policies = [("auto (default)", "auto"), (f"{threads} threads, fixed (torch's default)", threads)]
    if threads > 1:
        policies.append(("1 thread, fixed", 1))
    train_rows = [
        {"label": f"{name}, {'busy' if busy else 'idle'}", "policy_name": name, "policy": policy, "busy": busy,
         "piece": piece_path, "vocab_size": piece["vocab_size"], **s}
        for name, policy in policies for busy in (False, True)
    ]
    op_policies = [("auto (default)", "auto"), (f"none: torch's {threads} threads (the op before)", "none")]
    if threads > 1:
        op_policies.append(("1 thread (DSMR_THREADS=1)", 1))
    op_rows = [
        {"label": f"op {name}, {'busy' if busy else 'idle'}", "kind": "op", "policy_name": name, "policy": policy,
         "busy": busy, "seconds": 5 if quick else 12, "warm_s": 1.5}
        for name, policy in op_policies for busy in (False, True)
    ]
    return train_rows + op_rows


def render_op(results) -> Tuple[str, List[dict]]:
    """The op table (markdown) and its rows."""
    by = {(c["policy_name"], c["busy"]): r for c, r in results}
    names = list(dict.fromkeys(c["policy_name"] for c, _ in results))
    rows = []
    for name in names:
        row = {"DSMR_THREADS policy": name}
        for tag, busy in (("idle", False), ("beside a busy process", True)):
            r = by.get((name, busy))
            if r is not None and r.ok:
                row[f"fwd+bwd ms {tag}"] = r.data["ms"]
                row[f"calls timed {tag}"] = r.data["calls"]
                row[f"threads used {tag}"] = ", ".join(str(t) for t in r.data["threads_seen"])
            elif r is not None:
                row["note"] = (row.get("note", "") + f" {tag}: {r.error}").strip()
        if "fwd+bwd ms idle" in row and "fwd+bwd ms beside a busy process" in row:
            row["speed busy / idle"] = row["fwd+bwd ms idle"] / row["fwd+bwd ms beside a busy process"]
        rows.append(row)
    ref = rows[1] if len(rows) > 1 else {}
    for row in rows:
        if ref.get("fwd+bwd ms idle") and row.get("fwd+bwd ms idle"):
            row["idle speed vs none"] = ref["fwd+bwd ms idle"] / row["fwd+bwd ms idle"]
    cols = ["DSMR_THREADS policy", "fwd+bwd ms idle", "fwd+bwd ms beside a busy process", "speed busy / idle",
            "idle speed vs none", "threads used idle", "threads used beside a busy process",
            "calls timed idle", "calls timed beside a busy process", "note"]
    auto = rows[0] if rows else {}
    checks = [
        ("op, `auto`: speed beside one busy process >= 0.5x idle", auto.get("speed busy / idle"), 0.5),
        ("op, `auto`: idle speed >= 0.95x `none` (today's idle speed, within 5%)", auto.get("idle speed vs none"), 0.95),
    ]
    shape = OP_SHAPE
    md = [
        "## The op in a user's own loop",
        "",
        f"- `DSMRAttention(d_model={shape['d_model']}, n_heads={shape['n_heads']}, horizon={shape['horizon']})`, "
        f"forward + backward of one {shape['segment']}-token segment (B = 1, fp32) over a full "
        f"{shape['horizon']}-token memory, in a plain Python loop: no dsmr loop, no governed block",
        "- `DSMR_THREADS` set in the worker before the first call; median per-call time after the first 1.5 s "
        "(the governor decides once a second)",
        "",
        Table(cols, rows).markdown(),
        "",
        Table(["target", "measured", "met"],
              [{"target": t, "measured": fmt(v) if v is not None else "—",
                "met": "—" if v is None else ("yes" if v >= lim else "no")} for t, v, lim in checks]).markdown(),
    ]
    return "\n".join(md), rows


def render(results: List[Tuple[dict, object]], quick: bool, piece: dict, threads: int) -> Section:
    s = setting(quick)
    op_results = [(c, r) for c, r in results if c.get("kind") == "op"]
    results = [(c, r) for c, r in results if c.get("kind") != "op"]
    by = {(c["policy_name"], c["busy"]): r for c, r in results}
    names = list(dict.fromkeys(c["policy_name"] for c, _ in results))
    fixed_all = names[1] if len(names) > 1 else None
    rows = []
    for name in names:
        idle, busy = by.get((name, False)), by.get((name, True))
        row = {"thread policy": name}
        for tag, r in (("idle", idle), ("beside a busy process", busy)):
            if r is not None and r.ok:
                row[f"tokens/s {tag}"] = r.data["tokens_per_s"]
                row[f"threads used {tag}"] = ", ".join(str(t) for t in r.data["threads_seen"])
                row[f"load (1 min) after, {tag}"] = r.data.get("load_1min_end")
            elif r is not None:
                row["note"] = (row.get("note", "") + f" {tag}: {r.error}").strip()
        if "tokens/s idle" in row and "tokens/s beside a busy process" in row:
            row["busy / idle"] = row["tokens/s beside a busy process"] / row["tokens/s idle"]
        rows.append(row)
    ref = next((r for r in rows if r["thread policy"] == fixed_all), {})
    for row in rows:
        if ref.get("tokens/s idle") and row.get("tokens/s idle"):
            row["idle vs fixed all cores"] = row["tokens/s idle"] / ref["tokens/s idle"]
    cols = ["thread policy", "tokens/s idle", "tokens/s beside a busy process", "busy / idle",
            "idle vs fixed all cores", "threads used idle", "threads used beside a busy process",
            "load (1 min) after, idle", "load (1 min) after, beside a busy process", "note"]
    table = Table(cols, rows)
    auto = rows[0] if rows else {}
    checks = [
        ("`auto` beside one busy process >= 0.5x its idle tokens/s", auto.get("busy / idle"), 0.5),
        ("`auto` idle >= 0.9x the fixed all-core policy's idle tokens/s", auto.get("idle vs fixed all cores"), 0.9),
    ]
    target_rows = [{"target": t, "measured": fmt(v) if v is not None else "—",
                    "met": "—" if v is None else ("yes" if v >= lim else "no")} for t, v, lim in checks]
    md = [
        "## Configuration",
        "",
        f"- `dsmr.train.train` with its defaults except: preset `{s['preset']}`, {s['lanes']} lanes, "
        f"{s['steps']} optimizer steps, no validation or periodic checkpoints, fp32, CPU",
        f"- data: {piece['source']}, cut into {s['lanes']} pieces so no lane runs dry",
        f"- tokens/s over steps {SKIP + 1}..{s['steps']} (the first {SKIP} carry one-time costs)",
        "- busy process: `python -c 'while True: pass'` (one core), started 0.5 s before training, killed after",
        f"- thread policies: `TrainConfig.threads` = `auto` (dsmr's default: :mod:`dsmr.threads` reads "
        f"/proc/stat once a second and uses the cores other processes leave free), {threads} (every core, "
        "torch's default and dsmr's behaviour before `auto`), 1",
        "- each configuration in its own process, one round; `threads used` lists every count a step ran with",
        "",
        "## Results",
        "",
        table.markdown(),
        "",
        "## Targets",
        "",
        Table(["target", "measured", "met"], target_rows).markdown(),
    ]
    if op_results:
        op_md, _ = render_op(op_results)
        md += ["", op_md]
    if piece.get("synthetic"):
        md.insert(0, f"> **Note:** {piece['source']}\n")
    return Section("contention", "Training beside a busy process: thread policies", "\n".join(md), table.csv())


if __name__ == "__main__":
    worker_main(measure)
