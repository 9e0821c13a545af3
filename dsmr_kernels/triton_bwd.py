"""Triton backward kernels of segment-memory attention: preprocess, dK/dV, dQ. No atomics.

With ``P = exp2(scale * log2(e) * Q K^T - lse2)`` rebuilt from the forward's log2-unit LSE and
``delta_i = sum_d O_id dO_id`` (the preprocess kernel)::

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)        dQ = scale * dS K
    dK = scale * dS^T Q

Each output block is owned by exactly one program, so every gradient is a plain store:

* ``_attn_bwd_dkdv``: one program per (segment key block, lane, kv head); it walks the query
  blocks that can see the key block (from the diagonal up to the end of the window) of all G
  query heads of its GQA group as ONE flat loop over (head, block) pairs -- a nested loop over a
  runtime G measured 255 registers and spills at D=64 on sm_90. Memory keys get no gradient
  (detached state), so there is no memory key loop here.
* ``_attn_bwd_dq``: one program per (query block, lane, query head); it walks the memory and
  segment key blocks exactly like the forward: one masked loop over the edge blocks, one
  unmasked loop over the rest, in the joint key index space of ``triton_common``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRETING,
    _kv_block,
    _memory_blocks,
    _mma,
    _nth_block,
    _segment_blocks,
    config_rule,
    launch_meta,
    make_prune,
    maybe_autotune,
    size_bucket,
)


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta,  #
                         stride_ob, stride_oh, stride_os, stride_od,  #
                         stride_dob, stride_doh, stride_dos, stride_dod,  #
                         H, S,  #
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``delta = rowsum(O * dO)`` in fp32, ``(B, H, S)``. Grid ``(cdiv(S, BLOCK_M), B * H)``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh
                + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh
                 + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    tl.store(Delta + off_bh.to(tl.int64) * S + offs_m, delta, mask=row_ok)


# The main inner loop for dK and dV: one segment key block against (head, query block) pairs.
@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v,  #
                         Q, DO, Lse2, Delta,  #
                         stride_qh, stride_qs, stride_qd, stride_doh, stride_dos, stride_dod,  #
                         first_h, n_per_head, n_total, n1, start1, start2,  #
                         start_n, S, qk_scale, window,  #
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,  #
                         MASKED: tl.constexpr, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Accumulate ``dk, dv`` (BLOCK_N, D) fp32 over ``n_total`` (query head, query block) pairs.

    Pair ``t`` is query head ``first_h + t // n_per_head`` and its ``(t % n_per_head)``-th block
    of two ranges (``n1`` blocks from ``start1``, the rest from ``start2``). ``Q``/``DO`` point at
    this lane's first query head, ``Lse2``/``Delta`` at this lane's rows. Works on transposed
    tiles (keys on rows) so dK and dV come out without a final transpose. With ``MASKED=False``
    every query row of every block sees every key of the block.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for t in tl.range(0, n_total, num_stages=1 if MASKED else None):
        h = first_h + t // n_per_head
        start_m = _nth_block(t % n_per_head, n1, n_per_head, start1, start2, start2, BLOCK_M)
        h64 = h.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row = h64 * S + start_m
        qT_ptrs = Q + h64 * stride_qh + offs_m[None, :] * stride_qs + offs_d[:, None] * stride_qd  # (D, BLOCK_M)
        do_ptrs = DO + h64 * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod
        rows = tl.arange(0, BLOCK_M)
        if MASKED:
            row_ok = offs_m < S
            qT = tl.load(qT_ptrs, mask=row_ok[None, :], other=0.0)
            lse2 = tl.load(Lse2 + row + rows, mask=row_ok, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            lse2 = tl.load(Lse2 + row + rows)
        # -- recompute P^T from the saved LSE (log2 units) ----
        qkT = _mma(k, qT, None, UPCAST, FP32_IEEE) * qk_scale  # (BLOCK_N, BLOCK_M)
        arg = qkT - lse2[None, :]
        if MASKED:
            # Mask the exponent, not the result: invisible scores can be large and exp2 would
            # overflow before tl.where threw them away.
            visible = row_ok[None, :] & (offs_n[:, None] < S) & (offs_n[:, None] <= offs_m[None, :]) \
                & (offs_m[None, :] - offs_n[:, None] < window)
            arg = tl.where(visible, arg, float("-inf"))
        pT = tl.math.exp2(arg)
        if MASKED:
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            delta = tl.load(Delta + row + rows, mask=row_ok, other=0.0)
        else:
            do = tl.load(do_ptrs)
            delta = tl.load(Delta + row + rows)
        # -- dV += P^T dO ----
        dv = _mma(pT.to(do.dtype), do, dv, UPCAST, FP32_IEEE)
        # -- dS^T = P^T * (dP^T - delta) ----
        dpT = _mma(v, tl.trans(do), None, UPCAST, FP32_IEEE)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        # -- dK += dS^T Q (scale applied once at the end) ----
        dk = _mma(dsT.to(qT.dtype), tl.trans(qT), dk, UPCAST, FP32_IEEE)
    return dk, dv


# 16-bit: 32-row query tiles. k, v, dk and dv all stay in registers, and 64-row tiles spilled
# (sm_80: 24-112 B at D=64, 8 B at D=16; sm_90: 48-128 B at D=128).
_DKDV_CONFIGS_16 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": bn}, num_warps=4 if bn == 64 else 8, num_stages=s)
    for bn in (64, 128)
    for s in (2, 3)
]
# fp32 (IEEE FMA dots, see triton_fwd): small tiles; 16x32 with 4 warps spilled at D=64.
_DKDV_CONFIGS_32 = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=8, num_stages=1),
]
_DKDV_CONFIGS = _DKDV_CONFIGS_16 + _DKDV_CONFIGS_32


def dkdv_smem(cfg, head_dim: int, elt: int) -> int:
    """Upper bound on dK/dV's shared memory: q and dO tiles per stage, k and v, and one fp32
    (BLOCK_N, BLOCK_M) tile for the P / dS layout conversions (measured +1 KB over the rest at D=16)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return elt * head_dim * (2 * bm * cfg.num_stages + 2 * bn) + 4 * bm * bn + 2048


