"""Streaming whole pieces: how a corpus becomes segment batches, and one segment's forward.

How a corpus becomes batches (the :class:`LaneBatcher`)::

    piece p (L raw ids)  ->  seq = [BOS] + ids + [EOS]        (L + 2 tokens)
    inputs  = seq[0 : L+1]   (BOS .. last id; EOS is never an input)
    targets = seq[1 : L+2]   (first id .. EOS;  BOS is never a target)

    lane 0:  | p3 seg0 | p3 seg1 | p3 seg2+pad | p7 seg0 | p7 seg1 | ...
    lane 1:  | p1 seg0 | p1 seg1+pad | p5 seg0 | p5 seg1 | p5 seg2 | ...
                                       ^ reset: lane 1's memory is wiped before this batch

Each lane keeps its piece until the piece ends; the last segment of a piece is padded with
``pad_id`` and its padded positions have target ``IGNORE_INDEX`` (no loss). A lane whose piece
ended takes the next piece and is reset (``state.reset(lanes)``). The pieces come from one
stream: epoch 0's order, then epoch 1's, ..., so when an epoch's order runs out a freed lane
takes the next epoch's first piece instead of idling until the epoch's longest piece ends. Lanes
idle (all padding, no loss, reset every batch) only after the last of ``max_epochs`` epochs. The
epoch order is a permutation drawn from ``(seed, epoch)`` alone, so it can be rebuilt on resume
and on every rank without communication.

Distributed (``torchrun``): pieces of the epoch order are dealt round-robin to ranks
(``order[rank::world]``). Every rank computes every rank's lane schedule from the piece lengths,
so all ranks agree on the number of batches of a run of E epochs (the longest rank's) without
talking; a rank that finishes early feeds no-loss batches.

:func:`stream_segment` is the one place a batch meets the model: training, evaluation, the
KV-reset diagnostic and the benchmarks all call it, so they all stream by the same rules
(reset the lanes that start a piece, forward, per-token NLL, drop dead memory slots).
"""
from __future__ import annotations

import dataclasses
import heapq
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_int
from .model import ModelState

