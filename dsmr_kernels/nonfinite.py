"""NaN and inf in the inputs: every path propagates them as the reference does.

The rule (see :func:`dsmr_kernels.reference.segment_memory_attention_ref`): an output row (and its
LSE) is non-finite iff its query row, or a key or value row it *sees*, has a NaN or inf entry.
Fused kernels break it both ways: ATen's CPU kernel swallows a NaN query (its running max skips
NaN), and additive ``-inf`` masks turn a NaN key into NaN scores in rows that cannot see it.

So the dispatcher checks the inputs first (one sum over each of q, k, v and the *visible* memory
slots, one host read); only when something is non-finite does :func:`with_nonfinite_rows` run
the path on zeroed copies and mark the rows the rule names. Finite inputs cost only the check.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

from .reference import visibility_mask


def _runs(lens: Sequence[int]):
    """``(b0, b1, L)``: consecutive lanes with equal ``L > 0`` visible memory slots."""
    b0 = 0
    for b in range(1, len(lens) + 1):
        if b == len(lens) or lens[b] != lens[b0]:
            if lens[b0] > 0:
                yield b0, b, lens[b0]
            b0 = b


def inputs_finite(q, k, v, mem_k, mem_v, lens: Sequence[int], M: int) -> bool:
    """True when q, k, v and the visible memory slots (the newest ``lens[b]`` of lane b) are finite.

    One sum per tensor and one host read: a sum is NaN or inf whenever an entry is, so no
    non-finite input passes. Finite entries whose sum overflows (|x| near the dtype's maximum)
    read as non-finite too; that only sends the call down the exact zeroed-copy path, whose
    result is the same. Sums are far cheaper than min/max or ``isfinite`` passes, whose extra
    small ops cost 7% of an S = 512 fp32 forward.
    """
    parts: List[torch.Tensor] = [q, k, v]
    if mem_k is not None:
        for b0, b1, L in _runs(lens):
            parts += [mem_k[b0:b1, :, M - L:], mem_v[b0:b1, :, M - L:]]
    acc = None
    for t in parts:
        if not t.numel():
            continue
        # fp16 would overflow at 65504; bf16 and wider sum within their own (fp32-sized) range.
        s = t.detach().sum(dtype=torch.float32) if t.dtype == torch.float16 else t.detach().sum()
        acc = s if acc is None else acc + s
    return acc is None or math.isfinite(float(acc))


def _zeroed(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with non-finite entries replaced by 0 (differentiable for the finite ones)."""
    if t is None:
        return None
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def nonfinite_rows(q, k, v, mem_k, mem_v, lens: Sequence[int], M: int, window: Optional[int]) -> torch.Tensor:
    """(B, H, S) bool: the output rows the rule makes non-finite."""
    B, H, S, _ = q.shape
    Hkv = k.shape[1]
    bad_q = ~torch.isfinite(q).all(-1)  # (B, H, S)
    bad_seg = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, S)
    if mem_k is not None and M > 0:
        bad_mem = ~(torch.isfinite(mem_k).all(-1) & torch.isfinite(mem_v).all(-1))  # (B, Hkv, M)
        bad_kv = torch.cat([bad_mem, bad_seg], dim=-1)
        mem_len = torch.tensor(list(lens), device=q.device)  # window-clipped: older slots are unseen anyway
    else:
        bad_kv, mem_len, M = bad_seg, None, 0
    vis = visibility_mask(S, M, mem_len, window, q.device)  # (B or 1, 1, S, M + S)
    seen = (vis[:, :, None] & bad_kv[:, :, None, None, :]).any(-1)  # (B, Hkv, 1, S)
    seen = seen.expand(B, Hkv, H // Hkv, S).reshape(B, H, S)
    return bad_q | seen


def with_nonfinite_rows(run: Callable, q, k, v, mem_k, mem_v, lens: Sequence[int], M: int,
                        window: Optional[int]):
    """``run(q, k, v, mem_k, mem_v) -> (out, lse)`` on zeroed inputs, rows named by the rule set to NaN."""
    rows = nonfinite_rows(q, k, v, mem_k, mem_v, lens, M, window)
    out, lse = run(_zeroed(q), _zeroed(k), _zeroed(v), _zeroed(mem_k), _zeroed(mem_v))
    out = out.masked_fill(rows[..., None], float("nan"))
    lse = None if lse is None else lse.masked_fill(rows, float("nan"))
    return out, lse
