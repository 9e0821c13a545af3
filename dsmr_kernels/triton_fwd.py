"""Triton forward kernel of segment-memory attention, plus the helpers the backward shares.

Layout of the key axis for one query block (the mask picture is in ``interface.py``)::

    memory (MemK/MemV, M slots, right-aligned)        | segment (K/V, S slots)
    [ skipped | masked edge | unmasked ... unmasked ] | [ skipped | masked | unmasked | masked diag ]
      invalid   mem_len or      fully visible            outside   window   fully     causal
      or out    window edge                               window   edge     visible   diagonal
      of window

Memory and segment are read from their own tensors through two pointers; nothing is
concatenated. Memory key blocks are aligned to the *right* end (``M - k * BLOCK_N``), so every
memory block but the leftmost is fully in bounds and only that leftmost one straddles the
``mem_len`` edge. Segment key blocks are aligned to 0 like the query blocks. A block is run
without masks only when every query row of the program sees every key of the block.

Softmax is online (FlashAttention-2, as in Triton's ``06-fused-attention`` tutorial): scores are
multiplied by ``scale * log2(e)`` so ``exp2`` can be used, and the kernel stores the
LSE ``(B, H, S)`` in log2 units (``log2 sum_j 2^(qk_j * scale * log2 e)``) that the backward
uses to rebuild the probabilities; the public op returns it times ln 2.
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
def _attn_fwd_inner(acc, l_i, m_i, q,  #
                    K, V, MemK, MemV,  #
                    stride_ks, stride_kd, stride_vs, stride_vd,  #
                    stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                    n_blocks, n1, n2, start1, start2, start3,  #
                    M, key_lo, key_hi, row_lo, row_hi, qk_scale,  #
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,  #
                    UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Online-softmax update over ``n_blocks`` key blocks (up to three ranges, see ``_nth_block``).

    Keys live in the joint index space of ``triton_common``: a block starting below ``M`` reads
    the memory tensors, one starting at ``M + s`` reads segment row ``s``. Row ``r`` sees key
    ``J`` iff ``row_lo[r] <= J <= row_hi[r]``; keys outside ``[key_lo, key_hi)`` are never loaded
    (invalid slots may hold NaN/inf garbage; out-of-bounds loads are silent). With
    ``MASKED=False`` the caller guarantees every row sees every key of every block.

    Non-finite values follow the reference's rule. In a masked block a value row can be hidden
    from some rows (a future key on the causal diagonal, a key past a window edge), where
    0 * NaN would poison them; so masked blocks load non-finite value rows as zeros and give
    the rows that see one a NaN score instead. Unmasked blocks need neither: every row sees
    every key, and NaN or inf values propagate on their own.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Masked ranges are a few edge blocks: software-pipelining them buys nothing and costs
    # registers and shared memory, so only the unmasked interior is pipelined.
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
            # Value rows with a NaN or inf (0 * x is NaN exactly for those), read before the
            # score tile exists: a check on the loaded V tile later, beside P, spilled registers
            # at D = 128 on sm_90. Those rows are then loaded as zeros below.
            v_chk = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
            v_bad = tl.sum(v_chk.to(tl.float32) * 0.0, 1) != 0.0  # (BLOCK_N,)
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = _mma(q, tl.trans(k), None, UPCAST, FP32_IEEE) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = (offs_key[None, :] >= row_lo[:, None]) & (offs_key[None, :] <= row_hi[:, None])
            # A visible non-finite value row makes the score NaN, so P, the row sum and the
            # output of every row that sees it turn NaN; rows that do not see it get P = 0 and
            # the row's zeros. No extra tile or reduction (a flag tile spilled on sm_80).
            qk = tl.where(visible, tl.where(v_bad[None, :], float("nan"), qk), float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0
            # rather than exp2(-inf - -inf) = NaN.
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_sub = m_ij
        p = tl.math.exp2(qk - m_sub[:, None])
        l_ij = tl.sum(p, 1)
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + l_ij
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=(in_range & ~v_bad)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        # P is rounded to the input dtype before P @ V, like the reference does.
        acc = _mma(p.to(v.dtype), v, acc, UPCAST, FP32_IEEE)
        m_i = m_ij
    return acc, l_i, m_i


# 16-bit: 128-row blocks need 8 warps (with 4 they measured 205-255 registers at D=64 on sm_90
# and spilled at D=128).
_FWD_CONFIGS_16 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4 if bm == 64 else 8, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64)
    for s in (2, 3)
]
# fp32 asks for IEEE dots, which run as FMAs on CUDA cores with the whole tile in registers:
# only small tiles stay out of local memory (64x32 spilled 650 B at D=64 and 12 KB at D=128),
# and there is no tensor-core load to pipeline.
_FWD_CONFIGS_32 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
]
_FWD_CONFIGS = _FWD_CONFIGS_16 + _FWD_CONFIGS_32


def fwd_smem(cfg, head_dim: int, elt: int) -> int:
    """Upper bound on the forward's shared memory: q, plus K and V tiles per pipeline stage."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return elt * head_dim * (bm + 2 * bn * cfg.num_stages) + 2048


