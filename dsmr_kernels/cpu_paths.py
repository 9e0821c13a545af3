"""One CPU call along a route: a forward path and a backward path, each chosen by the dispatcher.

The CPU paths (see :mod:`dsmr_kernels.torch_backend` for the table that chooses among them):

* ``"flash"``: ATen's fused CPU flash kernel in the input dtype, split-KV (:mod:`.cpu_flash`);
* ``"tiled"``: flash-attention-2 in large batched bf16 GEMMs (:mod:`.cpu_tiled`);
* ``"upcast"``: the flash path computed in fp32 on fp32 copies of the inputs (only the *visible*
  memory slots are copied), output and gradients rounded back once. For half types on CPUs whose
  GEMMs in that type are emulated.

Every path returns the same ``(out, lse)`` (LSE in natural log, fp32), and every backward takes
the *final* ``out`` and ``lse``, so forward and backward may take different paths. The LSE is
not differentiable: :class:`CpuAttention` is the autograd Function, saving q, k, v, the memory
(views of the inputs, no copies), out and lse.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from .cpu_dispatch import calibrate, calibration_key, choose
from .cpu_flash import CpuPlan, flash_backward, flash_forward
from .cpu_tiled import TileConfig, scratch, tiled_forward
from .cpu_tiled_bwd import tiled_backward
from .mask_cache import MASK_CACHE

PATHS = ("flash", "tiled", "upcast")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Route:
    """The path of each direction; ``tiles`` configures the ``"tiled"`` path.

    ``fwd`` / ``bwd`` are a path name or a tuple of candidates, which the first call of its kind
    calibrates (:func:`.cpu_dispatch.calibrate`); both are stored as tuples.
    """

    fwd: Union[str, Tuple[str, ...]]
    bwd: Union[str, Tuple[str, ...]]
    tiles: Optional[TileConfig] = None

    def __post_init__(self):
        for field in ("fwd", "bwd"):
            names = getattr(self, field)
            names = (names,) if isinstance(names, str) else tuple(names)
            if not names or any(n not in PATHS for n in names):
                raise ValueError(f"CPU path must be one of {PATHS}, got {getattr(self, field)!r}")
            object.__setattr__(self, field, names)


def _fp32(name: str, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An fp32 copy of ``t`` in this thread's scratch buffer ``name`` (valid until the next call).

    Fresh multi-MB copies page-faulted on first touch: converting a 4096-slot memory took 4.5 ms
    that way against 0.5 ms into a warm buffer, a tenth of the whole forward (S = 512, H = 8)."""
    if t is None:
        return None
    return scratch(f"upcast.{name}", t.shape, torch.float32, t.device).copy_(t)


def _visible_fp32(name: str, mem: Optional[torch.Tensor], plan: CpuPlan) -> Optional[torch.Tensor]:
    """fp32 copy of the newest ``plan.max_len`` slots (every lane's runs read from the right end)."""
    L = plan.max_len
    return _fp32(name, mem[:, :, plan.M - L:]) if mem is not None and L > 0 else None


def _upcast_forward(q, k, v, mem_k, mem_v, plan: CpuPlan):
    """``(out fp32, lse)``: the flash path on fp32 copies of q, k, v and the visible memory."""
    return flash_forward(_fp32("q", q), _fp32("k", k), _fp32("v", v), _visible_fp32("mk", mem_k, plan),
                         _visible_fp32("mv", mem_v, plan), replace(plan, M=plan.max_len))


def path_forward(path: str, q, k, v, mem_k, mem_v, plan: CpuPlan, tiles: Optional[TileConfig],
                 keep: Optional[dict] = None):
    """``(out (B, H, S, D) in q.dtype, lse (B, H, S) fp32)`` by one path, no autograd.

    ``keep``: a dict that receives what the backward can reuse: the tiled path's memory-tile
    probabilities, the upcast path's unrounded fp32 output (``"out32"``)."""
    if path == "tiled":
        return tiled_forward(q, k, v, mem_k, mem_v, list(plan.lens), plan.M, plan.scale, plan.window,
                             MASK_CACHE, tiles or TileConfig(), keep)
    if path == "upcast" and q.dtype in _HALF:
        out, lse = _upcast_forward(q, k, v, mem_k, mem_v, plan)
        if keep is not None:
            keep["out32"] = out
        return out.to(q.dtype), lse
    return flash_forward(q, k, v, mem_k, mem_v, plan)


