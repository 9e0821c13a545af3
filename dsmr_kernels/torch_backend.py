"""The ``backend="torch"`` dispatcher: which path runs a call, as one decision table.

Four paths, one module each:

=============  =========================================================  ==========================
path           algorithm                                                  module
=============  =========================================================  ==========================
``flash``      ATen's CPU flash kernel on memory and segment, LSE merge   :mod:`.cpu_flash`
``tiled``      flash-attention-2 in large batched bf16 GEMMs              :mod:`.cpu_tiled`
``upcast``     ``flash`` in fp32 on fp32 copies, rounded back once        :mod:`.cpu_paths`
``generic``    public ``F.scaled_dot_product_attention`` (non-CPU)        :mod:`.sdpa_generic`
=============  =========================================================  ==========================

The decision, top to bottom:

1. tensors not on the CPU (MPS, CUDA without Triton, ...)  -> ``generic``;
2. CPU: :func:`cpu_route` -> the decision table of :mod:`.cpu_dispatch` (dtype, shape class,
   what this CPU accelerates; an override by ``path=`` or ``$DSMR_CPU_PATH``) -> a
   :class:`~.cpu_paths.Route` (forward and backward path, or candidates to calibrate), run by
   :func:`~.cpu_paths.run_route`;
3. either way, non-finite inputs go through :func:`.nonfinite.with_nonfinite_rows`;
4. every CPU call ticks the thread governor (:func:`.threads.op_tick`): torch's thread count
   follows the cores other processes leave free, for callers that run their own loops too.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._validate import OpDims
from .cpu_dispatch import choose, describe_cpu  # noqa: F401 - describe_cpu re-exported
from .cpu_flash import make_plan, visible_lens
from .cpu_paths import Route, run_route
from .cpu_tiled import TileConfig
from .mask_cache import MASK_CACHE, MaskCache, mask_cache_nbytes  # noqa: F401 - re-exported
from .nonfinite import inputs_finite, with_nonfinite_rows
from .threads import op_tick
from .sdpa_generic import generic_forward

_MaskCache = MaskCache  # the names the tests and older callers know
_MASK_CACHE = MASK_CACHE

#: Tile sizes of the ``tiled`` path; ``None`` takes it out of the table (``flash`` stands in).
BF16_TILES: Optional[TileConfig] = TileConfig()


def cpu_route(dtype: torch.dtype, dims: OpDims, override: Optional[str] = None) -> Route:
    """The route of a CPU call: the decision table's candidates (:func:`.cpu_dispatch.choose`).

    ``override``: a path (``"tiled"``) or ``"fwd=PATH,bwd=PATH"``; else ``$DSMR_CPU_PATH``; else the
    table for this CPU's features, dtype and shape class.
    """
    fwd, bwd = choose(dtype, dims.S, override=override)
    if BF16_TILES is None:
        fwd, bwd = (tuple(dict.fromkeys("flash" if p == "tiled" else p for p in c)) for c in (fwd, bwd))
    return Route(fwd, bwd, BF16_TILES)


def device_path(device: torch.device) -> str:
    """``"cpu"`` for CPU tensors (the CPU routes), ``"generic"`` for any other device.

    CUDA reaches this only without Triton (``backend="auto"`` takes Triton there); MPS, XPU and
    the rest have no fused kernel of ours, and the generic path uses public PyTorch APIs only.
    """
    return "cpu" if torch.device(device).type == "cpu" else "generic"


def torch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: Optional[torch.Tensor],
    mem_v: Optional[torch.Tensor],
    mem_len: Optional[torch.Tensor],
    scale: float,
    window: Optional[int],
    dims: OpDims,
    need_lse: bool = True,
    path: Optional[str] = None,
):
    """Returns ``(out (B, H, S, D) in q.dtype, lse (B, H, S) fp32)``; differentiable in q, k, v.

    q: (B, H, S, D); k, v: (B, Hkv, S, D); mem_k, mem_v: (B, Hkv, M, D) or None; mem_len: (B,)
    or None. ``lse`` is fp64 for fp64 input. ``need_lse=False`` lets the generic (non-CPU) path
    skip the LSE, which it must compute separately (None is returned then); the CPU paths get it
    for free. ``path`` overrides the choice (for benchmarks and tests): ``"generic"`` on any
    device, or a CPU route (``"flash"``, ``"tiled"``, ``"upcast"``) for CPU tensors. Non-finite
    inputs propagate by the reference's rule (:mod:`.nonfinite`).
    """
    if mem_k is not None and dims.M == 0:
        mem_k = mem_v = None
    where = device_path(q.device) if path is None else ("generic" if path == "generic" else "cpu")
    if where == "generic":
        lens = visible_lens(dims.B, dims.M, mem_len, window) if mem_k is not None else []

        def run(q, k, v, mem_k, mem_v):
            return generic_forward(q, k, v, mem_k, mem_v, mem_len, scale, window, dims, need_lse)
    else:
        if q.device.type != "cpu":
            raise ValueError(f"path={path!r} is a CPU path; tensors on {q.device.type} take path='generic'")
        # Threads follow the cores other processes leave free (dsmr_kernels.threads): beside one
        # busy process a 2-thread call spun at OpenMP barriers for 10x its idle time.
        op_tick()
        plan = make_plan(dims, mem_len, scale, window)
        route = cpu_route(q.dtype, dims, override=path)
        lens = plan.lens

        def run(q, k, v, mem_k, mem_v):
            return run_route(q, k, v, mem_k, mem_v, plan, route)

    if inputs_finite(q, k, v, mem_k, mem_v, lens, dims.M):
        return run(q, k, v, mem_k, mem_v)
    return with_nonfinite_rows(run, q, k, v, mem_k, mem_v, lens, dims.M, window)
