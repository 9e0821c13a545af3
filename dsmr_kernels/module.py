"""``DSMRAttention``: drop-in multi-head self-attention with a recurrent, truncated KV memory."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .interface import segment_memory_attention


class _KVBuffer:
    """Backing storage for a state's memory with spare room to the right (no-grad use only).

    A state's ``mem_k``/``mem_v`` are views ``[a, b)`` of ``k``/``v``; ``fill`` is the end of the
    newest region written. A state whose view ends at ``fill`` may append in place, so decoding a
    token costs O(1) instead of an O(M) ``torch.cat`` (whose per-token allocations also inflated
    peak RSS). Any other state (an older one, or a branch) copies into a fresh buffer instead, so
    writes never touch a region some state still reads.
    """

    __slots__ = ("k", "v", "fill")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fill: int):
        self.k, self.v, self.fill = k, v, fill

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@dataclass
class AttentionState:
    """Recurrent state of one attention layer for B lanes (all tensors detached).

    Attributes:
        mem_k, mem_v: ``(B, Hkv, M, D)`` rotated keys / values, right-aligned (newest at ``M-1``),
            or None before the first segment (M = 0).
        mem_len: ``(B,)`` int64, valid memory slots per lane.
        pos: ``(B,)`` int64, absolute position in the piece of each lane's next token.
    """

    mem_k: Optional[torch.Tensor]
    mem_v: Optional[torch.Tensor]
    mem_len: torch.Tensor
    pos: torch.Tensor
    # (buffer, a): mem_k is buffer.k[:, :, a:a+M]; set only by no-grad forwards (see _KVBuffer)
    _buf: Optional[tuple] = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, batch: int, device: Union[str, torch.device] = "cpu") -> "AttentionState":
        """A fresh state: no memory, every lane at position 0."""
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(None, None, zeros, zeros.clone())

    @property
    def batch(self) -> int:
        return self.mem_len.shape[0]

    @property
    def capacity(self) -> int:
        """Memory slots M currently allocated (valid or not)."""
        return 0 if self.mem_k is None else self.mem_k.shape[2]

    def reset(self, lanes: Union[Sequence[int], torch.Tensor, None] = None) -> "AttentionState":
        """Start a new piece in ``lanes`` (all lanes when None): memory emptied, position 0.

        ``lanes`` is a sequence/tensor of lane indices or a ``(B,)`` boolean mask.

        Returns a new state; the old one is left intact (autograd may still hold its tensors).
        """
        mem_len, pos = self.mem_len.clone(), self.pos.clone()
        if lanes is not None and not isinstance(lanes, torch.Tensor) and len(lanes) == 0:
            lanes = torch.zeros(0, dtype=torch.long)  # an empty list would become a float tensor
        if lanes is None:
            mem_len.zero_()
            pos.zero_()
        else:
            idx = torch.as_tensor(lanes, device=mem_len.device)
            if idx.dtype == torch.bool:  # a per-lane mask, e.g. a batch's reset flags
                if idx.shape != (self.batch,):
                    raise ValueError(f"a boolean lanes mask must have shape ({self.batch},), got {tuple(idx.shape)}")
                idx = idx.nonzero().flatten()
            elif idx.dtype.is_floating_point or idx.is_complex():
                raise ValueError(f"lanes must be lane indices or a boolean mask, got dtype {idx.dtype}")
            idx = idx.to(torch.long).flatten()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch):
                raise ValueError(f"lanes must lie in [0, {self.batch}), got {idx.tolist()}")
            mem_len[idx] = 0
            pos[idx] = 0
        return replace(self, mem_len=mem_len, pos=pos)

    def truncate(self, horizon: Optional[int]) -> "AttentionState":
        """Keep only the newest ``horizon`` slots (None: keep all). Returns a new state."""
        if horizon is None or self.mem_k is None or self.capacity <= horizon:
            return self
        if horizon == 0:
            return AttentionState(None, None, torch.zeros_like(self.mem_len), self.pos)
        M = self.capacity
        if self._buf is not None:  # a narrower view of the same buffer; the next append stays in place
            buf, a = self._buf
            return AttentionState(
                self.mem_k[:, :, M - horizon:], self.mem_v[:, :, M - horizon:],
                torch.clamp(self.mem_len, max=horizon), self.pos, (buf, a + M - horizon),
            )
        return AttentionState(
            self.mem_k[:, :, M - horizon:].clone(),
            self.mem_v[:, :, M - horizon:].clone(),
            torch.clamp(self.mem_len, max=horizon),
            self.pos,
        )

    def to(self, device) -> "AttentionState":
        """The same state with every tensor moved to ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        mem_k = mv(self.mem_k)
        # Same device: .to returns the same tensors, still views of the decode buffer, so the buffer
        # bookkeeping must come along (a grad-mode forward from the copy has to fence the buffer).
        buf = self._buf if mem_k is self.mem_k else None
        return AttentionState(mem_k, mv(self.mem_v), self.mem_len.to(device), self.pos.to(device), buf)

    def compact(self) -> "AttentionState":
        """The same state with memory in its own contiguous storage (no spare buffer room),
        e.g. before saving it: ``torch.save`` writes a view's whole storage."""
        if self._buf is None:
            return self
        return AttentionState(self.mem_k.clone(), self.mem_v.clone(), self.mem_len, self.pos)


