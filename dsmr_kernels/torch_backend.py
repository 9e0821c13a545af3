"""The ``backend="torch"`` path: PyTorch's fused attention, split into memory and segment parts.

CPU tensors go to ATen's tiled CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``), which streams over key blocks with an online
softmax and returns the log-sum-exp (LSE) too. The key space ``[memory; segment]`` is never
concatenated; it is attended in two parts and the parts are merged by their LSEs (split-KV, as
in flash-decoding):

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
* **Backward**: the kernel's LSE output is not differentiable, so the op is a
  ``torch.autograd.Function`` whose backward calls ATen's flash backward once per part with the
  *final* merged ``out`` and ``lse``. That is exact: ``dS = P * (dP - rowsum(dO * O))`` with
  ``P = exp(S - LSE_final)`` is the same per-part formula. ``dq`` sums over the parts, ``dk`` /
  ``dv`` come from the segment part alone (memory is detached state).

**bf16** on the CPU takes :mod:`dsmr_kernels.torch_tiled` instead (same split-free key space, large
batched bf16 GEMMs, fp32 softmax; see :data:`BF16_TILES`): ATen's kernel gains little from bf16 on
CPUs without AMX, the tiled path is 1.1-2x faster than it there. fp32/fp64 stay on ATen; fp16 is
computed in fp32 on CPUs without AMX-FP16 (:data:`FP16_UPCAST`), where fp16 GEMMs are emulated.

Other devices (CUDA without Triton, MPS, ...) take :func:`generic_forward`: public APIs only
(``F.scaled_dot_product_attention`` over ``[valid memory; segment]`` with a boolean mask,
gradients by autograd, LSE by a chunked matmul only when asked for).

Masks are cached in a small LRU bounded in bytes (see :data:`_MASK_CACHE`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._validate import OpDims
from .torch_tiled import TileConfig, tiled_backward, tiled_forward

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Byte-bounded mask cache
# --------------------------------------------------------------------------------------------
class _MaskCache:
    """LRU cache of small masks, bounded in bytes; masks above ``max_entry_bytes`` are not kept."""

    def __init__(self, max_bytes: int, max_entry_bytes: int):
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._store: "OrderedDict[tuple, Optional[torch.Tensor]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(t: Optional[torch.Tensor]) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    def get(self, key: tuple, build) -> Optional[torch.Tensor]:
        """The cached value for ``key``, else ``build()`` (kept only if small enough)."""
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                return self._store[key]
        value = build()
        size = self._size(value)
        if size <= self.max_entry_bytes:
            with self._lock:
                if key not in self._store:
                    self._store[key] = value
                    self._bytes += size
                while self._bytes > self.max_bytes or len(self._store) > 256:
                    _, old = self._store.popitem(last=False)
                    self._bytes -= self._size(old)
        return value

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self._bytes = 0


_MASK_CACHE = _MaskCache(max_bytes=16 << 20, max_entry_bytes=4 << 20)

#: Tile sizes of the bf16 CPU path (:mod:`dsmr_kernels.torch_tiled`); ``None`` sends bf16 through
#: ATen's flash kernel like the other dtypes. The tiled path is 1.1-2x faster in bf16 on CPUs without
#: AMX (bench/results/op.md). fp16 is never tiled: CPU fp16 GEMMs are far slower than fp32 ones (see below).
BF16_TILES: Optional[TileConfig] = TileConfig()

#: fp16 on the CPU: compute in fp32 and round the output (and gradients) back to fp16. Without
#: AMX-FP16, CPU fp16 GEMMs are emulated: ATen's fp16 kernel ran 2x (forward) and 6x (forward +
#: backward) slower than its fp32 kernel at S=512, M=4096. Off where the CPU has AMX-FP16.
FP16_UPCAST: bool = not (hasattr(torch.cpu, "_is_amx_fp16_supported") and torch.cpu._is_amx_fp16_supported())


def mask_cache_nbytes() -> int:
    """Bytes currently held by this module's mask cache (bounded by ``_MASK_CACHE.max_bytes``)."""
    return _MASK_CACHE.nbytes


def _segment_window_mask(S: int, window: Optional[int], device) -> Optional[torch.Tensor]:
    """Additive ``(S, S)`` window mask for the segment part (causality is the kernel's own).

    None when the window covers the whole segment (``window >= S``).
    """
    if window is None or window >= S:
        return None

    def build():
        i = torch.arange(S, device=device)
        far = (i[:, None] - i[None, :]) >= window
        return torch.zeros(S, S, device=device).masked_fill_(far, _NEG_INF)

    return _MASK_CACHE.get(("seg", S, window, str(device)), build)


