"""Input checks shared by every backend of ``segment_memory_attention``.

Each check raises ``ValueError`` naming the argument and saying what to do, in the spirit of
FlexAttention's ``_validate_*`` helpers. All backends call :func:`validate_inputs` so the rules
(and their messages) live in exactly one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What the Triton kernels compile for; ``backend="auto"`` sends anything else to the torch path.
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Check ``mem_len``'s range for GPU tensors too (a host sync per call; for debugging).
#: Set ``DSMR_CHECK_MEM_LEN=1`` or assign this attribute.
CHECK_DEVICE_MEM_LEN: bool = os.environ.get("DSMR_CHECK_MEM_LEN", "0") == "1"


@dataclass(frozen=True)
class OpDims:
    """Sizes of one call: B lanes, H query heads, Hkv kv heads, S segment, M memory, D head dim."""

    B: int
    H: int
    Hkv: int
    S: int
    M: int
    D: int

    @property
    def groups(self) -> int:
        return self.H // self.Hkv


def _check_rank4(name: str, t: torch.Tensor, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dims {layout}, got shape {tuple(t.shape)}; "
            "if you have (B, S, H, D), transpose dims 1 and 2 first"
        )


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: Optional[torch.Tensor],
    mem_v: Optional[torch.Tensor],
    mem_len: Optional[torch.Tensor],
    window: Optional[int],
) -> OpDims:
    """Check shapes, dtypes, devices and ranges; return the call's sizes.

    Raises ``ValueError`` with a message that names the offending argument.
    """
    _check_rank4("q", q, "(B, H, S, D)")
    _check_rank4("k", k, "(B, Hkv, S, D)")
    _check_rank4("v", v, "(B, Hkv, S, D)")
    B, H, S, D = q.shape
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move them to one device")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch {Bk} but q has batch {B}")
    if Sk != S:
        raise ValueError(f"k has segment length {Sk} but q has {S}; q, k and v cover the same segment")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} but q has {D}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"q has {H} heads, which is not a multiple of the {Hkv} kv heads of k/v; "
            "use n_kv_heads that divides n_heads"
        )
    if S < 1:
        raise ValueError("q has segment length 0; pass at least one query")
    if D < 1:
        raise ValueError("head dim D must be >= 1")

    if (mem_k is None) != (mem_v is None):
        raise ValueError("pass both mem_k and mem_v, or neither")
    M = 0
    if mem_k is not None:
        _check_rank4("mem_k", mem_k, "(B, Hkv, M, D)")
        _check_rank4("mem_v", mem_v, "(B, Hkv, M, D)")
        if mem_k.shape != mem_v.shape:
            raise ValueError(
                f"mem_k and mem_v must have the same shape, got {tuple(mem_k.shape)} and {tuple(mem_v.shape)}"
            )
        Bm, Hm, M, Dm = mem_k.shape
        if Bm != B or Hm != Hkv or Dm != D:
            raise ValueError(
                f"mem_k has shape {tuple(mem_k.shape)} but must be (B={B}, Hkv={Hkv}, M, D={D}) to match k"
            )
        for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
            if t.dtype != q.dtype:
                raise ValueError(f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype}; cast the memory")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move the memory")
            if t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but recurrent memory is detached state by design; "
                    f"pass {name}.detach()"
                )

    if mem_len is not None:
        if not isinstance(mem_len, torch.Tensor):
            raise ValueError(f"mem_len must be an int tensor of shape (B,), got {type(mem_len).__name__}")
        if mem_len.dim() != 1 or mem_len.shape[0] != B:
            raise ValueError(f"mem_len must have shape (B,) = ({B},), got {tuple(mem_len.shape)}")
        if mem_len.dtype.is_floating_point or mem_len.dtype == torch.bool or mem_len.is_complex():
            raise ValueError(f"mem_len must be an integer tensor, got {mem_len.dtype}")
        if mem_len.device != q.device:
            raise ValueError(f"mem_len is on {mem_len.device} but q is on {q.device}")
        # Reading values back is a device-to-host sync: per layer per step on a GPU, illegal under
        # CUDA-graph capture and a graph break for torch.compile. So the range is checked on the
        # host only for CPU tensors (or on request); the Triton kernels clamp mem_len to [0, M].
        if B > 0 and (mem_len.device.type == "cpu" or CHECK_DEVICE_MEM_LEN):
            lo, hi = int(mem_len.min()), int(mem_len.max())
            if lo < 0 or hi > M:
                raise ValueError(
                    f"mem_len values must lie in [0, M] = [0, {M}], got min {lo} and max {hi}"
                )

    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (a query always sees itself), got {window}")
    return OpDims(B, H, Hkv, S, M, D)
