"""Test helpers shared by every kernel test: random op inputs and the error-ratio rule.

The rule (from flash-attention's tests): compare the fast path and the reference *in the same
dtype* against a float64 golden; the fast path's max error must be at most ``factor`` times the
reference's own error, plus a small dtype floor that covers ties when both are near zero.
"""
from __future__ import annotations

from typing import Optional

import torch

# Absolute floors per dtype: a few ulps at unit scale, so near-exact results never fail on ratio alone.
DTYPE_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def make_inputs(
    B: int,
    H: int,
    Hkv: int,
    S: int,
    M: int,
    D: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    mem_len: Optional[list] = None,
    requires_grad: bool = True,
    seed: int = 0,
):
    """Random ``(q, k, v, mem_k, mem_v, mem_len)``; memory is None when ``M == 0``.

    ``mem_len`` defaults to a spread of values in ``[0, M]`` (first lane 0 when B > 1, last M).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B, H, S, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    if M == 0:
        return q, k, v, None, None, None
    mem_k, mem_v = rnd(B, Hkv, M, D), rnd(B, Hkv, M, D)
    if mem_len is None:
        if B == 1:
            mem_len = [M]
        else:
            mem_len = [round(M * b / (B - 1)) for b in range(B)]  # 0 ... M
    ml = torch.tensor(mem_len, dtype=torch.int32, device=device)
    return q, k, v, mem_k, mem_v, ml


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference in float64 (on the CPU, so GPU results compare with CPU goldens)."""
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def assert_close_to_golden(
    name: str,
    fast: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    golden: torch.Tensor,
    factor: float,
    dtype: torch.dtype,
) -> None:
    """Assert ``err(fast) <= factor * err(ref) + floor(dtype)``, both errors against ``golden``."""
    fast_err = max_err(fast, golden)
    ref_err = max_err(ref_same_dtype, golden)
    bound = factor * ref_err + DTYPE_FLOOR[dtype]
    assert fast_err <= bound, (
        f"{name}: fast-path error {fast_err:.3e} exceeds {factor} x reference error {ref_err:.3e} "
        f"+ floor {DTYPE_FLOOR[dtype]:.1e} (dtype {dtype})"
    )


def forward_backward(fn, q, k, v, mem_k, mem_v, mem_len, do, **kw):
    """Run ``fn`` and backprop ``do``; return ``(out, dq, dk, dv)`` detached."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, mem_k, mem_v, mem_len, **kw)
    out.backward(do)
    return out.detach(), q.grad.detach(), k.grad.detach(), v.grad.detach()
