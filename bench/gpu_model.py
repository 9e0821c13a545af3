"""GPU model-level comparison the paper reports (run by ``bench/gpu_check.sh``; needs CUDA).

The ``paper`` preset (12 layers, d_model 512, 8 heads, segment 512), 8 lanes, each streaming a
synthetic 16k-token piece, bf16 autocast, the package's own trainer step
(:func:`dsmr.train.setup` + :func:`dsmr.train.train_step`): full memory vs two-scale
(4096 x 2 layers, 512 elsewhere). Reports training tokens/s over the whole piece and
``torch.cuda.max_memory_allocated``; the paper measured 1.36x tokens/s and 0.41x memory for
two-scale. Each schedule runs in its own process so allocator state cannot leak between them.
Writes ``OUT/gpu_model.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIECE_LEN = 16384
LANES = 8
VOCAB = 512


def measure(schedule: str) -> dict:
    """Train one pass over the lanes' pieces with one schedule; tokens/s and peak memory."""
    import numpy as np
    import torch

    from dsmr import DSMRConfig, schedules
    from dsmr.config import PRESETS
    from dsmr.stream import Vocab
    from dsmr.train import TrainConfig, setup, train_step

    preset = {k: v for k, v in PRESETS["paper"].items() if k != "schedule"}
    n = preset["n_layers"]
    horizons = schedules.full(n) if schedule == "full" else schedules.two_scale(n, 4096, 512, 2)
    cfg = DSMRConfig(vocab_size=VOCAB, horizons=horizons, **preset)
    S = cfg.segment_len
    n_steps = PIECE_LEN // S
    rng = np.random.default_rng(0)
    pieces = [rng.integers(3, VOCAB, size=PIECE_LEN - 1).astype(np.int64) for _ in range(LANES)]
    train_cfg = TrainConfig(out_dir="unused", batch_lanes=LANES, max_steps=n_steps + 2, lr=3e-4, warmup_steps=0,
                            seed=0, shuffle=False, device="cuda", autocast=True, plot=False)
    run = setup(cfg, train_cfg, pieces, Vocab(VOCAB, 0, 1, 2))
    batches = [run.batcher.next_batch() for _ in range(n_steps)]
    train_step(run, [batches[0]])  # warm-up: kernel compiles / autotune, cuBLAS handles, AdamW state
    torch.cuda.synchronize()
    run.state = run.raw_model.init_state(LANES, run.device)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches:
        train_step(run, [b])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    real = sum(int((b.targets >= 0).sum()) for b in batches)
    return dict(schedule=schedule, horizons=[h if h is not None else "all" for h in horizons], steps=n_steps,
                seconds=round(seconds, 3), tokens_per_s=round(real / seconds, 1),
                peak_mib=round(torch.cuda.max_memory_allocated() / 2 ** 20, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    ap.add_argument("--worker", choices=["full", "two_scale"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for schedule in ("full", "two_scale"):
        proc = subprocess.run([sys.executable, __file__, "--worker", schedule], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            results[schedule] = {"schedule": schedule, "error": proc.stderr.strip().splitlines()[-1:]}
            continue
        results[schedule] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(results[schedule], flush=True)
    (out / "gpu_model.json").write_text(json.dumps(results, indent=1))
    import torch

    lines = [f"# GPU model level: paper preset, {LANES} lanes x {PIECE_LEN}-token synthetic piece, bf16 autocast",
             "", f"{torch.cuda.get_device_name()}; torch {torch.__version__}. The paper: two-scale 1.36x tokens/s, "
             "0.41x peak memory vs full.", "",
             "| schedule | tokens/s | peak MiB | seconds | horizons |", "|---|---|---|---|---|"]
    for r in results.values():
        lines.append(f"| {r['schedule']} | {r.get('tokens_per_s', '-')} | {r.get('peak_mib', '-')} | "
                     f"{r.get('seconds', r.get('error'))} | {r.get('horizons', '')} |")
    f, t = results.get("full", {}), results.get("two_scale", {})
    if "tokens_per_s" in f and "tokens_per_s" in t:
        lines += ["", f"two_scale / full: {t['tokens_per_s'] / f['tokens_per_s']:.2f}x tokens/s, "
                      f"{t['peak_mib'] / f['peak_mib']:.2f}x peak memory."]
    (out / "gpu_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
