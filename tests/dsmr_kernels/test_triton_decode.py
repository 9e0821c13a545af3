"""Split-KV decode kernel vs the float64 golden, under TRITON_INTERPRET=1 (set in tests/conftest.py).

Same rule as test_triton.py: the kernel's max error against the float64 reference must be at most
2x the error of the reference run in the same dtype (output and LSE), plus a dtype floor. The
interpreter's default blocks give one split per 128 memory slots; most cases patch 16-slot
splits and 16-wide key blocks so a small memory is cut into many splits that the combine merges.
"""
import os

import pytest
import torch

from dsmr_kernels import segment_memory_attention_ref, triton_decode
from dsmr_kernels._validate import validate_inputs
from dsmr_kernels.testing import assert_close_to_golden, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
LN2 = 0.6931471805599453
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
H = 8


@pytest.fixture
def small_splits(monkeypatch):
    """16-slot splits of 16-wide key blocks: M = 200 becomes 13 splits, M = 37 three."""
    monkeypatch.setattr(triton_decode, "SPLIT_ALIGN", 16)
    monkeypatch.setattr(triton_decode, "INTERPRET_META", {"decode": {"BLOCK_N": 16}, "combine": {"BLOCK_RC": 16}})


def _decode(q, k, v, mem_k, mem_v, mem_len, window=None):
    """``decode_forward`` with the argument conventions of ``triton_attention``; returns (out, lse)."""
    dims = validate_inputs(q, k, v, mem_k, mem_v, mem_len, window)
    M = dims.M
    if mem_len is None or M == 0:
        mem_len32 = torch.full((dims.B,), M, dtype=torch.int32)
    else:
        mem_len32 = mem_len.to(torch.int32)
    window_eff = M + dims.S if window is None else min(window, M + dims.S)
    args = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (q, k, v, mem_k, mem_v, mem_len32)]
    with torch.no_grad():
        out, lse2 = triton_decode.decode_forward(*args, dims.D ** -0.5, window_eff, dims)
    return out.cpu(), lse2.cpu() * LN2


def _check(dtype, B, Hkv, S, M, window, D, mem_len, seed=0, garbage=False):
    """Kernel vs same-dtype reference vs float64 golden (error-ratio rule), output and LSE."""
    q, k, v, mem_k, mem_v, ml = make_inputs(
        B, H, Hkv, S, M, D, dtype=dtype, mem_len=mem_len, requires_grad=False, seed=seed
    )
    kmem, vmem = mem_k, mem_v
    if garbage and M > 0:
        # Invalid slots [0, M - mem_len) hold NaN/inf: the kernel must never let them through.
        kmem, vmem = mem_k.clone(), mem_v.clone()
        for b in range(B):
            n_bad = M - int(ml[b])
            kmem[b, :, :n_bad] = float("nan")
            vmem[b, :, :n_bad] = float("inf")
            kmem[b, :, :n_bad:3] = float("-inf")
    out, lse = _decode(q, k, v, kmem, vmem, ml, window)
    ref, lse_ref = segment_memory_attention_ref(q, k, v, mem_k, mem_v, ml, window=window, return_lse=True)

    def f64(t):
        return None if t is None else t.double()

    gold, lse_gold = segment_memory_attention_ref(
        f64(q), f64(k), f64(v), f64(mem_k), f64(mem_v), ml, window=window, return_lse=True
    )
    assert out.dtype == dtype and out.shape == (B, H, S, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, S)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close_to_golden("out", out, ref, gold, 2, dtype)
    assert_close_to_golden("lse", lse, lse_ref, lse_gold, 2, dtype)


