"""Streaming trainer: B lanes stream whole pieces left to right, one segment per lane per batch.

    from dsmr import DSMRConfig
    from dsmr.train import TrainConfig, train
    summary = train(DSMRConfig(vocab_size=300, n_layers=6, d_model=256, n_heads=4, segment_len=512),
                    TrainConfig(out_dir="runs/x", batch_lanes=8, max_steps=10_000),
                    data=token_cache)          # or train_pieces=[...], val_pieces=[...], pad_id=..., ...

How a corpus becomes batches (the :class:`LaneBatcher`)::

    piece p (L raw ids)  ->  seq = [BOS] + ids + [EOS]        (L + 2 tokens)
    inputs  = seq[0 : L+1]   (BOS .. last id; EOS is never an input)
    targets = seq[1 : L+2]   (first id .. EOS;  BOS is never a target)

    lane 0:  | p3 seg0 | p3 seg1 | p3 seg2+pad | p7 seg0 | p7 seg1 | ...
    lane 1:  | p1 seg0 | p1 seg1+pad | p5 seg0 | p5 seg1 | p5 seg2 | ...
                                       ^ reset: lane 1's memory is wiped before this batch

Each lane keeps its piece until the piece ends; the last segment of a piece is padded with
``pad_id`` and its padded positions have target ``IGNORE_INDEX`` (no loss). A lane whose piece
ended takes the next piece of the epoch's order and is reset (``state.reset(lanes)``). Once the
order is used up, lanes idle (all padding, no loss, reset every batch) until the epoch's last
lane ends; the next epoch starts with every lane reset. The epoch order is a permutation drawn
from ``(seed, epoch)`` alone, so it can be rebuilt on resume and on every rank without
communication.

Distributed (``torchrun``): pieces of the epoch order are dealt round-robin to ranks
(``order[rank::world]``). Every rank computes every rank's lane schedule from the piece lengths,
so all ranks agree on the number of batches per epoch (the longest rank's) without talking; a
rank that finishes early feeds no-loss batches. The loss of a step is normalized by the number of
real target tokens of the whole step on all ranks, so an idle rank contributes zero gradient and
DDP's mean equals the token-mean over the global batch.

The loop follows nanoGPT's fixed order: lr -> eval/checkpoint -> micro-steps under autocast ->
clip -> step -> log.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import heapq
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model import DSMRConfig, DSMRModel, ModelState

IGNORE_INDEX = -100
"""Target id of positions that carry no loss (``F.cross_entropy(ignore_index=...)``)."""


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    """Training hyper-parameters (a plain dataclass with a JSON round-trip).

    Length of the run: ``max_steps`` optimizer steps and/or ``epochs`` passes over the training
    pieces, whichever ends first (at least one must be given). One optimizer step consumes
    ``grad_accum`` consecutive segment batches of ``batch_lanes`` lanes. ``eval_every`` /
    ``ckpt_every`` / ``log_every`` count optimizer steps; 0 disables the periodic action (a final
    evaluation and checkpoint are always made). ``grad_clip`` 0 disables clipping.
    ``progress=None`` shows a tqdm bar only when stderr is a terminal.
    """

    out_dir: str = "runs/dsmr"
    batch_lanes: int = 8
    grad_accum: int = 1
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    lr_decay_steps: Optional[int] = None  # cosine reaches min_lr here; default: the run's last step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    shuffle: bool = True
    autocast: bool = False
    autocast_dtype: str = "bfloat16"
    device: str = "auto"
    eval_every: int = 500
    eval_batch_lanes: Optional[int] = None
    eval_max_pieces: Optional[int] = None
    ckpt_every: int = 500
    log_every: int = 10
    progress: Optional[bool] = None
    plot: bool = True
    train_split: str = "train"
    val_split: Optional[str] = "validation"
    dist_backend: Optional[str] = None  # default: nccl on CUDA, gloo on CPU

    def __post_init__(self):
        def pos_int(name, allow_none=False, allow_zero=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            lo = 0 if allow_zero else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}{' or None' if allow_none else ''}, got {v!r}")

        for name in ("batch_lanes", "grad_accum"):
            pos_int(name)
        for name in ("max_steps", "epochs", "lr_decay_steps", "eval_batch_lanes", "eval_max_pieces"):
            pos_int(name, allow_none=True)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "log_every", "seed"):
            pos_int(name, allow_zero=True)
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps and/or epochs: the run needs a length")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 (grad_clip 0 disables clipping)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.autocast_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be 'bfloat16' or 'float16', got {self.autocast_dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine down to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay = cfg.lr_decay_steps or total_steps
    if step >= decay:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class Vocab:
    """Size of the id space of a corpus and its special ids."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_corpus(train_pieces=None, val_pieces=None, *, data=None, vocab_size=None, pad_id=None,
                   bos_id=None, eos_id=None, tokenizer_config=None, train_split="train",
                   val_split: Optional[str] = "validation", default_vocab_size=None):
    """Normalize "a data object" or "lists of arrays + ids" into ``(train, val, Vocab, tok_cfg)``.

    ``data`` (or a ``train_pieces`` that has a ``.pieces`` method) is duck-typed like
    ``dsmr.data.TokenCache``: ``.pieces(split) -> list[np.ndarray]``, ``.vocab_size``,
    ``.pad_id``, ``.bos_id``, ``.eos_id``, ``.tokenizer_config``. Explicit arguments win over
    the data object's.
    """
    if data is None and train_pieces is not None and hasattr(train_pieces, "pieces"):
        data, train_pieces = train_pieces, None
    if data is not None:
        if train_pieces is None:
            train_pieces = data.pieces(train_split)
        if val_pieces is None and val_split:
            val_pieces = data.pieces(val_split)
        vocab_size = data.vocab_size if vocab_size is None else vocab_size
        pad_id = data.pad_id if pad_id is None else pad_id
        bos_id = data.bos_id if bos_id is None else bos_id
        eos_id = data.eos_id if eos_id is None else eos_id
        if tokenizer_config is None:
            tokenizer_config = getattr(data, "tokenizer_config", None)
    missing = [n for n, v in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)) if v is None]
    if missing:
        raise ValueError(f"special ids {missing} are needed: pass them or a data object that has them")
    vocab_size = default_vocab_size if vocab_size is None else vocab_size
    vocab = Vocab(int(vocab_size), int(pad_id), int(bos_id), int(eos_id))
    return train_pieces, val_pieces, vocab, tokenizer_config


