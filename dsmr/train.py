"""Streaming trainer: B lanes stream whole pieces left to right, one segment per lane per batch.

    from dsmr import DSMRConfig
    from dsmr.train import TrainConfig, train
    summary = train(DSMRConfig(vocab_size=300, n_layers=6, d_model=256, n_heads=4, segment_len=512),
                    TrainConfig(out_dir="runs/x", batch_lanes=8, max_steps=10_000),
                    data=token_cache)          # or train_pieces=[...], val_pieces=[...], pad_id=..., ...

The recipe (:func:`train`) reads top to bottom: join the process group, check the corpus,
:func:`setup` the run (model, optimizer, learning-rate schedule, lane batcher, memory), resume
from ``last.pt`` (:func:`dsmr.checkpoint.restore_training`), then the flat loop in nanoGPT's
order — evaluate/checkpoint -> one :func:`train_step` -> log — and a summary. How pieces become
batches and how one segment is streamed live in :mod:`dsmr.stream`.

One optimizer step consumes ``grad_accum`` segment batches. Its loss is the summed NLL over the
real targets of the whole step on all ranks divided by their number, so an idle rank (one whose
pieces ran out, see :mod:`dsmr.stream`) contributes zero gradient and DDP's mean equals the
token-mean over the global batch.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from dsmr_kernels.cpu_dispatch import calibration_state

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistInfo, gather_objects, resolve_device, setup_distributed, sum_over_ranks
from .evaluate import evaluate
from .metrics import MetricsLog, plot_curves
from .model import DSMRConfig, DSMRModel, ModelState
from .threads import governed
from .stream import Batch, LaneBatcher, Vocab, check_pieces, check_vocab, resolve_corpus, stream_segment

__all__ = ["TrainConfig", "Run", "lr_at", "configure_optimizer", "setup", "train_step", "train"]


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine down to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay = cfg.lr_decay_steps or total_steps
    if step >= decay:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices (and embeddings) decay, norms and biases do not (as in nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused step (CUDA, and CPU since torch 2.4) does all parameters in one kernel per group:
    # 3x faster than the foreach step on CPU (7.5 -> 2.5 ms for a 3M-parameter model, 3-4% of a
    # training step), same values to 1e-9. Older torch or other devices keep the foreach step.
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# ----------------------------------------------------------------------------------------------
# setup


@dataclass
class Run:
    """Everything one training process holds between steps (built by :func:`setup`)."""

    cfg: TrainConfig
    model_config: DSMRConfig
    dist: DistInfo
    device: torch.device
    raw_model: DSMRModel
    model: torch.nn.Module  # raw_model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    batcher: LaneBatcher
    state: ModelState
    vocab: Vocab
    total_steps: int
    out_dir: Path
    val_pieces: Optional[list] = None
    tokenizer_config: Optional[dict] = None
    step: int = 0
    best_ppl: float = math.inf
    last_val: Optional[dict] = None

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype, None without autocast."""
        if not self.cfg.autocast:
            return None
        return torch.bfloat16 if self.cfg.autocast_dtype == "bfloat16" else torch.float16

    @property
    def master(self) -> bool:
        return self.dist.rank == 0


