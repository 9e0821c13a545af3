"""Triton backend of ``segment_memory_attention``: the ``autograd.Function`` and its entry point.

Layering (as in flash-attention): private launchers in ``triton_fwd.py`` / ``triton_bwd.py`` ->
``_SegmentMemoryAttention`` (saves only q, k, v, out, LSE plus the detached memory) ->
``triton_attention``, called by ``interface.segment_memory_attention(..., backend="triton")``.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is
imported); that is how CI tests them.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ._validate import TRITON_DTYPES as SUPPORTED_DTYPES
from ._validate import TRITON_HEAD_DIMS as SUPPORTED_HEAD_DIMS
from ._validate import OpDims
from .triton_bwd import attention_backward
from .triton_common import INTERPRETING, LN2
from .triton_decode import decode_forward
from .triton_fwd import attention_forward

#: No-grad calls with at most this many queries per lane run the split-KV decode kernel.
DECODE_MAX_S = 16



def _check_supported(q: torch.Tensor, dims: OpDims) -> None:
    """Raise ``ValueError`` for what validation allows but these kernels do not."""
    if dims.D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"q head dim {dims.D} is not supported by backend='triton' (supported: {SUPPORTED_HEAD_DIMS}); "
            "use backend='torch' or pad the head dim"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"backend='triton' supports float16, bfloat16 and float32, got q.dtype {q.dtype}; "
            "for float64 use backend='torch' or segment_memory_attention_ref"
        )
    if q.device.type == "cpu" and not INTERPRETING:
        raise ValueError(
            "backend='triton' got CPU tensors but TRITON_INTERPRET=1 was not set before dsmr_kernels "
            "was imported; move the tensors to a GPU or use backend='torch'"
        )


def _on_device_of(t: torch.Tensor):
    """Triton launches on the *current* CUDA device; make that the tensors' device (e.g. cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class _SegmentMemoryAttention(torch.autograd.Function):
    """Fused forward/backward; gradients for q, k, v only (memory is detached state)."""

    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, mem_len32, scale, window_eff, dims):
        with _on_device_of(q):
            out, lse2 = attention_forward(q, k, v, mem_k, mem_v, mem_len32, scale, window_eff, dims)
        # The kernels keep the LSE in log2 units (exact for the backward's exp2); callers get ln.
        ctx.save_for_backward(q, k, v, out, lse2, mem_k, mem_v, mem_len32)
        ctx.scale, ctx.window_eff, ctx.dims = scale, window_eff, dims
        lse = lse2 * LN2
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse2, mem_k, mem_v, mem_len32 = ctx.saved_tensors
        with _on_device_of(q):
            dq, dk, dv = attention_backward(
                dout, q, k, v, mem_k, mem_v, mem_len32, out, lse2, ctx.scale, ctx.window_eff, ctx.dims
            )
        return dq, dk, dv, None, None, None, None, None, None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: Optional[torch.Tensor],
    mem_v: Optional[torch.Tensor],
    mem_len: Optional[torch.Tensor],
    scale: float,
    window: Optional[int],
    dims: OpDims,
):
    """Segment-memory attention with the Triton kernels; inputs already validated.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, Hkv, S, D)``; any strides.
        mem_k, mem_v: ``(B, Hkv, M, D)`` right-aligned memory, or None.
        mem_len: ``(B,)`` int tensor of valid memory slots, or None (all M valid).
        scale: softmax scale; window: sliding window or None; dims: ``OpDims`` of the call.

    Returns:
        ``out`` ``(B, H, S, D)`` in q's dtype (differentiable in q, k, v) and ``lse`` ``(B, H, S)``
        fp32 (no gradient). Calls that need no gradient with ``S <= DECODE_MAX_S`` (generation)
        run the split-KV decode kernel of ``triton_decode.py`` instead of the training kernels.
        ``mem_len`` values outside ``[0, M]`` are clamped by the kernels (the host check in
        ``_validate`` skips GPU tensors so that no call syncs with the device).
    """
    _check_supported(q, dims)
    M = dims.M if mem_k is not None else 0
    if mem_len is None or M == 0:
        mem_len32 = torch.full((dims.B,), M, dtype=torch.int32, device=q.device)
    else:
        mem_len32 = mem_len.to(device=q.device, dtype=torch.int32).contiguous()
    # No window == a window no query can reach past (distance <= M + S - 1); clamping also keeps
    # a huge user window inside int32.
    window_eff = M + dims.S if window is None else min(int(window), M + dims.S)
    if dims.S <= DECODE_MAX_S and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                    or v.requires_grad)):
        # Generation / evaluation: split-KV decode kernel (a (S, BLOCK_M) tile would be mostly
        # padding, and only B * H programs would stream all of the memory).
        with _on_device_of(q):
            out, lse2 = decode_forward(q, k, v, mem_k if M > 0 else None, mem_v if M > 0 else None, mem_len32,
                                       float(scale), window_eff, dims)
        return out, lse2 * LN2
    return _SegmentMemoryAttention.apply(
        q, k, v, mem_k if M > 0 else None, mem_v if M > 0 else None, mem_len32, float(scale), window_eff, dims
    )
