"""Public entry point: ``segment_memory_attention`` with one ``backend=`` switch."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ._validate import TRITON_DTYPES, TRITON_HEAD_DIMS, validate_inputs
from .reference import segment_memory_attention_ref

BACKENDS = ("auto", "torch", "triton", "reference")


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported (it may still need a GPU or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    head_dim: Optional[int] = None,
) -> str:
    """Map ``"auto"`` to a concrete backend for a call on ``device`` in ``dtype`` with ``head_dim``.

    ``auto`` picks Triton only for CUDA tensors the kernels support (head dim 16/32/64/128;
    fp16, bf16, fp32) when Triton is importable; everything else -- other head dims such as 80 or
    96, float64, CPU, ``mps`` and other devices -- takes the torch path (the fused CPU kernels
    on CPU, public SDPA elsewhere), so a config that runs on CPU also runs on a GPU.
    An explicit backend is returned as is (and raises later if it cannot run the call).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type != "cuda" or not triton_importable():
        return "torch"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return "torch"
    if head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
        return "torch"
    return "triton"


def segment_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: Optional[torch.Tensor] = None,
    mem_v: Optional[torch.Tensor] = None,
    mem_len: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention of a segment over itself (causal) and over a right-aligned recurrent KV memory.

    Key index space is ``[0, M + S)``: memory slots first, then the segment. Query ``i`` sees key
    ``j`` iff the slot is valid, ``j <= M + i`` (bottom-right causal) and, with a window,
    ``M + i - j < window``. Example, M = 3 with mem_len = 2, S = 3 (1 = visible)::

                    mem  mem  mem | seg0 seg1 seg2
        query 0:     0    1    1  |  1    0    0
        query 1:     0    1    1  |  1    1    0
        query 2:     0    1    1  |  1    1    1

    Args:
        q: ``(B, H, S, D)`` queries.
        k, v: ``(B, Hkv, S, D)`` segment keys/values, ``H % Hkv == 0`` (GQA when Hkv < H).
        mem_k, mem_v: ``(B, Hkv, M, D)`` memory, newest slot at index ``M - 1``; must not require
            grad (memory is detached state). None for no memory.
        mem_len: ``(B,)`` int tensor, valid slots per lane in ``[0, M]``; None = all valid.
        scale: softmax scale, default ``D ** -0.5``.
        window: optional sliding-window length (>= 1).
        backend: ``"auto"`` (Triton for CUDA tensors whose dtype and head dim the kernels support,
            when importable; else torch), ``"torch"``
            (fused CPU/any-device path), ``"triton"`` (GPU kernels; CPU only under
            ``TRITON_INTERPRET=1``) or ``"reference"``.
        return_lse: also return the log-sum-exp ``(B, H, S)`` in fp32 (no gradient flows through
            it in the fused backends).

    Returns:
        ``out`` ``(B, H, S, D)`` in q's dtype, or ``(out, lse)``. Gradients flow to q, k, v.
    """
    if isinstance(q, torch.Tensor):
        chosen = resolve_backend(backend, q.device, q.dtype, q.shape[-1] if q.dim() > 0 else None)
    else:  # validation below names the problem
        chosen = resolve_backend(backend, torch.device("cpu"))
    if chosen == "reference":
        return segment_memory_attention_ref(
            q, k, v, mem_k, mem_v, mem_len, scale=scale, window=window, return_lse=return_lse
        )
    dims = validate_inputs(q, k, v, mem_k, mem_v, mem_len, window)
    scale = dims.D ** -0.5 if scale is None else float(scale)
    if chosen == "torch":
        from .torch_backend import torch_forward

        out, lse = torch_forward(q, k, v, mem_k, mem_v, mem_len, scale, window, dims, need_lse=return_lse)
    else:
        if not triton_importable():
            raise ValueError('backend="triton" needs the triton package: pip install "dsmr[triton]"')
        from .triton_attention import triton_attention

        out, lse = triton_attention(q, k, v, mem_k, mem_v, mem_len, scale, window, dims)
    return (out, lse) if return_lse else out
