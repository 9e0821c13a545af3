"""The torch backend's internals: the CPU split-KV path and the generic (non-CPU) path.

``test_op.py`` covers the public op over a full grid; these tests pin what that grid does not:
the generic path (run here on CPU tensors, since no GPU is assumed), B = 0, the LSE, lanes with
different ``mem_len`` under a window, garbage in invalid slots (forward *and* backward), the
byte-bounded mask cache, and that no copy of the memory is kept for backward.
"""
import itertools

import pytest
import torch

from dsmr_kernels import DSMRAttention, segment_memory_attention, segment_memory_attention_ref
from dsmr_kernels import torch_backend as tb
from dsmr_kernels._validate import validate_inputs
from dsmr_kernels.testing import assert_close_to_golden, forward_backward, make_inputs, max_err


def _to(t, dtype):
    return None if t is None else t.detach().to(dtype)


def _generic(q, k, v, mem_k, mem_v, mem_len, *, window=None, return_lse=False):
    dims = validate_inputs(q, k, v, mem_k, mem_v, mem_len, window)
    out, lse = tb.generic_forward(q, k, v, mem_k, mem_v, mem_len, dims.D ** -0.5, window, dims)
    return (out, lse) if return_lse else out


def _torch_op(*args, **kw):
    return segment_memory_attention(*args, backend="torch", **kw)


def _check_against_golden(fn, dtype, B, H, Hkv, S, M, D, window, mem_len=None, seed=0):
    """out/dq/dk/dv and lse of ``fn`` in ``dtype`` vs the reference in ``dtype``, both vs float64."""
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, torch.float64, mem_len=mem_len, seed=seed)
    do = torch.randn(B, H, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    gold = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, window=window)
    args = (_to(q, dtype), _to(k, dtype), _to(v, dtype), _to(mk, dtype), _to(mv, dtype), ml, do.to(dtype))
    ref = forward_backward(segment_memory_attention_ref, *args, window=window)
    fast = forward_backward(fn, *args, window=window)
    for name, f, r, g, factor in zip(["out", "dq", "dk", "dv"], fast, ref, gold, [2, 3, 3, 3]):
        assert f.dtype == dtype and f.shape == g.shape
        assert_close_to_golden(name, f, r, g, factor, dtype)
    _, gl = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)
    _, rl = segment_memory_attention_ref(*args[:6], window=window, return_lse=True)
    _, fl = fn(*args[:6], window=window, return_lse=True)
    assert fl.shape == (B, H, S) and fl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_golden("lse", fl, rl, gl, 2, dtype)


# ------------------------------------------------------------------------------------------
# The generic (non-CPU) path, exercised on CPU tensors
# ------------------------------------------------------------------------------------------
GENERIC_CASES = list(
    itertools.product(
        [1, 3],  # B (B = 3 gets mem_len [0, M/2, M])
        [4, 2, 1],  # Hkv (H = 4)
        [1, 17],  # S
        [0, 5, 40],  # M
        [None, 1, 8, 24],  # window
    )
)


@pytest.mark.parametrize("B,Hkv,S,M,window", GENERIC_CASES)
def test_generic_path_matches_reference_fp32(B, Hkv, S, M, window):
    _check_against_golden(_generic, torch.float32, B, 4, Hkv, S, M, 16, window, seed=B * 100 + S + M)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("window", [None, 6])
def test_generic_path_matches_reference_other_dtypes(dtype, window):
    _check_against_golden(_generic, dtype, 3, 4, 2, 9, 20, 16, window, mem_len=[20, 3, 11])


