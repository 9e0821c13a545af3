"""What dsmr relies on in ATen's CPU flash kernel, pinned so that a torch upgrade that changes it is noticed.

``cpu_flash`` calls ``_scaled_dot_product_flash_attention_for_cpu`` with additive masks. The kernel
checks the mask dtype against the query's for most pairs, but silently accepts an fp32 mask with
fp64 q/k/v and then computes garbage (torch 2.13: output errors ~1, on every ATen capability).
``cpu_flash.mask_dtype`` therefore gives fp64 queries fp64 masks. These tests run the kernel alone
(no dsmr code in the call) against a float64 brute force.
"""
import math

import pytest
import torch

from dsmr_kernels.cpu_flash import mask_dtype

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Round-off of the kernel in each dtype on this problem (O(1) values, 21 keys): the bound the
# pinned "works" cases must meet, far below the ~1 errors of the broken pairing.
_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _problem(qdt, B=1, H=2, S=13, L=21, D=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (S, L, L))
    i, j = torch.arange(S)[:, None], torch.arange(L)[None]
    hidden = j > i + (L - S)  # bottom-right causal: every row sees at least one key
    bias = torch.zeros(S, L, dtype=torch.float64).masked_fill(hidden, float("-inf"))
    return q, k, v, bias


def _brute(q, k, v, bias):
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, -1)
    return p @ v


@pytest.mark.parametrize("qdt", [torch.float64, torch.float32, torch.bfloat16])
def test_mask_in_dsmr_dtype_is_exact_forward_and_backward(qdt):
    q, k, v, bias = _problem(qdt)
    qd, kd, vd = (t.to(qdt) for t in (q, k, v))
    m = bias.to(mask_dtype(qdt))
    out, lse = _flash(qd, kd, vd, 0.0, False, attn_mask=m)
    assert (out.double() - _brute(q, k, v, bias)).abs().max().item() < _TOL[qdt]
    go = torch.randn_like(q)
    dq, dk, dv = _flash_bwd(go.to(qdt), qd, kd, vd, out, lse, 0.0, False, attn_mask=m)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    _brute(qq, kk, vv, bias).backward(go)
    for got, want in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        assert (got.double() - want).abs().max().item() < 4 * _TOL[qdt]


@pytest.mark.parametrize("qdt,mdt", [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, torch.float64), (torch.float64, torch.bfloat16)])
def test_other_mismatches_raise(qdt, mdt):
    q, k, v, bias = _problem(qdt)
    with pytest.raises(RuntimeError, match="mask"):
        _flash(q.to(qdt), k.to(qdt), v.to(qdt), 0.0, False, attn_mask=bias.to(mdt))


def test_fp64_query_with_fp32_mask_is_still_silently_wrong():
    """The pairing ``mask_dtype`` exists for. If this starts to pass through exactly (ATen fixed
    it) or to raise, the workaround can go: update this pin and ``cpu_flash.mask_dtype``."""
    q, k, v, bias = _problem(torch.float64)
    out, _ = _flash(q, k, v, 0.0, False, attn_mask=bias.float())
    err = (out - _brute(q, k, v, bias)).abs().max().item()
    assert err > 1e-3, f"ATen now computes fp64 q with an fp32 mask correctly (error {err:.1e})"
