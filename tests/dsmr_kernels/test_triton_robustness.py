"""Triton backend: garbage in invalid memory slots, and query groups larger than 4.

Invalid memory slots (``[0, M - mem_len)`` of each lane) hold whatever an earlier piece or a
spare buffer left there; NaN, inf or 1e30 in them must reach neither the output nor any
gradient (the torch paths are held to the same rule in test_torch_backend.py). Grouped-query
attention with H = 8 query heads on one key/value head (the most compressed KV state) is checked
against the float64 golden with the error-ratio rule of ``dsmr_kernels.testing``.

Runs under TRITON_INTERPRET=1 (tests/conftest.py); small shapes, the interpreter is slow.
"""
import os

import pytest
import torch

from dsmr_kernels import segment_memory_attention, segment_memory_attention_ref
from dsmr_kernels import triton_common
from dsmr_kernels.testing import assert_close_to_golden, forward_backward, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Several key blocks per row, the first memory block only partly valid: the block-skipping and
# the edge masks both meet the garbage.
SMALL_BLOCKS = {
    "fwd": {"BLOCK_M": 16, "BLOCK_N": 16},
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 16},
    "dq": {"BLOCK_M": 16, "BLOCK_N": 16},
}


def _triton(*args, **kw):
    """The Triton op on DEVICE; outputs come back to the CPU (autograd carries grads across)."""
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    res = segment_memory_attention(*args, backend="triton", **kw)
    return tuple(r.cpu() for r in res) if isinstance(res, tuple) else res.cpu()


def _f64(t):
    return None if t is None else t.detach().double()


@pytest.mark.parametrize("small_blocks", [False, True], ids=["interp-blocks", "16-blocks"])
@pytest.mark.parametrize("dtype,window", [(F32, None), (BF16, 9), (F16, None)], ids=str)
def test_garbage_in_invalid_slots_reaches_neither_output_nor_grads(dtype, window, small_blocks, monkeypatch):
    if small_blocks:
        monkeypatch.setattr(triton_common, "INTERPRET_META", SMALL_BLOCKS)
    B, H, Hkv, S, M, D = 4, 4, 2, 11, 37, 16
    lens = [0, 5, M, 20]
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, dtype, mem_len=lens, requires_grad=False, seed=4)
    do = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    clean = forward_backward(_triton, q, k, v, mk, mv, ml, do, window=window)
    mk2, mv2 = mk.clone(), mv.clone()
    for b, n in enumerate(lens):
        mk2[b, :, : M - n] = float("nan")
        mv2[b, :, : M - n] = float("inf")
        mk2[b, 0, : M - n] = 1e30 if dtype != F16 else 6e4  # huge but finite: would win a softmax
    dirty = forward_backward(_triton, q, k, v, mk2, mv2, ml, do, window=window)
    for name, c, d in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.isfinite(d).all(), f"{name}: garbage in invalid slots leaked as non-finite values"
        assert torch.equal(c, d), f"{name}: garbage in invalid slots changed the result"
    # and the clean result is right (so equality above is not two equally wrong runs)
    ref = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, window=window)
    gold = forward_backward(segment_memory_attention_ref, _f64(q), _f64(k), _f64(v), _f64(mk), _f64(mv), ml,
                            _f64(do), window=window)
    for name, f, r, g, factor in zip(("out", "dq", "dk", "dv"), clean, ref, gold, (2, 3, 3, 3)):
        assert_close_to_golden(name, f, r, g, factor, dtype)


GROUP_CASES = [
    # (H, Hkv, dtype, B, S, M, window, mem_len)
    (8, 1, F32, 2, 17, 23, None, [23, 9]),
    (8, 1, F32, 1, 40, 0, 13, None),
    (8, 1, BF16, 2, 17, 23, 30, [0, 23]),
    (8, 1, F16, 2, 9, 70, None, [64, 3]),
    (8, 2, BF16, 2, 9, 70, 20, [70, 0]),
    (8, 2, F32, 1, 17, 23, None, [11]),
    (6, 1, F32, 2, 9, 23, 5, [0, 23]),
    (6, 1, F16, 1, 17, 70, None, None),
]