def path_backward(path: str, g, q, k, v, mem_k, mem_v, out, lse, plan: CpuPlan, need_q: bool, need_kv: bool,
                  tiles: Optional[TileConfig], probs: Optional[dict] = None):
    """``(dq, dk, dv)`` in q.dtype (None where not needed) by one path, from the final out / lse."""
    if path == "tiled":
        return tiled_backward(g, q, k, v, mem_k, mem_v, out, lse, list(plan.lens), plan.M, plan.scale,
                              plan.window, MASK_CACHE, need_q, need_kv, tiles or TileConfig(), probs)
    if path == "upcast" and q.dtype in _HALF:
        # The fp32 op's backward, by the path fp32 calls take (its candidates and calibrated
        # choice: the tiled backward beat flash's by 18% at M = 4096 under AVX2 emulation). The
        # upcast forward's own fp32 output when it ran (the gradients are then exactly the fp32
        # op's, rounded once), else the final output widened.
        out32 = (probs or {}).get("out32")
        args = (_fp32("g", g), _fp32("q", q), _fp32("k", k), _fp32("v", v), _visible_fp32("mk", mem_k, plan),
                _visible_fp32("mv", mem_v, plan), out32 if out32 is not None else _fp32("out", out), lse.float(),
                replace(plan, M=plan.max_len), need_q, need_kv, tiles)

        def run32(p):
            return path_backward(p, *args)

        p32, grads = calibrate(calibration_key("bwd", torch.float32, plan.S, plan.max_len),
                               choose(torch.float32, plan.S)[1], run32)
        grads = grads if grads is not None else run32(p32)
        return tuple(None if t is None else t.to(q.dtype) for t in grads)
    return flash_backward(g, q, k, v, mem_k, mem_v, out, lse, plan, need_q, need_kv)


def _backward(ctx, grad_out, q, k, v, mem_k, mem_v, out, lse, need_q, need_kv):
    route, plan = ctx.route, ctx.plan

    probs, ctx.probs = ctx.probs, None  # read once: the tiles' memory goes with this backward

    def run(path):
        return path_backward(path, grad_out, q, k, v, mem_k, mem_v, out, lse, plan, need_q, need_kv, route.tiles,
                             probs if path in ("tiled", "upcast") else None)

    path, grads = calibrate(calibration_key("bwd", q.dtype, plan.S, plan.max_len), route.bwd, run)
    return grads if grads is not None else run(path)


class CpuAttention(torch.autograd.Function):
    """Autograd wrapper: forward by ``route.fwd``, backward by ``route.bwd``; LSE non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, plan, route):
        # tiled both ways: the forward's memory-tile probabilities save the backward a GEMM each;
        # an upcast forward keeps its fp32 output for an upcast backward.
        tiled_both = route.fwd == route.bwd == ("tiled",)
        ctx.probs = {} if tiled_both or (route.fwd == ("upcast",) and "upcast" in route.bwd) else None
        out, lse = path_forward(route.fwd[0], q, k, v, mem_k, mem_v, plan, route.tiles, ctx.probs)
        ctx.save_for_backward(q, k, v, mem_k, mem_v, out, lse)
        ctx.plan, ctx.route = plan, route
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, mem_k, mem_v, out, lse = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0]
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = _backward(ctx, grad_out, q, k, v, mem_k, mem_v, out, lse, need_q, need_kv)
        dk = dk if ctx.needs_input_grad[1] else None
        dv = dv if ctx.needs_input_grad[2] else None
        return dq, dk, dv, None, None, None, None


def run_route(q, k, v, mem_k, mem_v, plan: CpuPlan, route: Route):
    """``(out, lse)`` of one CPU call along ``route``; differentiable in q, k, v when they require grad.

    Several forward candidates: the first call of this kind times them (and, without autograd,
    returns the winner's result). A route that is ``"upcast"`` both ways gives exactly the fp32
    op's output and gradients, each rounded once: the forward keeps its unrounded fp32 output for
    the backward, and both directions widen their inputs into reused scratch buffers.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if len(route.fwd) > 1:
        with torch.no_grad():
            path, res = calibrate(calibration_key("fwd", q.dtype, plan.S, plan.max_len), route.fwd,
                                  lambda p: path_forward(p, q, k, v, mem_k, mem_v, plan, route.tiles))
        if res is not None and not needs_grad:
            return res
        route = replace(route, fwd=path)
    if needs_grad:
        return CpuAttention.apply(q, k, v, mem_k, mem_v, plan, route)
    return path_forward(route.fwd[0], q, k, v, mem_k, mem_v, plan, route.tiles)
