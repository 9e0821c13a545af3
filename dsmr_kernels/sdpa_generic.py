"""The generic path: any device (CUDA without Triton, MPS, ...), public PyTorch APIs only.

One ``F.scaled_dot_product_attention`` over ``[valid memory; segment]`` with a boolean mask;
gradients by autograd; the LSE (needed only for ``return_lse=True``) by a chunked matmul +
logsumexp. Simple and portable rather than fast: it concatenates the keys and builds an
``(S, L + S)`` mask, which the CPU paths never do.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._validate import OpDims
from .cpu_flash import acc_dtype, visible_lens

_NEG_INF = float("-inf")


#: Devices whose SDPA is known to take ``enable_gqa``; elsewhere (MPS, XPU, ...) the kv heads are
#: repeated, which every device supports.
GQA_DEVICES = ("cpu", "cuda")


def _sdpa(q, keys, vals, mask, scale, G):
    if G > 1 and q.device.type not in GQA_DEVICES:
        keys, vals = keys.repeat_interleave(G, dim=1), vals.repeat_interleave(G, dim=1)
    elif G > 1:
        try:
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5: no enable_gqa
            keys, vals = keys.repeat_interleave(G, dim=1), vals.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)


def _lse(q, keys, vis, scale, dims: OpDims, L: int) -> torch.Tensor:
    """``(B, H, S)`` log-sum-exp of the visible scores, chunked to ~64 MB of fp32 scores at a time."""
    B, H, Hkv, S, D, G = dims.B, dims.H, dims.Hkv, dims.S, dims.D, dims.groups
    acc = acc_dtype(q.dtype)
    with torch.no_grad():
        kf = keys.detach().to(acc)[:, :, None]  # (B, Hkv, 1, L+S, D)
        qf = q.detach().reshape(B, Hkv, G, S, D)
        lse = torch.empty(B, Hkv, G, S, dtype=acc, device=q.device)
        rows = max(1, (16 << 20) // max(1, B * H * (L + S)))
        for r0 in range(0, S, rows):
            r1 = min(S, r0 + rows)
            s = torch.matmul(qf[:, :, :, r0:r1].to(acc), kf.transpose(-1, -2)) * scale
            s = s.masked_fill(~vis[:, :, None, r0:r1], _NEG_INF)
            lse[:, :, :, r0:r1] = torch.logsumexp(s, dim=-1)
    return lse.reshape(B, H, S)


def generic_forward(
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
):
    """Device-agnostic path: one ``F.scaled_dot_product_attention`` over ``[valid memory; segment]``.

    q: (B, H, S, D); k, v: (B, Hkv, S, D); mem_k, mem_v: (B, Hkv, M, D) or None.
    Memory is cut to the newest ``Lmax`` slots any lane can use (with a window, at most
    ``window - 1``); slots invalid for a shorter lane are zeroed (they may hold NaN) and masked.
    Gradients flow through autograd. Returns ``(out (B, H, S, D), lse (B, H, S) or None)``; the
    LSE (no gradient) is computed only when ``need_lse``.
    """
    B, H, S, M, D = dims.B, dims.H, dims.S, dims.M, dims.D
    dev = q.device
    if B == 0:
        lse = torch.empty(0, H, S, dtype=acc_dtype(q.dtype), device=dev) if need_lse else None
        return q.new_empty(0, H, S, D) + 0 * (q.sum() + k.sum() + v.sum()), lse
    lens = visible_lens(B, M, mem_len, window) if M > 0 else None
    L = 0 if lens is None else max(lens)
    if L > 0:
        mk, mv = mem_k[:, :, M - L:], mem_v[:, :, M - L:]
        eff = torch.tensor(lens, device=dev)
        j = torch.arange(L, device=dev)
        if min(lens) < L:
            valid = (j[None, :] >= (L - eff)[:, None])[:, None, :, None]  # (B, 1, L, 1)
            mk = torch.where(valid, mk, torch.zeros((), dtype=mk.dtype, device=dev))
            mv = torch.where(valid, mv, torch.zeros((), dtype=mv.dtype, device=dev))
        keys, vals = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)
    else:
        keys, vals = k, v
    i = torch.arange(S, device=dev)[:, None]
    jj = torch.arange(L + S, device=dev)[None, :]
    vis = jj <= L + i
    if window is not None:
        vis = vis & (L + i - jj < window)
    vis = vis[None, None]  # (1, 1, S, L+S)
    if L > 0 and min(lens) < L:
        vis = vis & (jj >= (L - eff)[:, None])[:, None, None, :]  # (B, 1, S, L+S)
    out = _sdpa(q, keys, vals, None if bool(vis.all()) else vis, scale, dims.groups)
    return out, (_lse(q, keys, vis, scale, dims, L) if need_lse else None)
