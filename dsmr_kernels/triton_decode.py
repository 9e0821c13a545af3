"""Triton decode kernel of segment-memory attention: split-KV for small ``S x B x H`` (generation).

The prefill forward (``triton_fwd.py``) runs one program per (query block, lane, query head). At
``S = 1`` that tile is 63/64 padding and only ``B * H`` programs stream the whole memory, far too
few to fill a GPU. Here (as in flash-decoding):

* **GQA rows packed.** One program serves every query row of one KV head: the ``G = H / Hkv``
  heads times ``S`` queries form its row block (row ``r`` is head ``r // S``, query ``r % S``), so
  each key/value tile is read once per KV head, not once per query head.
* **Split-KV.** The memory axis is cut into ``n_splits`` right-aligned chunks of ``split_len``
  slots (a multiple of every ``BLOCK_N`` the autotuner may pick); grid ``(B * Hkv, n_splits,
  row blocks)``. The last split also covers the ``S`` segment keys. Each program writes a partial
  (LSE, normalized output); a split that sees no key (invalid memory, outside the window) writes
  the neutral partial ``(-inf, 0)``.
* **Combine.** A second small kernel merges the partials of each row by LSE.

Masks, as in the forward: memory slot ``j`` is valid iff ``M - mem_len[b] <= j < M``; query ``i``
sees key index ``j`` iff ``j <= M + i`` and ``M + i - j < window``. Invalid slots are never
multiplied: masked loads zero them, so NaN/inf garbage there cannot reach the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import AUTOTUNE, INTERPRETING, _mma, device_smem_limit, maybe_autotune, size_bucket

# Every split length is a multiple of this, hence of every BLOCK_N in DECODE_CONFIGS (the block
# grid of each split must not overlap its neighbour's). Tests patch it (and the interpreter's
# BLOCK_N) small to get many splits from a small memory.
SPLIT_ALIGN = 128
# Programs to aim for: about two per SM of an H100/H200 (132 SMs); the launcher reads the real
# SM count on CUDA.
DEFAULT_SM_COUNT = 132
PROGRAMS_PER_SM = 2
# Row block (GQA heads x queries) limits: tl.dot needs >= 16 rows; more than 32 rows go to
# further row blocks (this kernel is for small S; prefill belongs to the forward kernel). 64-row
# blocks pushed bf16 D >= 64 to 235-255 registers on sm_80/sm_90.
MIN_ROWS, MAX_ROWS = 16, 32

INTERPRET_META = {"decode": {"BLOCK_N": 64}, "combine": {"BLOCK_RC": 16}}

# Decode streams K/V once: two tile widths, two pipeline depths and an 8-warp variant for the
# widest tiles (a wider sweep multiplied compile and autotune time for nothing the cubins could
# show), plus one small 32-key tile that fits fp32 at D=128 on ~100 KB shared-memory cards.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w in ((64, 4), (128, 4), (128, 8))
    for s in (2, 3)
] + [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)]
assert all(SPLIT_ALIGN % c.kwargs["BLOCK_N"] == 0 for c in DECODE_CONFIGS)
# The combine kernel is tiny and memory-bound; one fixed config (the AOT tool compiles it too).
COMBINE_CONFIG = triton.Config({"BLOCK_RC": 16}, num_warps=4, num_stages=1)


def decode_smem_bytes(config, head_dim: int, elem_bytes: int, block_r: int) -> int:
    """Conservative shared-memory estimate of the split kernel at ``config``.

    Pipelining keeps ``num_stages`` K and V tiles in flight; q and the P tile that feeds the second
    dot (converted to a dot-operand layout through shared memory) come on top.
    """
    bn, stages = config.kwargs["BLOCK_N"], max(config.num_stages, 1)
    kv = 2 * stages * bn * head_dim * elem_bytes
    return kv + block_r * head_dim * elem_bytes + block_r * bn * max(elem_bytes, 2)


def prune_decode_configs(configs, head_dim: int, elem_bytes: int, block_r: int, smem_limit: int):
    """The configs the autotuner may pick at this shape (never empty).

    Drops configs whose estimated shared memory exceeds ``smem_limit`` bytes, and two kinds where
    ptxas spilled a few bytes to reach its occupancy target (measured from sm_80/sm_90 cubins):
    8 warps on anything but 128-key tiles at D >= 32 (it caps 8-warp programs near 128 registers:
    spills at D = 16 x 64 keys on sm_90, D = 128 x 64 keys x 32 rows on sm_80), and score tiles
    over 16 fp32 per thread (``block_r * BLOCK_N / threads``; spills at 32 rows x 128 keys, 4 warps).
    """
    def sane(c):
        bn, threads = c.kwargs["BLOCK_N"], 32 * c.num_warps
        return (c.num_warps < 8 or (bn == 128 and head_dim >= 32)) and block_r * bn <= 16 * threads

    cands = [c for c in configs if sane(c)] or configs
    fit = [c for c in cands if decode_smem_bytes(c, head_dim, elem_bytes, block_r) <= smem_limit]
    if not fit:  # keep the smallest so a launch is always possible (and fails loudly if it cannot)
        fit = [min(cands, key=lambda c: decode_smem_bytes(c, head_dim, elem_bytes, block_r))]
    return fit


def _early_prune(configs, named_args, **kwargs):
    """``triton.autotune`` hook: drop configs that overflow the current device's shared memory
    (``triton_attention`` launches under the tensors' device, so that is q's device)."""
    args = {**named_args, **kwargs}
    return prune_decode_configs(configs, args["HEAD_DIM"], args["Q"].element_size(), args["BLOCK_R"],
                                device_smem_limit())


@triton.jit
def _decode_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,  #
                  lo, hi, key_lo, key_hi, q_pos, qk_scale, window,  #
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,  #
                  UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Online-softmax update over key blocks ``[lo, hi)`` of one KV tensor (memory or segment).

    Row ``r`` sees key ``j`` iff ``key_lo <= j < key_hi``, ``j <= q_pos[r]`` and
    ``q_pos[r] - j < window``; ``MASKED=False`` means the caller guarantees it for every pair.
    Block bases are int64 (``slot * stride`` can pass 2^31 in a strided memory view); in-block
    offsets stay int32 (the launcher keeps ``BLOCK_N * stride`` below 2^31).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kT_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, BLOCK_N)
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
    for start_n in range(lo, hi, BLOCK_N):
        kT_ptrs = K + tl.cast(start_n, tl.int64) * stride_kn + kT_offs
        v_ptrs = V + tl.cast(start_n, tl.int64) * stride_vn + v_offs
        offs_key = start_n + offs_n
        if MASKED:
            # Invalid slots load as 0 (never their garbage), so 0 * NaN cannot happen below.
            in_range = (offs_key >= key_lo) & (offs_key < key_hi)
            kT = tl.load(kT_ptrs, mask=in_range[None, :], other=0.0)
        else:
            kT = tl.load(kT_ptrs)
        qk = _mma(q, kT, None, UPCAST, FP32_IEEE) * qk_scale  # (BLOCK_R, BLOCK_N), log2 units
        if MASKED:
            visible = in_range[None, :] & (offs_key[None, :] <= q_pos[:, None]) \
                & (q_pos[:, None] - offs_key[None, :] < window)
            qk = tl.where(visible, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # no key yet: exp2(-inf - 0) = 0, no NaN
        else:
            m_sub = m_ij
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _mma(p.to(v.dtype), v, acc, UPCAST, FP32_IEEE)  # P rounded to the input dtype, like the reference
        m_i = m_ij
    return acc, l_i, m_i


@maybe_autotune(DECODE_CONFIGS, key=["SPLIT_BUCKET", "HEAD_DIM", "BLOCK_R"],
                prune_configs_by={"early_config_prune": _early_prune})
@triton.jit
def _decode_split(Q, K, V, MemK, MemV, MemLen, PartO, PartLse,  #
                  sm_scale, window,  #
                  stride_qb, stride_qh, stride_qs, stride_qd,  #
                  stride_kb, stride_kh, stride_ks, stride_kd,  #
                  stride_vb, stride_vh, stride_vs, stride_vd,  #
                  stride_mkb, stride_mkh, stride_mks, stride_mkd,  #
                  stride_mvb, stride_mvh, stride_mvs, stride_mvd,  #
                  Hkv, S, M, G, SPLIT_LEN, N_ROWS, SPLIT_BUCKET,  #
                  HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,  #
                  UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """One program = one row block (GQA heads x queries) of one (lane, kv head), one key split.

    Grid ``(B * Hkv, n_splits, cdiv(G * S, BLOCK_R))``. Writes the split's partial LSE (log2
    units, ``-inf`` when it saw no key) to ``PartLse[split, row]`` and its normalized output (0 when
    it saw no key) to ``PartO[split, row, :]``; ``row`` indexes ``(B, H, S)`` flattened.
    """
    tl.static_assert(BLOCK_R >= 16)  # one assert per condition: older Triton rejects `a and b`
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(HEAD_DIM >= 16)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    off_b = pid_bh // Hkv
    off_hk = pid_bh % Hkv
    b64 = off_b.to(tl.int64)
    k_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    mk_base = MemK + b64 * stride_mkb + off_hk.to(tl.int64) * stride_mkh
    mv_base = MemV + b64 * stride_mvb + off_hk.to(tl.int64) * stride_mvh

    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of this kv head
    row_ok = rows < G * S
    head = off_hk * G + rows // S  # query head of each row
    qi = rows % S  # query index in the segment of each row
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b64 * stride_qb + (head.to(tl.int64) * stride_qh + qi.to(tl.int64) * stride_qs)[:, None] \
        + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # fold log2(e) so the loop uses exp2

    # Memory slots of this split: [split_hi - SPLIT_LEN, split_hi), right-aligned like the forward.
    # The row block may hold every query index, so the block ranges are taken over all of [0, S).
    mem_lo = M - tl.minimum(tl.maximum(tl.load(MemLen + off_b), 0), M)  # first valid slot; clamped: no host check on GPUs
    split_hi = M - (n_splits - 1 - split) * SPLIT_LEN
    need_lo = tl.maximum(tl.maximum(mem_lo, M - window + 1), split_hi - SPLIT_LEN)  # query 0 sees it
    full_lo = tl.maximum(mem_lo, M + S - window)  # query S-1 (hence every query) sees it
    n_need = tl.cdiv(tl.maximum(split_hi - need_lo, 0), BLOCK_N)
    n_full = tl.minimum(tl.maximum(split_hi - full_lo, 0) // BLOCK_N, n_need)
    lo = split_hi - n_need * BLOCK_N
    mid = split_hi - n_full * BLOCK_N
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, mk_base, mv_base,  #
                                  stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                                  lo, mid, mem_lo, M, M + qi, qk_scale, window,  #
                                  BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, mk_base, mv_base,  #
                                  stride_mks, stride_mkd, stride_mvs, stride_mvd,  #
                                  mid, split_hi, mem_lo, M, M + qi, qk_scale, window,  #
                                  BLOCK_N, HEAD_DIM, False, UPCAST, FP32_IEEE)
    # The segment (a few keys at decode) belongs to the last split, masked: causal diagonal + window.
    seg_hi = tl.where(split == n_splits - 1, S, 0)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, k_base, v_base,  #
                                  stride_ks, stride_kd, stride_vs, stride_vd,  #
                                  0, seg_hi, 0, S, qi, qk_scale, window,  #
                                  BLOCK_N, HEAD_DIM, True, UPCAST, FP32_IEEE)

    # Neutral partial for rows that saw no key here: LSE -inf, output 0 (never 0/0).
    seen = l_i > 0.0
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    prow = split.to(tl.int64) * N_ROWS + pid_bh.to(tl.int64) * (G * S) + rows
    tl.store(PartLse + prow, lse2, mask=row_ok)
    tl.store(PartO + prow[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])


@triton.jit
def _decode_combine(PartO, PartLse, Out, Lse2, N_ROWS, N_SPLITS,  #
                    HEAD_DIM: tl.constexpr, BLOCK_RC: tl.constexpr):
    """Merge the split partials of ``BLOCK_RC`` rows by LSE. Grid ``(cdiv(N_ROWS, BLOCK_RC),)``.

    ``out = sum_s 2^(lse_s - lse) * o_s`` with ``lse = log2 sum_s 2^lse_s``; neutral partials
    (``lse_s = -inf``) weigh exactly 0. ``Out`` is contiguous ``(B, H, S, D)``.
    """
    rows = tl.program_id(0) * BLOCK_RC + tl.arange(0, BLOCK_RC)
    row_ok = rows < N_ROWS
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.zeros([BLOCK_RC], dtype=tl.float32) - float("inf")
    for s in range(0, N_SPLITS):
        m = tl.maximum(m, tl.load(PartLse + s * N_ROWS + rows64, mask=row_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)  # only padding rows: every real row sees itself
    l_sum = tl.zeros([BLOCK_RC], dtype=tl.float32)
    acc = tl.zeros([BLOCK_RC, HEAD_DIM], dtype=tl.float32)
    for s in range(0, N_SPLITS):
        prow = s * N_ROWS + rows64
        w = tl.math.exp2(tl.load(PartLse + prow, mask=row_ok, other=float("-inf")) - m)
        o = tl.load(PartO + prow[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        l_sum += w
        acc += w[:, None] * o
    l_safe = tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(Lse2 + rows64, m + tl.math.log2(l_safe), mask=row_ok)
    tl.store(Out + rows64[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])


def decode_block_rows(groups: int, S: int) -> int:
    """Row block of the split kernel for ``groups * S`` packed rows: a power of two in [16, 64]."""
    return min(MAX_ROWS, max(MIN_ROWS, triton.next_power_of_2(groups * S)))


def decode_splits(M: int, programs: int, sm_count: int = DEFAULT_SM_COUNT) -> tuple:
    """``(n_splits, split_len)`` for a memory of ``M`` slots and ``programs`` programs per split.

    Enough splits that ``programs * n_splits`` reaches ~``PROGRAMS_PER_SM * sm_count``, each split
    at least ``SPLIT_ALIGN`` slots and a multiple of it; ``n_splits * split_len >= M``.
    """
    if M <= 0:
        return 1, SPLIT_ALIGN
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(programs, 1))
    n = max(1, min(want, triton.cdiv(M, SPLIT_ALIGN)))
    split_len = triton.cdiv(triton.cdiv(M, n), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(M, split_len), split_len


def _launch_meta(head_dim: int, elt: int, block_r: int) -> dict:
    """Autotuning: none. Interpreter: fixed blocks. A GPU with DSMR_AUTOTUNE=0: the first pruned config."""
    if AUTOTUNE:
        return {}
    if INTERPRETING:
        return dict(INTERPRET_META["decode"])
    cfg = prune_decode_configs(DECODE_CONFIGS, head_dim, elt, block_r, device_smem_limit())[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def decode_configs(block_r: int):
    """``(head_dim, elt, smem_limit) -> configs`` the autotuner may pick at row block ``block_r``
    (the AOT gate's view of :func:`prune_decode_configs`)."""
    return lambda head_dim, elt, smem_limit: prune_decode_configs(DECODE_CONFIGS, head_dim, elt, block_r,
                                                                  smem_limit)


def combine_configs(head_dim: int, elt: int, smem_limit: int) -> list:
    """The combine kernel's one launch config (for the AOT gate)."""
    return [COMBINE_CONFIG]


def _narrow_strides(t: torch.Tensor) -> torch.Tensor:
    """In-block offsets are int32: a tensor whose in-block offsets could pass 2^31 is copied."""
    return t if (abs(t.stride(2)) + abs(t.stride(3))) * SPLIT_ALIGN < 2**31 else t.contiguous()


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def decode_forward(q, k, v, mem_k, mem_v, mem_len32, scale, window_eff, dims):
    """Launch the split-KV decode kernel and its combine; same contract as ``attention_forward``.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, Hkv, S, D)``; any strides.
        mem_k, mem_v: ``(B, Hkv, M, D)`` or None when ``M == 0``.
        mem_len32: ``(B,)`` int32, valid memory slots per lane (all M when the user passed None).
        scale: softmax scale; window_eff: window, ``M + S`` standing in for "no window".
        dims: ``OpDims`` of the call.

    Returns:
        ``out`` ``(B, H, S, D)`` contiguous in q's dtype and ``lse2`` ``(B, H, S)`` fp32, the
        log-sum-exp in log2 units (multiply by ln 2 for the natural-log LSE). Forward only: meant
        for calls under ``torch.no_grad`` with small ``S`` (generation); any S is correct.
    """
    B, H, Hkv, S, M, D, G = dims.B, dims.H, dims.Hkv, dims.S, dims.M, dims.D, dims.groups
    out = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    if B == 0:  # an empty grid is not a valid launch
        return out, lse2
    if M == 0:  # any valid pointer works: the memory loops run zero iterations
        mem_k, mem_v = k, v
    q, k, v, mem_k, mem_v = (_narrow_strides(t) for t in (q, k, v, mem_k, mem_v))
    block_r = decode_block_rows(G, S)
    row_blocks = triton.cdiv(G * S, block_r)
    n_splits, split_len = decode_splits(M, B * Hkv * row_blocks, _sm_count(q.device))
    meta = _launch_meta(D, q.element_size(), block_r)
    if meta and split_len % meta["BLOCK_N"]:
        raise ValueError(f"split length {split_len} is not a multiple of BLOCK_N {meta['BLOCK_N']}")
    n_rows = B * H * S
    part_o = torch.empty((n_splits, n_rows, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((n_splits, n_rows), dtype=torch.float32, device=q.device)
    _decode_split[(B * Hkv, n_splits, row_blocks)](
        q, k, v, mem_k, mem_v, mem_len32, part_o, part_lse,
        scale, window_eff,
        *q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(),
        Hkv, S, M, G, split_len, n_rows, size_bucket(split_len),
        HEAD_DIM=D, BLOCK_R=block_r, UPCAST=INTERPRETING, FP32_IEEE=q.dtype == torch.float32,
        **meta,
    )
    if INTERPRETING:
        cmeta = dict(INTERPRET_META["combine"])
    else:
        cmeta = dict(COMBINE_CONFIG.kwargs, num_warps=COMBINE_CONFIG.num_warps, num_stages=COMBINE_CONFIG.num_stages)
    _decode_combine[(triton.cdiv(n_rows, cmeta["BLOCK_RC"]),)](
        part_o, part_lse, out, lse2, n_rows, n_splits, HEAD_DIM=D, **cmeta,
    )
    return out, lse2