def _segment_fold_mask(S: int, window: Optional[int], groups: int, dtype, device) -> Optional[torch.Tensor]:
    """Additive ``(G*S, S)`` causal (+ window) mask for the segment part with GQA folded into rows.

    Returned only when it fits the cache (it is rebuilt on every call otherwise; the caller then
    repeats the segment keys instead and uses the kernel's own causal path).
    """
    mask_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    if groups * S * S * torch.finfo(mask_dtype).bits // 8 > _MASK_CACHE.max_entry_bytes:
        return None

    def build():
        i = torch.arange(S, device=device)
        d = i[:, None] - i[None, :]
        hidden = d < 0 if window is None else (d < 0) | (d >= window)
        mask = torch.zeros(S, S, dtype=mask_dtype, device=device).masked_fill_(hidden, _NEG_INF)
        return mask.repeat(groups, 1)

    return _MASK_CACHE.get(("segfold", S, window, groups, mask_dtype, str(device)), build)


def _band_mask(R: int, W: int, window: Optional[int], groups: int, device) -> Optional[torch.Tensor]:
    """Additive ``(G*R, W)`` mask for the memory band: query row ``i < R`` over the newest ``W`` slots.

    Slot ``t`` of the band (absolute ``M - W + t``) is seen by query ``i`` (absolute ``M + i``) iff
    ``i + W - t < window``. None when every row sees every slot.
    """
    if window is None or R + W <= window:
        return None

    def build():
        i = torch.arange(R, device=device)[:, None]
        t = torch.arange(W, device=device)[None, :]
        mask = torch.zeros(R, W, device=device).masked_fill_(i + W - t >= window, _NEG_INF)
        return mask.repeat(groups, 1) if groups > 1 else mask

    return _MASK_CACHE.get(("band", R, W, window, groups, str(device)), build)


# --------------------------------------------------------------------------------------------
# Plan: which lanes read how much memory
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
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
    tiles: Optional[TileConfig] = None  # set: the bf16 tiled path (torch_tiled) runs this call


def _visible_lens(B: int, M: int, mem_len: Optional[torch.Tensor], window: Optional[int]) -> List[int]:
    """Per lane, how many of the newest memory slots some query can see (one host read of mem_len)."""
    lens = [M] * B if mem_len is None else [int(x) for x in mem_len.tolist()]
    if window is not None:
        lens = [min(n, window - 1) for n in lens]  # older slots are outside every query's window
    return lens


def _make_plan(dims: OpDims, mem_len: Optional[torch.Tensor], scale: float, window: Optional[int],
               dtype: torch.dtype) -> _Plan:
    B, S, M = dims.B, dims.S, dims.M
    R = S if window is None else min(S, window - 1)
    runs: List[Tuple[int, int, int]] = []
    lens = [0] * B
    if M > 0 and B > 0 and R > 0:
        lens = _visible_lens(B, M, mem_len, window)
        b0 = 0
        for b in range(1, B + 1):
            if b == B or lens[b] != lens[b0]:
                if lens[b0] > 0:
                    runs.append((b0, b, lens[b0]))
                b0 = b
    tiles = BF16_TILES if dtype == torch.bfloat16 and B > 0 else None
    return _Plan(B, dims.H, dims.Hkv, S, M, dims.D, dims.groups, scale, window, R, tuple(runs), tuple(lens), tiles)