def _dkdv_regs_ok(cfg, head_dim: int, elt: int) -> bool:
    # 16-bit at D=128: 128-key tiles spilled 0.2-3.6 KB on sm_80 (its mma layout needs more registers).
    return not (elt == 2 and head_dim > 64 and cfg.kwargs["BLOCK_N"] == 128)


#: ``(head_dim, elt, smem_limit) -> configs``: what the dK/dV autotuner may pick on a card (the AOT
#: gate compiles exactly these).
dkdv_configs = config_rule(_DKDV_CONFIGS_16, _DKDV_CONFIGS_32, dkdv_smem, _dkdv_regs_ok)


@maybe_autotune(_DKDV_CONFIGS, key=["S_BUCKET", "HEAD_DIM", "G"],
                prune_configs_by={"early_config_prune": make_prune(dkdv_configs)})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse2, Delta, DK, DV,  #
                   sm_scale, window,  #
                   stride_qb, stride_qh, stride_qs, stride_qd,  #
                   stride_kb, stride_kh, stride_ks, stride_kd,  #
                   stride_vb, stride_vh, stride_vs, stride_vd,  #
                   stride_dob, stride_doh, stride_dos, stride_dod,  #
                   stride_dkb, stride_dkh, stride_dks, stride_dkd,  #
                   stride_dvb, stride_dvh, stride_dvs, stride_dvd,  #
                   H, Hkv, S, G, S_BUCKET,  #
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
                   UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """One program = one segment key block of one (lane, kv head). Grid ``(cdiv(S, BLOCK_N), B * Hkv)``."""
    tl.static_assert(BLOCK_M >= 16)  # tl.dot minimum tile on GPUs
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(HEAD_DIM >= 16)
    tl.static_assert(BLOCK_N % BLOCK_M == 0)  # the diagonal ends on a query-block boundary
    start_n = tl.program_id(0) * BLOCK_N
    off_bk = tl.program_id(1)
    off_b = off_bk // Hkv
    off_hk = off_bk % Hkv
    b64 = off_b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < S
    # load k and v: they stay in registers for the whole program
    k = tl.load(K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # Query rows that see some key of the block: [start_n, hi). Rows in a block starting at or
    # after start_n + BLOCK_N are past the diagonal; they see the whole key block when the block
    # also ends inside S and inside the window of the block's first key.
    s_last = tl.minimum(start_n + BLOCK_N, S) - 1
    hi = tl.minimum(S, s_last + window)
    mid_lo = tl.minimum(start_n + BLOCK_N, hi)
    full_hi = tl.minimum(S, start_n + window) // BLOCK_M * BLOCK_M
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)

    # Per head: the diagonal [start_n, mid_lo) and the window edge / ragged tail [mid_hi, hi)
    # are masked, [mid_lo, mid_hi) is not; each walked for all G heads of the group in one loop.
    n_diag = tl.cdiv(mid_lo - start_n, BLOCK_M)
    n_edge = n_diag + tl.cdiv(hi - mid_hi, BLOCK_M)
    n_inner = (mid_hi - mid_lo) // BLOCK_M
    q_lane = Q + b64 * stride_qb
    do_lane = DO + b64 * stride_dob
    row_lane = b64 * H * S
    first_h = off_hk * G
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_lane, do_lane, Lse2 + row_lane, Delta + row_lane,  #
                                  stride_qh, stride_qs, stride_qd, stride_doh, stride_dos, stride_dod,  #
                                  first_h, n_inner, G * n_inner, n_inner, mid_lo, mid_lo,  #
                                  start_n, S, qk_scale, window,  #
                                  BLOCK_M, BLOCK_N, HEAD_DIM, False, UPCAST, FP32_IEEE)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_lane, do_lane, Lse2 + row_lane, Delta + row_lane,  #
                                  stride_qh, stride_qs, stride_qd, stride_doh, stride_dos, stride_dod,  #
                                  first_h, n_edge, G * n_edge, n_diag, start_n, mid_hi,  #
                                  start_n, S, qk_scale, window,  #
                                  BLOCK_M, BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)

    dk *= sm_scale
    dk_ptrs = DK + b64 * stride_dkb + off_hk.to(tl.int64) * stride_dkh \
        + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b64 * stride_dvb + off_hk.to(tl.int64) * stride_dvh \
        + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# The main inner loop for dQ: one query block against key blocks of the joint key space.
