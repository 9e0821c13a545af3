"""Static-cache decode engine: one generated token per lane in about twenty tensor ops per layer.

``DSMRModel.forward`` is written for training segments: a call with S = 1 validates its input,
builds rotary tables, runs the op's dispatcher (two flash calls and a log-sum-exp merge) and
builds ``AttentionState`` objects, about 110 ATen calls per layer: 2-8 ms per token for the
``tiny`` preset shape on one core (Intel Xeon / AMD EPYC), whose weights and caches take ~0.2 ms
to read. :class:`DecodeEngine` computes the same logits from preallocated per-layer caches:

    engine = DecodeEngine(model, batch=4, max_len=P + n)   # caches allocated once
    logits = engine.prefill(prompt)        # (4, V): the prompt through model.forward, segment by segment
    logits = engine.step(tokens)           # tokens (4,) -> (4, V), one position further

A step, per layer: the RMS scale of x (``vector_norm``, ``hypot``, ``div``; the norm weights,
``sqrt(d)`` and the softmax scale are folded into the weights), one GEMM for q, k and v into a
persistent buffer, rotary as one complex multiply in place (q/k rows are stored with each head's
two halves interleaved, so a (cos, sin) pair is one complex number; q and k share the order, so
their dot products are unchanged), one copy each of k and v into the caches, ``bmm`` / ``softmax``
/ ``bmm`` over a contiguous slice of the caches (GQA folds a KV head's query heads into GEMM rows;
keys are cached transposed, (D, slots): the q K^T GEMM then reads them in order, 1.6x faster than
through a transposed view), the output projection fused with the residual (``addmm``), and the MLP
(GEMM, GELU as ``u + u erf(u)`` with its constants folded into the weights, GEMM + residual).
Nothing is allocated for the caches and no Python object is built per token.

**Memory rule.** The model is defined segment by segment: a token at absolute position p, in the
segment that starts at s0 = p - p % S, sees in a layer of horizon h the positions
``[max(0, s0 - h), p]`` (h None: ``[0, p]``), limited to the last ``window`` positions when the
model has a window. A finite horizon's cache has h + S slots laid out for the current segment:
position j sits in slot ``j - (s0 - h)``, so the visible keys are one contiguous slice and no mask
is needed. When a new segment starts, the h positions before it move to the front (one copy per
segment: h / S slots per token, amortized; a ring buffer would avoid it but needs a validity
mask at every step). Whole-history layers (None), and finite horizons that have not cut yet when
fewer than h + S positions are expected (``max_len``, or four segments when open-ended), keep
position j at slot j: allocated for the expected positions and grown by doubling past them (a
finite horizon switches to its h + S window when its first cut comes).

Arithmetic runs in the weights' dtype (fp32, fp64); for bf16/fp16 weights on a GPU the norms,
rotary, GELU and softmax run in fp32 as in the model, and on a CPU everything runs in fp32 (the
weights upcast exactly; CPU GEMMs of those dtypes are slow at M = 1), so logits differ from
``model.forward``'s by that dtype's rounding. The engine copies (folds) the weights when it is
built: build a new one after the weights change. Plain tensor ops on any device; positions are
host ints, so a step never waits for a GPU.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn as nn

from dsmr_kernels import DSMRAttention
from dsmr_kernels.module import rotary_cos_sin

from .checks import check_int
from .distributed import unwrap
from .model import Block, DSMRModel, RMSNorm

__all__ = ["DecodeEngine", "engine_supports", "prompt_state"]

# Slots a growing (whole-history) cache starts with when the caller gives no max_len, in segments.
_GROW_START_SEGMENTS = 4
_NEVER = 1 << 62  # the "horizon" of a whole-history layer: no segment start exceeds it


def _own_forward(cls) -> bool:
    """Whether ``cls.forward`` is still the one its class defines (a patched one, e.g. a spy in a
    test or a user's change, may compute something the engine does not reproduce)."""
    fwd = cls.__dict__.get("forward")
    return getattr(fwd, "__qualname__", None) == f"{cls.__name__}.forward" and fwd.__module__ == cls.__module__


def engine_supports(model: nn.Module) -> Optional[str]:
    """None if :class:`DecodeEngine` can run ``model``; otherwise the reason it cannot.

    The engine reads the weights of the standard modules and reproduces their forwards; a model
    with other modules (a custom head, another norm), a subclass, or a replaced ``forward`` is
    left to ``model.forward``. Forward hooks are not run by the engine (it never calls forward
    per token).
    """
    raw = unwrap(model)
    if type(raw) is not DSMRModel:
        return f"not a DSMRModel ({type(raw).__name__})"
    changed = [cls.__name__ for cls in (DSMRModel, Block, DSMRAttention, RMSNorm) if not _own_forward(cls)]
    if changed:
        return f"{', '.join(changed)}.forward replaced"
    if type(raw.embed) is not nn.Embedding or type(raw.lm_head) is not nn.Linear:
        return "the embedding or the head is not the standard module"
    if type(raw.norm) is not RMSNorm:
        return "the final norm is not dsmr's RMSNorm"
    for i, blk in enumerate(raw.blocks):
        if type(blk) is not Block or type(blk.attn) is not DSMRAttention:
            return f"block {i} is not the standard Block / DSMRAttention"
        if type(blk.norm1) is not RMSNorm or type(blk.norm2) is not RMSNorm:
            return f"block {i} has another norm"
        if not all(type(m) is nn.Linear for m in (blk.fc, blk.proj, blk.attn.qkv, blk.attn.out)):
            return f"block {i} has another kind of projection"
        if blk.fc.bias is not None or blk.proj.bias is not None:
            return f"block {i} has MLP biases"
    dtypes = {p.dtype for p in raw.parameters()}
    if len(dtypes) != 1 or not dtypes <= {torch.float16, torch.bfloat16, torch.float32, torch.float64}:
        return f"parameters of dtypes {sorted(map(str, dtypes))} (one float dtype needed)"
    return None


def prompt_state(model: DSMRModel, tokens: torch.Tensor, on_forward: Optional[Callable] = None):
    """The prompt through ``model.forward`` the way generation defines it: full segments with
    their memory truncated, then a partial last segment untruncated (later tokens of that segment
    see its keys). ``tokens``: ``(P,)`` ids, P >= 1, on the model's device.

    Returns ``(logits after the last token (1, V), state)`` for one lane; ``on_forward(logits
    (1, s, V), state)`` sees every forward.
    """
    S, P = model.config.segment_len, tokens.shape[0]
    if P == 0:
        raise ValueError("prompt must hold at least one id")
    toks = tokens[None]
    state = model.init_state(1, tokens.device)
    full = P - P % S
    logits = None
    for s0 in range(0, full, S):
        logits, state = model(toks[:, s0:s0 + S], state)  # (1, S, V), memory truncated
        if on_forward is not None:
            on_forward(logits, state)
    if P > full:
        logits, state = model(toks[:, full:], state, truncate=False)
        if on_forward is not None:
            on_forward(logits, state)
    return logits[:, -1], state


class _Layer:
    """One layer's folded weights and caches (plain attributes: a step reads them directly).

    ``kt``: keys (B Hkv, D, slots), transposed; ``v``: values (B Hkv, slots, D); ``kt4``, ``v4``:
    the same as (B, Hkv, ...) views. ``full``: slot j holds position j (else the h + S window of
    the segment starting at ``s0``); ``hmax``: the horizon, or _NEVER for None."""

    __slots__ = ("w_qkv", "b_qkv", "w_out", "b_out", "w_fc", "w_proj", "c1", "c2", "horizon",
                 "hmax", "full", "kt", "v", "kt4", "v4", "s0", "held_max")


class DecodeEngine:
    """Static-cache decoding of a :class:`dsmr.DSMRModel` for ``batch`` lanes at one position.

    Args:
        model: the model (a DDP wrapper is unwrapped). Its weights are copied (folded) here, so
            later changes to them are not seen. Dropout is not applied (eval semantics).
        batch: lanes decoded together, every lane at the same position, each with its own caches.
        max_len: the most positions the engine is expected to hold (prompt + tokens fed back):
            whole-history caches are allocated for it, and so are finite horizons of more than
            ``max_len - S`` slots. None: open-ended (those caches start at four segments).
            Going past ``max_len`` is allowed: those caches grow by doubling (a finite horizon at
            most to its h + S slots).
        compute_dtype: dtype of the GEMMs and caches. None: the weights' dtype, but fp32 for
            bf16/fp16 weights on a CPU. In bf16/fp16 the norms, rotary, GELU and softmax still
            run in fp32, as in the model.

    Attributes:
        pos: absolute position of the next token to be fed (the same for every lane).
        held_max: per layer, the most key/value slots a fed token has had in its cache (the model
            path's cache capacity after the same token: at most ``horizon + S``).
    """

    def __init__(self, model: nn.Module, batch: int = 1, *, max_len: Optional[int] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        why = engine_supports(model)
        if why is not None:
            raise ValueError(f"DecodeEngine cannot run this model: {why}")
        check_int("batch", batch, 1)
        check_int("max_len", max_len, 1, allow_none=True)
        raw = unwrap(model)
        cfg = raw.config
        self.model, self.config, self.batch, self.max_len = raw, cfg, batch, max_len
        self.S, self.window = cfg.segment_len, cfg.window
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.H, self.Hkv, self.D, self.G = H, Hkv, D, H // Hkv
        w = raw.embed.weight
        # Logits come back in the weights' dtype. The engine computes in it too, but for bf16 /
        # fp16 weights on a CPU in fp32 (the weights upcast exactly): CPU GEMMs and bmm in those
        # dtypes ran 3x (mm) to 25x (bmm) slower than fp32 at these sizes, slower than the model.
        self.device, self.out_dtype = w.device, w.dtype
        half = w.dtype in (torch.float16, torch.bfloat16)
        if compute_dtype is None:
            compute_dtype = torch.float32 if half and w.device.type == "cpu" else w.dtype
        elif compute_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be a float dtype or None, got {compute_dtype}")
        self.dtype = compute_dtype
        # Elementwise work (norms, rotary, GELU, softmax) in fp32 at least, as the model does.
        self.cdt = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.low = self.cdt != self.dtype
        # Position j of a q/k head row holds element perm[j] of the model's layout: the two
        # rotary halves interleaved, (x1_0, x2_0, x1_1, x2_1, ...), one complex number per pair.
        self._perm = torch.arange(D, device=self.device).view(2, D // 2).t().reshape(D)
        with torch.no_grad():
            self._fold(raw)
        self.pos = 0
        self._rot = None
        self._rotary(max_len or 1)
        # The qkv GEMM writes into one persistent buffer; its views are built once.
        nq, nkv = H * D, Hkv * D
        self._t = torch.empty(batch, nq + 2 * nkv, dtype=self.dtype, device=self.device)
        self._q4 = self._t[:, :nq].view(batch, Hkv, self.G, D)
        # bmm wants a KV head's G query heads as the rows of one batch entry: a view of the GEMM
        # output for one lane; for several lanes a copy (their rows are not evenly spaced).
        self._q = (self._q4.view(Hkv, self.G, D) if batch == 1 else
                   torch.empty(batch * Hkv, self.G, D, dtype=self.dtype, device=self.device))
        self._k = self._t[:, nq:nq + nkv].view(batch, Hkv, D)
        self._v = self._t[:, nq + nkv:].view(batch, Hkv, D)
        qk = self._t[:, :nq + nkv].view(batch, H + Hkv, D // 2, 2)
        self._qk = torch.view_as_complex(qk) if not self.low else qk
        self._o = torch.empty(batch * Hkv, self.G, D, dtype=self.dtype, device=self.device)
        self._o2 = self._o.view(batch, H * D)
        S = self.S
        for lyr in self.layers:
            h = lyr.horizon
            lyr.held_max, lyr.s0 = 0, 0
            lyr.hmax = _NEVER if h is None else h
            # A finite horizon gets its h + S slots at once unless fewer positions are expected
            # (max_len, or a few segments when open-ended: a huge horizon allocates only what is
            # used); such a layer, and a whole-history one, keeps position j at slot j.
            start = max_len if max_len is not None else _GROW_START_SEGMENTS * S
            lyr.full = h is None or start < h + S
            slots = start if lyr.full else h + S
            self._set_cache(lyr, *self._new_cache(slots))

    def _new_cache(self, slots: int):
        """Zeroed keys (B, Hkv, D, slots) and values (B, Hkv, slots, D)."""
        B, Hkv, D = self.batch, self.Hkv, self.D
        kw = dict(dtype=self.dtype, device=self.device)
        return torch.zeros(B, Hkv, D, slots, **kw), torch.zeros(B, Hkv, slots, D, **kw)

    def _set_cache(self, lyr: _Layer, kt4: torch.Tensor, v4: torch.Tensor) -> None:
        lyr.kt4, lyr.v4 = kt4, v4
        lyr.kt, lyr.v = kt4.flatten(0, 1), v4.flatten(0, 1)  # views: what bmm reads

    # ------------------------------------------------------------------------------------------
    def _fold(self, raw: DSMRModel) -> None:
        """Weights as contiguous (in, out) matrices for ``mm`` with the constants folded in.

        ``rms(x) * w @ W.T == (x / hypot(|x|, sqrt(d eps))) @ (W * w * sqrt(d)).T``; q's rows
        carry the softmax scale (it commutes with rotary); q/k rows are interleaved (``_perm``);
        GELU's 1/sqrt(2) goes into the MLP's first matrix and its sqrt(2)/2 into the second.
        Folded in fp32 at least, rounded once to the weights' dtype.
        """
        cfg, H, Hkv, D = self.config, self.H, self.Hkv, self.D
        f, d = self.cdt, cfg.d_model
        rd, g = d ** 0.5, 0.5 ** 0.5

        def mat(w):  # (out, in) -> contiguous (in, out) in the weights' dtype
            return w.t().contiguous().to(self.dtype)

        def const(eps):  # the 0-dim sqrt(d * eps) of _rms_scaled
            return torch.tensor((d * eps) ** 0.5, dtype=f, device=self.device)

        def get(p):
            return p.detach().to(f)

        row_scale = torch.ones(H + 2 * Hkv, 1, dtype=f, device=self.device)
        row_scale[:H] = D ** -0.5
        perm = torch.cat([self._perm + i * D for i in range(H + Hkv)]
                         + [torch.arange((H + Hkv) * D, (H + 2 * Hkv) * D, device=self.device)])
        self.embed = raw.embed.weight.detach().to(self.dtype)
        self.layers: List[_Layer] = []
        for blk in raw.blocks:
            a = blk.attn
            lyr = _Layer()
            lyr.horizon = a.horizon
            w = get(a.qkv.weight).view(H + 2 * Hkv, D, d) * row_scale[:, :, None]
            lyr.w_qkv = mat(w.reshape(-1, d)[perm] * (get(blk.norm1.weight) * rd)[None])
            lyr.b_qkv = (None if a.qkv.bias is None else
                         (get(a.qkv.bias).view(H + 2 * Hkv, D) * row_scale).reshape(-1)[perm].to(self.dtype))
            lyr.w_out = mat(get(a.out.weight))
            lyr.b_out = None if a.out.bias is None else a.out.bias.detach().to(self.dtype)
            lyr.w_fc = mat(get(blk.fc.weight) * (get(blk.norm2.weight) * (rd * g))[None])
            lyr.w_proj = mat(get(blk.proj.weight) * g)
            lyr.c1, lyr.c2 = const(blk.norm1.eps), const(blk.norm2.eps)
            self.layers.append(lyr)
        self.w_head = mat(get(raw.lm_head.weight) * (get(raw.norm.weight) * rd)[None])
        self.b_head = None if raw.lm_head.bias is None else raw.lm_head.bias.detach().to(self.dtype)
        self.c_head = const(raw.norm.eps)

    def _rotary(self, upto: int) -> None:
        """Rotary factors ``cos + i sin`` (len, D/2) for positions [0, len), len >= ``upto``, from
        the model's own tables (``rotary_cos_sin``: float64 angles of absolute positions)."""
        have = 0 if self._rot is None else self._rot.shape[0]
        if upto <= have:
            return
        n = max(upto, 2 * have, 4 * self.S)
        cos, sin = rotary_cos_sin(torch.arange(n, device=self.device)[None], self.D, self.config.rope_base)
        cos, sin = cos[0, 0].to(self.cdt), sin[0, 0].to(self.cdt)  # (n, D/2), rounded as the model rounds
        self._rot = torch.complex(cos, sin)
        self._cs = torch.stack([cos, sin])  # for bf16/fp16 weights (no complex type to view them as)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt, on_forward: Optional[Callable] = None) -> torch.Tensor:
        """Run ``prompt`` (ids, (P,) or (1, P), P >= 1) through ``model.forward`` segment by
        segment (the training-speed path) and load its memory into every lane's caches.

        Needs a fresh engine (``pos == 0``). ``on_forward(logits (1, s, V), state)`` sees each of
        the prompt's forwards. Returns the logits after the prompt's last token, ``(batch, V)``
        (one row repeated for every lane).
        """
        if self.pos != 0:
            raise ValueError("prefill needs a fresh engine (pos 0)")
        toks = torch.as_tensor(prompt, dtype=torch.long, device=self.device).reshape(-1)
        last, state = prompt_state(self.model, toks, on_forward)
        self._load(state, toks.shape[0])
        return last.expand(self.batch, -1)

    def _load(self, state, P: int) -> None:
        """Copy a single-lane model state after P positions into every lane's caches."""
        s0 = P - P % self.S  # the segment of the next position
        self._rotary(P + 1)
        for lyr, st in zip(self.layers, state.layers):
            if lyr.full:
                self._relayout(lyr, P)
            lyr.s0 = s0
            n = 0 if st.mem_k is None else int(st.mem_len[0])
            if n:
                lo = P - n  # the state's valid slots hold positions [P - n, P), right-aligned
                a = lo if lyr.full else lo - (s0 - lyr.horizon)
                M = st.mem_k.shape[2]
                k = st.mem_k[0, :, M - n:][..., self._perm].to(self.dtype)  # (Hkv, n, D), interleaved
                v = st.mem_v[0, :, M - n:].to(self.dtype)
                lyr.kt4[:, :, :, a:a + n] = k.transpose(1, 2)
                lyr.v4[:, :, a:a + n] = v
            lyr.held_max = max(lyr.held_max, n)
        self.pos = P

    def _relayout(self, lyr: _Layer, p: int) -> None:
        """Make a slot-j layer (whole history, or a horizon that has not cut yet) hold position p.

        While p's segment starts at or before the horizon h, the layer needs positions [0, p]:
        the caches double (at most to h + S slots). Once a segment starts past h, the layer
        switches to the h + S window layout of a finite horizon with positions [s0 - h, p)."""
        S, slots = self.S, lyr.v.shape[1]
        s0 = p - p % S
        if s0 > lyr.hmax:
            h = lyr.horizon
            kt, v = self._new_cache(h + S)
            keep = min(p, slots) - (s0 - h)  # positions [s0 - h, p) that exist
            if keep > 0:
                kt[..., :keep] = lyr.kt4[..., s0 - h:s0 - h + keep]
                v[:, :, :keep] = lyr.v4[:, :, s0 - h:s0 - h + keep]
            self._set_cache(lyr, kt, v)
            lyr.full, lyr.s0 = False, s0
        elif p >= slots:
            kt, v = self._new_cache(min(max(p + 1, 2 * slots), lyr.hmax + S))
            kt[..., :slots] = lyr.kt4
            v[:, :, :slots] = lyr.v4
            self._set_cache(lyr, kt, v)

    def _next_segment(self, lyr: _Layer, s0: int) -> None:
        """Lay a window cache out for the segment starting at ``s0``: the h positions before it
        (``[s0 - h, s0)``, those that exist) move to slots ``[0, h)``."""
        h = lyr.horizon
        lo = max(0, s0 - h)  # first kept position
        first = lo - (s0 - h)  # its slot in the new layout; it sat at first + shift
        shift = s0 - lyr.s0
        # Destination below the source: copying in chunks no longer than the shift never reads
        # a slot already overwritten (copy_ refuses overlapping source and destination).
        for a in range(first, h, shift):
            b = min(a + shift, h)
            lyr.kt[:, :, a:b] = lyr.kt[:, :, a + shift:b + shift]
            lyr.v[:, a:b] = lyr.v[:, a + shift:b + shift]
        lyr.s0 = s0

    # ------------------------------------------------------------------------------------------
    def _rms_scaled(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x / hypot(|x|, sqrt(d eps)) = x * rsqrt(mean(x^2) + eps) / sqrt(d)``: RMSNorm without
        its weight and its sqrt(d), both folded into the next GEMM. Three ops with one fused
        reduction (``F.rms_norm`` and ``mean(x * x)`` took 2.5-3x longer at these sizes). ``c``
        is the 0-dim ``sqrt(d * eps)``; computed in fp32 at least, returned in the engine's dtype."""
        if self.low:
            xc = x.to(self.cdt)
            return (xc / torch.hypot(torch.linalg.vector_norm(xc, 2, -1, True), c)).to(self.dtype)
        return x / torch.hypot(torch.linalg.vector_norm(x, 2, -1, True), c)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per lane at position ``pos``; returns the logits ``(batch, V)`` of the
        next position, in the weights' dtype, on the engine's device.

        ``tokens``: ``(batch,)`` int64 ids on the engine's device (not range-checked here: an
        out-of-range id raises in the embedding lookup). Fastest under ``torch.inference_mode()``
        (no view or version-counter bookkeeping: a quarter of a tiny-shape step under no_grad);
        with grad enabled it runs under ``no_grad``.
        """
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.step(tokens)
        p = self.pos
        if p >= self._rot.shape[0]:
            self._rotary(p + 1)
        if self.low:
            return self._step_low(tokens, p)
        s0 = p - p % self.S
        window = self.window
        t, qk, q, k, v, o, o2 = self._t, self._qk, self._q, self._k, self._v, self._o, self._o2
        q4 = self._q4 if self.batch > 1 else None
        rot = self._rot[p]
        mm, addmm, bmm, hypot, norm = torch.mm, torch.addmm, torch.bmm, torch.hypot, torch.linalg.vector_norm
        x = self.embed.index_select(0, tokens)  # (B, d)
        for lyr in self.layers:
            a, n, slot = self._visible(lyr, p, s0, window)
            h = x / hypot(norm(x, 2, -1, True), lyr.c1)  # RMSNorm; its weight is in w_qkv
            if lyr.b_qkv is None:
                mm(h, lyr.w_qkv, out=t)
            else:
                addmm(lyr.b_qkv, h, lyr.w_qkv, out=t)
            qk.mul_(rot)  # rotary on q and k: (x1 + i x2)(cos + i sin)
            lyr.kt4.select(3, slot).copy_(k)
            lyr.v4.select(2, slot).copy_(v)
            if q4 is not None:
                q.view_as(q4).copy_(q4)
            prob = torch.softmax(bmm(q, lyr.kt.narrow(2, a, n)), -1)  # (B Hkv, G, n); scale in q
            bmm(prob, lyr.v.narrow(1, a, n), out=o)
            x = addmm(x if lyr.b_out is None else x + lyr.b_out, o2, lyr.w_out)
            u = mm(x / hypot(norm(x, 2, -1, True), lyr.c2), lyr.w_fc)  # u = (x W) / sqrt(2)
            x = addmm(x, torch.addcmul(u, u, torch.erf(u)), lyr.w_proj)  # sqrt(2) gelu(x W) = u (1 + erf(u))
        h = x / hypot(norm(x, 2, -1, True), self.c_head)
        self.pos = p + 1
        logits = mm(h, self.w_head) if self.b_head is None else addmm(self.b_head, h, self.w_head)
        return logits if self.out_dtype == self.dtype else logits.to(self.out_dtype)

    def _visible(self, lyr: _Layer, p: int, s0: int, window: Optional[int]):
        """Lay ``lyr``'s caches out for position p; returns (first visible slot, visible slots,
        p's slot) and records the slots held."""
        if lyr.full:
            if p >= lyr.v.shape[1] or s0 > lyr.hmax:
                self._relayout(lyr, p)
        elif s0 != lyr.s0:
            self._next_segment(lyr, s0)
        if lyr.full:
            lo = base = 0
        else:
            base = s0 - lyr.horizon
            lo = base if base > 0 else 0
        if p + 1 - lo > lyr.held_max:
            lyr.held_max = p + 1 - lo
        if window is not None and p - window + 1 > lo:
            lo = p - window + 1
        return lo - base, p + 1 - lo, p - base

    def _step_low(self, tokens: torch.Tensor, p: int) -> torch.Tensor:
        """:meth:`step` for bf16/fp16 weights: GEMMs in that dtype, the elementwise work (norms,
        rotary, GELU, softmax) in fp32 and rounded back, as the model does."""
        s0 = p - p % self.S
        cdt, dt = self.cdt, self.dtype
        t, q, k, v, o, o2 = self._t, self._q, self._k, self._v, self._o, self._o2
        q4 = self._q4 if self.batch > 1 else None
        x = self.embed.index_select(0, tokens)
        for lyr in self.layers:
            a, n, slot = self._visible(lyr, p, s0, self.window)
            torch.mm(self._rms_scaled(x, lyr.c1), lyr.w_qkv, out=t) if lyr.b_qkv is None else \
                torch.addmm(lyr.b_qkv, self._rms_scaled(x, lyr.c1), lyr.w_qkv, out=t)
            self._rotate_low(p)
            lyr.kt4.select(3, slot).copy_(k)
            lyr.v4.select(2, slot).copy_(v)
            if q4 is not None:
                q.view_as(q4).copy_(q4)
            s = torch.bmm(q, lyr.kt.narrow(2, a, n))
            torch.bmm(torch.softmax(s, -1, dtype=cdt).to(dt), lyr.v.narrow(1, a, n), out=o)
            x = torch.addmm(x if lyr.b_out is None else x + lyr.b_out, o2, lyr.w_out)
            u = torch.mm(self._rms_scaled(x, lyr.c2), lyr.w_fc).to(cdt)
            x = torch.addmm(x, torch.addcmul(u, u, torch.erf(u)).to(dt), lyr.w_proj)
        h = self._rms_scaled(x, self.c_head)
        self.pos = p + 1
        logits = torch.mm(h, self.w_head) if self.b_head is None else torch.addmm(self.b_head, h, self.w_head)
        return logits.to(self.out_dtype)

    def _rotate_low(self, p: int) -> None:
        """Rotary for bf16/fp16 weights (no complex dtype to view them as): in fp32, rounded back."""
        qk = self._qk  # (B, H + Hkv, D/2, 2) real view
        x = qk.to(self.cdt)
        cos, sin = self._cs[0, p][:, None], self._cs[1, p][:, None]  # (D/2, 1)
        x1, x2 = x[..., :1], x[..., 1:]
        qk.copy_(torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1))

    @property
    def held_max(self) -> List[int]:
        """Per layer, the most key/value slots a fed token has had in its cache (the prompt's
        forwards included): the model path's largest cache capacity, ``horizon + S`` at most."""
        return [lyr.held_max for lyr in self.layers]

    @property
    def held(self) -> List[int]:
        """Per layer, the key/value slots the last fed token had in its cache (before any window)."""
        p = self.pos - 1
        s0 = p - p % self.S
        return [p + 1 - (0 if lyr.horizon is None else max(0, s0 - lyr.horizon)) for lyr in self.layers]
