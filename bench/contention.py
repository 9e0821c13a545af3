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


def measure(cfg: dict) -> dict:
    """Worker: ``dsmr.train.train`` for ``steps`` steps under ``policy``, optionally beside a busy process."""
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
    return [
        {"label": f"{name}, {'busy' if busy else 'idle'}", "policy_name": name, "policy": policy, "busy": busy,
         "piece": piece_path, "vocab_size": piece["vocab_size"], **s}
        for name, policy in policies for busy in (False, True)
    ]


def render(results: List[Tuple[dict, object]], quick: bool, piece: dict, threads: int) -> Section:
    s = setting(quick)
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
    if piece.get("synthetic"):
        md.insert(0, f"> **Note:** {piece['source']}\n")
    return Section("contention", "Training beside a busy process: thread policies", "\n".join(md), table.csv())


if __name__ == "__main__":
    worker_main(measure)