def check_vocab(vocab: Vocab, model_vocab_size: int) -> None:
    """The model's embedding must cover the corpus's id space and special ids."""
    if vocab.vocab_size > model_vocab_size:
        raise ValueError(
            f"the corpus has vocab_size {vocab.vocab_size} but the model's vocab_size is "
            f"{model_vocab_size}; set DSMRConfig(vocab_size >= {vocab.vocab_size})"
        )
    for name in ("pad_id", "bos_id", "eos_id"):
        v = getattr(vocab, name)
        if not 0 <= v < model_vocab_size:
            raise ValueError(f"{name}={v} lies outside the model's vocab [0, {model_vocab_size})")


def check_pieces(pieces, model_vocab_size: int, name: str = "train") -> List[np.ndarray]:
    """Validate a corpus: each piece a non-empty 1-D integer array with ids in the model's vocab.

    Empty pieces are an error (not skipped): the data pipeline already drops empty files with a
    warning, so an empty piece here means the corpus was built wrongly and the message names it.
    """
    if pieces is None or len(pieces) == 0:
        raise ValueError(f"the {name} corpus has no pieces")
    out = []
    for i, p in enumerate(pieces):
        a = np.asarray(p)
        if a.ndim != 1:
            raise ValueError(f"{name} piece {i} must be a 1-D array of token ids, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{name} piece {i} is empty (0 tokens); drop empty pieces from the corpus")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} piece {i} must hold integer token ids, got dtype {a.dtype}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= model_vocab_size:
            raise ValueError(
                f"{name} piece {i} has token ids in [{lo}, {hi}] outside the model's vocab "
                f"[0, {model_vocab_size}); raise DSMRConfig.vocab_size or fix the tokenization"
            )
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# the lane batcher