@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta,  #
                       K, V, MemK, MemV,  #
                       stride_ks, stride_kd, stride_vs, stride_vd,  #
                       stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                       n_blocks, n1, n2, start1, start2, start3,  #
                       M, key_lo, key_hi, row_lo, row_hi, qk_scale,  #
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,  #
                       UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Accumulate ``dq`` (BLOCK_M, D) fp32; blocks and visibility as in ``_attn_fwd_inner``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for t in tl.range(0, n_blocks, num_stages=1 if MASKED else None):
        j0 = _nth_block(t, n1, n2, start1, start2, start3, BLOCK_N)
        in_mem = j0 < M
        k_blk = _kv_block(MemK, K, j0, M, stride_mks, stride_ks)
        v_blk = _kv_block(MemV, V, j0, M, stride_mvs, stride_vs)
        s_kn = tl.where(in_mem, stride_mks, stride_ks)
        s_kd = tl.where(in_mem, stride_mkd, stride_kd)
        s_vn = tl.where(in_mem, stride_mvs, stride_vs)
        s_vd = tl.where(in_mem, stride_mvd, stride_vd)
        k_ptrs = k_blk + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd  # (BLOCK_N, D)
        v_ptrs = v_blk + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd  # (BLOCK_N, D)
        if MASKED:
            offs_key = j0 + offs_n
            in_range = (offs_key >= key_lo) & (offs_key < key_hi)
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        # -- recompute P from the saved LSE ----
        arg = _mma(q, tl.trans(k), None, UPCAST, FP32_IEEE) * qk_scale - lse2[:, None]
        if MASKED:
            visible = (offs_key[None, :] >= row_lo[:, None]) & (offs_key[None, :] <= row_hi[:, None])
            arg = tl.where(visible, arg, float("-inf"))
        p = tl.math.exp2(arg)
        # -- dS = P * (dP - delta) ----
        dp = _mma(do, tl.trans(v), None, UPCAST, FP32_IEEE)
        ds = p * (dp - delta[:, None])
        # -- dQ += dS K (scale applied once at the end) ----
        dq = _mma(ds.to(k.dtype), k, dq, UPCAST, FP32_IEEE)
    return dq


