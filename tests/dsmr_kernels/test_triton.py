"""Triton backend vs the float64 golden, under TRITON_INTERPRET=1 (set in tests/conftest.py).

Rule (flash-attention's): the kernel's max error against the float64 reference must be at most
2x (output, LSE) / 3x (dq, dk, dv) the error of the reference run in the same dtype, plus a dtype
floor. The interpreter simulates every program in numpy, so instead of the full product of the
axes we run a covering set in which every value of every axis appears, crossed pairwise-ish with
the others.
"""
import os

import pytest
import torch

from dsmr_kernels import segment_memory_attention, segment_memory_attention_ref
from dsmr_kernels import triton_common
from dsmr_kernels.testing import assert_close_to_golden, forward_backward, make_inputs

# On a machine with a CUDA GPU, `TRITON_INTERPRET=0 pytest tests/dsmr_kernels` runs the compiled
# kernels on the GPU; inputs and goldens stay on the CPU and only the Triton call moves to DEVICE.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _on_device(*args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def _triton(*args, **kw):
    """The Triton op on DEVICE; outputs come back to the CPU (autograd carries grads across)."""
    res = segment_memory_attention(*_on_device(*args), backend="triton", **kw)
    return tuple(r.cpu() for r in res) if isinstance(res, tuple) else res.cpu()


H = 4
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (dtype, B, Hkv, S, M, window, D, mem_len)
# mem_len: "spread" = make_inputs' default (B=3 lanes get 0, M/2, M; B=1 gets M), "none" = pass
# None (all slots valid), or an explicit per-lane list.
CASES = [
    (F32, 1, 4, 1, 0, None, 16, "spread"),
    (F32, 3, 2, 17, 5, None, 64, "spread"),
    (F32, 3, 1, 64, 64, None, 16, "none"),
    (F32, 1, 4, 64, 100, None, 64, "spread"),
    (F32, 3, 4, 17, 100, 7, 16, [3, 100, 0]),
    (F32, 1, 1, 17, 64, 30, 64, "spread"),
    (F32, 3, 2, 64, 0, 20, 16, "spread"),
    (F32, 1, 2, 1, 5, 3, 64, "spread"),
    (F32, 3, 1, 1, 100, 50, 64, "spread"),
    (F32, 1, 4, 64, 100, 90, 64, [37]),
    # window=1: every row attends to itself only, so the reference's dS is exactly 0 while the
    # kernel's is rowsum(O*dO) - dO.V rounding (~ulp of |dP| ~ 20 at D=64), above the fp32 floor.
    # D=16 keeps |dP| near unit scale; the 16-bit cases cover window=1 at D=64.
    (F32, 3, 4, 64, 5, 1, 16, "spread"),
    (F32, 1, 1, 17, 0, None, 16, "spread"),
    (F16, 3, 4, 1, 5, None, 64, "spread"),
    (F16, 1, 2, 17, 64, None, 16, "spread"),
    (F16, 3, 1, 64, 100, None, 64, "spread"),
    (F16, 1, 4, 17, 0, None, 16, "spread"),
    (F16, 3, 2, 64, 64, 33, 64, "none"),
    (F16, 1, 1, 64, 5, 10, 16, "spread"),
    (F16, 3, 4, 1, 100, 60, 16, "spread"),
    (F16, 1, 2, 17, 100, 1, 64, "spread"),
    (F16, 3, 1, 17, 0, 5, 64, "spread"),
    (F16, 1, 4, 64, 64, 100, 16, "spread"),
    (F16, 3, 2, 1, 0, None, 16, "spread"),
    (F16, 1, 1, 64, 100, 64, 64, [0]),
    (BF16, 1, 4, 64, 5, None, 16, "spread"),
    (BF16, 3, 2, 1, 100, None, 64, "none"),
    (BF16, 1, 1, 17, 100, None, 64, "spread"),
    (BF16, 3, 4, 64, 0, None, 64, "spread"),
    (BF16, 1, 2, 64, 100, 16, 16, "spread"),
    (BF16, 3, 1, 17, 5, 4, 64, "spread"),
    (BF16, 1, 4, 1, 64, 2, 64, "spread"),
    (BF16, 3, 2, 17, 64, 70, 16, "spread"),
    (BF16, 1, 1, 1, 5, None, 16, "spread"),
    (BF16, 3, 4, 17, 100, 20, 16, [100, 0, 37]),
    (BF16, 1, 2, 64, 64, 1, 64, "spread"),
    (BF16, 3, 1, 64, 100, 130, 16, "spread"),
]


def _case_id(case):
    dtype, B, Hkv, S, M, window, D, ml = case
    ml_s = ml if isinstance(ml, str) else "-".join(map(str, ml))
    return f"{str(dtype)[6:]}-B{B}-Hkv{Hkv}-S{S}-M{M}-w{window}-D{D}-ml{ml_s}"