# ------------------------------------------------------------------------------------------
# The CPU path: cases the op grid does not reach
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "mem_len,window",
    [
        ([0, 2, 7, 30, 30, 30], 8),  # lanes below, at and above the band (window - 1 = 7)
        ([30, 30, 0, 0, 12, 12], 8),  # runs of equal lanes -> one kernel call per run
        ([3, 29, 30, 1, 0, 17], 40),  # window longer than S + memory of some lanes
        ([3, 29, 30, 1, 0, 17], 1),  # a query sees only itself
        ([3, 29, 30, 1, 0, 17], None),
    ],
)
def test_cpu_path_per_lane_mem_len_with_window(dtype, mem_len, window):
    _check_against_golden(_torch_op, dtype, 6, 4, 2, 11, 30, 16, window, mem_len=mem_len)


@pytest.mark.parametrize("window", [None, 5, 64])
def test_cpu_path_float64_is_exact(window):
    """In float64 the split-KV merge must agree with the reference to round-off."""
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 13, 21, 8, torch.float64, mem_len=[21, 0, 9])
    do = torch.randn(3, 4, 13, 8, dtype=torch.float64)
    a = forward_backward(_torch_op, q, k, v, mk, mv, ml, do, window=window)
    b = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, window=window)
    for x, y in zip(a, b):
        assert max_err(x, y) < 1e-12


def test_cpu_path_gradcheck():
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 5, 6, 4, torch.float64, mem_len=[6, 2])
    for window in (None, 3):
        fn = lambda q, k, v: _torch_op(q, k, v, mk, mv, ml, window=window)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_cpu_path_strided_inputs_and_grad_out():
    """The ATen kernel silently misreads a last dim with stride != 1; the backend must not pass one."""
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 9, 7, 16, torch.float64, mem_len=[7, 4], requires_grad=False)
    odd = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    qs, ks, vs, mks, mvs = (odd(t).float() for t in (q, k, v, mk, mv))
    qs, ks, vs = (odd(t).requires_grad_(True) for t in (qs, ks, vs))
    assert qs.stride(-1) != 1 and mks.stride(-1) != 1
    out = _torch_op(qs, ks, vs, mks, mvs, ml, window=5)
    out.sum().backward()  # grad_out is an expanded (all-zero-stride) tensor
    qd, kd, vd = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = segment_memory_attention_ref(qd, kd, vd, mk, mv, ml, window=5)
    ref.sum().backward()
    assert max_err(out, ref) < 1e-5
    for a, b in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert max_err(a, b) < 1e-5


def test_cpu_path_grad_for_some_inputs_only():
    q, k, v, mk, mv, ml = make_inputs(2, 4, 1, 6, 5, 8, torch.float64, mem_len=[5, 1], requires_grad=False)
    k = k.clone().requires_grad_(True)
    _torch_op(q, k, v, mk, mv, ml).sum().backward()
    kd = k.detach().clone().requires_grad_(True)
    segment_memory_attention_ref(q, kd, v, mk, mv, ml).sum().backward()
    assert max_err(k.grad, kd.grad) < 1e-12


# ------------------------------------------------------------------------------------------
# Both paths
# ------------------------------------------------------------------------------------------
PATHS = {"cpu": _torch_op, "generic": _generic}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("with_memory", [False, True])
def test_empty_batch(path, with_memory):
    q, k, v, mk, mv, ml = make_inputs(0, 4, 2, 5, 6 if with_memory else 0, 8, torch.float32)
    if with_memory:
        ml = torch.zeros(0, dtype=torch.long)
    out, lse = PATHS[path](q, k, v, mk, mv, ml, window=3, return_lse=True)
    assert out.shape == (0, 4, 5, 8) and out.dtype == torch.float32
    assert lse.shape == (0, 4, 5) and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("window", [None, 4])
def test_return_lse(path, window):
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 7, 9, 8, torch.float64, requires_grad=False)
    ro, rl = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)
    args = [t.float() for t in (q, k, v, mk, mv)]
    out, lse = PATHS[path](*args, ml, window=window, return_lse=True)
    assert lse.shape == (3, 4, 7) and lse.dtype == torch.float32
    assert max_err(lse, rl) < 1e-5 and max_err(out, ro) < 1e-5
    # no memory at all, and memory given but every lane empty: the LSE is the segment's alone
    for mem in ((None, None, None), (mk.float(), mv.float(), torch.zeros(3, dtype=torch.long))):
        _, l0 = PATHS[path](*args[:3], *mem, window=window, return_lse=True)
        _, r0 = segment_memory_attention_ref(q, k, v, window=window, return_lse=True)
        assert max_err(l0, r0) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("window", [None, 3, 7])
