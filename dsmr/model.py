"""The DSMR model: a pre-norm decoder of ``DSMRAttention`` blocks with per-layer memory horizons.

    config = DSMRConfig(vocab_size=512, n_layers=6, d_model=256, n_heads=4,
                        horizons=schedules.two_scale(6, 4096, 512, 2))
    model = DSMRModel(config)
    state = model.init_state(batch=4)
    for segment in segments:                      # (B, S) token ids, S <= segment_len
        logits, state = model(segment, state)     # logits (B, S, vocab)
    state = state.reset([2])                      # lane 2 starts a new piece
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dsmr_kernels import AttentionState, DSMRAttention
from dsmr_kernels.module import rotary_cos_sin

from . import schedules
from .checks import check_int


@dataclass
class DSMRConfig:
    """Model hyper-parameters (a plain dataclass with a JSON round-trip).

    ``horizons`` has one entry per layer (None = whole history; an int = that many most recent
    tokens; 0 = none); ``horizons=None`` means full memory everywhere. ``d_ff`` defaults to
    ``4 * d_model``; ``n_kv_heads`` to ``n_heads``.
    """

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None
    segment_len: int = 512
    horizons: Optional[List[Optional[int]]] = None
    dropout: float = 0.0
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    window: Optional[int] = None
    backend: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "segment_len"):
            check_int(name, getattr(self, name), 1)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be n_heads ({self.n_heads}) x an even head dim"
            )
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.horizons is not None:
            self.horizons = schedules.validate(self.horizons, self.n_layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def layer_horizons(self) -> List[Optional[int]]:
        return list(self.horizons) if self.horizons is not None else schedules.full(self.n_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DSMRConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DSMRConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DSMRConfig":
        return cls.from_dict(json.loads(text))


@dataclass
class ModelState:
    """Recurrent state of every layer for B lanes: ``layers[i]`` is layer i's ``AttentionState``."""

    layers: List[AttentionState] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.layers[0].batch

    @property
    def pos(self) -> torch.Tensor:
        """``(B,)`` absolute position of each lane's next token."""
        return self.layers[0].pos

    def reset(self, lanes: Union[Sequence[int], torch.Tensor, None] = None) -> "ModelState":
        """New state where ``lanes`` (all when None) start a new piece; other lanes keep theirs."""
        return ModelState([s.reset(lanes) for s in self.layers])

    def wipe(self) -> "ModelState":
        """Every layer's memory emptied, positions kept (unlike :meth:`reset`, which restarts at 0).

        The KV-reset diagnostic's cut: what follows sees no past content but keeps counting."""
        return ModelState([AttentionState(None, None, torch.zeros_like(s.mem_len), s.pos) for s in self.layers])

    def compact(self, max_len: int) -> "ModelState":
        """Drop memory slots no lane can use: every lane holds at most ``max_len`` valid slots.

        Whole-history layers otherwise keep growing by one segment per batch across resets (a
        reset only zeroes ``mem_len``), so an epoch would pile up dead slots. Slots are
        right-aligned, so keeping the newest ``max_len`` drops only invalid ones; the result
        computes the same numbers.
        """
        return ModelState([s.truncate(max_len) if s.mem_k is not None and s.capacity > max_len else s
                           for s in self.layers])

    def truncate(self, horizons: Sequence[Optional[int]]) -> "ModelState":
        """Cut each layer's memory to its horizon (see ``DSMRAttention.forward(truncate=False)``)."""
        horizons = list(horizons)
        if len(horizons) != len(self.layers):
            raise ValueError(f"got {len(horizons)} horizons for a state of {len(self.layers)} layers")
        return ModelState([s.truncate(h) for s, h in zip(self.layers, horizons)])

    def to(self, device) -> "ModelState":
        """The same state with every tensor moved to ``device``."""
        return ModelState([s.to(device) for s in self.layers])

    def nbytes(self) -> int:
        """Bytes of the memory tensors (allocated slots, valid or not).

        After no-grad decoding the memory is a view of a buffer with spare room (at most about
        twice the slots); ``to_dict`` / ``AttentionState.compact`` give copies without it."""
        n = 0
        for s in self.layers:
            if s.mem_k is not None:
                n += s.mem_k.numel() * s.mem_k.element_size() * 2
        return n

    def to_dict(self) -> dict:
        """Flat dict of tensors (for checkpoints loaded with ``weights_only=True``)."""
        d = {}
        for i, s in enumerate(self.layers):
            d[f"{i}.mem_len"], d[f"{i}.pos"] = s.mem_len, s.pos
            if s.mem_k is not None:
                s = s.compact()  # a view of a larger decode buffer would save the whole buffer
                d[f"{i}.mem_k"], d[f"{i}.mem_v"] = s.mem_k, s.mem_v
        return d

    @classmethod
    def from_dict(cls, d: dict, n_layers: int) -> "ModelState":
        return cls(
            [
                AttentionState(d.get(f"{i}.mem_k"), d.get(f"{i}.mem_v"), d[f"{i}.mem_len"], d[f"{i}.pos"])
                for i in range(n_layers)
            ]
        )


