"""The ``tiled`` bf16 CPU path (dsmr_kernels/cpu_tiled.py): flash-attention-2 in batched tiles."""
import itertools

import pytest
import torch

from dsmr_kernels import cpu_tiled, cpu_tiled_bwd
from dsmr_kernels.cpu_tiled import TileConfig, _lane_groups, _tiles
from dsmr_kernels.cpu_tiled_bwd import SEG_COLS
from dsmr_kernels.testing import make_inputs

from .cpu_helpers import check_against_golden, force_route, saved_bytes_beyond_inputs, torch_op
from .test_cpu_flash import PER_LANE_CASES

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
    force_route(monkeypatch, "tiled", tiles=TileConfig(*tiles))
    check_against_golden(torch_op, torch.bfloat16, 3, 4, Hkv, S, M, 16, window, seed=S + M)


@pytest.mark.parametrize("window", [None, 200])
def test_tiled_bf16_path_default_tiles_medium_shape(window, monkeypatch):
    """Default tiles on a shape that needs two row blocks and two memory tiles (S = 300, M = 700)."""
    force_route(monkeypatch, "tiled")
    check_against_golden(torch_op, torch.bfloat16, 2, 4, 2, 300, 700, 64, window, mem_len=[700, 333])


@pytest.mark.parametrize("mem_len,window", PER_LANE_CASES)
def test_tiled_per_lane_mem_len_with_window(mem_len, window, monkeypatch):
    force_route(monkeypatch, "tiled")
    check_against_golden(torch_op, torch.bfloat16, 6, 4, 2, 11, 30, 16, window, mem_len=mem_len)


@pytest.mark.parametrize("window", [None, 6])
def test_tiled_backward_keeps_no_copy_of_the_memory(window, monkeypatch):
    """Saved-for-backward tensors: views of the inputs, plus out and lse; nothing of size M.

    (The memory tiles' probabilities the forward keeps for the backward are bounded by
    ``TileConfig.keep_bytes``: see the two tests below.)"""
    force_route(monkeypatch, "tiled")
    B, H, Hkv, S, M, D = 4, 4, 2, 8, 256, 16
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, torch.bfloat16, mem_len=[0, 80, 170, 256])
    extra, out = saved_bytes_beyond_inputs(torch_op, q, k, v, mk, mv, ml, window=window)
    assert extra <= out.numel() * out.element_size() + B * H * S * 4
    out.sum().backward()


def test_tiled_lane_groups_respect_the_tile_budget():
    assert list(_lane_groups([5, 5, 5, 0, 0, 5], per_lane=10, budget=20)) == [
        (0, 2, 5), (2, 3, 5), (3, 5, 0), (5, 6, 5)
    ]
    assert list(_lane_groups([3, 3], per_lane=100, budget=10)) == [(0, 1, 3), (1, 2, 3)]  # never split a lane


def test_tiled_tiles_cover_exactly_the_visible_keys():
    """Every visible (row, key) pair of a row block is in exactly one tile, unmasked; nothing else is."""
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
    force_route(monkeypatch, "tiled", tiles=TileConfig(8, 16, 1 << 10))
    cpu_tiled.release_workspaces()
    assert cpu_tiled.workspace_nbytes() == 0
    B, H, Hkv, S, M, D = 3, 4, 2, 20, 50, 16
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, torch.bfloat16)
    torch_op(q, k, v, mk, mv, ml).sum().backward()
    held = cpu_tiled.workspace_nbytes()
    # forward: one bf16 + one fp32 buffer of one tile of one lane (4 x 8 x 16 entries exceed the
    # 1024-entry budget, so a group is a single lane)
    fwd = H * 8 * 16 * (2 + 4)
    # backward: two bf16 + two fp32 score buffers of one lane's row block (the budget allows
    # 1024 // (4 * 128) = 2 rows x 128 keys, SEG_COLS), plus (rows or keys) x D scratch slabs:
    # q and [dO, -delta] rows (GQA copies), a dq part, k keys and a dk/dv part
    rows = (1 << 10) // (H * SEG_COLS)
    bwd = H * rows * SEG_COLS * 2 * (2 + 4)
    keys = max(16, min(SEG_COLS, S))  # the widest key tile: memory tiles are 16 wide, the segment's 20
    slabs = 2 * (H * rows * D + H * rows * (D + 2) + H * rows * D + Hkv * keys * D + Hkv * keys * D)
    assert held == fwd + bwd + slabs
    torch_op(q, k, v, mk, mv, ml).sum().backward()
    assert cpu_tiled.workspace_nbytes() == held  # reused, not re-allocated per call
    cpu_tiled.release_workspaces()
    assert cpu_tiled.workspace_nbytes() == 0