def test_garbage_in_invalid_slots_reaches_neither_output_nor_grads(path, window, dtype):
    lens = [0, 3, 8, 5]
    q, k, v, mk, mv, ml = make_inputs(4, 4, 2, 6, 8, 8, dtype, mem_len=lens, requires_grad=False)
    do = torch.randn(4, 4, 6, 8).to(dtype)
    clean = forward_backward(PATHS[path], q, k, v, mk, mv, ml, do, window=window)
    mk2, mv2 = mk.clone(), mv.clone()
    for b, n in enumerate(lens):
        mk2[b, :, : 8 - n] = float("nan")
        mv2[b, :, : 8 - n] = float("inf")
        mk2[b, 0, : 8 - n] = 1e30
    dirty = forward_backward(PATHS[path], q, k, v, mk2, mv2, ml, do, window=window)
    for name, a, c in zip(["out", "dq", "dk", "dv"], clean, dirty):
        assert torch.isfinite(c).all(), name
        assert torch.equal(a, c), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 5])
def test_torch_backend_on_cuda_matches_reference(window):
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 9, 12, 16, torch.float32, device="cuda", mem_len=[12, 0, 7])
    do = torch.randn_like(q)
    fast = forward_backward(_torch_op, q, k, v, mk, mv, ml, do, window=window)
    ref = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, window=window)
    for a, b in zip(fast, ref):
        assert max_err(a, b) < 1e-4


# ------------------------------------------------------------------------------------------
# Memory: bounded mask cache, no copies of the memory kept for backward
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 48])
def test_full_history_streaming_keeps_mask_cache_bounded(window):
    """A full-history layer sees a new memory length every segment; the cache must not follow it."""
    tb._MASK_CACHE.clear()
    attn = DSMRAttention(64, 4, 2, horizon=None, window=window, backend="torch")
    state = attn.init_state(3)
    x = torch.randn(3, 32, 64)
    for seg in range(40):
        if seg == 15:
            state = state.reset([1])  # lanes now disagree on mem_len
        with torch.no_grad():
            _, state = attn(x, state)
    assert state.capacity == 40 * 32
    if window is None:
        assert tb.mask_cache_nbytes() == 0  # without a window no mask is needed at all
    else:
        assert tb.mask_cache_nbytes() < 64 << 10
    assert tb.mask_cache_nbytes() <= tb._MASK_CACHE.max_bytes


def test_mask_cache_is_bounded_in_bytes():
    cache = tb._MaskCache(max_bytes=1 << 20, max_entry_bytes=256 << 10)
    for n in range(1, 400):
        t = cache.get(("x", n), lambda n=n: torch.zeros(n * 64))  # n * 256 bytes
        assert t.numel() == n * 64
        assert cache.nbytes <= cache.max_bytes
    calls = []
    cache.get(("x", 399), lambda: calls.append(1))
    assert not calls  # the most recent entry is still cached
    big = cache.get(("big",), lambda: torch.zeros(1 << 20))  # 4 MiB: returned, never kept
    assert big.numel() == 1 << 20 and cache.nbytes <= cache.max_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 6])
def test_backward_keeps_no_copy_of_the_memory(window, dtype):
    """Saved-for-backward tensors: views of the inputs, plus out and lse; nothing of size M."""
    B, H, Hkv, S, M, D = 4, 4, 2, 8, 256, 16
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, dtype, mem_len=[0, 80, 170, 256])
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, mk, mv)}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            extra.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _torch_op(q, k, v, mk, mv, ml, window=window)
    out_bytes = out.numel() * out.element_size()
    lse_bytes = B * H * S * 4
    assert sum(extra) <= out_bytes + lse_bytes
    out.sum().backward()


