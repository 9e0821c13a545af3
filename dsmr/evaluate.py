"""Streaming evaluation: perplexity over whole pieces, and NLL by position within the piece.

Pieces are streamed exactly as in training (:class:`dsmr.stream.LaneBatcher` and
:func:`dsmr.stream.stream_segment`: B lanes, whole pieces, segment by segment, memory reset at
each piece start), without gradients and in the corpus order. Every real target counts: each id of the piece and the final EOS; BOS is never a
target and padding carries nothing. Perplexity is ``exp(total NLL / real targets)``.

Position buckets use the 1-based index of the target in ``[BOS] + ids + [EOS]`` (the first id
is position 1, so a piece of L ids has targets 1..L+1)::

    "1-1k": 1..1024   "1k-4k": 1025..4096   "4k-8k": 4097..8192
    "8k-16k": 8193..16384   "16k-32k": 16385..32768   "32k+": 32769..

Offset buckets use the target's column within its segment (0..S-1): ``"0-15"``, ``"16-63"``,
``"64+"``. A target at offset j sees j + 1 inputs of its own segment; everything older comes
through the recurrent memory, so these buckets show where memory carries context.

Given the tokenizer (or the pieces' note counts), the result also holds **NLL per note**: a
piece's total NLL (every real target, EOS included) over its note count (:mod:`dsmr.notes`),
pooled over pieces as ``sum(NLL) / sum(notes)``. Unlike NLL per token it compares across
tokenizers, whose token counts per note differ.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .distributed import sum_over_ranks, unwrap
from .stream import LaneBatcher, Vocab, check_pieces, check_vocab, segment_length, stream_segment
from .threads import Policy, governed

BUCKET_EDGES = (1024, 4096, 8192, 16384, 32768)
BUCKET_LABELS = ("1-1k", "1k-4k", "4k-8k", "8k-16k", "16k-32k", "32k+")
# Offset of a target within its segment (0 = the segment's first column). Early columns see only a
# few tokens of their own segment, so what cross-segment memory gives shows up there first.
OFFSET_EDGES = (16, 64)
OFFSET_LABELS = ("0-15", "16-63", "64+")


def _bucket_summary(labels, sums: Sequence[float], counts: Sequence[float]) -> dict:
    out = {}
    for lab, s, c in zip(labels, sums, counts):
        c = int(round(c))
        out[lab] = {"tokens": c, "nll_sum": float(s),
                    "nll": float(s) / c if c else None, "ppl": math.exp(float(s) / c) if c else None}
    return out


@torch.no_grad()
def evaluate(
    model,
    pieces: Sequence[np.ndarray],
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    batch_lanes: int = 8,
    segment_len: Optional[int] = None,
    device=None,
    autocast: bool = False,
    autocast_dtype: torch.dtype = torch.bfloat16,
    max_pieces: Optional[int] = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    tokenizer=None,
    notes: Optional[Sequence[int]] = None,
    threads: Policy = "auto",
) -> dict:
    """Perplexity of ``model`` over ``pieces``, streamed in lanes like training.

    Args:
        model: a :class:`dsmr.DSMRModel` (or a DDP wrapper of one); its train/eval mode is
            restored afterwards.
        pieces: list of 1-D int arrays of raw ids (no BOS/EOS).
        pad_id, bos_id, eos_id: the corpus's special ids.
        batch_lanes: lanes B streamed side by side.
        segment_len: segment length S (default: the model's; at most the model's). For a
            full-memory model any S gives the same result; finite horizons are defined per S.
        device: default: the model's device.
        autocast: run the forward under ``torch.autocast(dtype=autocast_dtype)``.
        max_pieces: only the first pieces.
        rank, world_size: shard the pieces over processes (``pieces[rank::world_size]``) and sum
            the statistics with ``all_reduce``; every rank returns the global result.
        tokenizer: the MidiTok tokenizer the pieces were encoded with; adds NLL per note.
        notes: instead of ``tokenizer``, each piece's note count (one int per piece).
        threads: CPU threads: ``"auto"`` follows the cores other processes leave free
            (:mod:`dsmr.threads`; inside :func:`dsmr.train.train` the trainer's policy), an int
            fixes the count, None leaves torch's setting.

    Returns:
        ``{"nll", "ppl", "tokens", "nll_sum", "pieces", "buckets": {label: {"tokens", "nll_sum",
        "nll", "ppl"}}, "offsets": {label: {...}}}``: ``buckets`` by position in the piece,
        ``offsets`` by offset in the segment (:data:`OFFSET_LABELS`); each set's ``tokens`` and
        ``nll_sum`` add up to the totals. With
        ``tokenizer`` or ``notes`` also ``"notes"`` (total), ``"nll_per_note"`` (summed NLL of the
        pieces that have notes / their notes; None if none has) and ``"piece_nll"`` (each piece's
        total NLL, ``(len(pieces),)`` list).
    """
    from tqdm.auto import tqdm

    raw = unwrap(model)
    cfg = raw.config
    S = segment_length(cfg, segment_len)
    pieces = check_pieces(pieces[:max_pieces], cfg.vocab_size, "evaluation")
    notes = _note_counts(pieces, tokenizer, None if notes is None else list(notes)[:max_pieces])
    check_vocab(Vocab(cfg.vocab_size, pad_id, bos_id, eos_id), cfg.vocab_size)
    device = next(raw.parameters()).device if device is None else torch.device(device)
    batcher = LaneBatcher(pieces, batch_lanes, S, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id,
                          shuffle=False, rank=rank, world_size=world_size, max_epochs=1)
    edges = torch.tensor(BUCKET_EDGES, device=device)
    nb = len(BUCKET_LABELS)
    sums = torch.zeros(nb, dtype=torch.float64, device=device)
    counts = torch.zeros(nb, dtype=torch.float64, device=device)
    off_edges = torch.tensor(OFFSET_EDGES, device=device)
    no = len(OFFSET_LABELS)
    off_sums = torch.zeros(no, dtype=torch.float64, device=device)
    off_counts = torch.zeros(no, dtype=torch.float64, device=device)
    # (1, S): every lane's segment starts at column 0.
    off_bucket = torch.bucketize(torch.arange(S, device=device), off_edges, right=True)[None]
    piece_nll = torch.zeros(len(pieces), dtype=torch.float64, device=device)

    was_training = raw.training
    raw.eval()
    state = raw.init_state(batch_lanes, device)
    with governed(threads, device=device) as gov:
        try:
            for _ in tqdm(range(batcher.total_batches(1)), desc="eval", disable=not progress, leave=False):
                gov.tick()
                b = batcher.next_batch()
                nll, state = stream_segment(raw, state, b, autocast_dtype=autocast_dtype if autocast else None)
                mask = b.mask.to(device)
                # Position p (1-based) falls in bucket i when edges[i-1] < p <= edges[i].
                bucket = torch.bucketize(b.positions().to(device) - 1, edges, right=True)[mask]  # (n,)
                sums.index_add_(0, bucket, nll[mask].double())
                counts += torch.bincount(bucket, minlength=nb).double()
                ob = off_bucket.expand_as(mask)[mask]
                off_sums.index_add_(0, ob, nll[mask].double())
                off_counts += torch.bincount(ob, minlength=no).double()
                live = b.piece >= 0
                piece_nll.index_add_(0, b.piece[live].to(device), (nll * mask).sum(1).double()[live.to(device)])
        finally:
            raw.train(was_training)

    if world_size > 1:
        both = sum_over_ranks(torch.cat([sums, counts, off_sums, off_counts, piece_nll]))
        sums, counts = both[:nb], both[nb:2 * nb]
        off_sums, off_counts = both[2 * nb:2 * nb + no], both[2 * nb + no:2 * (nb + no)]
        piece_nll = both[2 * (nb + no):]
    total, n = float(sums.sum()), int(round(float(counts.sum())))
    mean = total / n if n else float("nan")
    per_note = {} if notes is None else _per_note(piece_nll.tolist(), notes)
    return {
        "nll": mean,
        "ppl": math.exp(mean) if n else float("nan"),
        "tokens": n,
        "nll_sum": total,
        "pieces": len(pieces),
        "buckets": _bucket_summary(BUCKET_LABELS, sums.tolist(), counts.tolist()),
        "offsets": _bucket_summary(OFFSET_LABELS, off_sums.tolist(), off_counts.tolist()),
        **per_note,
    }


def _note_counts(pieces, tokenizer, notes) -> Optional[list]:
    """Each piece's note count, from ``notes`` or by counting with ``tokenizer`` (None without both)."""
    if notes is not None:
        notes = [int(n) for n in notes]
        if len(notes) != len(pieces) or min(notes, default=0) < 0:
            raise ValueError(f"notes must hold one count >= 0 per evaluated piece ({len(pieces)}), got {len(notes)}")
        return notes
    if tokenizer is None:
        return None
    from .notes import count_notes, notes_per_id

    table = notes_per_id(tokenizer)
    return [count_notes(p, table) for p in pieces]


def _per_note(piece_nll: list, notes: list) -> dict:
    """``notes``, ``nll_per_note`` (pooled over pieces that have notes) and ``piece_nll``."""
    with_notes = [i for i, k in enumerate(notes) if k > 0]
    n_notes = sum(notes[i] for i in with_notes)
    return {"notes": sum(notes),
            "nll_per_note": sum(piece_nll[i] for i in with_notes) / n_notes if n_notes else None,
            "piece_nll": piece_nll}