def rotary_cos_sin(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(B, 1, S, head_dim // 2)`` in float64 for absolute positions ``pos`` (B, S).

    Angles are computed in float64 from absolute piece positions, so a token gets the same
    rotation whether it arrives in one long call or in many segments, and positions in the tens
    of thousands keep full fp32 accuracy.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=pos.device) / head_dim)
    angles = pos.to(torch.float64)[..., None] * inv_freq  # (B, S, D/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, S, D) by half-split (GPT-NeoX) rotary embedding; returns x's dtype.

    Low-precision inputs are rotated in fp32 (float64 stays float64).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(compute), sin.to(compute)
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def _rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = rotate(x)`` for x, out (..., D) in the compute dtype; cos/sin broadcast to (..., D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _RotateQK(torch.autograd.Function):
    """q and k of one qkv projection rotated at once, with a hand-written backward.

    ``qk`` (B, S, H + Hkv, D) is the q/k part of the projection (a view); returns q (B, H, S, D)
    and k (B, Hkv, S, D), contiguous, in qk's dtype. The backward is the inverse rotation of the
    incoming gradients and saves only the tables: autograd's version of :func:`apply_rotary`
    kept fp32 copies of q and k and ran about twice the kernels (0.9 ms per layer of a training
    step at S = 512, d_model 256, against about 0.35 ms here). First derivatives only: a double
    backward through it raises.
    """

    @staticmethod
    def forward(ctx, qk, cos, sin, H: int):
        B, S, N, D = qk.shape
        compute = torch.float64 if qk.dtype == torch.float64 else torch.float32
        cos, sin = cos.to(compute), sin.to(compute)  # (B, S, 1, D/2)
        rot = _rotate_into(qk.to(compute), cos, sin, torch.empty(B, S, N, D, dtype=compute, device=qk.device))
        q = torch.empty(B, H, S, D, dtype=qk.dtype, device=qk.device)
        k = torch.empty(B, N - H, S, D, dtype=qk.dtype, device=qk.device)
        q.transpose(1, 2).copy_(rot[:, :, :H])  # rounding and layout change in one pass
        k.transpose(1, 2).copy_(rot[:, :, H:])
        ctx.save_for_backward(cos, sin)
        ctx.H, ctx.dtype = H, qk.dtype
        return q, k

    @staticmethod
    @once_differentiable
    def backward(ctx, gq, gk):  # autograd materializes unused outputs' gradients as zeros
        cos, sin = ctx.saved_tensors
        H = ctx.H
        B, S, Hkv, D = gq.shape[0], gq.shape[2], gk.shape[1], gq.shape[3]
        g = torch.empty(B, S, H + Hkv, D, dtype=cos.dtype, device=cos.device)
        g[:, :, :H].copy_(gq.transpose(1, 2))
        g[:, :, H:].copy_(gk.transpose(1, 2))
        # The rotation is orthogonal: its vector-Jacobian product is the rotation by -angle.
        return _rotate_into(g, cos, -sin, torch.empty_like(g)).to(ctx.dtype), None, None, None


def rotate_qk(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int):
    """Rotary embedding of q and k taken straight from the projection, as :func:`apply_rotary`.

    ``qk`` (B, S, n_heads + Hkv, D): the q and k heads of one qkv projection; ``cos``/``sin``
    (B, 1, S, D/2) from :func:`rotary_cos_sin`. Returns ``q`` (B, n_heads, S, D) and ``k``
    (B, Hkv, S, D), contiguous, in qk's dtype (computed in fp32; float64 stays float64).
    """
    return _RotateQK.apply(qk, cos.transpose(1, 2), sin.transpose(1, 2), n_heads)


class DSMRAttention(nn.Module):
    """Multi-head self-attention over a segment plus this layer's recurrent KV memory.

    Args:
        d_model: model width.
        n_heads: query heads H; head dim is ``d_model // n_heads`` (must be even, for rotary).
        n_kv_heads: key/value heads Hkv (GQA when < n_heads); default n_heads.
        horizon: memory kept after each segment: None = whole history of the piece, an int =
            that many most recent tokens, 0 = none.
        window: optional sliding window passed to the op.
        rope_base: rotary base.
        bias: bias in the projections.
        backend: op backend (``"auto"``, ``"torch"``, ``"triton"``, ``"reference"``).

    ``forward(x, state=None) -> (y, new_state)`` with x, y ``(B, S, d_model)``. Keys are cached
    after rotation at their absolute piece position, so memory is never re-projected or
    re-rotated. The returned state is detached.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        horizon: Optional[int] = None,
        *,
        window: Optional[int] = None,
        rope_base: float = 10000.0,
        bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        head_dim = d_model // n_heads
        if head_dim % 2:
            raise ValueError(f"head dim d_model // n_heads = {head_dim} must be even for rotary embedding")
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0):
            raise ValueError(f"horizon must be None (whole history) or an int >= 0, got {horizon!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.horizon, self.window, self.rope_base, self.backend = horizon, window, rope_base, backend
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"horizon={self.horizon}, window={self.window}, backend={self.backend!r}"
        )

    def init_state(self, batch: int, device=None) -> AttentionState:
        """Empty state for ``batch`` lanes on ``device`` (default: the module's device)."""
        device = self.qkv.weight.device if device is None else device
        return AttentionState.empty(batch, device)

    def forward(self, x: torch.Tensor, state: Optional[AttentionState] = None, *, truncate: bool = True,
                rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """x ``(B, S, d_model)`` -> ``(y (B, S, d_model), new_state)``.

        ``rotary``: the ``(cos, sin)`` tables of this call's positions, ``rotary_cos_sin(state.pos[:,
        None] + arange(S), head_dim, rope_base)`` (B, 1, S, head_dim // 2), when the caller has them
        already (a model computes them once for all its layers); by default they are computed here.

        With ``truncate=False`` the new memory keeps all of ``[memory; segment]`` instead of the
        last ``horizon`` tokens; incremental decoding uses it inside a segment (the keys of the
        segment so far act as memory) and calls :meth:`AttentionState.truncate` at the segment's
        end, which reproduces the segment-granular rule of a segment-wise forward exactly.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, S, d_model={self.d_model}), got {tuple(x.shape)}")
        B, S, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device)
        if state.batch != B:
            raise ValueError(f"state has {state.batch} lanes but x has batch {B}")
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim

        qkv = self.qkv(x)  # (B, S, (H + 2 Hkv) D)
        qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
        v = v.view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)

        if rotary is None:
            pos = state.pos[:, None] + torch.arange(S, device=x.device)  # (B, S) absolute positions
            rotary = rotary_cos_sin(pos, D, self.rope_base)
        elif any(t.shape != (B, 1, S, D // 2) for t in rotary):
            raise ValueError(f"rotary tables (cos, sin) must each be (B, 1, S, head_dim // 2) = "
                             f"{(B, 1, S, D // 2)}, got {[tuple(t.shape) for t in rotary]}")
        q, k = rotate_qk(qk.view(B, S, H + Hkv, D), *rotary, H)  # (B, H, S, D), (B, Hkv, S, D)

        mem_k, mem_v, mem_len = state.mem_k, state.mem_v, state.mem_len
        if mem_k is not None and mem_k.shape[2] > 0:
            if mem_k.dtype != q.dtype:  # e.g. memory written under autocast, read in fp32
                mem_k, mem_v = mem_k.to(q.dtype), mem_v.to(q.dtype)
        else:
            mem_k = mem_v = mem_len = None
        y = segment_memory_attention(
            q, k, v, mem_k, mem_v, mem_len, window=self.window, backend=self.backend
        )  # (B, H, S, D)
        y = self.out(y.transpose(1, 2).reshape(B, S, H * D))
        return y, self._next_state(state, mem_k, mem_v, k, v, S, self.horizon if truncate else None)

    def _next_state(self, state, mem_k, mem_v, k, v, S, horizon) -> AttentionState:
        """New memory = last ``horizon`` valid keys of ``[memory; segment]``, detached."""
        if state._buf is not None and torch.is_grad_enabled():
            # This forward may have saved views of the buffer for backward: no later no-grad
            # forward may write into it (a version bump would fail that backward).
            state._buf[0].fill = -1
        M = 0 if mem_k is None else mem_k.shape[2]
        if horizon is None and M > 0 and state.mem_len.device.type == "cpu" and state.batch > 0:
            # Slots older than every lane's valid memory are dead (lanes that started a new piece):
            # drop them, or a whole-history layer's capacity would grow across pieces forever.
            # CPU only: on a GPU this would be a host sync per layer (the trainer trims there).
            longest = int(state.mem_len.max())
            if longest < M:
                mem_k, mem_v, M = mem_k[:, :, M - longest:], mem_v[:, :, M - longest:], longest
        cap = M + S if horizon is None else min(horizon, M + S)
        new_len = torch.clamp(state.mem_len + S, max=cap)
        if cap == 0:
            new_k = new_v = None
        elif cap <= S:
            # Own contiguous storage: a slice would keep the whole segment's qkv activations alive.
            new_k = k[:, :, S - cap:].detach().clone(memory_format=torch.contiguous_format)
            new_v = v[:, :, S - cap:].detach().clone(memory_format=torch.contiguous_format)
        else:
            keep = cap - S  # slots taken from the old memory's newest end
            if not torch.is_grad_enabled():
                return self._append_in_buffer(state, mem_k, mem_v, k, v, keep, new_len)
            new_k = torch.cat([mem_k[:, :, M - keep:], k.detach()], dim=2)
            new_v = torch.cat([mem_v[:, :, M - keep:], v.detach()], dim=2)
        return AttentionState(new_k, new_v, new_len, state.pos + S)

    @staticmethod
    def _append_in_buffer(state, mem_k, mem_v, k, v, keep, new_len) -> AttentionState:
        """No-grad memory update: ``[newest keep slots of memory; segment]`` as a view of a buffer.

        In place when ``state`` holds the newest region of its buffer and the segment fits in the
        spare room; otherwise the kept slots move to a fresh buffer with room for as many again
        (amortized O(S) per call). Grad mode never takes this path: writing into a buffer would
        bump the version counter of memory views saved for backward.
        """
        B, Hkv, M, D = mem_k.shape
        S = k.shape[2]
        buf, a = state._buf if state._buf is not None else (None, 0)
        b = a + M  # end of state's view in its buffer
        usable = (
            buf is not None and buf.fill == b and mem_k is state.mem_k and b + S <= buf.capacity
        )
        if not usable:
            cap = keep + S
            room = max(2 * cap, cap + 64)
            nk = k.new_empty(B, Hkv, room, D)
            nv = v.new_empty(B, Hkv, room, D)
            nk[:, :, :keep] = mem_k[:, :, M - keep:]
            nv[:, :, :keep] = mem_v[:, :, M - keep:]
            buf, b, keep_from = _KVBuffer(nk, nv, keep), keep, 0
        else:
            keep_from = b - keep
        buf.k[:, :, b:b + S] = k
        buf.v[:, :, b:b + S] = v
        buf.fill = b + S
        return AttentionState(
            buf.k[:, :, keep_from:b + S], buf.v[:, :, keep_from:b + S], new_len, state.pos + S, (buf, keep_from)
        )