def _group_id(case):
    H, Hkv, dtype, B, S, M, window, ml = case
    return f"H{H}-Hkv{Hkv}-{str(dtype)[6:]}-B{B}-S{S}-M{M}-w{window}-ml{ml}".replace(" ", "")


@pytest.mark.parametrize("H,Hkv,dtype,B,S,M,window,ml", GROUP_CASES, ids=[_group_id(c) for c in GROUP_CASES])
def test_large_query_groups_match_float64_golden(H, Hkv, dtype, B, S, M, window, ml):
    D = 16
    q, k, v, mk, mv, mlen = make_inputs(B, H, Hkv, S, M, D, dtype=dtype, mem_len=ml, seed=H + Hkv)
    do = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    captured = {}

    def triton_fn(*args, **kw):
        out, lse = _triton(*args, return_lse=True, **kw)
        captured["lse"] = lse
        return out

    fast = forward_backward(triton_fn, q, k, v, mk, mv, mlen, do, window=window)
    ref = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, mlen, do, window=window)
    gold = forward_backward(segment_memory_attention_ref, _f64(q), _f64(k), _f64(v), _f64(mk), _f64(mv), mlen,
                            _f64(do), window=window)
    assert fast[2].shape == (B, Hkv, S, D)  # dk summed over the group, not per query head
    for name, f, r, g, factor in zip(("out", "dq", "dk", "dv"), fast, ref, gold, (2, 3, 3, 3)):
        assert torch.isfinite(f).all(), f"{name} has non-finite values"
        assert_close_to_golden(name, f, r, g, factor, dtype)
    with torch.no_grad():
        _, lse_ref = segment_memory_attention_ref(q, k, v, mk, mv, mlen, window=window, return_lse=True)
        _, lse_gold = segment_memory_attention_ref(_f64(q), _f64(k), _f64(v), _f64(mk), _f64(mv), mlen,
                                                   window=window, return_lse=True)
    assert_close_to_golden("lse", captured["lse"], lse_ref, lse_gold, 2, dtype)


@pytest.mark.parametrize("small_blocks", [False, True], ids=["interp-blocks", "16-blocks"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype,window", [(F32, None), (BF16, 5), (F16, None)], ids=str)
def test_nonfinite_values_follow_the_reference_rule(dtype, window, bad, small_blocks, monkeypatch):
    """An output row is non-finite iff its query or a key/value row it sees is (the reference's rule).

    A bad *future* value row inside the diagonal block, or one past a window edge, must not poison
    rows that cannot see it through 0 * NaN in P @ V; rows that see it must turn non-finite."""
    if small_blocks:
        monkeypatch.setattr(triton_common, "INTERPRET_META", SMALL_BLOCKS)
    B, H, Hkv, S, M, D = 2, 2, 1, 21, 9, 16
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, dtype, mem_len=[M, 4], requires_grad=False, seed=6)
    v[0, 0, 13, 2] = bad  # a future value for rows 0..12 of lane 0, inside their diagonal block
    v[1, 0, 3, 0] = bad  # lane 1: seen by rows 3.. (and, with a window, only by rows 3..7)
    mv[1, 0, 8, 1] = bad  # lane 1's newest valid memory slot
    ref, ref_lse = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)
    out, lse = _triton(q, k, v, mk, mv, ml, window=window, return_lse=True)
    want = ~torch.isfinite(ref).all(-1)
    assert want.any() and not want.all()
    assert torch.equal(~torch.isfinite(out).all(-1), want)
    assert torch.equal(~torch.isfinite(lse), ~torch.isfinite(ref_lse))
    ok = ~want[..., None].expand_as(out)
    tol = 1e-5 if dtype == F32 else 2e-2
    assert (out[ok].double() - ref[ok].double()).abs().max().item() < tol
