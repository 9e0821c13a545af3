"""CPU path "flash": ATen's fused CPU flash kernel, called on memory and segment separately.

ATen's tiled CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``) streams over key
blocks with an online softmax and returns the log-sum-exp (LSE) too. The key space
``[memory; segment]`` is never concatenated; it is attended in two parts and the parts are merged
by their LSEs (split-KV, as in flash-decoding):

* **Segment part**: the S queries over the S segment keys. The square causal pattern is the
  kernel's own ``is_causal`` (blocks above the diagonal are skipped, no mask). A sliding window
  shorter than S adds a small cached ``(S, S)`` mask. GQA repeats the (cheap) segment keys in
  the forward; the backward folds the G query heads into rows instead (below) with a cached
  ``(G*S, S)`` causal mask, because the kernel's backward is much faster in bf16 on long query
  slabs; it repeats instead when that mask would be too big to cache, or when ``B * Hkv`` slabs
  are too few to keep every thread busy (the backward parallelizes over (lane, head) only).
* **Memory part**: queries over the *valid* memory slots only, read as views of ``mem_k`` /
  ``mem_v`` (``[M - L, M)``), so invalid slots -- which may hold stale NaN/inf -- are never read
  and no padding mask exists. Lanes are grouped into runs with equal valid length; each run is
  one kernel call (one call in total when all lanes agree, the common case). GQA folds the G
  query heads of a kv head into the query axis, ``(B, H, S, D) -> (B, Hkv, G*S, D)``, so memory
  is never copied. With a window only the last ``window - 1`` slots can be seen by any query and
  only the first ``window - 1`` queries see any slot: the call is restricted to that band and a
  row-dependent mask of at most ``(G*(window-1), window-1)`` covers its edge. No mask ever scales
  with M.
* **Merge**: ``lse = logaddexp(lse_mem, lse_seg)`` (fp32; fp64 for fp64 input) and
  ``out = o_mem * exp(lse_mem - lse) + o_seg * exp(lse_seg - lse)``, written as one in-place
  ``lerp(o_seg, o_mem, exp(lse_mem - lse))`` on the output (the weights sum to 1; half types
  are computed in fp32 and rounded once). Rows with no visible memory are simply not merged
  (their memory LSE would be -inf), so no -inf arithmetic ever happens.
* **Backward**: :func:`flash_backward` calls ATen's flash backward once per part with the
  *final* merged ``out`` and ``lse``. That is exact: ``dS = P * (dP - rowsum(dO * O))`` with
  ``P = exp(S - LSE_final)`` is the same per-part formula. ``dq`` sums over the parts, ``dk`` /
  ``dv`` come from the segment part alone (memory is detached state).

:class:`CpuPlan` (which lanes read how much memory) is shared with the other CPU paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ._validate import OpDims
from .mask_cache import MASK_CACHE

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Plan: which lanes read how much memory
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuPlan:
    """Sizes of one CPU call and the memory each lane reads (one host read of ``mem_len``)."""

    B: int
    H: int
    Hkv: int
    S: int
    M: int
    D: int
    G: int
    scale: float
    window: Optional[int]
    R: int  # query rows that can see memory: S, or min(S, window - 1)
    runs: Tuple[Tuple[int, int, int], ...]  # (lane_begin, lane_end, L): lanes reading the newest L slots
    lens: Tuple[int, ...] = ()  # valid memory slots any query of lane b can see (window-clipped)

    @property
    def max_len(self) -> int:
        """The most memory slots any lane reads (the newest ``max_len`` slots cover every lane)."""
        return max(self.lens, default=0)


def visible_lens(B: int, M: int, mem_len: Optional[torch.Tensor], window: Optional[int]) -> List[int]:
    """Per lane, how many of the newest memory slots some query can see (one host read of mem_len)."""
    lens = [M] * B if mem_len is None else [int(x) for x in mem_len.tolist()]
    if window is not None:
        lens = [min(n, window - 1) for n in lens]  # older slots are outside every query's window
    return lens


def make_plan(dims: OpDims, mem_len: Optional[torch.Tensor], scale: float, window: Optional[int]) -> CpuPlan:
    """The lanes' memory runs for one call (no memory, or no lane with memory: no runs)."""
    B, S, M = dims.B, dims.S, dims.M
    R = S if window is None else min(S, window - 1)
    runs: List[Tuple[int, int, int]] = []
    lens = [0] * B
    if M > 0 and B > 0 and R > 0:
        lens = visible_lens(B, M, mem_len, window)
        b0 = 0
        for b in range(1, B + 1):
            if b == B or lens[b] != lens[b0]:
                if lens[b0] > 0:
                    runs.append((b0, b, lens[b0]))
                b0 = b
    return CpuPlan(B, dims.H, dims.Hkv, S, M, dims.D, dims.groups, scale, window, R, tuple(runs), tuple(lens))