@pytest.mark.parametrize("threads", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_backward_folded_and_repeated_gqa(threads, dtype, monkeypatch):
    """The segment backward folds GQA heads when B * Hkv >= threads, else repeats the keys."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the heuristic reads
    monkeypatch.setattr(tb, "BF16_TILES", None)  # bf16 through ATen's kernel too
    _check_against_golden(_torch_op, dtype, 2, 8, 2, 33, 20, 16, None, mem_len=[20, 7])
    _check_against_golden(_torch_op, dtype, 2, 8, 2, 33, 20, 16, 9, mem_len=[20, 7])


# ------------------------------------------------------------------------------------------
# The bf16 tiled path (torch_tiled): default for bf16 on the CPU
# ------------------------------------------------------------------------------------------
TILED_CASES = list(
    itertools.product(
        [(8, 16, 1 << 22), (5, 7, 64)],  # (rows, cols, tile_elems): many tiles; 64 also splits lane groups
        [4, 1],  # Hkv (H = 4)
        [17, 64],  # S
        [5, 100],  # M (B = 3 lanes read [0, M/2, M] slots)
        [None, 1, 24],  # window
    )
)


@pytest.mark.parametrize("tiles,Hkv,S,M,window", TILED_CASES)
def test_tiled_bf16_path_with_small_tiles(tiles, Hkv, S, M, window, monkeypatch):
    """Small tiles force multi-tile online softmax, several row blocks, edge masks and lane groups."""
    from dsmr_kernels.torch_tiled import TileConfig

    monkeypatch.setattr(tb, "BF16_TILES", TileConfig(*tiles))
    _check_against_golden(_torch_op, torch.bfloat16, 3, 4, Hkv, S, M, 16, window, seed=S + M)


@pytest.mark.parametrize("window", [None, 200])
def test_tiled_bf16_path_default_tiles_medium_shape(window):
    """Default tiles on a shape that needs two row blocks and two memory tiles (S = 300, M = 700)."""
    _check_against_golden(_torch_op, torch.bfloat16, 2, 4, 2, 300, 700, 64, window, mem_len=[700, 333])


def test_tiled_bf16_path_is_the_default_and_can_be_turned_off(monkeypatch):
    from dsmr_kernels import torch_tiled

    calls = []
    real = torch_tiled.tiled_forward
    monkeypatch.setattr(tb, "tiled_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 9, 6, 16, torch.bfloat16, requires_grad=False)
    a = _torch_op(q, k, v, mk, mv, ml)
    assert len(calls) == 1
    _torch_op(q.float(), k.float(), v.float(), mk.float(), mv.float(), ml)
    _torch_op(q.half(), k.half(), v.half(), mk.half(), mv.half(), ml)
    assert len(calls) == 1  # fp32 and fp16 stay on ATen's kernel
    monkeypatch.setattr(tb, "BF16_TILES", None)
    b = _torch_op(q, k, v, mk, mv, ml)
    assert len(calls) == 1
    assert max_err(a, b) < 0.05  # same op through two paths, each within bf16 rounding


def test_tiled_lane_groups_respect_the_tile_budget():
    from dsmr_kernels.torch_tiled import _lane_groups

    assert list(_lane_groups([5, 5, 5, 0, 0, 5], per_lane=10, budget=20)) == [
        (0, 2, 5), (2, 3, 5), (3, 5, 0), (5, 6, 5)
    ]
    assert list(_lane_groups([3, 3], per_lane=100, budget=10)) == [(0, 1, 3), (1, 2, 3)]  # never split a lane


def test_tiled_tiles_cover_exactly_the_visible_keys():
    """Every visible (row, key) pair of a row block is in exactly one tile, unmasked; nothing else is."""
    from dsmr_kernels.torch_tiled import _tiles

    for L, S, window, rows, cols in [(7, 9, None, 4, 3), (20, 11, 6, 5, 4), (0, 8, 3, 3, 2), (3, 5, 1, 2, 2)]:
        for r0 in range(0, S, rows):
            r1 = min(S, r0 + rows)
            seen = torch.zeros(r1 - r0, L + S, dtype=torch.int32)
            for t in _tiles(L, r0, r1, window, cols):
                assert t.part == ("mem" if t.j1 <= L else "seg") and (t.j0 >= L) == (t.part == "seg")
                i = torch.arange(r1 - r0)[:, None]
                c = torch.arange(t.j1 - t.j0)[None, :]
                vis = torch.ones(r1 - r0, t.j1 - t.j0, dtype=torch.bool)
                if t.d is not None:
                    vis = (c - i) <= t.d
                    if window is not None:
                        vis &= (i - c + t.d) < window
                seen[:, t.j0:t.j1] += vis.int()
            i = torch.arange(r0, r1)[:, None]
            j = torch.arange(L + S)[None, :]
            want = j <= L + i
            if window is not None:
                want &= (L + i - j) < window
            assert torch.equal(seen, want.int()), (L, S, window, rows, cols, r0)


def test_tiled_workspace_is_reused_bounded_and_releasable(monkeypatch):
    from dsmr_kernels import torch_tiled
    from dsmr_kernels.torch_tiled import TileConfig

    monkeypatch.setattr(tb, "BF16_TILES", TileConfig(8, 16, 1 << 10))
    torch_tiled.release_workspaces()
    assert torch_tiled.workspace_nbytes() == 0
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 20, 50, 16, torch.bfloat16)
    _torch_op(q, k, v, mk, mv, ml).sum().backward()
    held = torch_tiled.workspace_nbytes()
    # forward: one bf16 + one fp32 buffer, backward: two of each; one tile of one lane (4 x 8 x 16
    # entries) exceeds the 1024-entry budget, so a group is a single lane
    assert held == 4 * 8 * 16 * (2 + 4) + 4 * 8 * 16 * 2 * (2 + 4)
    _torch_op(q, k, v, mk, mv, ml).sum().backward()
    assert torch_tiled.workspace_nbytes() == held  # reused, not re-allocated per call
    torch_tiled.release_workspaces()
    assert torch_tiled.workspace_nbytes() == 0


# ------------------------------------------------------------------------------------------
# fp16 on the CPU: computed in fp32 unless the CPU has AMX-FP16
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 5])
def test_fp16_is_computed_in_fp32_and_returned_in_fp16(window, monkeypatch):
    monkeypatch.setattr(tb, "FP16_UPCAST", True)
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 9, 12, 16, torch.float16, mem_len=[12, 0, 7])
    do = torch.randn(3, 4, 9, 16).to(torch.float16)
    fast = forward_backward(_torch_op, q, k, v, mk, mv, ml, do, window=window)
    f32 = forward_backward(_torch_op, *(_to(t, torch.float32) for t in (q, k, v, mk, mv)), ml,
                           do.float(), window=window)
    for a, b in zip(fast, f32):
        assert a.dtype == torch.float16
        assert torch.equal(a, b.to(torch.float16))  # exactly the fp32 result, rounded once
    out, lse = _torch_op(q, k, v, mk, mv, ml, window=window, return_lse=True)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("upcast", [True, False])
def test_fp16_paths_match_reference(upcast, monkeypatch):
    monkeypatch.setattr(tb, "FP16_UPCAST", upcast)
    _check_against_golden(_torch_op, torch.float16, 3, 4, 2, 17, 30, 16, None, mem_len=[30, 0, 11])
    _check_against_golden(_torch_op, torch.float16, 3, 4, 1, 17, 30, 16, 6, mem_len=[30, 0, 11])
