"""KV-reset diagnostic: how much does a model use the context its memory carries?

Stream one piece twice: once normally and once with every layer's memory wiped at token R
(positions keep counting, so only the *content* of the past is taken away). Before R the two runs
are identical; after R the difference in per-token NLL (wiped - normal) measures how much the
model leaned on what happened before R, as a function of the distance from R. A model whose
memory is short (or unused) shows an increase that falls to 0 quickly; a model with real
long-range use shows an increase that persists.

R is given in input positions of ``[BOS] + ids + [EOS]`` (input t predicts token t+1). Memory is
carried at segment granularity, so R is rounded **down** to a multiple of the segment length S:
the wipe happens between two segments, at the last segment boundary at or before the requested
R. The default R is 8192; a piece too short to leave a full segment after token 8192 is wiped at
half its input length instead (then rounded down as well). Distance d = t - R counts from the first input after the wipe (d = 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .distributed import unwrap
from .metrics import pyplot
from .stream import LaneBatcher, segment_length, stream_segment
from .threads import tick

DISTANCE_EDGES = (256, 1024, 4096, 8192)
DISTANCE_LABELS = ("0-256", "256-1k", "1k-4k", "4k-8k", "8k+")


def _reset_point(n_inputs: int, S: int, reset_at: Optional[int], window: Optional[int]):
    """``(requested R, R rounded down to a segment boundary, window W)``; ValueError if unusable."""
    if reset_at is None:
        requested = 8192 if n_inputs - 8192 >= S else n_inputs // 2
    else:
        requested = int(reset_at)
    R = (requested // S) * S
    if R <= 0 or R >= n_inputs:
        raise ValueError(
            f"reset_at={requested} rounds down to R={R} with segment_len {S}; R must leave at least one "
            f"segment before and one input after it (the piece has {n_inputs} inputs)"
        )
    W = n_inputs - R if window is None else min(int(window), n_inputs - R)
    if W <= 0:
        raise ValueError(f"window must be >= 1, got {window}")
    return requested, R, W


def _stream_twice(raw, ids, S, R, W, *, bos_id, eos_id, device, amp_dtype, progress):
    """Per-target NLL before R (one run), then after R normally and with memory wiped at R.

    The piece streams as one lane of :class:`LaneBatcher`, through :func:`stream_segment`, so the
    normal run is exactly an evaluation of the piece. Returns ``(before (R,), {"normal": (W,),
    "wiped": (W,)})`` float64 CPU tensors.
    """
    from tqdm.auto import tqdm

    # Padding is never a target, so any in-vocab id serves as pad.
    batcher = LaneBatcher([ids], 1, S, pad_id=bos_id, bos_id=bos_id, eos_id=eos_id, shuffle=False, max_epochs=1)
    n_before, n_after = R // S, -(-W // S)
    batches = [batcher.next_batch() for _ in range(n_before + n_after)]
    bar = tqdm(total=n_before + 2 * n_after, desc="kv-reset", disable=not progress, leave=False)
    try:
        # The shared prefix [0, R) runs once; then two states continue from R.
        state, before = raw.init_state(1, device), []
        for b in batches[:n_before]:
            tick()
            nll, state = stream_segment(raw, state, b, autocast_dtype=amp_dtype)
            before.append(nll[0])
            bar.update(1)
        runs = {}
        for name, st in (("normal", state), ("wiped", state.wipe())):
            out = []
            for b in batches[n_before:]:
                tick()
                nll, st = stream_segment(raw, st, b, autocast_dtype=amp_dtype)
                out.append(nll[0])
                bar.update(1)
            runs[name] = torch.cat(out)[:W].double().cpu()
    finally:
        bar.close()
    return torch.cat(before).double().cpu(), runs


@torch.no_grad()
def kv_reset_diagnostic(
    model,
    piece: np.ndarray,
    *,
    bos_id: int,
    eos_id: int,
    reset_at: Optional[int] = None,
    window: Optional[int] = None,
    segment_len: Optional[int] = None,
    device=None,
    autocast: bool = False,
    autocast_dtype: torch.dtype = torch.bfloat16,
    plot_path: Optional[Union[str, Path]] = None,
    progress: bool = False,
) -> dict:
    """NLL increase caused by wiping all layers' memory at token R, by distance after R.

    Args:
        model: a :class:`dsmr.DSMRModel` (any schedule); put in eval mode for the call.
        piece: 1-D int array of raw ids (no BOS/EOS); the stream is ``[BOS] + ids + [EOS]``.
        bos_id, eos_id: special ids.
        reset_at: requested R (default 8192, or half the inputs when fewer than 8192 + S); rounded down to a
            multiple of the segment length. Must leave at least one segment before and after.
        window: how many inputs after R to report (default: to the end of the piece).
        segment_len: S (default: the model's).
        plot_path: if given, a PNG of the increase against distance is written there.
        progress: show a tqdm bar over segments.

    Returns: dict with ``reset_at`` (R used), ``requested_reset_at``, ``segment_len``,
    ``n_inputs`` (piece length + 1), ``window``, per-token lists over distance 0..window-1:
    ``increase``, ``nll_normal``, ``nll_wiped``; ``auc`` (sum of the increase over the window),
    ``mean_increase`` (auc / window), ``nll_before`` (mean normal NLL before R),
    ``nll_after_normal`` / ``nll_after_wiped`` (means over the window) and ``buckets``
    ``{label: {"tokens", "sum_increase", "mean_increase"}}`` by distance.
    """
    raw = unwrap(model)
    cfg = raw.config
    S = segment_length(cfg, segment_len)
    ids = np.asarray(piece)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"piece must be a non-empty 1-D array of ids, got shape {ids.shape}")
    n_inputs = len(ids) + 1
    requested, R, W = _reset_point(n_inputs, S, reset_at, window)
    device = next(raw.parameters()).device if device is None else torch.device(device)
    was_training = raw.training
    raw.eval()
    try:
        before, runs = _stream_twice(raw, ids, S, R, W, bos_id=bos_id, eos_id=eos_id, device=device,
                                     amp_dtype=autocast_dtype if autocast else None, progress=progress)
    finally:
        raw.train(was_training)
    result = _summary(before, runs, requested=requested, R=R, W=W, S=S, n_inputs=n_inputs)
    if plot_path is not None:
        plot_kv_reset(result, plot_path)
    return result


def _summary(before, runs, *, requested, R, W, S, n_inputs) -> dict:
    """The result dict of :func:`kv_reset_diagnostic` from the per-target NLLs."""
    inc = runs["wiped"] - runs["normal"]  # (W,)
    dist = torch.arange(W)
    bucket = torch.bucketize(dist, torch.tensor(DISTANCE_EDGES), right=True)
    buckets = {}
    for i, lab in enumerate(DISTANCE_LABELS):
        sel = inc[bucket == i]
        if sel.numel():
            buckets[lab] = {"tokens": int(sel.numel()), "sum_increase": float(sel.sum()),
                            "mean_increase": float(sel.mean())}
    auc = float(inc.sum())
    return {
        "reset_at": R,
        "requested_reset_at": requested,
        "segment_len": S,
        "n_inputs": n_inputs,
        "window": W,
        "distance": dist.tolist(),
        "increase": inc.tolist(),
        "nll_normal": runs["normal"].tolist(),
        "nll_wiped": runs["wiped"].tolist(),
        "auc": auc,
        "mean_increase": auc / W,
        "nll_before": float(before.mean()),
        "nll_after_normal": float(runs["normal"].mean()),
        "nll_after_wiped": float(runs["wiped"].mean()),
        "buckets": buckets,
    }


def kv_reset_diagnostic_pieces(
    model,
    pieces,
    *,
    names=None,
    progress: bool = False,
    plot_path: Optional[Union[str, Path]] = None,
    **kwargs,
) -> dict:
    """:func:`kv_reset_diagnostic` over several pieces, averaged by distance after each piece's R.

    Args:
        model: a :class:`dsmr.DSMRModel`.
        pieces: sequence of 1-D int arrays of raw ids (no BOS/EOS).
        names: optional names of the pieces (for ``per_piece`` and ``skipped``).
        progress: a tqdm bar over pieces.
        plot_path: PNG of the mean increase against distance.
        **kwargs: passed to :func:`kv_reset_diagnostic` for every piece (``bos_id``, ``eos_id``,
            ``reset_at``, ``window``, ``segment_len``, ``device``, ``autocast``...).

    Pieces too short for the requested R (the per-piece ValueError) are skipped and listed in
    ``skipped``; ValueError is raised only when every piece is skipped.

    Returns: dict with ``pieces`` (used), ``skipped`` ``[{"piece", "reason"}]``, ``per_piece``
    (each piece's R, window, auc, mean_increase and NLL means), ``increase`` (mean over the pieces
    that reach each distance d = 0..max window-1), ``pieces_at_distance`` (how many reach d),
    ``auc`` (sum of ``increase``), ``mean_increase`` (all tokens after R pooled),
    ``mean_auc_per_piece`` and ``buckets`` (pooled over pieces, as in the single-piece result).
    """
    from tqdm.auto import tqdm

    names = [str(i) for i in range(len(pieces))] if names is None else [str(n) for n in names]
    if len(names) != len(pieces):
        raise ValueError(f"got {len(names)} names for {len(pieces)} pieces")
    results, used, skipped = [], [], []
    for i in tqdm(range(len(pieces)), desc="kv-reset pieces", disable=not progress, leave=False):
        try:
            results.append(kv_reset_diagnostic(model, pieces[i], **kwargs))
            used.append(names[i])
        except ValueError as e:
            skipped.append({"piece": names[i], "reason": str(e)})
    if not results:
        raise ValueError(f"no piece could be diagnosed ({len(skipped)} skipped); first reason: "
                         f"{skipped[0]['reason'] if skipped else 'no pieces given'}")
    W = max(r["window"] for r in results)
    total = np.zeros(W)
    count = np.zeros(W, dtype=np.int64)
    for r in results:
        inc = np.asarray(r["increase"], dtype=np.float64)
        total[: len(inc)] += inc
        count[: len(inc)] += 1
    mean_inc = total / count
    buckets = {}
    for lab in DISTANCE_LABELS:
        parts = [r["buckets"][lab] for r in results if lab in r["buckets"]]
        if parts:
            n = sum(p["tokens"] for p in parts)
            sm = sum(p["sum_increase"] for p in parts)
            buckets[lab] = {"tokens": n, "sum_increase": sm, "mean_increase": sm / n}
    pooled_tokens = sum(r["window"] for r in results)
    result = {
        "pieces": used,
        "skipped": skipped,
        "per_piece": [
            {"piece": n, **{k: r[k] for k in ("reset_at", "n_inputs", "window", "auc", "mean_increase",
                                               "nll_before", "nll_after_normal", "nll_after_wiped")}}
            for n, r in zip(used, results)
        ],
        "distance": list(range(W)),
        "increase": mean_inc.tolist(),
        "pieces_at_distance": count.tolist(),
        "auc": float(mean_inc.sum()),
        "mean_increase": sum(r["auc"] for r in results) / pooled_tokens,
        "mean_auc_per_piece": float(np.mean([r["auc"] for r in results])),
        "buckets": buckets,
        "reset_at": sorted({r["reset_at"] for r in results}),
    }
    if plot_path is not None:
        plot_kv_reset(result, plot_path)
    return result


def plot_kv_reset(result: dict, path: Union[str, Path], smooth: int = 64) -> Optional[Path]:
    """PNG of the NLL increase against distance after R (raw and a running mean of ``smooth``)."""
    plt = pyplot()
    if plt is None:
        return None
    inc = np.asarray(result["increase"], dtype=np.float64)
    d = np.arange(len(inc))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(d, inc, lw=0.5, alpha=0.4, label="per token")
    k = max(1, min(smooth, len(inc)))
    if k > 1:
        run = np.convolve(inc, np.ones(k) / k, mode="valid")
        ax.plot(d[k - 1:], run, lw=1.5, label=f"running mean ({k})")
    ax.axhline(0.0, color="k", lw=0.5)
    R = result["reset_at"]
    where = f"R={R}" if not isinstance(R, list) else (
        f"R={R[0]}" if len(R) == 1 else f"each piece's R ({min(R)}-{max(R)})")
    n = len(result.get("pieces", [])) or 1
    ax.set_xlabel(f"tokens after the wipe at {where}" + (f", mean over {n} pieces" if n > 1 else ""))
    ax.set_ylabel("NLL increase (wiped - normal), nats")
    ax.set_title(f"KV-reset diagnostic: AUC {result['auc']:.2f}, mean {result['mean_increase']:.4f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["kv_reset_diagnostic", "kv_reset_diagnostic_pieces", "plot_kv_reset", "DISTANCE_LABELS"]
