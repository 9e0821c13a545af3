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

import os

import torch
import triton
import triton.language as tl

# Read once, at import: TRITON_INTERPRET decides how @triton.jit functions are built.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotuning benchmarks configs with a GPU driver; the interpreter has none.
AUTOTUNE = (not INTERPRETING) and torch.cuda.is_available()

LN2 = 0.6931471805599453

# Interpreter block sizes. Each program is simulated op by op in numpy at ~1 ms per launch plus a
# per-op cost, so few large programs are much faster than many small ones. Tests may patch these
# (smaller, unequal blocks exercise the block-range arithmetic).
INTERPRET_META = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 64},
    "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 64},
}


def launch_meta(kernel: str) -> dict:
    """Block sizes to pass at launch: none when autotuning (the autotuner picks), else fixed."""
    return {} if AUTOTUNE else dict(INTERPRET_META[kernel])


def maybe_autotune(configs, key):
    """``triton.autotune(configs, key)`` on a GPU; identity in the interpreter (no driver to time with)."""
    if AUTOTUNE:
        return triton.autotune(configs=configs, key=key)
    return lambda fn: fn


def size_bucket(n: int) -> int:
    """Autotune key for a length: the next power of two, so a growing memory does not retune every call."""
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit helpers (the backward imports them too).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32.

    UPCAST: the interpreter's dot is numpy matmul, which reads bfloat16 storage as raw uint16 and
    returns garbage, so operands are widened to fp32 first (exact, since bf16/fp16 embed in fp32).
    FP32_IEEE: fp32 inputs would silently get TF32 (10-bit mantissa) on NVIDIA tensor cores;
    the op promises fp32 accuracy for fp32 input, so ask for IEEE fp32.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if FP32_IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _memory_blocks(M, mem_lo, q_first, q_last, window, BLOCK_N: tl.constexpr):
    """Memory key-block range for query rows ``[q_first, q_last]`` (segment positions).

    Memory blocks start at ``M - k * BLOCK_N`` (right-aligned). Returns ``(lo, mid)``: blocks in
    ``[lo, mid)`` are partly visible (mem_len edge, window edge, or negative slots) and need masks;
    blocks in ``[mid, M)`` are visible to every row and run unmasked. Blocks left of ``lo`` are
    invisible to every row and are skipped. ``mem_lo = M - mem_len[b]`` is the first valid slot.
    Query ``i`` sits at key index ``M + i`` and sees memory slot ``j`` iff ``M + i - j < window``.
    """
    need_lo = tl.maximum(mem_lo, M + q_first - window + 1)  # first slot any row sees
    full_lo = tl.maximum(mem_lo, M + q_last - window + 1)  # first slot every row sees
    n_need = tl.cdiv(tl.maximum(M - need_lo, 0), BLOCK_N)
    n_full = tl.maximum(M - full_lo, 0) // BLOCK_N
    return M - n_need * BLOCK_N, M - n_full * BLOCK_N


@triton.jit
def _segment_blocks(q_first, q_last, window, BLOCK_N: tl.constexpr):
    """Segment key-block range for query rows ``[q_first, q_last]``; ``q_first % BLOCK_N == 0``.

    Returns ``(lo, mid_lo, mid_hi, hi)``: masked ``[lo, mid_lo)`` (window edge), unmasked
    ``[mid_lo, mid_hi)``, masked ``[mid_hi, hi)`` (the causal diagonal). Keys left of ``lo`` are
    outside every row's window and are skipped; keys from ``hi`` on are in every row's future.
    """
    lo = tl.maximum(q_first - window + 1, 0) // BLOCK_N * BLOCK_N
    full_lo = tl.cdiv(tl.maximum(q_last - window + 1, 0), BLOCK_N) * BLOCK_N
    # A block ending at or before q_first is in the past of every row (causally full).
    mid_hi = q_first
    mid_lo = tl.minimum(full_lo, mid_hi)
    return lo, mid_lo, mid_hi, q_last + 1