@dataclass
class Batch:
    """One segment for each of B lanes.

    Attributes:
        inputs: ``(B, S)`` int64 token ids; ``pad_id`` where a piece ended or a lane idles.
        targets: ``(B, S)`` int64 next-token ids; ``IGNORE_INDEX`` where there is no loss.
        reset: ``(B,)`` bool, the lane's state must be wiped before this segment (it starts a
            piece, or idles).
        piece: ``(B,)`` int64 corpus index of each lane's piece, -1 for an idle lane.
        start: ``(B,)`` int64 index in ``[BOS] + ids + [EOS]`` of each lane's first input.
        epoch: the epoch this batch belongs to.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    reset: torch.Tensor
    piece: torch.Tensor
    start: torch.Tensor
    epoch: int

    @property
    def mask(self) -> torch.Tensor:
        """``(B, S)`` bool, positions that carry loss."""
        return self.targets != IGNORE_INDEX

    @property
    def n_tokens(self) -> int:
        """Real target tokens in the batch."""
        return int(self.mask.sum())

    def positions(self) -> torch.Tensor:
        """``(B, S)`` 1-based index of each target in its piece (the first id after BOS is 1)."""
        S = self.inputs.shape[1]
        return self.start[:, None] + torch.arange(1, S + 1)

    def to(self, device, non_blocking=False) -> "Batch":
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return dataclasses.replace(self, inputs=mv(self.inputs), targets=mv(self.targets))


def seq_slice(ids: np.ndarray, a: int, b: int, bos_id: int, eos_id: int) -> np.ndarray:
    """``([BOS] + ids + [EOS])[a:b]`` as int64, without building the whole sequence."""
    L = len(ids)
    b = min(b, L + 2)
    out = np.empty(max(0, b - a), dtype=np.int64)
    if b <= a:
        return out
    lo, hi = max(a, 1), min(b, L + 1)
    if a == 0:
        out[0] = bos_id
    if hi > lo:
        out[lo - a:hi - a] = ids[lo - 1:hi - 1]
    if b == L + 2:
        out[-1] = eos_id
    return out


class LaneBatcher:
    """Deals whole pieces to ``batch_lanes`` lanes and cuts them into ``segment_len`` segments.

    ``next_batch() -> Batch`` (see the module docstring for the layout). Deterministic given
    ``(seed, shuffle, rank, world_size)``; ``state_dict()`` / ``load_state_dict()`` capture the
    exact position (epoch, order, next piece, each lane's piece and offset) for resuming.
    With ``max_epochs`` the batcher yields idle (all-padding) batches after that many epochs.
    """

    def __init__(self, pieces: Sequence[np.ndarray], batch_lanes: int, segment_len: int, *,
                 pad_id: int, bos_id: int, eos_id: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, max_epochs: Optional[int] = None):
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len <= 0:
            raise ValueError(f"segment_len must be a positive int, got {segment_len!r}")
        if isinstance(batch_lanes, bool) or not isinstance(batch_lanes, int) or batch_lanes <= 0:
            raise ValueError(f"batch_lanes must be a positive int, got {batch_lanes!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.pieces = list(pieces)
        for i, p in enumerate(self.pieces):
            if len(p) == 0:
                raise ValueError(f"piece {i} is empty (0 tokens); drop empty pieces from the corpus")
        self.B, self.S = batch_lanes, segment_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.max_epochs = max_epochs
        # BOS + ids are inputs; EOS is only ever a target.
        self.n_inputs = np.array([len(p) + 1 for p in self.pieces], dtype=np.int64)
        self.n_segments = -(-self.n_inputs // segment_len)
        self._epoch_len_cache: Dict[int, int] = {}
        self._start_epoch(0)

    # -- epoch bookkeeping

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Order of the pieces in ``epoch`` (a permutation drawn from ``(seed, epoch)``)."""
        n = len(self.pieces)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def _lanes_end(self, shard: np.ndarray) -> int:
        """Batches until the last lane ends when lanes take ``shard`` greedily in order."""
        # (free at batch, lane): the batcher hands the next piece to the lane that frees first,
        # lowest lane index on ties, which is exactly this heap order.
        heap = [(0, lane) for lane in range(self.B)]
        end = 0
        for p in shard:
            t, lane = heapq.heappop(heap)
            t += int(self.n_segments[p])
            end = max(end, t)
            heapq.heappush(heap, (t, lane))
        return end

    def epoch_len(self, epoch: int) -> int:
        """Segment batches in ``epoch`` (the same on every rank: the longest rank's schedule)."""
        if epoch not in self._epoch_len_cache:
            order = self.epoch_order(epoch)
            self._epoch_len_cache[epoch] = max(
                self._lanes_end(order[r::self.world_size]) for r in range(self.world_size)
            )
        return self._epoch_len_cache[epoch]

    def total_batches(self, epochs: int) -> int:
        return sum(self.epoch_len(e) for e in range(epochs))

    @property
    def exhausted(self) -> bool:
        """True once ``max_epochs`` epochs have been served (only idle batches follow)."""
        return self.max_epochs is not None and self.epoch >= self.max_epochs

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = self.epoch_order(epoch)
        self.shard = self.order[self.rank::self.world_size]
        self.next_idx = 0
        self.batch_idx = 0
        self.lane_piece = np.full(self.B, -1, dtype=np.int64)
        self.lane_off = np.zeros(self.B, dtype=np.int64)
        self.cur_epoch_len = 0 if self.exhausted else self.epoch_len(epoch)

    # -- batches

    def next_batch(self) -> Batch:
        if not self.exhausted and self.batch_idx >= self.cur_epoch_len:
            self._start_epoch(self.epoch + 1)
        B, S = self.B, self.S
        inputs = np.full((B, S), self.pad_id, dtype=np.int64)
        targets = np.full((B, S), IGNORE_INDEX, dtype=np.int64)
        reset = np.zeros(B, dtype=bool)
        start = np.zeros(B, dtype=np.int64)
        for lane in range(B):
            p = int(self.lane_piece[lane])
            if p >= 0 and self.lane_off[lane] >= self.n_inputs[p]:
                p = -1  # its piece ended with the previous batch
            if p < 0:
                reset[lane] = True
                if not self.exhausted and self.next_idx < len(self.shard):
                    p = int(self.shard[self.next_idx])
                    self.next_idx += 1
                    self.lane_piece[lane], self.lane_off[lane] = p, 0
                else:
                    self.lane_piece[lane], self.lane_off[lane] = -1, 0
                    continue
            off = int(self.lane_off[lane])
            n = min(S, int(self.n_inputs[p]) - off)
            ids = self.pieces[p]
            inputs[lane, :n] = seq_slice(ids, off, off + n, self.bos_id, self.eos_id)
            targets[lane, :n] = seq_slice(ids, off + 1, off + n + 1, self.bos_id, self.eos_id)
            start[lane] = off
            self.lane_off[lane] = off + n
        epoch = self.epoch
        if not self.exhausted:
            self.batch_idx += 1
        return Batch(
            torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(reset),
            torch.from_numpy(self.lane_piece.copy()), torch.from_numpy(start), epoch,
        )

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- resume

    def state_dict(self) -> dict:
        """Exact stream position (tensors and ints only, for ``weights_only`` checkpoints)."""
        return {
            "epoch": int(self.epoch),
            "batch_idx": int(self.batch_idx),
            "next_idx": int(self.next_idx),
            "order": torch.from_numpy(self.order.copy()),
            "lane_piece": torch.from_numpy(self.lane_piece.copy()),
            "lane_off": torch.from_numpy(self.lane_off.copy()),
            "n_pieces": len(self.pieces),
            "n_inputs_total": int(self.n_inputs.sum()),
            "batch_lanes": self.B,
            "segment_len": self.S,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, d: dict) -> None:
        mine = (len(self.pieces), int(self.n_inputs.sum()), self.B, self.S, self.world_size)
        theirs = (d["n_pieces"], d["n_inputs_total"], d["batch_lanes"], d["segment_len"], d["world_size"])
        if mine != theirs:
            raise ValueError(
                "the checkpoint's data position does not fit this run: (pieces, tokens, lanes, "
                f"segment_len, world_size) were {theirs}, now {mine}; resume with the same corpus and settings"
            )
        self._start_epoch(int(d["epoch"]))
        order = d["order"].numpy().astype(np.int64)
        if not np.array_equal(order, self.order):
            raise ValueError("the checkpoint's piece order differs from the one rebuilt from the seed; "
                             "resume with the same seed and shuffle setting")
        self.batch_idx, self.next_idx = int(d["batch_idx"]), int(d["next_idx"])
        self.lane_piece = d["lane_piece"].numpy().astype(np.int64).copy()
        self.lane_off = d["lane_off"].numpy().astype(np.int64).copy()


def compact_state(state: ModelState, max_len: int) -> ModelState:
    """Drop memory slots no lane can use: every lane holds at most ``max_len`` valid slots.

    Full-horizon layers otherwise keep growing by one segment per batch across resets (a reset
    only zeroes ``mem_len``), so an epoch would pile up dead slots. Slots are right-aligned, so
    keeping the newest ``max_len`` drops only invalid ones; the result is numerically the same.
    """
    layers = []
    for s in state.layers:
        if s.mem_k is not None and s.capacity > max_len:
            s = s.truncate(max_len)
        layers.append(s)
    return ModelState(layers)


def apply_resets(state: ModelState, batch: Batch) -> ModelState:
    """Wipe the lanes of ``batch.reset`` (new piece or idle)."""
    if bool(batch.reset.any()):
        state = state.reset(batch.reset.nonzero().flatten().tolist())
    return state


# ----------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class DistInfo:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed(cfg: TrainConfig, device_hint: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    The group is created once per process and torn down at exit, not after each ``train()``:
    under torchrun a second ``init_process_group`` on the launcher's store can meet the first
    group's stale rendezvous keys and hang, so later calls (e.g. a resume in the same process)
    reuse the group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_world_size() > 1, dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = cfg.dist_backend or ("nccl" if device_hint == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    atexit.register(_destroy_group)
    return DistInfo(True, rank, world, local_rank)


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
    return dev


def _all_reduce_sum(values: List[float], device, dist_info: DistInfo) -> List[float]:
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# optimizer, metrics, plot


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices (and embeddings) decay, norms and biases do not (as in nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def _read_metrics(path: Path) -> List[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                pass
    return out


def plot_curves(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Train loss and validation NLL against step, from the JSON-lines metrics file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'dsmr[plot]'); skipping the plot")
        return None
    recs = _read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("type") == "train"]
    va = [(r["step"], r["nll"]) for r in recs if r.get("type") == "val" and r.get("nll") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val NLL", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


class _Metrics:
    """JSON-lines writer (rank 0 only); on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        keep = []
        if resume_step is not None:
            keep = [r for r in _read_metrics(path) if r.get("step", 0) <= resume_step]
        # Atomic: a kill during the rewrite must not lose the history before the checkpoint.
        from .checkpoint import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------------------------
# the training loop


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
    "tokens_per_s", "n_params", "out_dir", "last_checkpoint", "best_checkpoint", "metrics",
    "plot"}``.
    """
    from . import checkpoint as ckpt_mod
    from .evaluate import evaluate  # evaluate imports the batcher from this module

    cfg = train_cfg
    hint = "cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device.startswith("cuda") else "cpu"
    dist_info = setup_distributed(cfg, hint)
    return _train(model_config, cfg, train_pieces, val_pieces, data, vocab_size, pad_id, bos_id,
                  eos_id, tokenizer_config, resume, callback, return_model, dist_info, ckpt_mod, evaluate)


def _train(model_config, cfg, train_pieces, val_pieces, data, vocab_size, pad_id, bos_id, eos_id,
           tokenizer_config, resume, callback, return_model, dist_info, ckpt_mod, evaluate):
    from tqdm.auto import tqdm

    rank, world = dist_info.rank, dist_info.world_size
    master = rank == 0
    device = resolve_device(cfg.device, dist_info)
    S, B = model_config.segment_len, cfg.batch_lanes

    # -- corpus
    train_pieces, val_pieces, vocab, tokenizer_config = resolve_corpus(
        train_pieces, val_pieces, data=data, vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id,
        eos_id=eos_id, tokenizer_config=tokenizer_config, train_split=cfg.train_split,
        val_split=cfg.val_split, default_vocab_size=model_config.vocab_size,
    )
    check_vocab(vocab, model_config.vocab_size)
    train_pieces = check_pieces(train_pieces, model_config.vocab_size, "train")
    if val_pieces is not None and len(val_pieces) > 0:
        val_pieces = check_pieces(val_pieces, model_config.vocab_size, "validation")
        if cfg.eval_max_pieces:
            val_pieces = val_pieces[: cfg.eval_max_pieces]
    else:
        val_pieces = None

    out_dir = Path(cfg.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_mod.remove_stale_temps(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    # -- model, optimizer, schedule, data stream
    torch.manual_seed(cfg.seed)  # identical init on every rank
    raw_model = DSMRModel(model_config).to(device)
    optimizer = configure_optimizer(raw_model, cfg, device)
    batcher = LaneBatcher(train_pieces, B, S, pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                          seed=cfg.seed, shuffle=cfg.shuffle, rank=rank, world_size=world,
                          max_epochs=cfg.epochs)
    total_steps = cfg.max_steps or 0
    if cfg.epochs is not None:
        epoch_steps = -(-batcher.total_batches(cfg.epochs) // cfg.grad_accum)
        total_steps = epoch_steps if cfg.max_steps is None else min(cfg.max_steps, epoch_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.lr
    )
    amp_dtype = torch.bfloat16 if cfg.autocast_dtype == "bfloat16" else torch.float16
    # float16 needs loss scaling (bf16 has fp32's range); disabled, the scaler is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.autocast and amp_dtype == torch.float16)
    state = raw_model.init_state(B, device)
    step, best_ppl, last_val = 0, float("inf"), None
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout streams differ per rank

    resume_step = None
    if resume:
        if last_path.exists():
            ck = ckpt_mod.load_checkpoint(last_path, map_location="cpu")  # RNG states must stay on CPU
            if ck["model_config"] != model_config.to_dict():
                raise ValueError(f"{last_path} was trained with model config {ck['model_config']}, "
                                 f"not {model_config.to_dict()}; resume with the same model config")
            if ck.get("world_size", 1) != world:
                raise ValueError(f"{last_path} was written by {ck.get('world_size', 1)} processes; "
                                 f"resume with the same number (now {world})")
            raw_model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            batcher.load_state_dict(ck["data"][rank])
            state = ModelState.from_dict(
                {k: v.to(device).contiguous() for k, v in ck["memory"][rank].items()}, model_config.n_layers
            )
            ckpt_mod.set_rng_state(ck["rng"][rank])
            step, resume_step = int(ck["step"]), int(ck["step"])
            best_ppl = ck.get("best_val_ppl") or float("inf")
            last_val = ck.get("val")
            del ck
        elif master:
            warnings.warn(f"resume requested but {last_path} does not exist; starting fresh")

    model = raw_model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)

    if master:
        ckpt_mod.atomic_write_text(out_dir / "train_config.json", cfg.to_json())
        ckpt_mod.atomic_write_text(out_dir / "model_config.json", model_config.to_json())
    metrics = _Metrics(out_dir / "metrics.jsonl", master, resume_step)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.autocast)  # noqa: E731

    def save(paths):
        """Gather every rank's stream position, memory and RNG; rank 0 writes ``paths``."""
        mine = {
            "data": batcher.state_dict(),
            "memory": {k: v.detach().cpu() for k, v in state.to_dict().items()},
            "rng": ckpt_mod.rng_state(),
        }
        if dist_info.enabled:
            import torch.distributed as dist

            per_rank = [None] * world
            dist.all_gather_object(per_rank, mine)
        else:
            per_rank = [mine]
        if not master:
            return
        obj = ckpt_mod.make_checkpoint(
            model=raw_model, optimizer=optimizer, scheduler=scheduler, step=step,
            epoch=batcher.epoch, model_config=model_config, train_config=cfg,
            tokenizer_config=tokenizer_config, vocab=vocab.to_dict(),
            data=[r["data"] for r in per_rank], memory=[r["memory"] for r in per_rank],
            rng=[r["rng"] for r in per_rank], world_size=world,
            best_val_ppl=None if math.isinf(best_ppl) else best_ppl, val=last_val,
        )
        obj["scaler"] = scaler.state_dict()
        for p in paths:
            ckpt_mod.save_checkpoint(obj, p)

    def run_eval():
        return evaluate(raw_model, val_pieces, pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                        batch_lanes=cfg.eval_batch_lanes or B, device=device, autocast=cfg.autocast,
                        autocast_dtype=amp_dtype, rank=rank, world_size=world, progress=show and master)

    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    pbar = tqdm(total=total_steps, initial=step, disable=not (show and master), desc="train",
                dynamic_ncols=True)
    t_start = t_log = time.time()
    tokens_seen = tokens_since_log = 0
    train_loss = None
    model.train()
    try:
        while True:
            # -- evaluate and checkpoint (skipped at the step we resumed at: done before the kill)
            is_last = step >= total_steps
            if step != resume_step:
                save_to = []
                if val_pieces is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last):
                    last_val = run_eval()
                    rec = {"type": "val", "step": step, "epoch": batcher.epoch, **last_val}
                    metrics.write(rec)
                    if last_val["ppl"] < best_ppl and step > 0:
                        best_ppl = last_val["ppl"]
                        save_to.append(best_path)
                    if master:
                        pbar.write(f"step {step}: val nll {last_val['nll']:.4f} ppl {last_val['ppl']:.3f}")
                if step > 0 and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or is_last):
                    save_to.insert(0, last_path)
                if save_to:
                    save(save_to)
            if is_last:
                break

            # -- one optimizer step = grad_accum segment batches
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, cfg, total_steps)  # LambdaLR holds the same value; explicit for readers
            batches = [batcher.next_batch() for _ in range(cfg.grad_accum)]
            n_local = sum(b.n_tokens for b in batches)
            n_global = _all_reduce_sum([float(n_local)], device, dist_info)[0]
            # Sum of NLL / global token count, times world because DDP averages gradients.
            norm = world / max(n_global, 1.0)
            nll_sum = torch.zeros((), device=device)
            for i, b in enumerate(batches):
                state = apply_resets(state, b)
                b = b.to(device, non_blocking=True)
                sync = contextlib.nullcontext()
                if dist_info.enabled and i < len(batches) - 1:
                    sync = model.no_sync()
                with sync:
                    with autocast():
                        logits, state = model(b.inputs, state)  # (B, S, V)
                    nll = F.cross_entropy(logits.float().flatten(0, 1), b.targets.flatten(),
                                          ignore_index=IGNORE_INDEX, reduction="sum")
                    scaler.scale(nll * norm).backward()
                nll_sum += nll.detach()
                state = compact_state(state, int((b.start + S).max()))
            grad_norm = None
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(n_global)
            tokens_since_log += int(n_global)

            # -- log
            record = {"step": step, "epoch": batcher.epoch}
            if (cfg.log_every and step % cfg.log_every == 0) or step == total_steps:
                total_nll = _all_reduce_sum([float(nll_sum)], device, dist_info)[0]
                train_loss = total_nll / max(n_global, 1.0)
                now = time.time()
                tps = tokens_since_log / max(now - t_log, 1e-9)
                t_log, tokens_since_log = now, 0
                record.update({"type": "train", "loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                               "tokens": int(n_global), "tokens_per_s": tps,
                               "grad_norm": None if grad_norm is None else float(grad_norm)})
                metrics.write(record)
                pbar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tps:.0f}")
            pbar.update(1)
            if callback is not None:
                callback(step, record)
    finally:
        pbar.close()

    elapsed = time.time() - t_start
    plot_path = None
    if master and cfg.plot:
        plot_path = plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
    summary = {
        "step": step,
        "epoch": batcher.epoch,
        "train_loss": train_loss,
        "val": last_val,
        "best_val_ppl": None if math.isinf(best_ppl) else best_ppl,
        "tokens": tokens_seen,
        "time_s": elapsed,
        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
        "n_params": raw_model.num_params(),
        "out_dir": str(out_dir),
        "last_checkpoint": str(last_path) if last_path.exists() else None,
        "best_checkpoint": str(best_path) if best_path.exists() else None,
        "metrics": str(out_dir / "metrics.jsonl"),
        "plot": None if plot_path is None else str(plot_path),
    }
    if return_model:
        summary["model"] = raw_model
    return summary