def setup(model_config: DSMRConfig, cfg: TrainConfig, train_pieces: List, vocab: Vocab, *,
          val_pieces: Optional[List] = None, tokenizer_config: Optional[dict] = None,
          dist_info: Optional[DistInfo] = None) -> Run:
    """A fresh run at step 0: model (seeded), AdamW, the warmup+cosine schedule, the lane batcher.

    ``train_pieces`` are checked 1-D int arrays (:func:`dsmr.stream.check_pieces`). Nothing is
    written to disk. The learning rate has one mechanism: ``LambdaLR`` over :func:`lr_at`.
    """
    dist_info = dist_info or DistInfo()
    device = resolve_device(cfg.device, dist_info)
    torch.manual_seed(cfg.seed)  # identical init on every rank
    raw_model = DSMRModel(model_config).to(device)
    optimizer = configure_optimizer(raw_model, cfg, device)
    batcher = LaneBatcher(train_pieces, cfg.batch_lanes, model_config.segment_len, pad_id=vocab.pad_id,
                          bos_id=vocab.bos_id, eos_id=vocab.eos_id, seed=cfg.seed, shuffle=cfg.shuffle,
                          rank=dist_info.rank, world_size=dist_info.world_size, max_epochs=cfg.epochs)
    total_steps = cfg.max_steps or 0
    if cfg.epochs is not None:
        epoch_steps = -(-batcher.total_batches(cfg.epochs) // cfg.grad_accum)
        total_steps = epoch_steps if cfg.max_steps is None else min(cfg.max_steps, epoch_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.lr)
    # float16 needs loss scaling (bf16 has fp32's range); disabled, the scaler is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.autocast and cfg.autocast_dtype == "float16")
    state = raw_model.init_state(cfg.batch_lanes, device)
    torch.manual_seed(cfg.seed + 1 + dist_info.rank)  # dropout streams differ per rank
    return Run(cfg, model_config, dist_info, device, raw_model, raw_model, optimizer, scheduler, scaler,
               batcher, state, vocab, total_steps, Path(cfg.out_dir), val_pieces, tokenizer_config)


def _resume(run: Run) -> Optional[int]:
    """Continue from ``out_dir/last.pt`` if it exists; returns the step resumed at (or None)."""
    path = run.out_dir / "last.pt"
    if not path.exists():
        if run.master:
            warnings.warn(f"resume requested but {path} does not exist; starting fresh")
        return None
    got = ckpt.restore_training(path, model=run.raw_model, optimizer=run.optimizer, scheduler=run.scheduler,
                                scaler=run.scaler, batcher=run.batcher, model_config=run.model_config,
                                rank=run.dist.rank, world_size=run.dist.world_size, device=run.device)
    run.step, run.state, run.last_val = got["step"], got["state"], got["val"]
    run.best_ppl = got["best_val_ppl"] or math.inf
    return run.step


def _data_parallel(run: Run) -> torch.nn.Module:
    if not run.dist.enabled:
        return run.raw_model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(run.raw_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------
# the pieces of the loop


def train_step(run: Run, batches: List[Batch]) -> dict:
    """One optimizer step over ``batches`` (``grad_accum`` segment batches); advances ``run``.

    Returns ``{"nll_sum": this rank's summed NLL (0-dim tensor), "tokens": real targets of the
    step on all ranks, "slots": lane slots (batches x lanes x positions) on all ranks,
    "grad_norm": pre-clip norm or None}``; ``tokens / slots`` is the step's lane utilization.
    """
    n_global = float(sum_over_ranks(torch.tensor([float(sum(b.n_tokens for b in batches))],
                                                 dtype=torch.float64, device=run.device))[0])
    # Sum of NLL / global token count, times world because DDP averages gradients.
    norm = run.dist.world_size / max(n_global, 1.0)
    nll_sum = torch.zeros((), device=run.device)
    for i, b in enumerate(batches):
        # Gradients are all-reduced once, on the step's last batch.
        sync = run.model.no_sync() if run.dist.enabled and i < len(batches) - 1 else contextlib.nullcontext()
        with sync:
            nll, run.state = stream_segment(run.model, run.state, b, autocast_dtype=run.amp_dtype)
            nll = nll.sum()
            run.scaler.scale(nll * norm).backward()
        nll_sum += nll.detach()
    grad_norm = None
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    slots = sum(b.inputs.numel() for b in batches) * run.dist.world_size
    return {"nll_sum": nll_sum, "tokens": n_global, "slots": float(slots), "grad_norm": grad_norm}


def save(run: Run, paths: List[Path]) -> None:
    """Gather every rank's stream position, memory and RNG; rank 0 writes ``paths`` atomically."""
    mine = {
        "data": run.batcher.state_dict(),
        "memory": {k: v.detach().cpu() for k, v in run.state.to_dict().items()},
        "rng": ckpt.rng_state(),
        "cpu_paths": calibration_state(),
    }
    per_rank = gather_objects(mine, run.dist)
    if not run.master:
        return
    obj = ckpt.make_checkpoint(
        model=run.raw_model, optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler,
        step=run.step, epoch=run.batcher.epoch, model_config=run.model_config, train_config=run.cfg,
        tokenizer_config=run.tokenizer_config, vocab=run.vocab.to_dict(),
        data=[r["data"] for r in per_rank], memory=[r["memory"] for r in per_rank],
        rng=[r["rng"] for r in per_rank], cpu_paths=[r["cpu_paths"] for r in per_rank],
        world_size=run.dist.world_size,
        best_val_ppl=None if math.isinf(run.best_ppl) else run.best_ppl, val=run.last_val,
    )
    for p in paths:
        ckpt.save_checkpoint(obj, p)


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _evaluate_and_save(run: Run, metrics: MetricsLog, pbar, show: bool) -> None:
    """The periodic (and final) validation and checkpoint of the step ``run`` stands at."""
    cfg, is_last = run.cfg, run.step >= run.total_steps
    save_to = []
    if run.val_pieces is not None and (_due(cfg.eval_every, run.step) or is_last):
        run.last_val = evaluate(run.raw_model, run.val_pieces, pad_id=run.vocab.pad_id, bos_id=run.vocab.bos_id,
                                eos_id=run.vocab.eos_id, batch_lanes=cfg.eval_batch_lanes or cfg.batch_lanes,
                                device=run.device, autocast=cfg.autocast,
                                autocast_dtype=run.amp_dtype or torch.bfloat16, rank=run.dist.rank,
                                world_size=run.dist.world_size, progress=show and run.master)
        metrics.write({"type": "val", "step": run.step, "epoch": run.batcher.epoch, **run.last_val})
        if run.last_val["ppl"] < run.best_ppl and run.step > 0:
            run.best_ppl = run.last_val["ppl"]
            save_to.append(run.out_dir / "best.pt")
        if run.master:
            pbar.write(f"step {run.step}: val nll {run.last_val['nll']:.4f} ppl {run.last_val['ppl']:.3f}")
    if run.step > 0 and (_due(cfg.ckpt_every, run.step) or is_last):
        save_to.insert(0, run.out_dir / "last.pt")
    if save_to:
        save(run, save_to)


class _Rate:
    """Tokens per second and lane utilization (real tokens / lane slots) since the last logged step."""

    def __init__(self):
        self.t, self.tokens, self.slots = time.time(), 0, 0

    def add(self, stats: dict) -> None:
        self.tokens += int(stats["tokens"])
        self.slots += int(stats["slots"])

    def take(self) -> tuple:
        now = time.time()
        rate, util = self.tokens / max(now - self.t, 1e-9), self.tokens / max(self.slots, 1)
        self.t, self.tokens, self.slots = now, 0, 0
        return rate, util


def _log(run: Run, stats: dict, metrics: MetricsLog, pbar, rate: _Rate, threads: int) -> dict:
    """The step's record; on logged steps with the loss (summed over ranks), lr, throughput and CPU threads."""
    record = {"step": run.step, "epoch": run.batcher.epoch}
    if _due(run.cfg.log_every, run.step) or run.step == run.total_steps:
        total_nll = float(sum_over_ranks(stats["nll_sum"].detach().double().reshape(1))[0])
        loss = total_nll / max(stats["tokens"], 1.0)
        tps, util = rate.take()
        record.update({"type": "train", "loss": loss, "lr": run.optimizer.param_groups[0]["lr"],
                       "tokens": int(stats["tokens"]), "tokens_per_s": tps, "lane_util": util, "threads": threads,
                       "grad_norm": None if stats["grad_norm"] is None else float(stats["grad_norm"])})
        metrics.write(record)
        pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tps:.0f}", lanes=f"{util:.0%}")
    pbar.update(1)
    return record


# ----------------------------------------------------------------------------------------------
# the recipe


def _corpus(model_config, cfg, train_pieces, val_pieces, **ids):
    """Resolve and check the corpus: ``(train pieces, val pieces or None, Vocab, tokenizer config)``."""
    train_pieces, val_pieces, vocab, tok_cfg = resolve_corpus(
        train_pieces, val_pieces, train_split=cfg.train_split, val_split=cfg.val_split,
        default_vocab_size=model_config.vocab_size, **ids)
    check_vocab(vocab, model_config.vocab_size)
    train_pieces = check_pieces(train_pieces, model_config.vocab_size, "train")
    if val_pieces is not None and len(val_pieces) > 0:
        val_pieces = check_pieces(val_pieces, model_config.vocab_size, "validation")[: cfg.eval_max_pieces]
    else:
        val_pieces = None
    return train_pieces, val_pieces, vocab, tok_cfg


def train(
    model_config: DSMRConfig,
    train_cfg: TrainConfig,
    train_pieces=None,
    val_pieces=None,
    *,
    data: Any = None,
    vocab_size: Optional[int] = None,
    pad_id: Optional[int] = None,
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    tokenizer_config: Optional[dict] = None,
    resume: bool = False,
    callback: Optional[Callable[[int, dict], None]] = None,
    return_model: bool = False,
) -> dict:
    """Train a :class:`DSMRModel` by streaming whole pieces; returns a summary dict.

    Args:
        model_config: the model; its ``segment_len`` is the training segment length S.
        train_cfg: see :class:`TrainConfig`.
        train_pieces, val_pieces: lists of 1-D int arrays of raw ids (no BOS/EOS), or pass
            ``data`` (duck-typed ``TokenCache``: ``.pieces(split)``, ``.vocab_size``, ``.pad_id``,
            ``.bos_id``, ``.eos_id``, ``.tokenizer_config``) and the splits named in the config are
            used. ``val_pieces`` None (and no data) trains without validation.
        vocab_size, pad_id, bos_id, eos_id: the corpus's id space (needed without ``data``);
            ``vocab_size`` defaults to the model's. The model's vocab must cover it.
        tokenizer_config: any JSON-able dict, stored in checkpoints.
        resume: continue from ``out_dir/last.pt`` (model, optimizer, scheduler, RNG, data
            position and the lanes' memory): the continued run reproduces the losses of an
            uninterrupted one exactly. Without a checkpoint the run starts fresh (with a warning).
        callback: ``callback(step, record)`` after every optimizer step on every rank (``record``
            has ``loss`` on logged steps); an exception in it stops the run like a kill.
        return_model: also return the trained model (unwrapped from DDP) as ``summary["model"]``.

    Writes under ``out_dir`` (rank 0 only): ``last.pt``, ``best.pt`` (lowest validation
    perplexity), ``metrics.jsonl`` (one JSON object per logged step / evaluation),
    ``train_config.json``, ``model_config.json`` and ``curves.png``.

    Returns: ``{"step", "epoch", "train_loss", "val", "best_val_ppl", "tokens", "time_s",
    "tokens_per_s", "lane_util" (real tokens / lane slots of this run's steps), "n_params", "out_dir", "last_checkpoint", "best_checkpoint", "metrics",
    "plot"}``.
    """
    cfg = train_cfg
    on_cuda = (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device.startswith("cuda")
    dist_info = setup_distributed(cfg.dist_backend, "cuda" if on_cuda else "cpu")
    train_pieces, val_pieces, vocab, tokenizer_config = _corpus(
        model_config, cfg, train_pieces, val_pieces, data=data, vocab_size=vocab_size, pad_id=pad_id,
        bos_id=bos_id, eos_id=eos_id, tokenizer_config=tokenizer_config)
    run = setup(model_config, cfg, train_pieces, vocab, val_pieces=val_pieces,
                tokenizer_config=tokenizer_config, dist_info=dist_info)
    if run.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temps(run.out_dir)
    resume_step = _resume(run) if resume else None
    run.model = _data_parallel(run)
    if run.master:
        ckpt.atomic_write_text(run.out_dir / "train_config.json", cfg.to_json())
        ckpt.atomic_write_text(run.out_dir / "model_config.json", model_config.to_json())
    metrics = MetricsLog(run.out_dir / "metrics.jsonl", run.master, resume_step)
    return _loop(run, metrics, resume_step, callback, return_model)


def _loop(run: Run, metrics: MetricsLog, resume_step: Optional[int], callback, return_model: bool) -> dict:
    """Evaluate/checkpoint -> step -> log until the run's last step, then the summary."""
    from tqdm.auto import tqdm

    show = run.cfg.progress if run.cfg.progress is not None else sys.stderr.isatty()
    pbar = tqdm(total=run.total_steps, initial=run.step, disable=not (show and run.master), desc="train",
                dynamic_ncols=True)
    t_start, rate = time.time(), _Rate()
    tokens_seen, slots_seen, train_loss = 0, 0, None
    run.model.train()
    # CPU threads follow the cores other processes leave free (dsmr.threads): a busy core would
    # otherwise stall every OpenMP barrier of the step.
    with governed(run.cfg.threads, device=run.device) as gov:
        try:
            while True:
                gov.tick()
                if run.step != resume_step:  # the resumed step's evaluation/checkpoint ran before the kill
                    _evaluate_and_save(run, metrics, pbar, show)
                if run.step >= run.total_steps:
                    break
                stats = train_step(run, [run.batcher.next_batch() for _ in range(run.cfg.grad_accum)])
                tokens_seen += int(stats["tokens"])
                slots_seen += int(stats["slots"])
                rate.add(stats)
                record = _log(run, stats, metrics, pbar, rate, gov.threads)
                train_loss = record.get("loss", train_loss)
                if callback is not None:
                    callback(run.step, record)
        finally:
            pbar.close()
    elapsed = time.time() - t_start
    plot = plot_curves(run.out_dir / "metrics.jsonl", run.out_dir / "curves.png") \
        if run.master and run.cfg.plot else None
    last, best = run.out_dir / "last.pt", run.out_dir / "best.pt"
    summary = {
        "step": run.step, "epoch": run.batcher.epoch, "train_loss": train_loss, "val": run.last_val,
        "best_val_ppl": None if math.isinf(run.best_ppl) else run.best_ppl, "tokens": tokens_seen,
        "time_s": elapsed, "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
        "lane_util": tokens_seen / slots_seen if slots_seen else None,
        "n_params": run.raw_model.num_params(), "out_dir": str(run.out_dir),
        "last_checkpoint": str(last) if last.exists() else None,
        "best_checkpoint": str(best) if best.exists() else None,
        "metrics": str(run.out_dir / "metrics.jsonl"), "plot": None if plot is None else str(plot),
    }
    if return_model:
        summary["model"] = run.raw_model
    return summary
