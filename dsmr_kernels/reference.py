"""Readable reference for segment-memory attention: materialized scores, any float dtype.

Precision model (it matters for the tests' error budget): the two matmuls run in the input dtype,
the softmax in fp32 (float64 for float64 input), and the probabilities are cast back to the input
dtype before ``P @ V``, which is what a fused kernel does too. In float64 it is the golden answer.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._validate import validate_inputs


def visibility_mask(
    S: int,
    M: int,
    mem_len: Optional[torch.Tensor],
    window: Optional[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean visibility over key index space ``[0, M + S)``.

    Returns ``(B, 1, S, M + S)`` when ``mem_len`` is given, else ``(1, 1, S, M + S)``.
    ``True`` means query ``i`` sees key ``j``: the slot is valid, ``j <= M + i`` and, with a
    window, ``M + i - j < window``.
    """
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(M + S, device=device)[None, :]
    vis = j <= M + i
    if window is not None:
        vis = vis & (M + i - j < window)
    vis = vis[None, None]
    if mem_len is not None:
        first_valid = (M - mem_len.to(device=device, dtype=torch.long)).view(-1, 1, 1, 1)
        vis = vis & (j[None, None] >= first_valid)
    return vis


def segment_memory_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: Optional[torch.Tensor] = None,
    mem_v: Optional[torch.Tensor] = None,
    mem_len: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    return_lse: bool = False,
):
    """Plain-PyTorch segment-memory attention (same signature as the fast op, minus ``backend``).

    Args:
        q: ``(B, H, S, D)`` queries of the current segment.
        k, v: ``(B, Hkv, S, D)`` keys/values of the segment; ``H % Hkv == 0``.
        mem_k, mem_v: ``(B, Hkv, M, D)`` right-aligned recurrent memory, or None.
        mem_len: ``(B,)`` ints, valid slots per lane (``[M - mem_len, M)``); None = all M valid.
        scale: softmax scale, default ``D ** -0.5``.
        window: optional sliding window over absolute key index.
        return_lse: also return the log-sum-exp ``(B, H, S)`` (fp32; float64 for float64 input).

    Returns:
        ``(B, H, S, D)`` in the input dtype, or ``(out, lse)``. Differentiable in q, k, v.
    """
    dims = validate_inputs(q, k, v, mem_k, mem_v, mem_len, window)
    S, M, D = dims.S, dims.M, dims.D
    scale = D ** -0.5 if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    keys = torch.cat([mem_k, k], dim=2) if M > 0 else k  # (B, Hkv, M+S, D)
    vals = torch.cat([mem_v, v], dim=2) if M > 0 else v
    if dims.groups > 1:
        keys = keys.repeat_interleave(dims.groups, dim=1)  # (B, H, M+S, D)
        vals = vals.repeat_interleave(dims.groups, dim=1)

    # Non-finite input: an output row is non-finite (NaN) iff its query, or a key or value row it
    # sees, has a NaN or inf entry. Those rows are computed on zeros and set to NaN at the end:
    # 0 * NaN must stay out of rows that cannot see a bad row (stale inf/NaN in invalid memory
    # slots, future segment keys, out-of-window keys), and a NaN row must not reach a GEMM at all,
    # because blocked half-precision GEMMs can spill it into neighbouring rows (bf16 on AMX did).
    vis = visibility_mask(S, M, mem_len if M > 0 else None, window, q.device)
    q_bad = ~torch.isfinite(q).all(-1)  # (B, H, S)
    kv_bad = ~(torch.isfinite(keys).all(-1) & torch.isfinite(vals).all(-1))  # (B, H, M+S)
    row_bad = q_bad | (vis & kv_bad[:, :, None, :]).any(-1)  # (B, H, S)
    q = q.masked_fill(q_bad[..., None], 0)
    keys = keys.masked_fill(kv_bad[..., None], 0)
    vals = vals.masked_fill(kv_bad[..., None], 0)

    scores = torch.matmul(q, keys.transpose(-1, -2)).to(acc_dtype) * scale  # (B, H, S, M+S)
    scores = scores.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S)
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs.to(q.dtype), vals)  # (B, H, S, D)
    out = out.masked_fill(row_bad[..., None], float("nan"))
    lse = lse.masked_fill(row_bad, float("nan"))
    if return_lse:
        return out, lse
    return out


def segment_memory_attention_bruteforce(q, k, v, mem_k=None, mem_v=None, mem_len=None, *, scale=None, window=None):
    """Explicit loops over lanes, heads, queries and keys in float64: the test oracle for the reference.

    Returns ``(out, lse)`` in float64. Slow by design; use tiny shapes.
    """
    validate_inputs(q, k, v, mem_k, mem_v, mem_len, window)
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = 0 if mem_k is None else mem_k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    qd, kd, vd = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, S, D, dtype=torch.float64)
    lse = torch.zeros(B, H, S, dtype=torch.float64)
    for b in range(B):
        ml = M if mem_len is None else int(mem_len[b])
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(S):
                logits, values = [], []
                for j in range(M + S):
                    if j < M:
                        if j < M - ml:
                            continue
                        key, val = mem_k[b, hk, j].double(), mem_v[b, hk, j].double()
                    else:
                        if j - M > i:
                            continue
                        key, val = kd[b, hk, j - M], vd[b, hk, j - M]
                    if window is not None and M + i - j >= window:
                        continue
                    logits.append(float(qd[b, h, i] @ key) * scale)
                    values.append(val)
                t = torch.tensor(logits, dtype=torch.float64)
                mx = t.max()
                w = torch.exp(t - mx)
                lse[b, h, i] = mx + torch.log(w.sum())
                out[b, h, i] = (w[:, None] * torch.stack(values)).sum(0) / w.sum()
    return out, lse
