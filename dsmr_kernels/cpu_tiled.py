"""CPU path "tiled" (bf16): flash-attention-2 written with large batched tiles in plain PyTorch.

Why this exists: ATen's CPU flash kernel issues many small per-tile GEMMs (64 query rows x 512
keys) and converts every score tile, so on CPUs without AMX its bf16 path is hardly faster than
its fp32 path. Large bf16 GEMMs are 2-3x faster than fp32 ones on AVX512-BF16 hardware. Here each
tile is one batched GEMM over every (lane, kv head) of a group of lanes, ``R`` query rows and ``C``
keys (512 x 512 by default), so the GEMMs gain 2-3x from bf16 (ATen's tile GEMMs: ~1.3x), and the
softmax work around them is a handful of vectorized fp32 passes (``exp2`` with the scale folded
into the GEMM).

Semantics are the op's (see :mod:`dsmr_kernels.reference`): keys are ``[valid memory; segment]``
read in place from ``mem_k``/``mem_v`` and ``k``/``v`` (never concatenated); GQA folds the ``G``
query heads of a kv head into the row axis (rows ``g*R + r``), so keys are never repeated and
``dK``/``dV`` sum over the group inside the GEMM. Tiles wholly outside the causal/window band are
never visited; tiles crossing its edge add a cached ``(R, C)`` additive mask.

Precision: scores come out of the GEMM in bf16 (like the reference's bf16 matmul), softmax
statistics, ``exp2`` and all accumulators are fp32, probabilities are rounded to bf16 for the
``P @ V`` GEMM (as in the reference). The output, LSE and gradients are rounded once at the end.

Backward: :mod:`.cpu_tiled_bwd` (key tiles outer, every query row that sees a tile at once).

Memory: temporaries are bounded by ``tile_elems`` score entries per tile (lanes are processed
in groups to respect it), independent of the memory length M; tile buffers are kept between
calls (:func:`release_workspaces`).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from .mask_cache import MASK_CACHE

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the bf16 path.

    ``rows``: query rows per tile (per head); ``cols``: keys per tile; ``tile_elems``: the most
    score entries one tile may hold across its batch of (lane, head) slabs (lanes are split into
    groups to respect it; one lane is never split, so the bound is ``max(tile_elems, H*rows*cols)``).
    """

    # 512 rows: a whole 512-token segment per tile, so each key tile is packed and visited once;
    # measured 7-15% faster forward than 256 rows (S=512, M=2048-4096, H=4-8, B=1-8; backward unchanged).
    rows: int = 512
    cols: int = 512
    tile_elems: int = 1 << 22
    #: Under autograd, the forward keeps its bf16 probabilities of the memory tiles for the
    #: backward when they take at most this many bytes per call (0: never), so the backward skips
    #: those tiles' ``Q K^T`` GEMM and ``exp2`` (see :mod:`.cpu_tiled_bwd`).
    keep_bytes: int = 32 << 20


DEFAULT_TILES = TileConfig()


@dataclass(frozen=True)
class _Tile:
    part: str  # "mem" or "seg"
    j0: int  # first key, in the concatenated [valid memory; segment] coordinate
    j1: int
    d: Optional[int]  # mask offset (L + r0 - j0) when the tile crosses the band edge, else None


def _tiles(L: int, r0: int, r1: int, window: Optional[int], cols: int) -> List[_Tile]:
    """Key tiles seen by query rows ``[r0, r1)`` of a lane with ``L`` valid memory slots.

    Query ``i`` (absolute position ``L + i``) sees key ``j`` iff ``j <= L + i`` and, with a
    window, ``L + i - j < window``. Only keys some row of the block sees are visited.
    """
    lo = 0 if window is None else max(0, L + r0 - window + 1)
    hi = L + r1
    tiles = []
    for part, a, b in (("mem", lo, min(hi, L)), ("seg", max(lo, L), hi)):
        j0 = a
        while j0 < b:
            j1 = min(j0 + cols, b)
            full = j1 - 1 <= L + r0 and (window is None or (L + r1 - 1) - j0 < window)
            tiles.append(_Tile(part, j0, j1, None if full else L + r0 - j0))
            j0 = j1
    return tiles


def _tile_mask(R: int, C: int, d: int, window: Optional[int], device, cache) -> torch.Tensor:
    """Additive fp32 ``(R, C)`` mask: row ``i`` sees column ``t`` iff ``t - i <= d`` and
    ``i - t + d < window``."""

    def build():
        i = torch.arange(R, device=device)[:, None]
        t = torch.arange(C, device=device)[None, :]
        hidden = (t - i) > d
        if window is not None:
            hidden |= (i - t + d) >= window
        return torch.zeros(R, C, device=device).masked_fill_(hidden, _NEG_INF)

    return cache.get(("tile", R, C, d, window, str(device)), build)