@pytest.mark.parametrize("window", [None, 3, 30])
def test_backward_key_tiles_cover_exactly_the_visible_pairs(window):
    """Every visible (row, key) pair is in exactly one (tile, row block); the rows of each block all
    see some key of its tile, and the tiles respect their widths and the row-block cap."""
    from dsmr_kernels.cpu_tiled_bwd import _key_tiles

    for L, S, cols, seg_cols, max_rows in [(40, 30, 16, 8, 7), (0, 9, 4, 2, 100), (5, 12, 3, 5, 1)]:
        seen = torch.zeros(S, L + S, dtype=torch.int32)
        for part, j0, j1, ra, rb in _key_tiles(L, S, window, cols, seg_cols, max_rows):
            assert (part == "mem") == (j1 <= L) and j1 - j0 <= (cols if part == "mem" else seg_cols)
            assert 0 < rb - ra <= max_rows
            i = torch.arange(ra, rb)[:, None]
            j = torch.arange(j0, j1)[None, :]
            vis = j <= L + i
            if window is not None:
                vis &= (L + i - j) < window
            assert vis.any(1).all()  # no row of the block is wasted
            seen[ra:rb, j0:j1] += vis.int()
        i = torch.arange(S)[:, None]
        j = torch.arange(L + S)[None, :]
        want = j <= L + i
        if window is not None:
            want &= (L + i - j) < window
        assert torch.equal(seen, want.int()), (L, S, window)


def test_tiled_backward_row_blocks_match_one_block(monkeypatch):
    """A lane above the tile budget is split into row blocks; gradients agree with one block."""
    from dsmr_kernels.testing import forward_backward

    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 40, 30, 16, torch.bfloat16, mem_len=[30, 9])
    do = torch.randn(2, 4, 40, 16).to(torch.bfloat16)
    force_route(monkeypatch, "tiled", tiles=TileConfig(256, 512, 1 << 22))
    one = forward_backward(torch_op, q, k, v, mk, mv, ml, do, window=17)
    force_route(monkeypatch, "tiled", tiles=TileConfig(256, 512, 4 * 128 * 3))  # 3 rows per block
    many = forward_backward(torch_op, q, k, v, mk, mv, ml, do, window=17)
    for a, b in zip(one[1:], many[1:]):
        assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()


@pytest.mark.parametrize("window", [None, 200])
def test_tiled_backward_reuses_the_forwards_memory_probabilities(window, monkeypatch):
    """With kept probabilities the memory tiles skip the Q K^T GEMM + exp2 (fewer ``_probs``
    calls), and out / grads stay within the golden tolerances; without them every tile recomputes."""
    calls = []
    real = cpu_tiled_bwd._probs
    monkeypatch.setattr(cpu_tiled_bwd, "_probs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    counts = {}
    for keep_bytes in (32 << 20, 0):
        calls.clear()
        force_route(monkeypatch, "tiled", tiles=TileConfig(keep_bytes=keep_bytes))
        check_against_golden(torch_op, torch.bfloat16, 2, 4, 2, 300, 700, 64, window, mem_len=[700, 333])
        counts[keep_bytes] = len(calls)
    # lane 0: 700 slots = 2 memory tiles, lane 1: 333 = 1: all reused. With a window only the first
    # window - 1 rows see memory, so the backward's row slab is not the kept one: it recomputes.
    mem_tiles = 3 if window is None else 0
    assert counts[0] - counts[32 << 20] == mem_tiles


def test_kept_probabilities_respect_the_byte_budget():
    B, H, Hkv, S, M, D = 2, 4, 2, 40, 600, 16
    q, k, v, mk, mv, _ = make_inputs(B, H, Hkv, S, M, D, torch.bfloat16, requires_grad=False)
    lens = [600, 100]
    need = (600 + 100) * H * S * 2  # bytes of every memory tile's bf16 probabilities
    for cfg, expect in ((TileConfig(keep_bytes=need), True), (TileConfig(keep_bytes=need - 1), False),
                        (TileConfig(rows=16, keep_bytes=1 << 30), False)):  # several row blocks: nothing kept
        keep = {}
        out, lse = cpu_tiled.tiled_forward(q, k, v, mk, mv, lens, M, D ** -0.5, None, tiles=cfg, keep=keep)
        assert bool(keep) == expect
        if expect:
            assert sum(p.numel() * p.element_size() for p, _ in keep.values()) == need
            assert sorted(keep) == [(0, 1, 0, 512), (0, 1, 512, 600), (1, 2, 0, 100)]
            p, m = keep[(1, 2, 0, 100)]
            assert p.shape == (Hkv, (H // Hkv) * S, 100) and m.shape == (Hkv, (H // Hkv) * S)
