"""What the Triton kernels share: launch settings and the ``@triton.jit`` helpers.

The forward (``triton_fwd.py``), the backward (``triton_bwd.py``) and the decode kernel
(``triton_decode.py``) import from here; nothing here launches a kernel.

Key index space (the mask picture is in ``interface.py`` and ``docs/DESIGN.md``): memory slots
``[0, M)`` then segment keys ``[M, M + S)``. Query row ``r`` (0-based in the segment) sits at key
index ``M + r`` and sees key ``J`` iff ``J >= M - mem_len`` (a valid slot), ``J <= M + r``
(causal) and ``M + r - J < window``. The kernels fold all three into two per-row bounds
``row_lo[r] <= J <= row_hi[r]`` and walk *key blocks* in this one index space: memory blocks are
right-aligned (``M - k * BLOCK_N``) and segment blocks start at ``M + k * BLOCK_N``, so no block
straddles the memory/segment boundary and a block's start says which tensor it reads.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, at import: TRITON_INTERPRET decides how @triton.jit functions are built.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotuning benchmarks configs with a GPU driver; the interpreter has none. DSMR_AUTOTUNE=0
# turns it off on a GPU too (one fixed config per kernel: quick correctness runs, bisecting).
AUTOTUNE = (not INTERPRETING) and torch.cuda.is_available() and os.environ.get("DSMR_AUTOTUNE", "1") != "0"

LN2 = 0.6931471805599453

# Interpreter block sizes. Each program is simulated op by op in numpy at ~1 ms per launch plus a
# per-op cost, so few large programs are much faster than many small ones. Tests may patch these
# (smaller, unequal blocks exercise the block-range arithmetic).
INTERPRET_META = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 64},
    "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 64},
    "decode": {"BLOCK_N": 64, "SPLIT_BLOCKS": 4},
}


def launch_meta(kernel: str, configs_for=None, head_dim: int = 0, elt: int = 2) -> dict:
    """Meta-parameters to pass at launch.

    Autotuning: none (the autotuner picks). Interpreter: the fixed ``INTERPRET_META`` blocks. A GPU
    with ``DSMR_AUTOTUNE=0``: the first config ``configs_for(head_dim, elt, smem_limit)`` keeps
    (the same rule the autotuner and the AOT gate use, so it fits this card).
    """
    if AUTOTUNE:
        return {}
    if INTERPRETING or configs_for is None:
        return dict(INTERPRET_META[kernel])
    cfg = configs_for(head_dim, elt, device_smem_limit())[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def maybe_autotune(configs, key, prune_configs_by=None):
    """``triton.autotune`` on a GPU; identity in the interpreter (no driver to time with)."""
    if AUTOTUNE:
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune_configs_by)
    return lambda fn: fn


def size_bucket(n: int) -> int:
    """Autotune key for a length: the next power of two, so a growing memory does not retune every call."""
    return triton.next_power_of_2(max(int(n), 1))


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


@triton.jit
def _nth_block(t, n1, n2, start1, start2, start3, BLOCK_N: tl.constexpr):
    """Start of the ``t``-th key block of three back-to-back block ranges.

    The ranges hold ``n1``, ``n2`` and the remaining blocks and start at ``start1..3``. Walking
    several ranges in ONE loop matters on GPUs: every separate loop costs its own pipeline
    prologue, and the five loops of a per-range design measured ~60 more registers per thread.
    """
    j = start1 + t * BLOCK_N
    if t >= n1:
        j = start2 + (t - n1) * BLOCK_N
    if t >= n1 + n2:
        j = start3 + (t - n1 - n2) * BLOCK_N
    return j


@triton.jit
def _kv_block(MemX, X, j0, M, stride_mn, stride_n):
    """Base pointer of the key block starting at key index ``j0`` (memory or segment tensor).

    The block offset is 64-bit: memory can be a strided view of a larger buffer, and
    ``rows * stride`` may pass 2^31 even when every in-block offset fits in 32 bits.
    """
    if j0 < M:
        base = MemX + j0.to(tl.int64) * stride_mn
    else:
        base = X + (j0 - M).to(tl.int64) * stride_n
    return base


# ----------------------------------------------------------------------------------------------
# Which autotune configs a GPU may run. One rule set serves the autotuner (as its
# ``early_config_prune``) and the ahead-of-time gate (``python -m dsmr_kernels.aot``), which
# compiles exactly the configs these functions keep and fails if one of them does not fit.
# ----------------------------------------------------------------------------------------------

# Dynamic shared memory one block may opt into, by compute capability (CUDA programming guide).
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DEFAULT_SMEM_LIMIT = 101376  # the smallest of the above: safe for an unknown card


def device_smem_limit() -> int:
    """Shared memory (bytes) one block may use on the current CUDA device."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        return int(props["max_shared_mem"])
    except Exception:  # no driver (interpreter, AOT on a CPU box): the caller passes a limit
        return DEFAULT_SMEM_LIMIT


def pickable(configs, head_dim: int, elt: int, smem_limit: int, smem_estimate, reg_ok) -> list:
    """The configs a GPU may run: estimated shared memory fits and the register rule holds.

    ``smem_estimate(cfg, head_dim, elt) -> bytes`` must never be below what the compiler
    allocates (the AOT gate checks it); ``reg_ok(cfg, head_dim, elt)`` drops configs measured to
    spill. Never empty: on a card too small for all of them, the smallest config is kept.
    """
    kept = [c for c in configs if smem_estimate(c, head_dim, elt) <= smem_limit and reg_ok(c, head_dim, elt)]
    return kept or [min(configs, key=lambda c: smem_estimate(c, head_dim, elt))]


def config_rule(configs_16: list, configs_32: list, smem_estimate, reg_ok):
    """``configs_for(head_dim, elt, smem_limit)``: one kernel's pickable configs, 16-bit or fp32 list."""

    def configs_for(head_dim: int, elt: int, smem_limit: int) -> list:
        return pickable(configs_32 if elt == 4 else configs_16, head_dim, elt, smem_limit, smem_estimate, reg_ok)

    return configs_for


def make_prune(configs_for):
    """An ``early_config_prune`` for ``triton.autotune``: ``configs_for(head_dim, elt, smem_limit)``
    on the current device (the same function the AOT gate compiles)."""

    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        elt = next(a for a in named_args.values() if isinstance(a, torch.Tensor) and a.is_floating_point()).element_size()
        return configs_for(head_dim, elt, device_smem_limit())

    return prune