def _lane_groups(lens: List[int], per_lane: int, budget: int) -> Iterator[Tuple[int, int, int]]:
    """``(b0, b1, L)``: consecutive lanes with the same ``L``, at most ``budget // per_lane`` each."""
    cap = max(1, budget // max(1, per_lane))
    b0 = 0
    B = len(lens)
    for b in range(1, B + 1):
        if b == B or lens[b] != lens[b0] or b - b0 == cap:
            yield b0, b, lens[b0]
            b0 = b


def _fold_rows(x: torch.Tensor, b0: int, b1: int, r0: int, r1: int, Hkv: int) -> torch.Tensor:
    """``x[b0:b1, :, r0:r1]`` of shape (nb, H, R, ...) as (nb*Hkv, G*R, ...): group heads become rows."""
    blk = x[b0:b1, :, r0:r1]
    nb, H, R = blk.shape[:3]
    return blk.reshape(nb * Hkv, (H // Hkv) * R, *blk.shape[3:])


def _keys(part: str, j0: int, j1: int, L: int, M: int, seg: torch.Tensor, mem: Optional[torch.Tensor],
          b0: int, b1: int, pack: bool = True) -> torch.Tensor:
    """(nb*Hkv, j1 - j0, D) view of the tile's keys (or values), read from their own tensor."""
    if part == "mem":
        t = mem[b0:b1, :, M - L + j0:M - L + j1]
    else:
        t = seg[b0:b1, :, j0 - L:j1 - L]
    # Packed (batch stride C*D) tiles let the bf16 GEMM read K^T without its own, slower transposing copy.
    t = t.flatten(0, 1)
    return t.contiguous() if pack else t


class _Workspace:
    """Tile buffers, kept between calls (per thread, device and dtype).

    Fresh multi-MB tensors per tile or per call page-fault on every first touch (large CPU
    allocations go straight back to the OS), which tripled the cost of each elementwise pass and
    dominated short calls. The buffers only grow to the largest tile used so far, at most
    ``TileConfig.tile_elems`` entries x 6 bytes (forward) or 12 bytes (backward);
    :func:`release_workspaces` frees them.
    """

    def __init__(self, elems: int, device, n16: int, n32: int, dtype):
        # Normal tensors even when first built under inference_mode (generation), which would
        # make them inference tensors that a later training call may not write into.
        with torch.inference_mode(False):
            self.b16 = [torch.empty(elems, dtype=dtype, device=device) for _ in range(n16)]
            self.b32 = [torch.empty(elems, dtype=torch.float32, device=device) for _ in range(n32)]

    @staticmethod
    def view(buf: torch.Tensor, shape) -> torch.Tensor:
        return buf[: math.prod(shape)].view(shape)


_WORKSPACES = threading.local()


def _workspace(elems: int, device, n16: int, n32: int, dtype) -> _Workspace:
    """This thread's buffers for ``(device, dtype, n16, n32)``, grown to ``elems`` if smaller."""
    store = getattr(_WORKSPACES, "store", None)
    if store is None:
        store = _WORKSPACES.store = {}
    key = (str(device), dtype, n16, n32)
    ws = store.get(key)
    if ws is None or ws.b32[0].numel() < elems:
        ws = store[key] = _Workspace(elems, device, n16, n32, dtype)
    return ws


def scratch(name: str, shape, dtype, device) -> torch.Tensor:
    """A ``shape`` view of this thread's named scratch buffer (grown when too small, never shrunk).

    For the (rows or keys) x D slabs of the backward; the score-sized buffers are :func:`_workspace`'s.
    """
    store = getattr(_WORKSPACES, "scratch", None)
    if store is None:
        store = _WORKSPACES.scratch = {}
    key = (name, str(device), dtype)
    need = math.prod(shape)
    buf = store.get(key)
    if buf is None or buf.numel() < need:
        with torch.inference_mode(False):  # see _Workspace: a buffer outlives the mode it was made in
            buf = store[key] = torch.empty(need, dtype=dtype, device=device)
    return buf[:need].view(shape)


def release_workspaces() -> None:
    """Free the tile buffers this thread keeps between calls (they are re-created on demand)."""
    _WORKSPACES.store = {}
    _WORKSPACES.scratch = {}


def workspace_nbytes() -> int:
    """Bytes of tile buffers this thread currently keeps."""
    store = getattr(_WORKSPACES, "store", None) or {}
    extra = getattr(_WORKSPACES, "scratch", None) or {}
    return (sum(t.numel() * t.element_size() for ws in store.values() for t in ws.b16 + ws.b32)
            + sum(t.numel() * t.element_size() for t in extra.values()))


def _scores(qf, kt, c: float, mask: Optional[torch.Tensor], G: int, s16: torch.Tensor, s32: torch.Tensor):
    """fp32 scores in log2 units ``c * q @ k^T`` (+ mask) into ``s32``; the GEMM runs in the input
    dtype into ``s16`` (both flat buffers)."""
    n, GR, C = qf.shape[0], qf.shape[1], kt.shape[1]
    a = _Workspace.view(s16, (n, GR, C))
    torch.baddbmm(a, qf, kt.transpose(1, 2), beta=0.0, alpha=c, out=a)
    f = _Workspace.view(s32, (n, GR, C))
    f.copy_(a)
    if mask is not None:
        # In place on the fp32 copy: a mixed bf16 + fp32 broadcast add takes a ~20x slower path.
        f.view(n, G, GR // G, C).add_(mask)
    return f


@torch.no_grad()
def tiled_forward(q, k, v, mem_k, mem_v, lens: List[int], M: int, scale: float, window: Optional[int],
                  cache=MASK_CACHE, tiles: TileConfig = DEFAULT_TILES, keep: Optional[dict] = None):
    """Forward. q: (B, H, S, D); k, v: (B, Hkv, S, D); mem_k, mem_v: (B, Hkv, M, D) or None.

    ``lens[b]``: valid memory slots of lane ``b`` (already clipped to ``window - 1``).
    Returns ``out`` (B, H, S, D) in q.dtype and ``lse`` (B, H, S) fp32 (natural log).

    ``keep``: a dict that receives, per memory tile ``(b0, b1, j0, j1)``, the tile's bf16
    probabilities ``exp2(s - m)`` (nb*Hkv, G*S, C) and the row maxima ``m`` (nb*Hkv, G*S) they are
    relative to, when one row block covers the segment, there is no window, and all of them fit
    in ``tiles.keep_bytes``; :func:`.cpu_tiled_bwd.tiled_backward` turns them into the final
    probabilities with one row scale instead of a GEMM and an ``exp2``.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    c = scale * _LOG2E
    R = min(S, tiles.rows)
    out = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    groups = list(_lane_groups(lens, H * R * tiles.cols, tiles.tile_elems))
    elems = max(((b1 - b0) * H * R * tiles.cols for b0, b1, _ in groups), default=0)
    ws = _workspace(elems, q.device, 1, 1, q.dtype)
    if keep is not None:
        kept = sum((b1 - b0) * H * S * L for b0, b1, L in groups) * q.element_size()
        # With a window only some rows see a memory tile: the backward's row slab would differ.
        if R < S or window is not None or kept > tiles.keep_bytes:
            keep = None
    for b0, b1, L in groups:
        nb = b1 - b0
        for r0 in range(0, S, R):
            r1 = min(S, r0 + R)
            Rb = r1 - r0
            qf = _fold_rows(q, b0, b1, r0, r1, Hkv)
            m = l = acc = None
            for t in _tiles(L, r0, r1, window, tiles.cols):
                mask = None if t.d is None else _tile_mask(Rb, t.j1 - t.j0, t.d, window, q.device, cache)
                kt = _keys(t.part, t.j0, t.j1, L, M, k, mem_k, b0, b1)
                vt = _keys(t.part, t.j0, t.j1, L, M, v, mem_v, b0, b1)
                s = _scores(qf, kt, c, mask, G, ws.b16[0], ws.b32[0])
                m_tile = s.amax(-1)
                m_new = m_tile if m is None else torch.maximum(m, m_tile)
                # Rows that see nothing yet have m_new = -inf; subtract 0 there so exp2 gives 0, not NaN.
                m_sub = m_new if mask is None else torch.where(
                    m_new == _NEG_INF, torch.zeros((), device=q.device), m_new)
                p = s.sub_(m_sub.unsqueeze(-1)).exp2_()
                if keep is not None and t.part == "mem":
                    # Rounded straight into the tensor the backward keeps: no second copy.
                    p16 = torch.empty(p.shape, dtype=q.dtype, device=q.device).copy_(p)
                    keep[(b0, b1, t.j0, t.j1)] = (p16, m_sub)
                else:
                    p16 = _Workspace.view(ws.b16[0], p.shape).copy_(p)
                pv = torch.bmm(p16, vt)
                if m is None:
                    l = p.sum(-1)
                    acc = pv.float()
                else:
                    alpha = torch.exp2(m - m_sub)
                    l = l.mul_(alpha).add_(p.sum(-1))
                    acc = acc.mul_(alpha.unsqueeze(-1)).add_(pv)
                m = m_new
            # Every query sees at least its own key, so l > 0 on every row.
            o = acc.div_(l.unsqueeze(-1))
            out[b0:b1, :, r0:r1] = o.view(nb, H, Rb, D)
            lse[b0:b1, :, r0:r1] = (m + torch.log2(l)).mul_(_LN2).view(nb, H, Rb)
    return out, lse
