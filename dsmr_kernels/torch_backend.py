"""The fast CPU path: PyTorch's fused (flash) attention over ``[memory; segment]``.

Scores are never materialized in Python: the call goes to ATen's tiled CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``), which streams over key blocks with an online
softmax and also returns the log-sum-exp. Two tricks keep it cheap:

* **Uniform memory is sliced, not masked.** When every lane has the same number of valid slots
  (the common case: ``mem_len`` None, or all lanes mid-piece with full memory), the memory is cut
  to its valid tail (a view) and the only mask left is the bottom-right causal/window pattern,
  which depends on ``(S, L, window)`` alone and is cached.
* **GQA by folding, not repeating.** The ``G = H / Hkv`` query heads that share a kv head are
  folded into the query-length axis, ``(B, H, S, D) -> (B, Hkv, G*S, D)``, so K and V are never
  copied ``G`` times; the mask rows are tiled ``G`` times instead (cached as well).

Only when lanes disagree on ``mem_len`` is a per-lane mask built for the call.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from ._validate import OpDims

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

_MASK_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_MASK_CACHE_SIZE = 64


def _additive_mask(S: int, L: int, window: Optional[int], groups: int, dtype, device) -> Optional[torch.Tensor]:
    """Cached ``(G*S, L+S)`` additive mask (0 / -inf) for L valid memory slots; None if all visible."""
    key = (S, L, window, groups, dtype, str(device))
    hit = _MASK_CACHE.get(key)
    if hit is not None:
        _MASK_CACHE.move_to_end(key)
        return hit
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(L + S, device=device)[None, :]
    vis = j <= L + i
    if window is not None:
        vis &= L + i - j < window
    if bool(vis.all()):
        mask = None
    else:
        mask = torch.zeros(S, L + S, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))
        if groups > 1:
            mask = mask.repeat(groups, 1)
    _MASK_CACHE[key] = mask
    if len(_MASK_CACHE) > _MASK_CACHE_SIZE:
        _MASK_CACHE.popitem(last=False)
    return mask


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
):
    """Returns ``(out (B, H, S, D), lse (B, H, S) fp32)``; differentiable in q, k, v through ATen."""
    B, H, Hkv, S, M, D, G = dims.B, dims.H, dims.Hkv, dims.S, dims.M, dims.D, dims.groups
    # Uniform valid length across lanes -> slice; otherwise a per-lane mask over all M slots.
    if M == 0:
        L, per_lane = 0, None
    elif mem_len is None:
        L, per_lane = M, None
    else:
        lo, hi = int(mem_len.min()), int(mem_len.max())
        L, per_lane = (lo, None) if lo == hi else (M, mem_len)

    if L > 0:
        keys = torch.cat([mem_k[:, :, M - L:], k], dim=2)  # (B, Hkv, L+S, D)
        vals = torch.cat([mem_v[:, :, M - L:], v], dim=2)
    else:
        keys, vals = k, v

    base = _additive_mask(S, L, window, G, q.dtype, q.device)  # (G*S, L+S) or None
    if per_lane is not None:
        j = torch.arange(L + S, device=q.device)
        invalid = j[None, :] < (M - per_lane.to(torch.long))[:, None]  # (B, L+S)
        mask = torch.zeros(B, 1, 1, L + S, dtype=q.dtype, device=q.device)
        mask.masked_fill_(invalid[:, None, None, :], float("-inf"))
        # Stale or uninitialized slots may hold inf/NaN; 0 * NaN would leak through the softmax.
        keys = keys.masked_fill(invalid[:, None, :, None], 0)
        vals = vals.masked_fill(invalid[:, None, :, None], 0)
        mask = mask if base is None else mask + base  # (B, 1, G*S, L+S)
    else:
        mask = base

    qf = q.reshape(B, Hkv, G * S, D)  # fold GQA groups into the query axis
    out, lse = _flash_cpu(qf, keys, vals, 0.0, False, attn_mask=mask, scale=scale)
    return out.reshape(B, H, S, D), lse.reshape(B, H, S)
