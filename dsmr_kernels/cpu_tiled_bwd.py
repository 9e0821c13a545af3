"""Backward of the ``tiled`` CPU path: key tiles outer, every query row that sees a tile at once.

Why this shape (flash-attention-2's backward, laid out for CPU GEMMs): the forward walks query
blocks and key tiles; a backward in the same order accumulates ``dK`` / ``dV`` of every key tile
once per query block, as many small GEMMs (K dimension = one block's 256 rows) plus an fp32
read-modify-write each. Here the outer loop is over key tiles and the inner "loop" is one slab of
*all* query rows that see the tile, so per tile:

==============================  ==========================  ===================================
GEMM                            shape (per (lane, kv head))  K dimension
==============================  ==========================  ===================================
``S = Q K^T``                   (G*R, D) x (D, C)            D (64: a multiple of AMX's 32)
``dP - delta = [dO, -d] [V, 1]^T``  (G*R, D+2) x (D+2, C)    D + 2 (see below)
``dQ += dS K``                  (G*R, C) x (C, D)            C (512 memory / 128 segment keys)
``dV = P^T dO``, ``dK = dS^T Q``  (C, G*R) x (G*R, D)        G*R: every row that sees the tile
==============================  ==========================  ===================================

``R`` is the rows that see the tile: all S for memory tiles (without a window), ``S - s0`` for the
segment tile starting at key ``s0``. Segment tiles are narrower (128 keys) so that the causal
triangle wastes little: 1.25x the visible entries at S = 512 instead of 2x for one 512-wide tile.
Memory tiles need only ``dQ`` (memory is detached): three GEMMs, no ``dK``/``dV``. The forward
(see :mod:`.cpu_tiled`) keeps its query blocks; only the backward is laid out this way.

Precision (fp32 inputs, which the dispatcher may also send here, stay fp32 throughout):
GEMMs run in the input dtype (bf16) and round their output once; ``P`` and ``dS`` are
fp32 (``dS`` is rounded once for its GEMMs), the softmax scale is applied to the fp32 ``dQ`` /
``dK`` accumulators at the end, and ``dQ`` / ``dK`` / ``dV`` accumulate in fp32 and are rounded
once at the end. ``dP - delta`` (``delta = rowsum(dO * O)``) comes out of one
GEMM augmented with two columns (``delta`` split into two bf16 halves), so its rounding is
relative to the difference: with a row's mass on one key ``dP ~ delta``, and a plain bf16 ``dP``
measured 4-5x the reference's error on dq / dk at S = 17 (the reference subtracts a ``delta``
built from its own rounded ``dP``, which cancels). The cost is K = D + 2 in that one GEMM (padded
to 96 on AMX tiles; the dispatcher calibrates ``tiled`` against ATen's kernel there anyway).
``[V, 1, 1]`` and ``[dO, -d_hi, -d_lo]`` are built once per call and read as views per tile.

Memory: the score-sized buffers (2 bf16 + 2 fp32) are the forward's :class:`_Workspace`, sized
by ``TileConfig.tile_elems``; the (rows or keys) x D slabs live in named scratch buffers. Both are
kept between calls, so a call allocates only its gradients and fp32 accumulators.

Kept probabilities: under autograd, when the tiled forward covers the segment in one row block
(no window) and every memory tile's bf16 probabilities fit in ``TileConfig.keep_bytes`` (32 MiB
per call by default), the forward keeps them (``exp2(s - m)`` with its row maxima ``m``) and the
backward's memory tiles skip ``Q K^T`` and ``exp2``: with ``P = diag(exp2(m - lse)) p`` the row
scale moves past the ``dQ`` GEMM, so such a tile is two GEMMs and one bf16 multiply
(see :func:`_tile`). Measured at S = 512, H = 4, M = 2048-4096: 9-10% off a bf16
forward+backward for reusing the probabilities, then another 6-9% for moving the row scale (five
fp32 passes over the tile become one). These are also the very probabilities the forward
multiplied V with. Larger memories recompute, as flash attention does.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

from .cpu_tiled import DEFAULT_TILES, TileConfig, _lane_groups, _tile_mask, _workspace, _Workspace, scratch
from .mask_cache import MASK_CACHE

_LOG2E = 1.0 / math.log(2.0)

#: Keys per segment tile in the backward (memory tiles use ``TileConfig.cols``): see the module docstring.
SEG_COLS = 128


def _key_tiles(L: int, S: int, window: Optional[int], cols: int, seg_cols: int, max_rows: int) -> List[Tuple]:
    """``(part, j0, j1, ra, rb)``: key tiles of ``[valid memory; segment]`` and the query rows
    ``[ra, rb)`` that see at least one of their keys (query ``i`` sees key ``j`` iff ``j <= L + i``
    and, with a window, ``L + i - j < window``), in blocks of at most ``max_rows`` rows."""
    lo = 0 if window is None else max(0, L - window + 1)
    out = []
    for part, a, b, width in (("mem", lo, L, cols), ("seg", L, L + S, seg_cols)):
        for j0 in range(a, b, width):
            j1 = min(j0 + width, b)
            first = max(0, j0 - L)
            last = S if window is None else min(S, j1 - 1 - L + window)
            out += [(part, j0, j1, ra, min(ra + max_rows, last)) for ra in range(first, last, max_rows)]
    return out


def _row_slab(x: torch.Tensor, b0: int, b1: int, ra: int, rb: int, Hkv: int, name: str) -> torch.Tensor:
    """``x[b0:b1, :, ra:rb]`` (nb, H, R, D) as (nb*Hkv, G*R, D): a view when G = 1 or all rows
    are taken, else a copy into scratch (the G heads' row ranges are not adjacent in memory)."""
    blk = x[b0:b1, :, ra:rb]
    nb, H, R, D = blk.shape
    G = H // Hkv
    if G == 1 or R == x.shape[2]:
        return blk.reshape(nb * Hkv, G * R, D)
    buf = scratch(name, (nb, H, R, D), x.dtype, x.device)
    return buf.copy_(blk).view(nb * Hkv, G * R, D)


def _key_slab(part: str, j0: int, j1: int, L: int, M: int, seg, mem, b0: int, b1: int, name: str):
    """(nb*Hkv, j1 - j0, D) keys or values of the tile, packed into scratch (batch stride C*D lets
    the bf16 GEMM read K^T without its own transposing copy)."""
    t = mem[b0:b1, :, M - L + j0:M - L + j1] if part == "mem" else seg[b0:b1, :, j0 - L:j1 - L]
    nb, Hkv, C, D = t.shape
    return scratch(name, (nb, Hkv, C, D), t.dtype, t.device).copy_(t).view(nb * Hkv, C, D)


def _probs(qf, kt, lf, c: float, mask, G: int, ws: _Workspace):
    """fp32 probabilities ``exp2(c * q k^T (+ mask) - lse2)`` in ``ws.b32[0]`` (GEMM into ``ws.b16[0]``)."""
    n, GR, C = qf.shape[0], qf.shape[1], kt.shape[1]
    s16 = _Workspace.view(ws.b16[0], (n, GR, C))
    torch.baddbmm(s16, qf, kt.transpose(1, 2), beta=0.0, alpha=c, out=s16)
    p = _Workspace.view(ws.b32[0], (n, GR, C)).copy_(s16)
    if mask is not None:
        p.view(n, G, GR // G, C).add_(mask)  # in place on fp32: a mixed-dtype broadcast add is ~20x slower
    return p.sub_(lf).exp2_()


class _Call(NamedTuple):
    """What every tile of one backward call reads (inputs, per-call operands) and writes (grads)."""

    q: torch.Tensor  # (B, H, S, D), contiguous
    k: torch.Tensor  # (B, Hkv, S, D)
    mem_k: Optional[torch.Tensor]  # (B, Hkv, M, D)
    ga: torch.Tensor  # (B, H, S, D + 2): [dO, -delta_hi, -delta_lo]
    va: tuple  # ([V_mem, 1, 1] over the newest L_max slots or None, [V_seg, 1, 1])
    lse2: torch.Tensor  # (B, H, S) fp32, log2 units
    grads: tuple  # fp32 accumulators: dq (B, H, S, D), dk and dv (B*Hkv, S, D); None when not needed
    M: int
    window: Optional[int]
    scale: float
    ws: _Workspace
    cache: object
    probs: Optional[dict]  # memory tiles' forward probabilities (see tiled_forward's ``keep``)


def _tile(t, c: _Call, L: int, b0: int, b1: int):
    """One key tile against every query row that sees it: dQ (all tiles), dK and dV (segment tiles).

    ``ga = [dO, -delta_hi, -delta_lo]`` (B, H, S, D+2) and ``va = ([V_mem, 1, 1], [V_seg, 1, 1])``
    make ``dP - delta`` one GEMM that rounds the *difference* to bf16 once: with a row's mass on
    one key, ``dP ~ delta`` and rounding ``dP`` alone would leave an error the size of ``dP``.
    """
    part, j0, j1, ra, rb = t
    q, k, ga, va, window, ws = c.q, c.k, c.ga, c.va, c.window, c.ws
    dq_acc, dk_acc, dv_acc = c.grads
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    R, C, D = rb - ra, j1 - j0, q.shape[-1]
    seg = part == "seg"
    full = j1 - 1 <= L + ra and (window is None or L + rb - 1 - j0 < window)
    mask = None if full else _tile_mask(R, C, L + ra - j0, window, q.device, c.cache)
    qf = _row_slab(q, b0, b1, ra, rb, Hkv, "q")
    gaf = _row_slab(ga, b0, b1, ra, rb, Hkv, "ga")
    n = qf.shape[0]
    lf = c.lse2[b0:b1, :, ra:rb].reshape(n, G * R, 1)
    kt = _key_slab(part, j0, j1, L, c.M, k, c.mem_k, b0, b1, "k")
    if seg:
        vat = va[1][b0:b1, :, j0 - L:j1 - L].flatten(0, 1)  # (n, C, D + 2), a view
    else:
        off = va[0].shape[2] - L  # va[0] holds the newest L_max slots; this lane reads the newest L
        vat = va[0][b0:b1, :, off + j0:off + j1].flatten(0, 1)
    kept = None if seg or not c.probs or rb - ra != q.shape[2] else c.probs.get((b0, b1, j0, j1))
    # Kept memory tiles: the forward's bf16 p = exp2(s - m) gives P = diag(r) p with the row scale
    # r = exp2(m - lse2), so dS K = diag(r) ((p * (dP - delta)) K): no Q K^T GEMM or exp2, one bf16
    # multiply for dS instead of the fp32 round trips below, and r applied to dQ's rows in fp32.
    p = None if kept is not None else _probs(qf, kt, lf, c.scale * _LOG2E, mask, G, ws)  # fp32, final LSE
    dp = _Workspace.view(ws.b16[1], (n, G * R, C))
    torch.bmm(gaf, vat.transpose(1, 2), out=dp)  # dP - delta, K = D + 2
    if kept is not None:
        dsb, row_scale = dp.mul_(kept[0]), torch.exp2(kept[1].unsqueeze(-1) - lf)
    else:
        ds = _Workspace.view(ws.b32[1], p.shape).copy_(dp).mul_(p)  # P * (dP - delta)
        # Rounded once, for the dQ and dK GEMMs; the softmax scale is applied to the fp32 dQ / dK
        # accumulators at the end instead of to every tile. A plain copy: a mixed-dtype
        # ``torch.mul(fp32, s, out=bf16)`` took 1.1 ms per (4, 512, 512) tile in training.
        dsb, row_scale = dp.copy_(ds), None
    if dq_acc is not None:
        part_q = scratch("dq", qf.shape, q.dtype, q.device)
        torch.bmm(dsb, kt, out=part_q)  # K = C
        part = part_q if row_scale is None else part_q.float().mul_(row_scale)
        dq_acc[b0:b1, :, ra:rb].add_(part.view(b1 - b0, Hkv * G, R, D))
    if seg and dk_acc is not None:
        cols = slice(j0 - L, j1 - L)
        rows = slice(b0 * Hkv, b1 * Hkv)
        pb = _Workspace.view(ws.b16[0], p.shape).copy_(p)
        part_kv = scratch("dkv", kt.shape, q.dtype, q.device)
        dv_acc[rows, cols].add_(torch.bmm(pb.transpose(1, 2), gaf[..., :D], out=part_kv))  # K = G*R
        dk_acc[rows, cols].add_(torch.bmm(dsb.transpose(1, 2), qf, out=part_kv))


@torch.no_grad()
def tiled_backward(g, q, k, v, mem_k, mem_v, out, lse, lens: List[int], M: int, scale: float,
                   window: Optional[int], cache=MASK_CACHE, need_q: bool = True, need_kv: bool = True,
                   tiles: TileConfig = DEFAULT_TILES, probs: Optional[dict] = None):
    """Backward from the *final* ``out`` / ``lse``: ``(dq, dk, dv)`` in q.dtype (None if not needed).

    g, out: (B, H, S, D); lse: (B, H, S) fp32 natural log; q: (B, H, S, D); k, v: (B, Hkv, S, D);
    mem_k, mem_v: (B, Hkv, M, D) or None; ``lens[b]``: valid memory slots of lane b (window-clipped).
    ``dS = P * (dP - rowsum(dO * O))``; dq over all tiles, dk / dv from segment tiles only.
    ``probs``: the ``keep`` dict filled by :func:`.cpu_tiled.tiled_forward` on the same inputs.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    dt = q.dtype
    delta = (g.float() * out.float()).sum(-1, keepdim=True)  # (B, H, S, 1)
    d_hi = delta.to(dt)
    ga = torch.cat([g.to(dt), -d_hi, -(delta - d_hi.float()).to(dt)], dim=-1)  # (B, H, S, D + 2)
    L_max = max(lens, default=0)
    ones = torch.ones(B, Hkv, max(S, L_max), 2, dtype=dt, device=q.device)
    va = (torch.cat([mem_v[:, :, M - L_max:], ones[:, :, :L_max]], dim=-1) if L_max else None,
          torch.cat([v, ones[:, :, :S]], dim=-1))  # [V, 1, 1] once per call, read as views per tile
    lse2 = lse.float() * _LOG2E
    q = q.contiguous()  # row slabs of contiguous tensors are views
    dq_acc = torch.zeros(B, H, S, D, dtype=torch.float32, device=q.device) if need_q else None
    dk_acc = torch.zeros(B * Hkv, S, D, dtype=torch.float32, device=q.device) if need_kv else None
    dv_acc = torch.zeros(B * Hkv, S, D, dtype=torch.float32, device=q.device) if need_kv else None
    cols = max(tiles.cols, SEG_COLS)
    groups = list(_lane_groups(lens, H * S * cols, tiles.tile_elems))
    # One lane above the budget (long segments, many heads) is split into row blocks instead.
    max_rows = {(b0, b1): min(S, max(1, tiles.tile_elems // ((b1 - b0) * H * cols))) for b0, b1, _ in groups}
    elems = max(((b1 - b0) * H * max_rows[b0, b1] * cols for b0, b1, _ in groups), default=0)
    ws = _workspace(elems, q.device, 2, 2, dt)
    call = _Call(q, k, mem_k, ga, va, lse2, (dq_acc, dk_acc, dv_acc), M, window, scale, ws, cache, probs)
    for b0, b1, L in groups:
        for t in _key_tiles(L, S, window, tiles.cols, SEG_COLS, max_rows[b0, b1]):
            if t[0] == "seg" or need_q:
                _tile(t, call, L, b0, b1)
    dq = dq_acc.mul_(scale).to(dt) if need_q else None
    dk = dk_acc.mul_(scale).view(B, Hkv, S, D).to(dt) if need_kv else None
    dv = dv_acc.view(B, Hkv, S, D).to(dt) if need_kv else None
    return dq, dk, dv