def _check_against_golden(dtype, B, Hkv, S, M, window, D, ml, seed=0):
    """Run triton, the same-dtype reference and the float64 golden; apply the error-ratio rule."""
    q, k, v, mem_k, mem_v, mem_len = make_inputs(
        B, H, Hkv, S, M, D, dtype=dtype, mem_len=ml if isinstance(ml, list) else None, seed=seed
    )
    if ml == "none":
        mem_len = None
    do = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)

    captured = {}

    def triton_fn(*args, **kw):
        out, lse = _triton(*args, return_lse=True, **kw)
        captured["lse"] = lse
        return out

    fast = forward_backward(triton_fn, q, k, v, mem_k, mem_v, mem_len, do, window=window)
    ref = forward_backward(segment_memory_attention_ref, q, k, v, mem_k, mem_v, mem_len, do, window=window)

    def f64(t):
        return None if t is None else t.detach().double()

    golden = forward_backward(
        segment_memory_attention_ref, f64(q), f64(k), f64(v), f64(mem_k), f64(mem_v), mem_len, f64(do),
        window=window,
    )
    assert fast[0].dtype == dtype and fast[0].shape == (B, H, S, D)
    for name, f, r, g, factor in zip(("out", "dq", "dk", "dv"), fast, ref, golden, (2, 3, 3, 3)):
        assert torch.isfinite(f).all(), f"{name} has non-finite values"
        assert_close_to_golden(name, f, r, g, factor, dtype)

    lse = captured["lse"]
    assert lse.dtype == torch.float32 and lse.shape == (B, H, S)
    assert not lse.requires_grad
    with torch.no_grad():
        _, lse_ref = segment_memory_attention_ref(q, k, v, mem_k, mem_v, mem_len, window=window, return_lse=True)
        _, lse_gold = segment_memory_attention_ref(
            f64(q), f64(k), f64(v), f64(mem_k), f64(mem_v), mem_len, window=window, return_lse=True
        )
    assert_close_to_golden("lse", lse, lse_ref, lse_gold, 2, dtype)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64_golden(case):
    _check_against_golden(*case)


# Several query and key blocks per sequence with unequal block sizes (BLOCK_M != BLOCK_N, as GPU
# autotune configs use): exercises the unmasked segment blocks, the window-edge ranges and the
# dK/dV query-block loop, which 64-wide interpreter blocks never reach at S <= 64.
SMALL_BLOCKS = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 16},
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 16},
}


@pytest.mark.parametrize(
    "case",
    [
        (F32, 3, 2, 130, 77, None, 32, "spread"),
        (F32, 2, 1, 97, 45, 40, 16, [45, 13]),
        (BF16, 3, 4, 113, 100, 50, 32, "spread"),
        (F16, 1, 2, 70, 21, None, 128, "spread"),
    ],
    ids=_case_id,
)
def test_many_blocks_small_unequal_tiles(case, monkeypatch):
    monkeypatch.setattr(triton_common, "INTERPRET_META", SMALL_BLOCKS)
    _check_against_golden(*case)


def test_noncontiguous_inputs_and_grad():
    """q/k/v from a (B, S, H, D) transpose, memory sliced out of a wider tensor, strided dO."""
    B, Hkv, S, M, D = 2, 2, 19, 23, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2)  # (B, H, S, D), non-contiguous
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    mem_k = torch.randn(B, Hkv, M, 2 * D, generator=g)[..., ::2]  # stride 2 along D
    mem_v = torch.randn(B, Hkv, M, 2 * D, generator=g)[..., :D]
    mem_len = torch.tensor([M, 7])
    do = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or mem_k.is_contiguous() or do.is_contiguous())

    fast = forward_backward(_triton, q, k, v, mem_k, mem_v, mem_len, do, window=11)
    ref = forward_backward(
        segment_memory_attention_ref, q.contiguous(), k.contiguous(), v.contiguous(),
        mem_k.contiguous(), mem_v.contiguous(), mem_len, do.contiguous(), window=11,
    )
    for name, f, r in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5, msg=f"{name} differs")

    # out.sum().backward() hands the kernel a stride-0 (expanded) dO.
    qq = q.detach().clone().requires_grad_(True)
    _triton(qq, k, v, mem_k, mem_v, mem_len).sum().backward()
    qr = q.detach().clone().requires_grad_(True)
    segment_memory_attention_ref(qr, k, v, mem_k, mem_v, mem_len).sum().backward()
    torch.testing.assert_close(qq.grad, qr.grad, atol=1e-5, rtol=1e-5)


def test_unsupported_head_dim_raises():
    q, k, v, mem_k, mem_v, mem_len = make_inputs(1, H, 2, 5, 3, 24)
    with pytest.raises(ValueError, match=r"head dim 24.*16, 32, 64, 128"):
        _triton(q, k, v, mem_k, mem_v, mem_len)


def test_float64_raises():
    q, k, v, mem_k, mem_v, mem_len = make_inputs(1, H, 2, 5, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float64.*backend='torch'"):
        segment_memory_attention(q, k, v, mem_k, mem_v, mem_len, backend="triton")
