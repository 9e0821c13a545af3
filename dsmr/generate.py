"""Sampling from a DSMR model with per-layer caches bounded by each layer's horizon + a segment.

The model is defined segment by segment: a token at position p in segment k = p // S sees its
layer's memory as it stood at the segment's start (the last ``horizon`` tokens before k*S) plus
the tokens of segment k up to itself. Generation reproduces that rule token by token:

    prompt  | full segments: model(seg, state)                 (memory truncated after each)
            | tail of a segment: model(tail, state, truncate=False)
    decode  | one token: model(tok, state, truncate=False)     (memory grows within the segment)
            | at every segment boundary: state = state.truncate(config.layer_horizons)

so every layer's cache holds at most ``horizon + S`` slots (None horizons: the whole history),
and the logits equal those of a segment-wise forward over the same tokens.

With ``grammar=tokenizer`` every step first masks the tokens that would break the tokenizer's
grammar (see :mod:`dsmr.grammar`): its state machine runs over the prompt, then over each sampled
token, so every sampled sequence has MidiTok ``tokens_errors == 0``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .checks import check_int
from .distributed import unwrap
from .threads import Policy, governed


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> int:
    """Draw one id from ``logits`` ``(V,)``: temperature, then top-k, then nucleus (top-p).

    ``temperature == 0`` is greedy (argmax). Sampling runs on the CPU so a seeded CPU generator
    gives the same draw on any device.
    """
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (torch.cumsum(probs, -1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_args(max_new_tokens, temperature, top_k, top_p):
    check_int("max_new_tokens", max_new_tokens, 0)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    check_int("top_k", top_k, 1, allow_none=True)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


def _prepare(raw, prompt, device, seed):
    """Validated prompt ids, the device, and a (seeded) CPU sampling generator."""
    vocab = raw.config.vocab_size
    prompt = [int(t) for t in np.asarray(prompt).reshape(-1).tolist()]
    if not prompt:
        raise ValueError("prompt must hold at least one id (e.g. BOS)")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt ids {bad[:5]} lie outside the model's vocab [0, {vocab})")
    device = next(raw.parameters()).device if device is None else torch.device(device)
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(int(seed))
    else:
        gen.seed()
    return prompt, device, gen


def _repeat_state(state, n: int):
    """``state`` of one lane repeated into ``n`` independent lanes (own memory copies)."""
    from dsmr_kernels import AttentionState

    from .model import ModelState

    def rep(t):
        return None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))

    return ModelState([AttentionState(rep(s.mem_k), rep(s.mem_v), rep(s.mem_len), rep(s.pos))
                       for s in state.layers])


class _GrammarMask:
    """Adapts a :class:`dsmr.grammar.TokenGrammar` to the model's vocab and the decode loop."""

    def __init__(self, grammar, vocab_size: int, n: int, prompt, allow_eos: bool):
        from .grammar import as_grammar

        self.g = as_grammar(grammar)
        if self.g.vocab_size > vocab_size:
            raise ValueError(f"grammar: the tokenizer has {self.g.vocab_size} tokens but the model only "
                             f"{vocab_size}; pass the tokenizer the model was trained with")
        self.vocab_size, self.allow_eos = vocab_size, allow_eos
        self.state = self.g.start(1)
        self.g.advance_many(self.state, prompt)  # once, then copied into the n lanes
        self.state = self.state.repeat(n)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (n, V_model) with every disallowed token at -inf."""
        m = self.g.mask(self.state, allow_eos=self.allow_eos)  # (n, V_tokenizer)
        if self.vocab_size > m.shape[1]:  # ids past the tokenizer's vocab are never valid
            m = np.concatenate([m, np.zeros((m.shape[0], self.vocab_size - m.shape[1]), bool)], 1)
        return logits.masked_fill(~torch.from_numpy(m).to(logits.device), float("-inf"))


def _decode(raw, prompt, max_new_tokens, n, *, sampling, gen, eos_id, stop_at_eos, device, progress,
            on_forward=None, grammar=None, threads="auto"):
    """The loop behind :func:`generate` and :func:`generate_samples` (see the module docstring).

    Runs the prompt once (batch 1), copies its state into ``n`` lanes (n > 1), then samples one
    token per lane per step, masked by ``grammar`` (a tokenizer or ``TokenGrammar``) if given.
    ``on_forward(logits (n, t, V), state)`` sees every forward before any truncation. Returns
    ``(new ids per lane, stopped-at-EOS per lane)``.
    """
    gmask = None if grammar is None else _GrammarMask(
        grammar, raw.config.vocab_size, n, prompt, allow_eos=stop_at_eos and eos_id is not None)
    S, horizons = raw.config.segment_len, raw.config.layer_horizons
    was_training = raw.training
    raw.eval()
    new = [[] for _ in range(n)]
    stopped = [False] * n

    def forward(x, state, truncate=True):
        logits, state = raw(x, state, truncate=truncate)
        if on_forward is not None:
            on_forward(logits, state)
        return logits, state

    with governed(threads, device=device) as gov:
        try:
            toks = torch.tensor(prompt, dtype=torch.long, device=device)[None]  # (1, P)
            P = toks.shape[1]
            state = raw.init_state(1, device)
            full = P - P % S
            logits = None
            for s0 in range(0, full, S):
                logits, state = forward(toks[:, s0:s0 + S], state)  # (1, S, V), memory truncated
            if P > full:
                # A partial segment: keep its keys untruncated, later tokens of this segment see them.
                logits, state = forward(toks[:, full:], state, truncate=False)
            if n > 1:
                state = _repeat_state(state, n)
            last = logits[:, -1].expand(n, -1)  # (n, V): every lane starts from the prompt's last logits
            pos = P
            from tqdm.auto import tqdm

            desc = "generate" if n == 1 else f"generate x{n}"
            for i in tqdm(range(max_new_tokens), desc=desc, disable=not progress, leave=False):
                gov.tick()
                if gmask is not None:
                    last = gmask.apply(last)
                step = []
                for b in range(n):
                    if stopped[b]:
                        step.append(eos_id)  # fed so the batch stays rectangular, never kept
                        continue
                    tok = sample_next(last[b], generator=gen, **sampling)
                    new[b].append(tok)
                    step.append(tok)
                    if stop_at_eos and eos_id is not None and tok == eos_id:
                        stopped[b] = True
                if gmask is not None:
                    gmask.g.advance(gmask.state, step)
                if all(stopped) or i == max_new_tokens - 1:
                    break  # the last token is never fed back
                step_in = torch.tensor(step, dtype=torch.long, device=device)[:, None]  # (n, 1)
                logits, state = forward(step_in, state, truncate=False)
                last = logits[:, -1]
                pos += 1
                if pos % S == 0:
                    state = state.truncate(horizons)
        finally:
            raw.train(was_training)
    return new, stopped


@torch.no_grad()
def generate(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    eos_id: Optional[int] = None,
    stop_at_eos: bool = True,
    device=None,
    return_logits: bool = False,
    progress: bool = False,
    grammar=None,
    threads: Policy = "auto",
) -> dict:
    """Continue ``prompt`` by sampling up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`dsmr.DSMRModel` (put in eval mode for the call).
        prompt: 1-D ids used as given (start it with BOS to begin a piece). At least one id.
        max_new_tokens: upper bound on sampled tokens.
        temperature, top_k, top_p: sampling controls (temperature 0 = greedy).
        seed: seeds the sampling generator (same seed -> same tokens); None: nondeterministic.
        eos_id, stop_at_eos: stop after sampling ``eos_id`` (it is included in the output).
        return_logits: also return the logits of every position fed to the model.
        grammar: a MidiTok REMI tokenizer (or a :class:`dsmr.grammar.TokenGrammar`): mask, at every
            step, the tokens that would break its grammar, so the sequence has ``tokens_errors == 0``
            (see :mod:`dsmr.grammar`); with ``stop_at_eos=False`` EOS is masked too. None: no mask.
        threads: CPU threads: ``"auto"`` follows the cores other processes leave free
            (:mod:`dsmr.threads`), an int fixes the count, None leaves torch's setting.

    Returns: ``{"tokens": prompt + new (list), "new_tokens": list, "stopped_at_eos": bool,
    "max_capacity": per-layer largest cache size (slots) seen, "logits": (T - 1, V) float tensor
    (only with ``return_logits``; row i is the distribution of token i + 1, T = len(tokens))}``.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    raw = unwrap(model)
    prompt, device, gen = _prepare(raw, prompt, device, seed)
    max_cap = [0] * raw.config.n_layers
    all_logits = []

    def on_forward(logits, state):
        for i, s in enumerate(state.layers):
            max_cap[i] = max(max_cap[i], s.capacity)
        if return_logits:  # only when asked: 64k tokens x vocab would pile up
            all_logits.append(logits[0])

    new, stopped = _decode(raw, prompt, max_new_tokens, 1,
                           sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p), gen=gen,
                           eos_id=eos_id, stop_at_eos=stop_at_eos, device=device, progress=progress,
                           on_forward=on_forward, grammar=grammar, threads=threads)
    new = new[0]
    out = {"tokens": prompt + new, "new_tokens": new, "stopped_at_eos": stopped[0], "max_capacity": max_cap}
    if return_logits:
        lg = torch.cat(all_logits, 0).float().cpu()  # (T, V) rows for every fed position
        out["logits"] = lg[: len(prompt) + len(new) - 1]
    return out