# --------------------------------------------------------------------------------------------
# Masks (small, cached; none scales with M)
# --------------------------------------------------------------------------------------------
def mask_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an additive mask for ATen's CPU flash kernel with ``dtype`` queries.

    fp64 queries need an fp64 mask: the kernel silently computes garbage (errors ~1, gradients
    too) for fp64 q/k/v with an fp32 mask on AVX2 and plain-C++ ATen builds, where every other
    mismatch raises (pinned by ``tests/dsmr_kernels/test_aten_contract.py``). Half types keep
    fp32 masks (accepted and exact), except where a caller builds a half mask to halve its size.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segment_window_mask(S: int, window: Optional[int], dtype, device) -> Optional[torch.Tensor]:
    """Additive ``(S, S)`` window mask for the segment part (causality is the kernel's own).

    None when the window covers the whole segment (``window >= S``).
    """
    if window is None or window >= S:
        return None
    mdt = mask_dtype(dtype)

    def build():
        i = torch.arange(S, device=device)
        far = (i[:, None] - i[None, :]) >= window
        return torch.zeros(S, S, dtype=mdt, device=device).masked_fill_(far, _NEG_INF)

    return MASK_CACHE.get(("seg", S, window, mdt, str(device)), build)


def _segment_fold_mask(S: int, window: Optional[int], groups: int, dtype, device) -> Optional[torch.Tensor]:
    """Additive ``(G*S, S)`` causal (+ window) mask for the segment part with GQA folded into rows.

    Returned only when it fits the cache (it is rebuilt on every call otherwise; the caller then
    repeats the segment keys instead and uses the kernel's own causal path).
    """
    mdt = dtype if dtype in (torch.float16, torch.bfloat16) else mask_dtype(dtype)
    if groups * S * S * torch.finfo(mdt).bits // 8 > MASK_CACHE.max_entry_bytes:
        return None

    def build():
        i = torch.arange(S, device=device)
        d = i[:, None] - i[None, :]
        hidden = d < 0 if window is None else (d < 0) | (d >= window)
        mask = torch.zeros(S, S, dtype=mdt, device=device).masked_fill_(hidden, _NEG_INF)
        return mask.repeat(groups, 1)

    return MASK_CACHE.get(("segfold", S, window, groups, mdt, str(device)), build)


def _band_mask(R: int, W: int, window: Optional[int], groups: int, dtype, device) -> Optional[torch.Tensor]:
    """Additive ``(G*R, W)`` mask for the memory band: query row ``i < R`` over the newest ``W`` slots.

    Slot ``t`` of the band (absolute ``M - W + t``) is seen by query ``i`` (absolute ``M + i``) iff
    ``i + W - t < window``. None when every row sees every slot.
    """
    if window is None or R + W <= window:
        return None
    mdt = mask_dtype(dtype)

    def build():
        i = torch.arange(R, device=device)[:, None]
        t = torch.arange(W, device=device)[None, :]
        mask = torch.zeros(R, W, dtype=mdt, device=device).masked_fill_(i + W - t >= window, _NEG_INF)
        return mask.repeat(groups, 1) if groups > 1 else mask

    return MASK_CACHE.get(("band", R, W, window, groups, mdt, str(device)), build)


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------
def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The ATen CPU flash kernel honours every stride except the last, which must be 1."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _repeat_heads(x: torch.Tensor, G: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*G, S, D), head h reading kv head h // G."""
    x = _unit_stride(x)  # before the expand: the repeated view must keep a unit last stride too
    if G == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv * G, S, D)


