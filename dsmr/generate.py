"""Sampling from a DSMR model with per-layer caches bounded by each layer's horizon + a segment.

The model is defined segment by segment: a token at position p in segment k = p // S sees its
layer's memory as it stood at the segment's start (the last ``horizon`` tokens before k*S) plus
the tokens of segment k up to itself. Generation reproduces that rule:

    prompt  | full segments: model(seg, state)                 (memory truncated after each)
            | tail of a segment: model(tail, state, truncate=False)
            | (training-speed forwards; the state then fills every lane's engine caches)
    decode  | one token per lane: DecodeEngine.step(tokens)    (dsmr/decode.py: static caches of
            |   horizon + S slots per layer, laid out so the visible keys are one contiguous slice)

so every layer's cache holds at most ``horizon + S`` slots (None horizons: the whole history),
and the logits equal those of a segment-wise forward over the same tokens (up to rounding: the
engine folds norm weights and constants into its weights). ``engine=False`` decodes with the
model's own forward per token instead (``model(tok, state, truncate=False)``, then
``state.truncate(horizons)`` at every segment boundary): the reference path, 3-5x slower per
token, taken as well for a model the engine cannot run (:func:`dsmr.decode.engine_supports`).

Sampling runs on the CPU with one seeded generator, lane after lane (:func:`sample_rows` draws
every lane's token in one batch of ops, the same ids as :func:`sample_next` row by row). With
``grammar=tokenizer`` every step first masks the tokens that would break the tokenizer's grammar
(see :mod:`dsmr.grammar`): its state machine runs over the prompt, then over each sampled token,
so every sampled sequence has MidiTok ``tokens_errors == 0``.
"""
from __future__ import annotations

import contextlib
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