@torch.no_grad()
def generate_samples(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    num_samples: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    eos_id: Optional[int] = None,
    stop_at_eos: bool = True,
    device=None,
    progress: bool = False,
    grammar=None,
    threads: Policy = "auto",
) -> list:
    """``num_samples`` independent continuations of one prompt, decoded as a batch of lanes.

    The prompt runs once (batch 1); its state is then copied into ``num_samples`` lanes that
    sample and decode together, one token per step for all lanes, with the same bounded caches
    and segment rule as :func:`generate`. A lane that samples ``eos_id`` (with ``stop_at_eos``)
    stops; the batch stops when every lane has. Arguments as in :func:`generate`; draws come from
    one seeded generator, lane by lane, so a seed fixes all samples. ``grammar`` masks each lane
    with its own grammar state, and ``threads`` sets the CPU threads, as in :func:`generate`.

    Returns: a list of ``num_samples`` dicts ``{"tokens": prompt + new, "new_tokens",
    "stopped_at_eos"}``.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    check_int("num_samples", num_samples, 1)
    raw = unwrap(model)
    prompt, device, gen = _prepare(raw, prompt, device, seed)
    new, stopped = _decode(raw, prompt, max_new_tokens, num_samples,
                           sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p), gen=gen,
                           eos_id=eos_id, stop_at_eos=stop_at_eos, device=device, progress=progress,
                           grammar=grammar, threads=threads)
    return [{"tokens": prompt + n, "new_tokens": n, "stopped_at_eos": st} for n, st in zip(new, stopped)]