IGNORE_INDEX = -100
"""Target id of positions that carry no loss (``F.cross_entropy(ignore_index=...)``)."""


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

    ``next_batch() -> Batch`` (see the module docstring for the layout). This rank's stream of
    pieces is its share of epoch 0's order, then of epoch 1's, and so on: a lane whose piece ends
    takes the next piece of the stream even when that piece belongs to the next epoch, so no
    lane idles at an epoch boundary. With ``max_epochs`` the stream ends after that many epochs
    and lanes then idle (all padding). Deterministic given ``(seed, shuffle, rank, world_size)``;
    ``state_dict()`` / ``load_state_dict()`` capture the exact position (the dealing epoch and
    index, each lane's piece, offset and epoch) for resuming.
    """

    def __init__(self, pieces: Sequence[np.ndarray], batch_lanes: int, segment_len: int, *,
                 pad_id: int, bos_id: int, eos_id: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, max_epochs: Optional[int] = None):
        check_int("segment_len", segment_len, 1)
        check_int("batch_lanes", batch_lanes, 1)
        check_int("max_epochs", max_epochs, 1, allow_none=True)
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
        self._total_cache: Dict[int, int] = {0: 0}
        self.batch_idx = 0  # batches served
        self.lane_piece = np.full(self.B, -1, dtype=np.int64)
        self.lane_off = np.zeros(self.B, dtype=np.int64)
        self.lane_epoch = np.full(self.B, -1, dtype=np.int64)
        self._start_epoch(0)

    # -- the stream of pieces

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Order of the pieces in ``epoch`` (a permutation drawn from ``(seed, epoch)``)."""
        n = len(self.pieces)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def _shard(self, epoch: int, rank: int) -> np.ndarray:
        return self.epoch_order(epoch)[rank::self.world_size]

    def _lanes_end(self, stream: np.ndarray) -> int:
        """Batches until the last lane ends when lanes take the pieces of ``stream`` greedily in order."""
        # (free at batch, lane): the batcher hands the next piece to the lane that frees first,
        # lowest lane index on ties, which is exactly this heap order.
        heap = [(0, lane) for lane in range(self.B)]
        end = 0
        for p in stream:
            t, lane = heapq.heappop(heap)
            t += int(self.n_segments[p])
            end = max(end, t)
            heapq.heappush(heap, (t, lane))
        return end

    def total_batches(self, epochs: int) -> int:
        """Segment batches until every rank's lanes have streamed ``epochs`` epochs (the longest rank's)."""
        if epochs not in self._total_cache:
            self._total_cache[epochs] = max(
                self._lanes_end(np.concatenate([self._shard(e, r) for e in range(epochs)]))
                for r in range(self.world_size)
            )
        return self._total_cache[epochs]

    def epoch_len(self, epoch: int) -> int:
        """Segment batches that ``epoch`` adds to the run: ``total_batches(epoch + 1) - total_batches(epoch)``."""
        return self.total_batches(epoch + 1) - self.total_batches(epoch)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the epoch whose pieces are being dealt
        self.order = self.epoch_order(epoch)
        self.shard = self.order[self.rank::self.world_size]
        self.next_idx = 0

    def _deal(self) -> Optional[int]:
        """The next piece of this rank's stream (crossing into the next epoch), or None at its end."""
        if len(self.shard) == 0:  # fewer pieces than ranks: this rank never has one
            return None
        if self.next_idx >= len(self.shard):
            if self.max_epochs is not None and self.epoch + 1 >= self.max_epochs:
                return None
            self._start_epoch(self.epoch + 1)
        self.next_idx += 1
        return int(self.shard[self.next_idx - 1])

    def _active(self) -> np.ndarray:
        """``(B,)`` bool: the lane's piece has inputs left."""
        return (self.lane_piece >= 0) & (self.lane_off < self.n_inputs[np.maximum(self.lane_piece, 0)])

    @property
    def exhausted(self) -> bool:
        """True once the ``max_epochs`` stream is dealt and every lane has ended (only idle batches follow)."""
        done_dealing = self.max_epochs is not None and self.epoch + 1 >= self.max_epochs \
            and self.next_idx >= len(self.shard)
        return done_dealing and not self._active().any()

    # -- batches

    def next_batch(self) -> Batch:
        B, S = self.B, self.S
        inputs = np.full((B, S), self.pad_id, dtype=np.int64)
        targets = np.full((B, S), IGNORE_INDEX, dtype=np.int64)
        reset = ~self._active()  # a lane whose piece ended (or that idles) starts over
        start = np.zeros(B, dtype=np.int64)
        for lane in np.flatnonzero(reset):
            p = self._deal()
            self.lane_piece[lane], self.lane_off[lane] = (-1, 0) if p is None else (p, 0)
            self.lane_epoch[lane] = -1 if p is None else self.epoch
        for lane in np.flatnonzero(self.lane_piece >= 0):
            p, off = int(self.lane_piece[lane]), int(self.lane_off[lane])
            n = min(S, int(self.n_inputs[p]) - off)
            inputs[lane, :n] = seq_slice(self.pieces[p], off, off + n, self.bos_id, self.eos_id)
            targets[lane, :n] = seq_slice(self.pieces[p], off + 1, off + n + 1, self.bos_id, self.eos_id)
            start[lane] = off
            self.lane_off[lane] = off + n
        self.batch_idx += 1
        return Batch(
            torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(reset),
            torch.from_numpy(self.lane_piece.copy()), torch.from_numpy(start), self.epoch,
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
            "lane_epoch": torch.from_numpy(self.lane_epoch.copy()),
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
        self.lane_epoch = d["lane_epoch"].numpy().astype(np.int64).copy()


def segment_length(model_config, segment_len: Optional[int] = None) -> int:
    """The segment length S to stream with: the model's, or a shorter one that is asked for."""
    S = model_config.segment_len if segment_len is None else segment_len
    check_int("segment_len", S, 1)
    if S > model_config.segment_len:
        raise ValueError(f"segment_len {S} exceeds the model's segment_len {model_config.segment_len}")
    return S


def stream_segment(model, state: ModelState, batch: Batch, *,
                   autocast_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ModelState]:
    """One segment of every lane: reset the lanes that start a piece, forward, NLL per target.

    Args:
        model: a :class:`dsmr.DSMRModel` or a DDP wrapper of one (called as given, so DDP's
            hooks run); its mode (train/eval) and grad mode are the caller's.
        state: the lanes' :class:`ModelState` (B lanes); its device is where the batch goes.
        batch: a :class:`Batch` of B lanes and S positions (CPU tensors are fine).
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (None: no autocast).

    Returns:
        ``(nll, state)``: ``nll`` ``(B, S)`` float (fp32 at least, attached to the graph when
        grad is on), 0 where the target is ``IGNORE_INDEX``; the new state with slots that no
        lane can see any more dropped (:meth:`ModelState.compact`).
    """
    device = state.pos.device
    if bool(batch.reset.any()):
        state = state.reset(batch.reset)
    inputs = batch.inputs.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits, state = model(inputs, state)  # (B, S, V)
    # fp32 at least (logits may be bf16 under autocast); float64 models stay float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll, state.compact(int((batch.start + inputs.shape[1]).max()))
