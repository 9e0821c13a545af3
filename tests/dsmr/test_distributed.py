"""DDP training under torchrun: 2 CPU processes (gloo), uneven shards, kill-and-resume, rank-0 writes."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmr.stream import LaneBatcher

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    '''
    import os, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from dsmr import DSMRConfig
    from dsmr.train import TrainConfig, train

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    rng = np.random.default_rng(0)
    pieces = [rng.integers(3, 19, size=int(n)) for n in (3, 60, 5, 41, 2, 30, 7)]
    mc = DSMRConfig(vocab_size=19, n_layers=2, d_model=16, n_heads=2, segment_len=8, horizons=[None, 6],
                    dropout=0.1)
    kw = dict(batch_lanes=2, lr=3e-3, warmup_steps=2, eval_every=5, ckpt_every=4, log_every=1, seed=3,
              plot=False, max_steps=14)
    ids = dict(pad_id=0, bos_id=1, eos_id=2)

    # 1. uninterrupted, with epochs shorter than the run so epoch boundaries are crossed
    a = train(mc, TrainConfig(out_dir=f"{out}/a", **kw), pieces, pieces[:3], return_model=True, **ids)
    torch.save({k: v.clone() for k, v in a["model"].state_dict().items()}, f"{out}/params_a_rank{rank}.pt")

    # 2. killed after step 6 on every rank (last checkpoint at 4), then resumed to the end
    class Killed(Exception):
        pass

    def kill(step, rec):
        if step == 6:
            raise Killed()

    try:
        train(mc, TrainConfig(out_dir=f"{out}/b", **kw), pieces, pieces[:3], callback=kill, **ids)
        raise SystemExit("the kill did not happen")
    except Killed:
        pass
    b = train(mc, TrainConfig(out_dir=f"{out}/b", **kw), pieces, pieces[:3], resume=True,
              return_model=True, **ids)
    torch.save({k: v.clone() for k, v in b["model"].state_dict().items()}, f"{out}/params_b_rank{rank}.pt")
    print(f"rank {rank} done: step {b['step']} epoch {b['epoch']}", flush=True)
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uneven_shards_do_not_agree_on_length():
    """The corpus of the worker gives the two ranks different amounts of work (the hard case)."""
    rng = np.random.default_rng(0)
    pieces = [rng.integers(3, 19, size=int(n)) for n in (3, 60, 5, 41, 2, 30, 7)]
    for epoch in range(3):
        b0 = LaneBatcher(pieces, 2, 8, pad_id=0, bos_id=1, eos_id=2, seed=3, rank=0, world_size=2)
        order = b0.epoch_order(epoch)
        own = [b0._lanes_end(order[r::2]) for r in range(2)]
        if own[0] != own[1]:
            assert b0.epoch_len(epoch) == max(own)
            return
    pytest.fail("expected ranks with unequal batch counts in some epoch")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_cpu_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:  # a deadlock between ranks ends here
        pytest.fail(f"torchrun timed out (deadlock?):\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "rank 0 done: step 14" in proc.stdout and "rank 1 done: step 14" in proc.stdout

    # both ranks end with identical parameters, in both runs
    for run in ("a", "b"):
        p0 = torch.load(tmp_path / f"params_{run}_rank0.pt", weights_only=True)
        p1 = torch.load(tmp_path / f"params_{run}_rank1.pt", weights_only=True)
        for name in p0:
            assert torch.equal(p0[name], p1[name]), (run, name)

    # only rank 0 wrote: one metrics line per step, one checkpoint set
    recs = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    train_steps = [r["step"] for r in recs if r["type"] == "train"]
    assert train_steps == list(range(1, 15))
    assert any(r["type"] == "val" for r in recs)
    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["data"]) == len(ck["memory"]) == len(ck["rng"]) == 2
    assert ck["step"] == 14 and ck["epoch"] >= 1  # epoch boundaries were crossed

    # kill-and-resume under DDP reproduces the uninterrupted run exactly
    losses = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
                          if r["type"] == "train"]  # noqa: E731
    assert losses("a") == losses("b")
    pa = torch.load(tmp_path / "params_a_rank0.pt", weights_only=True)
    pb = torch.load(tmp_path / "params_b_rank0.pt", weights_only=True)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