# --------------------------------------------------------------------------------------------
# CPU path (ATen flash kernel)
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_forward(q, k, v, mem_k, mem_v, plan: _Plan):
    """No-grad forward: returns ``out`` (q.dtype) and ``lse`` (fp32; fp64 for fp64 input)."""
    p = plan
    qc = _unit_stride(q)
    out, lse = _flash_cpu(
        qc, _repeat_heads(k, p.G), _repeat_heads(v, p.G), 0.0, True,
        attn_mask=_segment_window_mask(p.S, p.window, q.device), scale=p.scale,
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
            attn_mask=_band_mask(R, L, p.window, p.G, q.device), scale=p.scale,
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


def _cpu_backward(g, q, k, v, mem_k, mem_v, out, lse, plan: _Plan, need_q: bool, need_kv: bool):
    p = plan
    B, H, Hkv, S, D, G = p.B, p.H, p.Hkv, p.S, p.D, p.G
    g = _unit_stride(g)
    qc = _unit_stride(q)
    out = _unit_stride(out)
    acc = _acc_dtype(q.dtype)
    fold_mask = None
    if G > 1 and B * Hkv >= torch.get_num_threads():
        fold_mask = _segment_fold_mask(S, p.window, G, q.dtype, q.device)
    if fold_mask is not None:
        # Folded GQA: one (G*S)-row slab per kv head. The kernel's backward tiles queries by
        # 256 rows from 768 rows up (64 below), which bf16 GEMMs need to be fast; it runs one
        # task per (lane, head), hence the thread-count condition above.
        dq, dk, dv = _flash_cpu_backward(
            _fold(g, Hkv), _fold(qc, Hkv), _unit_stride(k), _unit_stride(v), _fold(out, Hkv),
            _fold(lse, Hkv), 0.0, False, attn_mask=fold_mask, scale=p.scale,
        )
        dq = dq.reshape(B, H, S, D)
    else:
        dq, dk, dv = _flash_cpu_backward(
            g, qc, _repeat_heads(k, G), _repeat_heads(v, G), out, lse, 0.0, True,
            attn_mask=_segment_window_mask(S, p.window, q.device), scale=p.scale,
        )
        if need_kv and G > 1:
            dk = dk.reshape(B, Hkv, G, S, D).sum(2, dtype=acc).to(q.dtype)
            dv = dv.reshape(B, Hkv, G, S, D).sum(2, dtype=acc).to(q.dtype)
    if need_q and p.runs:
        R, M = p.R, p.M
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
                attn_mask=_band_mask(R, L, p.window, G, q.device), scale=p.scale,
            )
            dq[b0:b1, :, :R].add_(dq_m.reshape(nb, H, R, D))  # half types: summed in fp32, rounded once
    return (dq if need_q else None), (dk if need_kv else None), (dv if need_kv else None)


def _cpu_forward_any(q, k, v, mem_k, mem_v, plan: _Plan):
    if plan.tiles is not None:
        return tiled_forward(q, k, v, mem_k, mem_v, list(plan.lens), plan.M, plan.scale, plan.window,
                             _MASK_CACHE, plan.tiles)
    return _cpu_forward(q, k, v, mem_k, mem_v, plan)