# ----------------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,  #
                    K, V, stride_kn, stride_kd, stride_vn, stride_vd,  #
                    lo, hi, key_lo, key_hi, q_pos, qk_scale, window,  #
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,  #
                    UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Online-softmax update over key blocks ``[lo, hi)`` of one KV tensor (memory or segment).

    ``q_pos`` (BLOCK_M,) is each query row's position in this tensor's key coordinates; a row
    sees key ``j`` iff ``key_lo <= j < key_hi``, ``j <= q_pos`` and ``q_pos - j < window``.
    With ``MASKED=False`` the caller guarantees all of that for every (row, key) pair.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_key = start_n + offs_n
        kT_ptrs = K + offs_key[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, BLOCK_N)
        v_ptrs = V + offs_key[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        # -- compute qk ----
        if MASKED:
            # Out-of-bounds loads are silent, so the slot range doubles as the load mask.
            in_range = (offs_key >= key_lo) & (offs_key < key_hi)
            kT = tl.load(kT_ptrs, mask=in_range[None, :], other=0.0)
        else:
            kT = tl.load(kT_ptrs)
        qk = _mma(q, kT, None, UPCAST, FP32_IEEE) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = in_range[None, :] & (offs_key[None, :] <= q_pos[:, None]) \
                & (q_pos[:, None] - offs_key[None, :] < window)
            qk = tl.where(visible, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0
            # rather than exp2(-inf - -inf) = NaN.
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_sub = m_ij
        p = tl.math.exp2(qk - m_sub[:, None])
        l_ij = tl.sum(p, 1)
        # -- update m_i and l_i
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + l_ij
        # -- update output accumulator --
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        # P is rounded to the input dtype before P @ V, like the reference does.
        acc = _mma(p.to(v.dtype), v, acc, UPCAST, FP32_IEEE)
        m_i = m_ij
    return acc, l_i, m_i


_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64)
    for w in (4, 8)
    for s in (2, 3)
    if not (w == 8 and bm * bn < 128 * 64)
]


@maybe_autotune(_FWD_CONFIGS, key=["S_BUCKET", "M_BUCKET", "HEAD_DIM"])
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
    mem_lo = M - tl.load(MemLen + off_b)  # first valid memory slot of this lane
    # initialize running max, normalizer and accumulator
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # fold log2(e) so the loop uses exp2
    # load q: it stays in registers for every key block
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)

    # stage 1: memory (all of it is in every row's causal past)
    mem_lo_blk, mem_mid = _memory_blocks(M, mem_lo, start_m, q_last, window, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, mk_base, mv_base,  #
                                    stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                                    mem_lo_blk, mem_mid, mem_lo, M, M + offs_m, qk_scale, window,  #
                                    BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, mk_base, mv_base,  #
                                    stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                                    mem_mid, M, mem_lo, M, M + offs_m, qk_scale, window,  #
                                    BLOCK_N, HEAD_DIM, False, UPCAST, FP32_IEEE)
    # stage 2: segment -- window edge (masked), fully visible (unmasked), diagonal (masked)
    lo, mid_lo, mid_hi, hi = _segment_blocks(start_m, q_last, window, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base,  #
                                    stride_ks, stride_kd, stride_vs, stride_vd,  #
                                    lo, mid_lo, 0, S, offs_m, qk_scale, window,  #
                                    BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base,  #
                                    stride_ks, stride_kd, stride_vs, stride_vd,  #
                                    mid_lo, mid_hi, 0, S, offs_m, qk_scale, window,  #
                                    BLOCK_N, HEAD_DIM, False, UPCAST, FP32_IEEE)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base,  #
                                    stride_ks, stride_kd, stride_vs, stride_vd,  #
                                    mid_hi, hi, 0, S, offs_m, qk_scale, window,  #
                                    BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)

    # epilogue: padding rows past S may have seen no key (l = 0); keep them finite, they are not stored
    l_i = tl.where(row_ok, l_i, 1.0)
    m_i = tl.where(row_ok, m_i, 0.0)
    # LSE stays in log2 units: the backward rebuilds P = exp2(qk * qk_scale - lse2) without a
    # ln <-> log2 round trip (two roundings that showed up as ~1e-6 relative error in fp32 dQ).
    lse2 = m_i + tl.math.log2(l_i)
    acc = acc / l_i[:, None]
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
        **launch_meta("fwd"),
    )
    return out, lse2