def _fold(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, H, R, ...) -> (B, Hkv, G*R, ...): the G query heads of a kv head become more rows."""
    B, H, R = x.shape[:3]
    return x.reshape(B, Hkv, (H // Hkv) * R, *x.shape[3:])


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and LSE) dtype: fp64 for fp64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def flash_forward(q, k, v, mem_k, mem_v, plan: CpuPlan):
    """Forward: ``out`` (B, H, S, D) in q.dtype and ``lse`` (B, H, S) fp32 (fp64 for fp64 input).

    q: (B, H, S, D); k, v: (B, Hkv, S, D); mem_k, mem_v: (B, Hkv, M, D) or None (read only in the
    plan's runs, i.e. valid slots).
    """
    p = plan
    qc = _unit_stride(q)
    out, lse = _flash_cpu(
        qc, _repeat_heads(k, p.G), _repeat_heads(v, p.G), 0.0, True,
        attn_mask=_segment_window_mask(p.S, p.window, q.dtype, q.device), scale=p.scale,
    )
    if not p.runs:
        return out, lse
    R, M = p.R, p.M
    for b0, b1, L in p.runs:
        nb = b1 - b0
        o_m, lse_m = _flash_cpu(
            _fold(qc[b0:b1, :, :R], p.Hkv),
            _unit_stride(mem_k[b0:b1, :, M - L:]),
            _unit_stride(mem_v[b0:b1, :, M - L:]),
            0.0, False,
            attn_mask=_band_mask(R, L, p.window, p.G, q.dtype, q.device), scale=p.scale,
        )
        o_m = o_m.reshape(nb, p.H, R, p.D)
        lse_m = lse_m.reshape(nb, p.H, R)
        lse_s = lse[b0:b1, :, :R]
        new_lse = torch.logaddexp(lse_m, lse_s)
        # out = o_s * exp(lse_s - new) + o_m * exp(lse_m - new) = lerp(o_s, o_m, exp(lse_m - new)),
        # one in-place pass over the output (computed in fp32 for half types, rounded once).
        w_m = torch.exp(lse_m - new_lse).unsqueeze(-1)
        out[b0:b1, :, :R].lerp_(o_m, w_m.to(out.dtype))
        lse_s.copy_(new_lse)
    return out, lse


def _segment_backward(g, qc, k, v, out, lse, p: CpuPlan, need_kv: bool):
    """dq, dk, dv of the segment part (GQA folded into rows when that mask is cached, else repeated)."""
    B, H, Hkv, S, D, G = p.B, p.H, p.Hkv, p.S, p.D, p.G
    fold_mask = None
    if G > 1 and B * Hkv >= torch.get_num_threads():
        fold_mask = _segment_fold_mask(S, p.window, G, qc.dtype, qc.device)
    if fold_mask is not None:
        # Folded GQA: one (G*S)-row slab per kv head. The kernel's backward tiles queries by
        # 256 rows from 768 rows up (64 below), which bf16 GEMMs need to be fast; it runs one
        # task per (lane, head), hence the thread-count condition above.
        dq, dk, dv = _flash_cpu_backward(
            _fold(g, Hkv), _fold(qc, Hkv), _unit_stride(k), _unit_stride(v), _fold(out, Hkv),
            _fold(lse, Hkv), 0.0, False, attn_mask=fold_mask, scale=p.scale,
        )
        return dq.reshape(B, H, S, D), dk, dv
    dq, dk, dv = _flash_cpu_backward(
        g, qc, _repeat_heads(k, G), _repeat_heads(v, G), out, lse, 0.0, True,
        attn_mask=_segment_window_mask(S, p.window, qc.dtype, qc.device), scale=p.scale,
    )
    if need_kv and G > 1:
        acc = acc_dtype(qc.dtype)
        dk = dk.reshape(B, Hkv, G, S, D).sum(2, dtype=acc).to(qc.dtype)
        dv = dv.reshape(B, Hkv, G, S, D).sum(2, dtype=acc).to(qc.dtype)
    return dq, dk, dv


@torch.no_grad()
def flash_backward(g, q, k, v, mem_k, mem_v, out, lse, plan: CpuPlan, need_q: bool, need_kv: bool):
    """Backward with the final ``out`` / ``lse``: ``(dq, dk, dv)`` in q.dtype, None where not needed.

    g, out: (B, H, S, D); lse: (B, H, S) as returned by the forward of any CPU path.
    """
    p = plan
    g, qc, out = _unit_stride(g), _unit_stride(q), _unit_stride(out)
    dq, dk, dv = _segment_backward(g, qc, k, v, out, lse, p, need_kv)
    if need_q and p.runs:
        R, M, Hkv = p.R, p.M, p.Hkv
        for b0, b1, L in p.runs:
            nb = b1 - b0
            dq_m, _, _ = _flash_cpu_backward(
                _fold(g[b0:b1, :, :R], Hkv),
                _fold(qc[b0:b1, :, :R], Hkv),
                _unit_stride(mem_k[b0:b1, :, M - L:]),
                _unit_stride(mem_v[b0:b1, :, M - L:]),
                _fold(out[b0:b1, :, :R], Hkv),
                _fold(lse[b0:b1, :, :R], Hkv),
                0.0, False,
                attn_mask=_band_mask(R, L, p.window, p.G, q.dtype, q.device), scale=p.scale,
            )
            dq[b0:b1, :, :R].add_(dq_m.reshape(nb, p.H, R, p.D))  # half types: summed in fp32, rounded once
    return (dq if need_q else None), (dk if need_kv else None), (dv if need_kv else None)