def _fwd_regs_ok(cfg, head_dim: int, elt: int) -> bool:
    # fp32 at D=128: 32x16 with 4 warps spilled 176 B; 8 warps or 16x16 stay in registers.
    return not (elt == 4 and head_dim > 64 and cfg.kwargs["BLOCK_M"] == 32 and cfg.num_warps == 4)


#: ``(head_dim, elt, smem_limit) -> configs``: what the forward autotuner may pick on a card (the AOT
#: gate compiles exactly these).
fwd_configs = config_rule(_FWD_CONFIGS_16, _FWD_CONFIGS_32, fwd_smem, _fwd_regs_ok)


@maybe_autotune(_FWD_CONFIGS, key=["S_BUCKET", "M_BUCKET", "HEAD_DIM"],
                prune_configs_by={"early_config_prune": make_prune(fwd_configs)})
@triton.jit
def _attn_fwd(Q, K, V, MemK, MemV, MemLen, Out, Lse2,  #
              sm_scale, window,  #
              stride_qb, stride_qh, stride_qs, stride_qd,  #
              stride_kb, stride_kh, stride_ks, stride_kd,  #
              stride_vb, stride_vh, stride_vs, stride_vd,  #
              stride_mkb, stride_mkh, stride_mks, stride_mkd,  #
              stride_mvb, stride_mvh, stride_mvs, stride_mvd,  #
              stride_ob, stride_oh, stride_os, stride_od,  #
              H, S, M, G, S_BUCKET, M_BUCKET,  #
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
              UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """One program = one query block of one (lane, query head). Grid ``(cdiv(S, BLOCK_M), B * H)``."""
    # tl.dot on GPUs needs every tile dim >= 16 (one assert each: older Triton rejects `a and b and c`)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(HEAD_DIM >= 16)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # _segment_blocks: query blocks start on key blocks
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G  # GQA: G query heads share one kv head; index it, never repeat K/V
    b64 = off_b.to(tl.int64)
    q_base = Q + b64 * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    mk_base = MemK + b64 * stride_mkb + off_hk.to(tl.int64) * stride_mkh
    mv_base = MemV + b64 * stride_mvb + off_hk.to(tl.int64) * stride_mvh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q_last = tl.minimum(start_m + BLOCK_M, S) - 1
    mem_lo = M - tl.minimum(tl.maximum(tl.load(MemLen + off_b), 0), M)  # first valid slot; clamped: no host check on GPUs
    # initialize running max, normalizer and accumulator
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # fold log2(e) so the loop uses exp2
    # load q: it stays in registers for every key block
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)

    # Key blocks in the joint index space (memory [0, M), segment [M, M + S)): the edge blocks
    # (mem_len / window edges, the causal diagonal) in one masked loop, the fully visible ones in
    # one unmasked loop.
    mem_lo_blk, mem_mid = _memory_blocks(M, mem_lo, start_m, q_last, window, BLOCK_N)
    lo, mid_lo, mid_hi, hi = _segment_blocks(start_m, q_last, window, BLOCK_N)
    n_mem_edge = (mem_mid - mem_lo_blk) // BLOCK_N
    n_win_edge = (mid_lo - lo) // BLOCK_N
    n_edge = n_mem_edge + n_win_edge + tl.cdiv(hi - mid_hi, BLOCK_N)
    n_mem_full = (M - mem_mid) // BLOCK_N
    n_full = n_mem_full + (mid_hi - mid_lo) // BLOCK_N
    row_lo = tl.maximum(mem_lo, M + offs_m - window + 1)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, mk_base, mv_base,  #
                                    stride_ks, stride_kd, stride_vs, stride_vd,  #
                                    stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                                    n_full, n_mem_full, n_full, mem_mid, M + mid_lo, 0,  #
                                    M, mem_lo, M + S, row_lo, M + offs_m, qk_scale,  #
                                    BLOCK_N, HEAD_DIM, False, UPCAST, FP32_IEEE)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, mk_base, mv_base,  #
                                    stride_ks, stride_kd, stride_vs, stride_vd,  #
                                    stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                                    n_edge, n_mem_edge, n_win_edge, mem_lo_blk, M + lo, M + mid_hi,  #
                                    M, mem_lo, M + S, row_lo, M + offs_m, qk_scale,  #
                                    BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)

    # epilogue: padding rows past S may have seen no key (l = 0); keep them finite, they are not stored
    l_i = tl.where(row_ok, l_i, 1.0)
    m_i = tl.where(row_ok, m_i, 0.0)
    # LSE stays in log2 units: the backward rebuilds P = exp2(qk * qk_scale - lse2) without a
    # ln <-> log2 round trip (two roundings that showed up as ~1e-6 relative error in fp32 dQ).
    lse2 = m_i + tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    # A non-finite value in an unmasked block leaves the LSE finite: NaN it where the output row
    # is non-finite, as the reference does. One pass over the tile per program, none per key block.
    bad = tl.max(tl.where(tl.abs(acc) < float("inf"), 0, 1), 1)
    lse2 = tl.where(bad > 0, float("nan"), lse2)
    acc = tl.where(bad[:, None] > 0, float("nan"), acc)
    tl.store(Lse2 + off_bh.to(tl.int64) * S + offs_m, lse2, mask=row_ok)
    o_ptrs = Out + b64 * stride_ob + off_h.to(tl.int64) * stride_oh \
        + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])