class _SegmentMemoryAttentionCPU(torch.autograd.Function):
    """Autograd wrapper: forward and backward by ATen's CPU flash kernels, LSE non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, plan):
        out, lse = _cpu_forward_any(q, k, v, mem_k, mem_v, plan)
        ctx.save_for_backward(q, k, v, mem_k, mem_v, out, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, mem_k, mem_v, out, lse = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0]
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        p = ctx.plan
        if p.tiles is not None:
            dq, dk, dv = tiled_backward(grad_out, q, k, v, mem_k, mem_v, out, lse, list(p.lens), p.M, p.scale,
                                        p.window, _MASK_CACHE, need_q, need_kv, p.tiles)
        else:
            dq, dk, dv = _cpu_backward(grad_out, q, k, v, mem_k, mem_v, out, lse, p, need_q, need_kv)
        dk = dk if ctx.needs_input_grad[1] else None
        dv = dv if ctx.needs_input_grad[2] else None
        return dq, dk, dv, None, None, None


# --------------------------------------------------------------------------------------------
# Generic path (any device, public APIs only)
# --------------------------------------------------------------------------------------------
def _sdpa(q, keys, vals, mask, scale, G):
    if G > 1:
        try:
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5: no enable_gqa
            keys, vals = keys.repeat_interleave(G, dim=1), vals.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)


def generic_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: Optional[torch.Tensor],
    mem_v: Optional[torch.Tensor],
    mem_len: Optional[torch.Tensor],
    scale: float,
    window: Optional[int],
    dims: OpDims,
    need_lse: bool = True,
):
    """Device-agnostic path: one ``F.scaled_dot_product_attention`` over ``[valid memory; segment]``.

    Memory is cut to the newest ``Lmax`` slots any lane can use (with a window, at most
    ``window - 1``); slots invalid for a shorter lane are zeroed (they may hold NaN) and masked.
    Gradients flow through autograd. The LSE (no gradient) is a chunked matmul + logsumexp,
    computed only when ``need_lse``; otherwise None is returned in its place.
    """
    B, H, Hkv, S, M, D, G = dims.B, dims.H, dims.Hkv, dims.S, dims.M, dims.D, dims.groups
    dev = q.device
    if B == 0:
        lse = torch.empty(0, H, S, dtype=_acc_dtype(q.dtype), device=dev) if need_lse else None
        return q.new_empty(0, H, S, D) + 0 * (q.sum() + k.sum() + v.sum()), lse
    lens = _visible_lens(B, M, mem_len, window) if M > 0 else None
    L = 0 if lens is None else max(lens)
    if L > 0:
        mk, mv = mem_k[:, :, M - L:], mem_v[:, :, M - L:]
        eff = torch.tensor(lens, device=dev)
        j = torch.arange(L, device=dev)
        if min(lens) < L:
            valid = (j[None, :] >= (L - eff)[:, None])[:, None, :, None]  # (B, 1, L, 1)
            mk = torch.where(valid, mk, torch.zeros((), dtype=mk.dtype, device=dev))
            mv = torch.where(valid, mv, torch.zeros((), dtype=mv.dtype, device=dev))
        keys, vals = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)
    else:
        keys, vals = k, v
    i = torch.arange(S, device=dev)[:, None]
    jj = torch.arange(L + S, device=dev)[None, :]
    vis = jj <= L + i
    if window is not None:
        vis = vis & (L + i - jj < window)
    vis = vis[None, None]  # (1, 1, S, L+S)
    if L > 0 and min(lens) < L:
        vis = vis & (jj >= (L - eff)[:, None])[:, None, None, :]  # (B, 1, S, L+S)
    out = _sdpa(q, keys, vals, None if bool(vis.all()) else vis, scale, G)
    if not need_lse:
        return out, None
    acc = _acc_dtype(q.dtype)
    with torch.no_grad():
        kf = keys.detach().to(acc)[:, :, None]  # (B, Hkv, 1, L+S, D)
        qf = q.detach().reshape(B, Hkv, G, S, D)
        lse = torch.empty(B, Hkv, G, S, dtype=acc, device=dev)
        rows = max(1, (16 << 20) // max(1, B * H * (L + S)))  # ~64 MB of fp32 scores per chunk
        for r0 in range(0, S, rows):
            r1 = min(S, r0 + rows)
            s = torch.matmul(qf[:, :, :, r0:r1].to(acc), kf.transpose(-1, -2)) * scale
            s = s.masked_fill(~vis[:, :, None, r0:r1], _NEG_INF)
            lse[:, :, :, r0:r1] = torch.logsumexp(s, dim=-1)
    return out, lse.reshape(B, H, S)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def torch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: Optional[torch.Tensor],
    mem_v: Optional[torch.Tensor],
    mem_len: Optional[torch.Tensor],
    scale: float,
    window: Optional[int],
    dims: OpDims,
    need_lse: bool = True,
):
    """Returns ``(out (B, H, S, D) in q.dtype, lse (B, H, S) fp32)``; differentiable in q, k, v.

    ``lse`` is fp64 for fp64 input. ``need_lse=False`` lets the generic (non-CPU) path skip the
    LSE, which it must compute separately (None is returned then); the CPU path gets it for free.
    """
    if q.device.type != "cpu":
        return generic_forward(q, k, v, mem_k, mem_v, mem_len, scale, window, dims, need_lse)
    if mem_k is not None and dims.M == 0:
        mem_k = mem_v = None
    plan = _make_plan(dims, mem_len, scale, window, q.dtype)
    if q.dtype == torch.float16 and FP16_UPCAST:
        # Computed in fp32 (see FP16_UPCAST) on the visible memory slots only: the newest max(lens),
        # which the plan's per-lane runs read from the right end whatever M is. .float() is
        # differentiable, so gradients come back to q, k, v as fp16.
        L = max(plan.lens, default=0)
        mem_k, mem_v = (mem_k[:, :, plan.M - L:].float(), mem_v[:, :, plan.M - L:].float()) if L else (None, None)
        out, lse = _cpu_apply(q.float(), k.float(), v.float(), mem_k, mem_v, replace(plan, M=L))
        return out.to(torch.float16), lse
    return _cpu_apply(q, k, v, mem_k, mem_v, plan)


def _cpu_apply(q, k, v, mem_k, mem_v, plan: _Plan):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SegmentMemoryAttentionCPU.apply(q, k, v, mem_k, mem_v, plan)
    return _cpu_forward_any(q, k, v, mem_k, mem_v, plan)