class _RMSNormFn(torch.autograd.Function):
    """``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`` with a hand-written backward.

    Autograd's graph of the same formula ran about 15 small kernels backward (0.86 ms fwd+bwd
    per norm at (1, 512, 256), nine norms per step of a 4-layer model); this runs about ten and
    saves only ``x`` and the (.., 1) row scale: 0.3 ms. Computed in fp32 (float64 stays float64).
    First derivatives only: a double backward through it raises.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(compute)
        r = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (xf * r).to(x.dtype) * weight

    @staticmethod
    @once_differentiable  # r is saved without its graph: a second derivative would be wrong
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xh = x.to(r.dtype) * r  # the normalized input, recomputed: one multiply instead of a saved copy
        gf = g.to(r.dtype)
        gxh = gf * weight.to(r.dtype)
        # d/dx of x * r(x): r * (gxh - xh * mean(gxh * xh)), since dr/dx = -r^3 x / n.
        gx = (gxh - xh * (gxh * xh).mean(-1, keepdim=True)).mul_(r).to(x.dtype)
        gw = (gf * xh).reshape(-1, xh.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32: x (..., dim) -> (..., dim).

    The output is ``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`` (float64 inputs are
    computed in float64)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _RMSNormFn.apply(x, self.weight, self.eps)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DSMRConfig, horizon: Optional[int]):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = DSMRAttention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, horizon,
            window=cfg.window, rope_base=cfg.rope_base, backend=cfg.backend,
        )
        self.norm2 = RMSNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, state: AttentionState, truncate: bool = True, rotary=None):
        a, state = self.attn(self.norm1(x), state, truncate=truncate, rotary=rotary)
        x = x + self.drop(a)
        x = x + self.drop(self.proj(F.gelu(self.fc(self.norm2(x)))))
        return x, state


class DSMRModel(nn.Module):
    """Decoder-only LM over token ids with a recurrent, per-layer-truncated KV memory.

    ``forward(tokens (B, S), state=None) -> (logits (B, S, vocab), new_state)``; S must be at
    most ``config.segment_len``. The new state is detached.
    """

    def __init__(self, config: DSMRConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, h) for h in config.layer_horizons)
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2 style: scale residual projections by depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def with_horizons(self, horizons: Optional[Sequence[Optional[int]]]) -> "DSMRModel":
        """A copy of this model with other per-layer memory horizons and the same weights.

        ``horizons``: one entry per layer (None = whole history, an int = that many tokens, 0 =
        no memory), or None for full memory everywhere. Horizons hold no weights, so this is how
        a trained model is evaluated with its memory wiped (``[0] * n_layers``) or longer than it
        was trained with. The copy is on the same device and dtype, in the same train/eval mode;
        it shares no tensors with this model.
        """
        if horizons is not None:
            horizons = schedules.validate(list(horizons), self.config.n_layers)
        ref = self.embed.weight
        other = DSMRModel(replace(self.config, horizons=horizons)).to(device=ref.device, dtype=ref.dtype)
        other.load_state_dict(self.state_dict())
        return other.train(self.training)

    def init_state(self, batch: int, device=None) -> ModelState:
        """Empty state for ``batch`` lanes (every lane at the start of a piece)."""
        device = self.embed.weight.device if device is None else device
        return ModelState([blk.attn.init_state(batch, device) for blk in self.blocks])

    def forward(self, tokens: torch.Tensor, state: Optional[ModelState] = None, *, truncate: bool = True):
        """tokens ``(B, S)`` int64 -> ``(logits (B, S, vocab_size), new_state)``.

        ``truncate=False`` keeps every layer's memory untruncated (for incremental decoding
        within a segment; call ``state.truncate(model.config.layer_horizons)`` at its end).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, S), got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        B, S = tokens.shape
        if S == 0:
            raise ValueError("tokens has no positions (S = 0)")
        if S > self.config.segment_len:
            raise ValueError(
                f"segment of {S} tokens exceeds segment_len={self.config.segment_len}; split it"
            )
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got min {lo}, max {hi}")
        if state is None:
            state = self.init_state(B, tokens.device)
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layers but the model has {len(self.blocks)}; "
                             "use model.init_state(batch)")
        if state.batch != B:
            raise ValueError(f"state has {state.batch} lanes but tokens has batch {B}")
        x = self.drop(self.embed(tokens))  # (B, S, d_model)
        # Every layer's state sits at the same positions: one set of rotary tables for all.
        pos = state.pos[:, None] + torch.arange(S, device=tokens.device)  # (B, S)
        rotary = rotary_cos_sin(pos, self.config.head_dim, self.config.rope_base)
        new_layers = []
        for blk, st in zip(self.blocks, state.layers):
            x, st = blk(x, st, truncate, rotary)
            new_layers.append(st)
        logits = self.lm_head(self.norm(x))  # (B, S, vocab)
        return logits, ModelState(new_layers)