def attention_forward(q, k, v, mem_k, mem_v, mem_len32, scale, window_eff, dims):
    """Launch the forward kernel.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, Hkv, S, D)``; any strides.
        mem_k, mem_v: ``(B, Hkv, M, D)`` or None when ``M == 0``.
        mem_len32: ``(B,)`` int32, valid memory slots per lane (all M when the user passed None).
        scale: softmax scale; window_eff: window, ``M + S`` standing in for "no window".
        dims: ``OpDims`` of the call.

    Returns:
        ``out`` ``(B, H, S, D)`` in q's dtype and ``lse2`` ``(B, H, S)`` fp32, the log-sum-exp in
        log2 units (multiply by ln 2 for the natural-log LSE).
    """
    B, H, S, M, D, G = dims.B, dims.H, dims.S, dims.M, dims.D, dims.groups
    out = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    if B == 0:  # an empty grid is not a valid launch
        return out, lse2
    if M == 0:  # any valid pointer works: the memory loops run zero iterations
        mem_k, mem_v = k, v
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, mem_k, mem_v, mem_len32, out, lse2,
        scale, window_eff,
        *q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(), *out.stride(),
        H, S, M, G, size_bucket(S), size_bucket(M),
        HEAD_DIM=D, UPCAST=INTERPRETING, FP32_IEEE=q.dtype == torch.float32,
        **launch_meta("fwd", fwd_configs, D, q.element_size()),
    )
    return out, lse2