def sample_rows(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one id per row of ``logits`` ``(n, V)`` -> ``(n,)`` int64 (CPU), as :func:`sample_next`.

    The same rule as ``sample_next`` applied to every row in one batch of ops, and the same
    draws: row i gets exactly what ``sample_next(logits[i])`` would get from the generator after
    rows 0..i-1 (multinomial sampling of one id draws an Exp(1) variable per entry, row after
    row; ``tests/dsmr/test_decode.py`` checks the equality).
    """
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return torch.argmax(logits, -1)
    if temperature != 1:  # x / 1 == x: skip the op
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = (torch.cumsum(probs, -1) - probs) >= top_p  # as in sample_next: the top token stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    if torch.isnan(probs).any():  # let torch.multinomial raise its error
        return torch.multinomial(probs, 1, generator=generator).view(-1)
    # torch.multinomial's own algorithm for one sample (ATen's Distributions.cpp): argmax(p / q)
    # with q ~ Exp(1) drawn for every entry in order; here without its validity checks, each a
    # host sync (23 us against 11 us per call at V = 255). NaN rows went to multinomial above.
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / q, -1)


def _decode(raw, prompt, max_new_tokens, n, *, sampling, gen, eos_id, stop_at_eos, device, progress,
            on_logits=None, grammar=None, threads="auto", engine=True):
    """The loop behind :func:`generate` and :func:`generate_samples` (see the module docstring).

    Runs the prompt once (batch 1) segment by segment through ``model.forward``, gives its
    memory to ``n`` lanes, then samples one token per lane per step, masked by ``grammar`` (a
    tokenizer or ``TokenGrammar``) if given, and feeds the tokens back through the static-cache
    :class:`dsmr.decode.DecodeEngine` (``engine=False``, or a model the engine cannot run: the
    model's own forward per token, the reference path). ``on_logits(logits (n, t, V))`` sees the
    logits of every fed position. Returns ``(new ids per lane, stopped-at-EOS per lane,
    per-layer largest cache (slots))``.
    """
    from .decode import DecodeEngine, engine_supports, prompt_state

    gmask = None if grammar is None else _GrammarMask(
        grammar, raw.config.vocab_size, n, prompt, allow_eos=stop_at_eos and eos_id is not None)
    was_training = raw.training
    raw.eval()
    use_engine = engine and engine_supports(raw) is None
    max_cap = [0] * raw.config.n_layers
    new = [[] for _ in range(n)]
    stopped = [False] * n

    def capacity(state):
        for i, s in enumerate(state.layers):
            max_cap[i] = max(max_cap[i], s.capacity)

    def on_forward(logits, state):
        capacity(state)
        if on_logits is not None:
            on_logits(logits)

    # The engine runs under inference_mode: no view or version-counter bookkeeping per op (a
    # quarter of a tiny-model step under no_grad). Only ids and, for return_logits, logits leave
    # _decode; generate concatenates the logits outside it, which yields a normal tensor.
    mode = torch.inference_mode() if use_engine else contextlib.nullcontext()
    with governed(threads, device=device) as gov, mode:
        try:
            toks = torch.tensor(prompt, dtype=torch.long, device=device)  # (P,)
            P = toks.shape[0]
            if use_engine:
                # Positions ever fed: the prompt and all but the last sampled token.
                eng = DecodeEngine(raw, n, max_len=P + max(max_new_tokens - 1, 0))
                last = eng.prefill(toks, on_forward)  # (n, V)
                feed = eng.step
            else:
                last, state = prompt_state(raw, toks, on_forward)
                if n > 1:
                    state = _repeat_state(state, n)
                last = last.expand(n, -1)
                S, horizons = raw.config.segment_len, raw.config.layer_horizons
                box = {"state": state, "pos": P}

                def feed(step_in):
                    logits, st = raw(step_in[:, None], box["state"], truncate=False)
                    on_forward(logits, st)
                    box["pos"] += 1
                    box["state"] = st.truncate(horizons) if box["pos"] % S == 0 else st
                    return logits[:, -1]
            from tqdm.auto import tqdm

            desc = "generate" if n == 1 else f"generate x{n}"
            can_stop = stop_at_eos and eos_id is not None
            for i in tqdm(range(max_new_tokens), desc=desc, disable=not progress, leave=False):
                gov.tick()
                logits = last.detach().float().cpu()  # (n, V): sampling runs on the CPU generator
                if gmask is not None:
                    logits = gmask.apply(logits)
                active = [b for b in range(n) if not stopped[b]]
                rows = logits if len(active) == n else logits[active]
                drawn = sample_rows(rows, generator=gen, **sampling).tolist()
                step = [eos_id] * n  # a stopped lane is fed EOS so the batch stays rectangular, never kept
                for b, tok in zip(active, drawn):
                    new[b].append(tok)
                    step[b] = tok
                    if can_stop and tok == eos_id:
                        stopped[b] = True
                if gmask is not None:
                    gmask.g.advance(gmask.state, step)
                if all(stopped) or i == max_new_tokens - 1:
                    break  # the last token is never fed back
                last = feed(torch.tensor(step, dtype=torch.long, device=device))  # (n, V)
                if use_engine and on_logits is not None:
                    on_logits(last[:, None])
            if use_engine:
                max_cap = [max(a, b) for a, b in zip(max_cap, eng.held_max)]
        finally:
            raw.train(was_training)
    return new, stopped, max_cap


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
    engine: bool = True,
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
        engine: decode through :class:`dsmr.decode.DecodeEngine` (static caches, ~20 ops per layer
            and token; the same logits up to rounding). False: ``model.forward`` per token, the
            reference path (3-5x slower per token on one Xeon core); also taken for a model the
            engine cannot run (:func:`dsmr.decode.engine_supports`).

    Returns: ``{"tokens": prompt + new (list), "new_tokens": list, "stopped_at_eos": bool,
    "max_capacity": per-layer largest cache size (slots) seen, "logits": (T - 1, V) float tensor
    (only with ``return_logits``; row i is the distribution of token i + 1, T = len(tokens))}``.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    raw = unwrap(model)
    prompt, device, gen = _prepare(raw, prompt, device, seed)
    all_logits = []

    def on_logits(logits):  # (1, t, V)
        all_logits.append(logits[0])

    new, stopped, max_cap = _decode(
        raw, prompt, max_new_tokens, 1, sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p),
        gen=gen, eos_id=eos_id, stop_at_eos=stop_at_eos, device=device, progress=progress,
        # only when asked: 64k tokens x vocab would pile up
        on_logits=on_logits if return_logits else None, grammar=grammar, threads=threads, engine=engine)
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
    engine: bool = True,
) -> list:
    """``num_samples`` independent continuations of one prompt, decoded as a batch of lanes.

    The prompt runs once (batch 1); its state is then copied into ``num_samples`` lanes that
    sample and decode together, one token per step for all lanes, with the same bounded caches
    and segment rule as :func:`generate`. A lane that samples ``eos_id`` (with ``stop_at_eos``)
    stops; the batch stops when every lane has. Arguments as in :func:`generate`; draws come from
    one seeded generator, lane by lane, so a seed fixes all samples. ``grammar`` masks each lane
    with its own grammar state, ``threads`` sets the CPU threads and ``engine`` picks the decode
    path, as in :func:`generate`.

    Returns: a list of ``num_samples`` dicts ``{"tokens": prompt + new, "new_tokens",
    "stopped_at_eos"}``.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    check_int("num_samples", num_samples, 1)
    raw = unwrap(model)
    prompt, device, gen = _prepare(raw, prompt, device, seed)
    new, stopped, _ = _decode(raw, prompt, max_new_tokens, num_samples,
                              sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p), gen=gen,
                              eos_id=eos_id, stop_at_eos=stop_at_eos, device=device, progress=progress,
                              grammar=grammar, threads=threads, engine=engine)
    return [{"tokens": prompt + n, "new_tokens": n, "stopped_at_eos": st} for n, st in zip(new, stopped)]
