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
import torch.nn.functional as F

from .model import ModelState

DISTANCE_EDGES = (256, 1024, 4096, 8192)
DISTANCE_LABELS = ("0-256", "256-1k", "1k-4k", "4k-8k", "8k+")


def wipe_memory(state: ModelState) -> ModelState:
    """Every layer's memory emptied, positions kept (unlike ``state.reset``, which restarts at 0)."""
    from dsmr_kernels import AttentionState

    return ModelState([AttentionState(None, None, torch.zeros_like(s.mem_len), s.pos) for s in state.layers])


def _nll(model, inputs, targets, state, autocast, amp_dtype):
    with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=autocast):
        logits, state = model(inputs[None], state)  # (1, n, V)
    logits = logits[0].to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    nll = F.cross_entropy(logits, targets, reduction="none")  # (n,)
    return nll, state


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
    raw = model.module if hasattr(model, "module") else model
    cfg = raw.config
    S = cfg.segment_len if segment_len is None else segment_len
    if isinstance(S, bool) or not isinstance(S, int) or not 0 < S <= cfg.segment_len:
        raise ValueError(f"segment_len must be an int in [1, {cfg.segment_len}], got {S!r}")
    ids = np.asarray(piece)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"piece must be a non-empty 1-D array of ids, got shape {ids.shape}")
    seq = torch.from_numpy(np.concatenate([[bos_id], ids, [eos_id]]).astype(np.int64))
    n_inputs = len(seq) - 1
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
    device = next(raw.parameters()).device if device is None else torch.device(device)
    seq = seq.to(device)
    inputs, targets = seq[:-1], seq[1:]
    from tqdm.auto import tqdm

    was_training = raw.training
    raw.eval()
    n_after = -(-W // S)
    bar = tqdm(total=R // S + 2 * n_after, desc="kv-reset", disable=not progress, leave=False)
    try:
        # The shared prefix [0, R) runs once; then two states continue from R.
        state, before = raw.init_state(1, device), []
        for s0 in range(0, R, S):
            nll, state = _nll(raw, inputs[s0:s0 + S], targets[s0:s0 + S], state, autocast, autocast_dtype)
            before.append(nll)
            bar.update(1)
        runs = {}
        for name, st in (("normal", state), ("wiped", wipe_memory(state))):
            out = []
            for s0 in range(R, R + W, S):
                e = min(s0 + S, R + W)
                nll, st = _nll(raw, inputs[s0:e], targets[s0:e], st, autocast, autocast_dtype)
                out.append(nll)
                bar.update(1)
            runs[name] = torch.cat(out).double().cpu()
    finally:
        bar.close()
        raw.train(was_training)

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
    result = {
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
        "nll_before": float(torch.cat(before).double().mean()),
        "nll_after_normal": float(runs["normal"].mean()),
        "nll_after_wiped": float(runs["wiped"].mean()),
        "buckets": buckets,
    }
    if plot_path is not None:
        plot_kv_reset(result, plot_path)
    return result


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed (pip install 'dsmr[plot]'); skipping the plot")
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


__all__ = ["kv_reset_diagnostic", "kv_reset_diagnostic_pieces", "plot_kv_reset", "wipe_memory", "DISTANCE_LABELS"]