# (dtype, B, Hkv, S, M, window, D, mem_len): every S, M, Hkv, dtype and head dim appears, crossed
# with windows that cut into the memory, the segment only, or nothing; per-lane mem_len incl. 0.
CASES = [
    (F32, 3, 8, 1, 0, None, 16, None),
    (F32, 3, 2, 1, 1, None, 32, [0, 1, 1]),
    (F32, 3, 1, 3, 37, None, 64, [37, 0, 20]),
    (F32, 3, 2, 3, 200, None, 16, [200, 0, 57]),
    (F32, 2, 1, 1, 200, 50, 32, [200, 120]),
    (F32, 2, 8, 3, 37, 2, 16, [30, 0]),
    # window 18 at S = 3: query 0 sees the key block [M - 16, M) whole, query 2 misses its first
    # slot, so that block must stay masked (unmasked blocks start where the last query's window does).
    (F32, 2, 2, 3, 200, 18, 32, [200, 90]),
    (F16, 3, 1, 1, 0, 1, 16, None),
    (F16, 3, 8, 3, 1, None, 64, [1, 0, 1]),
    (F16, 3, 2, 1, 37, 20, 128, [0, 37, 11]),
    (F16, 2, 1, 3, 200, None, 16, [199, 0]),
    (BF16, 2, 2, 3, 0, None, 32, None),
    (BF16, 3, 1, 1, 37, None, 16, [5, 37, 0]),
    (BF16, 3, 8, 1, 200, 100, 64, [200, 0, 150]),
    (BF16, 2, 2, 3, 200, 3, 16, [64, 200]),
]


def _case_id(case):
    dtype, B, Hkv, S, M, window, D, ml = case
    ml_s = "all" if ml is None else "-".join(map(str, ml))
    return f"{str(dtype)[6:]}-B{B}-Hkv{Hkv}-S{S}-M{M}-w{window}-D{D}-ml{ml_s}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_many_splits_match_float64_golden(case, small_splits):
    _check(*case)


@pytest.mark.parametrize(
    "case",
    [(F32, 2, 2, 1, 200, None, 32, [200, 37]), (BF16, 3, 1, 3, 37, 30, 64, [0, 37, 12])],
    ids=_case_id,
)
def test_default_blocks_match_float64_golden(case):
    """The launcher's own split choice and 64-wide interpreter blocks (masked and unmasked blocks)."""
    _check(*case)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_garbage_in_invalid_slots_never_reaches_output(dtype, small_splits):
    """NaN/inf in invalid memory slots, incl. a lane with mem_len 0 and splits entirely invalid."""
    _check(dtype, 3, 2, 3, 200, None, 16, [0, 150, 7], garbage=True)
    _check(dtype, 2, 8, 1, 37, 9, 32, [37, 3], garbage=True)


def test_rows_beyond_one_block(small_splits):
    """G * S = 8 * 9 = 72 rows > MAX_ROWS = 32: three row blocks per kv head; head 3's queries
    (rows 27..35) straddle the first two."""
    _check(F32, 2, 1, 9, 40, None, 16, [40, 17])
    _check(BF16, 1, 1, 9, 40, 5, 16, [33])