_DQ_CONFIGS_16 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4 if bm == 64 else 8, num_stages=s)
    for bm, bn in ((64, 32), (64, 64), (128, 32), (128, 64))
    for s in (2, 3)
]
# fp32 (IEEE FMA dots): small tiles; at D=128, 32x16 needs 8 warps (4 warps spilled 272 B).
_DQ_CONFIGS_32 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
]
_DQ_CONFIGS = _DQ_CONFIGS_16 + _DQ_CONFIGS_32


def dq_smem(cfg, head_dim: int, elt: int) -> int:
    """Upper bound on dQ's shared memory: K and V tiles per stage, plus q and dO."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return elt * head_dim * (2 * bn * cfg.num_stages + 2 * bm) + 2048


def _dq_regs_ok(cfg, head_dim: int, elt: int) -> bool:
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if elt == 4:  # fp32 at D=128: 32x16 with 4 warps spilled 272 B
        return not (head_dim > 64 and bm == 32 and cfg.num_warps == 4)
    # 16-bit 128x64 tiles spilled on sm_80 at D=128 (~320 B) and D=32 (8 B); sm_90 was clean.
    return not (bm == 128 and bn == 64 and head_dim != 64)


#: ``(head_dim, elt, smem_limit) -> configs``: what the dQ autotuner may pick on a card (the AOT
#: gate compiles exactly these).
dq_configs = config_rule(_DQ_CONFIGS_16, _DQ_CONFIGS_32, dq_smem, _dq_regs_ok)


@maybe_autotune(_DQ_CONFIGS, key=["S_BUCKET", "M_BUCKET", "HEAD_DIM"],
                prune_configs_by={"early_config_prune": make_prune(dq_configs)})
@triton.jit
def _attn_bwd_dq(Q, K, V, MemK, MemV, MemLen, DO, Lse2, Delta, DQ,  #
                 sm_scale, window,  #
                 stride_qb, stride_qh, stride_qs, stride_qd,  #
                 stride_kb, stride_kh, stride_ks, stride_kd,  #
                 stride_vb, stride_vh, stride_vs, stride_vd,  #
                 stride_mkb, stride_mkh, stride_mks, stride_mkd,  #
                 stride_mvb, stride_mvh, stride_mvs, stride_mvd,  #
                 stride_dob, stride_doh, stride_dos, stride_dod,  #
                 stride_dqb, stride_dqh, stride_dqs, stride_dqd,  #
                 H, S, M, G, S_BUCKET, M_BUCKET,  #
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
                 UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """One program = one query block of one (lane, query head). Grid ``(cdiv(S, BLOCK_M), B * H)``."""
    tl.static_assert(BLOCK_M >= 16)  # tl.dot minimum tile on GPUs
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(HEAD_DIM >= 16)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # _segment_blocks: query blocks start on key blocks
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G
    b64 = off_b.to(tl.int64)
    k_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    mk_base = MemK + b64 * stride_mkb + off_hk.to(tl.int64) * stride_mkh
    mv_base = MemV + b64 * stride_mvb + off_hk.to(tl.int64) * stride_mvh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q_last = tl.minimum(start_m + BLOCK_M, S) - 1
    mem_lo = M - tl.minimum(tl.maximum(tl.load(MemLen + off_b), 0), M)  # clamped: no host check on GPUs
    qk_scale = sm_scale * 1.4426950408889634
    # q, dO, LSE and delta of this block stay in registers for every key block. Padding rows load
    # zeros, which makes their dS exactly 0.
    q = tl.load(Q + b64 * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    row_base = off_bh.to(tl.int64) * S
    lse2 = tl.load(Lse2 + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Edge blocks in one masked loop, fully visible blocks in one unmasked loop (as the forward).
    mem_lo_blk, mem_mid = _memory_blocks(M, mem_lo, start_m, q_last, window, BLOCK_N)
    lo, mid_lo, mid_hi, hi = _segment_blocks(start_m, q_last, window, BLOCK_N)
    n_mem_edge = (mem_mid - mem_lo_blk) // BLOCK_N
    n_win_edge = (mid_lo - lo) // BLOCK_N
    n_edge = n_mem_edge + n_win_edge + tl.cdiv(hi - mid_hi, BLOCK_N)
    n_mem_full = (M - mem_mid) // BLOCK_N
    n_full = n_mem_full + (mid_hi - mid_lo) // BLOCK_N
    row_lo = tl.maximum(mem_lo, M + offs_m - window + 1)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mk_base, mv_base,  #
                            stride_ks, stride_kd, stride_vs, stride_vd,  #
                            stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                            n_full, n_mem_full, n_full, mem_mid, M + mid_lo, 0,  #
                            M, mem_lo, M + S, row_lo, M + offs_m, qk_scale,  #
                            BLOCK_N, HEAD_DIM, False, UPCAST, FP32_IEEE)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mk_base, mv_base,  #
                            stride_ks, stride_kd, stride_vs, stride_vd,  #
                            stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                            n_edge, n_mem_edge, n_win_edge, mem_lo_blk, M + lo, M + mid_hi,  #
                            M, mem_lo, M + S, row_lo, M + offs_m, qk_scale,  #
                            BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)

    dq *= sm_scale
    dq_ptrs = DQ + b64 * stride_dqb + off_h.to(tl.int64) * stride_dqh \
        + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


_PREPROCESS_BLOCK_M = 64


def preprocess_configs(head_dim: int, elt: int, smem_limit: int) -> list:
    """The preprocess kernel is not autotuned: its one launch config, for the AOT gate."""
    return [triton.Config({"BLOCK_M": _PREPROCESS_BLOCK_M}, num_warps=4, num_stages=1)]


def attention_backward(do, q, k, v, mem_k, mem_v, mem_len32, out, lse2, scale, window_eff, dims):
    """Launch preprocess, dK/dV and dQ.

    Args:
        do: ``(B, H, S, D)`` gradient of ``out``, any strides.
        q, k, v, mem_k, mem_v, mem_len32, scale, window_eff, dims: as for the forward.
        out: ``(B, H, S, D)`` forward output; lse2: ``(B, H, S)`` fp32 forward LSE in log2 units.

    Returns:
        ``dq`` ``(B, H, S, D)``, ``dk``, ``dv`` ``(B, Hkv, S, D)`` in the input dtype.
    """
    B, H, Hkv, S, M, D, G = dims.B, dims.H, dims.Hkv, dims.S, dims.M, dims.D, dims.groups
    if B == 0:  # an empty grid is not a valid launch
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if M == 0:  # any valid pointer works: the memory loops run zero iterations
        mem_k, mem_v = k, v
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess[(triton.cdiv(S, _PREPROCESS_BLOCK_M), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, S,
        BLOCK_M=_PREPROCESS_BLOCK_M, HEAD_DIM=D,
    )
    dq = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, S, D), dtype=v.dtype, device=v.device)
    common = dict(HEAD_DIM=D, UPCAST=INTERPRETING, FP32_IEEE=q.dtype == torch.float32)

    grid_kv = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
    _attn_bwd_dkdv[grid_kv](
        q, k, v, do, lse2, delta, dk, dv,
        scale, window_eff,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Hkv, S, G, size_bucket(S),
        **common, **launch_meta("dkdv", dkdv_configs, D, q.element_size()),
    )
    grid_q = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq[grid_q](
        q, k, v, mem_k, mem_v, mem_len32, do, lse2, delta, dq,
        scale, window_eff,
        *q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(),
        *do.stride(), *dq.stride(),
        H, S, M, G, size_bucket(S), size_bucket(M),
        **common, **launch_meta("dq", dq_configs, D, q.element_size()),
    )
    return dq, dk, dv