def test_noncontiguous_views(small_splits):
    """q from a (B, S, H, D) transpose, memory sliced out of wider tensors (strided D), k a view."""
    B, Hkv, S, M, D = 2, 2, 3, 45, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, Hkv, S, 2 * D, generator=g)[..., D:]
    mem_k = torch.randn(B, Hkv, M, 2 * D, generator=g)[..., ::2]
    mem_v = torch.randn(B, M + 5, Hkv, D, generator=g)[:, 5:].transpose(1, 2)
    mem_len = torch.tensor([M, 19])
    assert not any(t.is_contiguous() for t in (q, k, v, mem_k, mem_v))
    out, lse = _decode(q, k, v, mem_k, mem_v, mem_len, window=30)
    ref, lse_ref = segment_memory_attention_ref(
        q.contiguous(), k.contiguous(), v.contiguous(), mem_k.contiguous(), mem_v.contiguous(), mem_len,
        window=30, return_lse=True,
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_split_choice():
    """Splits fill ~2 programs per SM, are multiples of SPLIT_ALIGN and cover M exactly once."""
    align = triton_decode.SPLIT_ALIGN
    assert triton_decode.decode_splits(0, 64) == (1, align)
    for M in (1, 37, 127, 128, 129, 4096, 16384, 100_000):
        for programs in (1, 8, 64, 512):
            n, split_len = triton_decode.decode_splits(M, programs, sm_count=132)
            assert split_len % align == 0 and split_len >= align
            assert (n - 1) * split_len < M <= n * split_len
            want = -(-2 * 132 // programs)
            assert n <= want  # no more splits than needed to fill the GPU
            # Rounding split_len up to SPLIT_ALIGN may cost up to half the wanted splits; fewer
            # than that only when every split is already one SPLIT_ALIGN long.
            assert 2 * n >= want or n == -(-M // align)
    assert triton_decode.decode_splits(16384, 64, sm_count=132)[0] == 5  # 64 * 5 >= 264 programs
    assert triton_decode.decode_splits(16384, 512, sm_count=132)[0] == 1


def test_config_pruning_by_shared_memory():
    """Every kept config fits the limit; an impossible limit still leaves one config to launch."""
    configs = triton_decode.DECODE_CONFIGS
    for D, elem in ((16, 2), (64, 2), (128, 2), (128, 4)):
        for limit in (99 * 1024, 163 * 1024, 227 * 1024):
            kept = triton_decode.prune_decode_configs(configs, D, elem, 16, limit)
            assert kept and all(triton_decode.decode_smem_bytes(c, D, elem, 16) <= limit for c in kept)
    big = triton_decode.prune_decode_configs(configs, 128, 4, 32, 227 * 1024)
    small = triton_decode.prune_decode_configs(configs, 128, 4, 32, 99 * 1024)
    assert len(small) < len(big) <= len(configs)
    assert len(triton_decode.prune_decode_configs(configs, 128, 4, 32, 1)) == 1


def test_op_routes_no_grad_small_segments_to_the_decode_kernel(monkeypatch):
    """Generation-shaped calls (no grad, S <= DECODE_MAX_S) take the decode kernel; training calls do not."""
    from dsmr_kernels import segment_memory_attention, triton_attention

    calls = []
    real = triton_attention.decode_forward
    monkeypatch.setattr(triton_attention, "decode_forward", lambda *a: calls.append(a[-1].S) or real(*a))
    q, k, v, mem_k, mem_v, mem_len = make_inputs(2, 4, 2, 1, 37, 16, dtype=torch.float32, mem_len=[37, 5])
    with torch.no_grad():
        out, lse = segment_memory_attention(q, k, v, mem_k, mem_v, mem_len, backend="triton", return_lse=True)
        gold, gold_lse = segment_memory_attention_ref(q.double(), k.double(), v.double(), mem_k.double(),
                                                      mem_v.double(), mem_len, return_lse=True)
    assert calls == [1]
    assert (out.double() - gold).abs().max() < 1e-5 and (lse.double() - gold_lse).abs().max() < 1e-5
    segment_memory_attention(q, k, v, mem_k, mem_v, mem_len, backend="triton").sum().backward()
    assert calls == [1] and q.grad is not None  # grad mode: the differentiable kernels


def test_kernels_clamp_out_of_range_mem_len():
    """GPU calls skip the host range check, so the kernels clamp mem_len to [0, M] themselves."""
    from dsmr_kernels._validate import validate_inputs
    from dsmr_kernels.triton_attention import triton_attention

    q, k, v, mem_k, mem_v, _ = make_inputs(2, 4, 2, 3, 20, 16, dtype=torch.float32, requires_grad=False)
    dims = validate_inputs(q, k, v, mem_k, mem_v, None, None)
    wild = torch.tensor([27, -4], dtype=torch.int32)  # what an unchecked GPU tensor could hold
    clamped = torch.tensor([20, 0], dtype=torch.int32)
    gold = segment_memory_attention_ref(q.double(), k.double(), v.double(), mem_k.double(), mem_v.double(), clamped)
    for grad in (False, True):  # decode kernel, then the training forward
        with torch.set_grad_enabled(grad):
            out, _ = triton_attention(q.requires_grad_(grad), k, v, mem_k, mem_v, wild, 16 ** -0.5, None, dims)
        assert (out.detach().double() - gold).abs().max() < 1e-5
