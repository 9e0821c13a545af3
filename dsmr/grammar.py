"""Grammar-constrained sampling: a per-lane state machine over REMI tokens that masks, at every
step, each token that MidiTok's ``tokens_errors`` would count as an error.

MidiTok 3.1 (``MusicTokenizer._tokens_errors``) counts three kinds of error, and the mask rules
out each of them:

- **type order**: a token whose type may not follow the previous token's type
  (``tokenizer.tokens_types_graph``: Pitch -> Velocity -> Duration, Position -> Program/Pitch/
  Tempo, Program -> Pitch, Bar -> TimeSig, ...);
- **time**: a ``Position`` at or before the current position of the bar;
- **duplicate note**: a pitch already played by the same program at the current position (when
  ``remove_duplicated_notes`` is set), ``Position`` and ``Bar`` starting a fresh onset.

It is stricter than ``tokens_errors`` where MidiTok's encoder is, so what it lets through also
decodes to what it says: a piece starts with ``Bar``; notes need a ``Position`` in their bar;
``TimeSig`` only right after ``Bar``; positions stay inside the bar of the current time signature;
drums (``Program_-1``) take ``PitchDrum`` and other programs ``Pitch``; a ``Program`` whose every
pitch is taken at this onset is not offered; ``PAD``/``BOS`` are never sampled and ``EOS`` only
between events of a piece that has a note. The prompt is advanced through the machine first.

Cost per step: one row gather from a precomputed (states, V) table of allowed token types, and
three vectorized value checks (positions, pitches, programs) over all lanes at once.

    >>> g = TokenGrammar(tokenizer)
    >>> state = g.start(n_lanes)
    >>> g.advance_many(state, prompt_ids)          # same prompt on every lane
    >>> allowed = g.mask(state)                    # (n_lanes, V) bool
    >>> g.advance(state, sampled_ids)              # (n_lanes,) one id per lane
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["TokenGrammar", "GrammarState", "as_grammar", "grammar_error_ratio"]

_START = "<start>"  # pseudo type: nothing, or BOS/EOS, before; a piece must open with a Bar
_NOTE_TYPES = ("Pitch", "PitchDrum")
_TIMESIG_DEFAULT = (4, 4)  # what MidiTok's decoder assumes before any TimeSig token


@dataclass
class GrammarState:
    """Per-lane state (n lanes): arrays, so masks are built for all lanes at once.

    prev: (n,) state index (token type of the last token, or the start state)
    pos: (n,) current position in the bar (-1 after a Bar)
    program: (n,) current program (-1 drums); 0 without Program tokens
    bar_positions: (n,) positions a bar holds under the current time signature
    notes: (n,) notes started since the piece began
    used: (n, 129, 128) bool, pitches played at the current onset, per program (row = program + 1)
    n_used: (n, 129) distinct pitches played at the current onset, per program
    fallbacks: steps at which the rules left no token and the mask fell back (0 for the presets)
    """

    prev: np.ndarray
    pos: np.ndarray
    program: np.ndarray
    bar_positions: np.ndarray
    notes: np.ndarray
    used: np.ndarray
    n_used: np.ndarray
    fallbacks: int = 0

    def repeat(self, n: int) -> "GrammarState":
        """A state of one lane copied into ``n`` independent lanes."""
        if self.prev.shape[0] != 1:
            raise ValueError(f"repeat needs a state of one lane, got {self.prev.shape[0]}")
        return GrammarState(*(np.repeat(getattr(self, k), n, axis=0) for k in
                              ("prev", "pos", "program", "bar_positions", "notes", "used", "n_used")),
                            fallbacks=self.fallbacks)


class TokenGrammar:
    """The REMI grammar of ``tokenizer`` (a MidiTok ``REMI`` without BPE), as vectorized masks.

    Supported: every setting of the dsmr presets and REMI's optional tokens that need no value
    rule (tempos, time signatures, pedals, chords, pitch bends, control changes, key signatures,
    programs with or without ``program_changes``). Rests, pitch intervals, bar embeddings or
    ``Bar_End`` tokens, and trained (BPE) tokenizers raise ``ValueError``.
    """

    def __init__(self, tokenizer):
        self._check_supported(tokenizer)
        self.tokenizer = tokenizer
        cfg = tokenizer.config
        vocab = tokenizer.vocab  # {"Type_Value": id}
        self.vocab_size = V = len(tokenizer)
        names = [None] * V
        for tok, i in vocab.items():
            names[i] = tok
        types = [n.split("_")[0] for n in names]
        self.type_names = [_START] + sorted(set(types))
        tix = {t: k for k, t in enumerate(self.type_names)}
        self.type_of = np.asarray([tix[t] for t in types], dtype=np.int64)  # (V,)
        self._tix = tix
        self.pad_id, self.bos_id, self.eos_id = vocab["PAD_None"], vocab["BOS_None"], vocab["EOS_None"]
        self.bar_id = vocab["Bar_None"]
        self._value_tables(names, types)
        self.pos_per_beat = int(cfg.max_num_pos_per_beat)
        self.check_duplicates = bool(cfg.remove_duplicated_notes)
        self.multitrack = bool(cfg.use_programs)
        self._successor_table(tokenizer)

    # -- construction
    @staticmethod
    def _check_supported(tokenizer) -> None:
        import miditok

        if not isinstance(tokenizer, miditok.REMI):
            raise ValueError(f"grammar-constrained sampling supports MidiTok REMI tokenizers, got "
                             f"{type(tokenizer).__name__}; sample without grammar (grammar=None)")
        if tokenizer.is_trained:
            raise ValueError("grammar-constrained sampling needs a tokenizer without BPE (its ids merge "
                             "several tokens); sample without grammar (grammar=None)")
        cfg = tokenizer.config
        bad = [name for name, on in (
            ("use_rests", cfg.use_rests), ("use_pitch_intervals", cfg.use_pitch_intervals),
            ("max_bar_embedding", cfg.additional_params.get("max_bar_embedding") is not None),
            ("use_bar_end_tokens", cfg.additional_params.get("use_bar_end_tokens"))) if on]
        if bad:
            raise ValueError(f"grammar-constrained sampling does not support tokenizer settings {bad}; "
                             f"turn them off or sample without grammar (grammar=None)")

    def _value_tables(self, names: list, types: list) -> None:
        """Ids and values of the token kinds whose values the rules look at."""
        def ids_vals(kind, parse=int):
            pairs = [(i, parse(n.split("_")[1])) for i, (n, t) in enumerate(zip(names, types)) if t == kind]
            return (np.asarray([p[0] for p in pairs], dtype=np.int64),
                    np.asarray([p[1] for p in pairs], dtype=np.int64).reshape(-1, *(() if parse is int else (2,))))

        self.pos_ids, self.pos_vals = ids_vals("Position")
        self.pitch_ids, self.pitch_vals = ids_vals("Pitch")
        self.drum_ids, self.drum_vals = ids_vals("PitchDrum")
        self.prog_ids, self.prog_vals = ids_vals("Program")
        self.ts_ids, self.ts_vals = ids_vals("TimeSig", lambda v: tuple(int(x) for x in v.split("/")))
        # Per token id, for advance(): the value it carries (or -1).
        V = len(names)
        self.value_of = np.full(V, -1, dtype=np.int64)
        for ids, vals in ((self.pos_ids, self.pos_vals), (self.pitch_ids, self.pitch_vals),
                          (self.drum_ids, self.drum_vals), (self.prog_ids, self.prog_vals)):
            self.value_of[ids] = vals
        self.ts_numerator = np.zeros(V, dtype=np.int64)
        if self.ts_ids.size:
            self.ts_numerator[self.ts_ids] = self.ts_vals[:, 0]
        # How many distinct pitch tokens each program row (program + 1) can play at one onset.
        drums = self.drum_vals if self.drum_vals.size else self.pitch_vals
        self.capacity = np.full(129, len(self.pitch_vals), dtype=np.int64)
        self.capacity[0] = len(drums)
        self.prog_rows = self.prog_vals + 1

    def _successor_table(self, tokenizer) -> None:
        """``self.allowed[s]``: (V,) bool, the tokens whose type may follow state ``s``."""
        graph = {k: set(v) for k, v in tokenizer.tokens_types_graph.items()}
        specials = {"PAD", "BOS", "EOS"}
        note_start = {"Pitch", "PitchDrum", "Program", "Chord"}
        n_states = len(self.type_names)
        allowed_types = [set() for _ in range(n_states)]
        self.eos_after = np.zeros(n_states, dtype=bool)
        for s, name in enumerate(self.type_names):
            if name == _START:
                succ = {"Bar"}
            elif name in specials:
                succ = set()  # PAD is skipped by advance(); BOS/EOS lead to the start state
            else:
                succ = graph.get(name, set()) - specials
                # An event boundary (where Position/Bar may come) is where a piece may end.
                self.eos_after[s] = bool(succ & {"Position", "Bar"})
                if name != "Bar":
                    succ.discard("TimeSig")  # MidiTok writes TimeSig right after Bar only
                if name in ("Bar", "TimeSig"):
                    succ -= note_start  # notes need a Position in their bar
            allowed_types[s] = {self._tix[t] for t in succ if t in self._tix}
        self.allowed = np.zeros((n_states, self.vocab_size), dtype=bool)
        for s, ts in enumerate(allowed_types):
            self.allowed[s] = np.isin(self.type_of, sorted(ts))
        self._t = {name: self._tix.get(name, -1) for name in
                   ("Position", "Pitch", "PitchDrum", "Program", "TimeSig", "Bar", "PAD", "BOS", "EOS")}

    # -- state
    def start(self, n: int) -> GrammarState:
        """A fresh state for ``n`` lanes, as before the first token of a piece."""
        return GrammarState(
            prev=np.zeros(n, dtype=np.int64), pos=np.full(n, -1, dtype=np.int64),
            program=np.zeros(n, dtype=np.int64),
            bar_positions=np.full(n, _TIMESIG_DEFAULT[0] * self.pos_per_beat, dtype=np.int64),
            notes=np.zeros(n, dtype=np.int64), used=np.zeros((n, 129, 128), dtype=bool),
            n_used=np.zeros((n, 129), dtype=np.int64))

    def _new_onset(self, st: GrammarState, b: int) -> None:
        if st.n_used[b].any():
            st.used[b] = False
            st.n_used[b] = 0

    def advance(self, st: GrammarState, ids: Sequence[int]) -> None:
        """Feed one token per lane (``ids``: (n,) ints), in place, as ``tokens_errors`` reads them."""
        t_pos, t_pitch, t_drum, t_prog, t_ts = (self._t[k] for k in ("Position", "Pitch", "PitchDrum", "Program",
                                                                      "TimeSig"))
        for b, tok in enumerate(np.asarray(ids, dtype=np.int64).reshape(-1).tolist()):
            if tok == self.pad_id:
                continue
            if tok == self.bos_id or tok == self.eos_id:
                self._reset_lane(st, b)
                continue
            t = int(self.type_of[tok])
            if tok == self.bar_id:
                st.pos[b] = -1
                self._new_onset(st, b)
            elif t == t_pos:
                st.pos[b] = self.value_of[tok]
                self._new_onset(st, b)
            elif t == t_pitch or t == t_drum:
                row, pitch = st.program[b] + 1, self.value_of[tok]
                if not st.used[b, row, pitch]:
                    st.used[b, row, pitch] = True
                    st.n_used[b, row] += 1
                st.notes[b] += 1
            elif t == t_prog:
                st.program[b] = self.value_of[tok]
            elif t == t_ts:
                st.bar_positions[b] = self.ts_numerator[tok] * self.pos_per_beat
            st.prev[b] = t

    def advance_many(self, st: GrammarState, ids: Iterable[int]) -> None:
        """Feed the same token sequence (e.g. a prompt) to every lane."""
        n = st.prev.shape[0]
        for tok in ids:
            self.advance(st, [int(tok)] * n)

    def first_violation(self, ids: Sequence[int], allow_eos: bool = True):
        """Index of the first token of ``ids`` (T,) that the mask would have refused, or None.

        The sequence is read from the start state; a leading BOS is fine. Useful to check that
        MidiTok's own encodings pass (the grammar is never stricter than real music needs).
        """
        st = self.start(1)
        for i, tok in enumerate(np.asarray(ids, dtype=np.int64).reshape(-1).tolist()):
            if tok != self.pad_id and not (i == 0 and tok == self.bos_id):
                if not self.mask(st, allow_eos=allow_eos)[0, tok]:
                    return i
            self.advance(st, [tok])
        return None

    def _reset_lane(self, st: GrammarState, b: int) -> None:
        fresh = self.start(1)
        for name in ("prev", "pos", "program", "bar_positions", "notes"):
            getattr(st, name)[b] = getattr(fresh, name)[0]
        self._new_onset(st, b)

    # -- masks
    def mask(self, st: GrammarState, allow_eos: bool = True) -> np.ndarray:
        """Tokens each lane may take next: (n, V) bool. Never all False in a row.

        ``allow_eos=False`` also masks EOS (for sampling that does not stop at it, since nothing
        may follow EOS). Should the rules ever leave a lane nothing (they do not for REMI with the
        presets' settings), that lane falls back to its type rule alone, or to every non-special
        token, and ``st.fallbacks`` counts it.
        """
        m = self.allowed[st.prev]  # (n, V) fancy indexing copies
        n = m.shape[0]
        lanes = np.arange(n)
        if self.pos_ids.size:
            pv = self.pos_vals[None]
            m[:, self.pos_ids] &= (pv > st.pos[:, None]) & (pv < st.bar_positions[:, None])
        drums = st.program == -1
        used_now = st.used[lanes, st.program + 1]  # (n, 128)
        if self.pitch_ids.size:
            ok = ~used_now[:, self.pitch_vals] if self.check_duplicates else True
            m[:, self.pitch_ids] &= ok & ~(drums[:, None] & bool(self.drum_ids.size))
        if self.drum_ids.size:
            ok = ~used_now[:, self.drum_vals] if self.check_duplicates else True
            m[:, self.drum_ids] &= ok & drums[:, None]
        if self.prog_ids.size and self.check_duplicates:
            m[:, self.prog_ids] &= st.n_used[:, self.prog_rows] < self.capacity[self.prog_rows][None]
        m[:, self.eos_id] = allow_eos & self.eos_after[st.prev] & (st.notes > 0)
        empty = ~m.any(1)
        if empty.any():
            st.fallbacks += int(empty.sum())
            m[empty] = self.allowed[st.prev[empty]]
            still = ~m.any(1)
            m[still] = True
            m[:, [self.pad_id, self.bos_id]] = False
        return m


def as_grammar(grammar) -> TokenGrammar:
    """``grammar`` as a :class:`TokenGrammar`: one already, or a MidiTok tokenizer to build it from."""
    if isinstance(grammar, TokenGrammar):
        return grammar
    if hasattr(grammar, "tokens_types_graph"):
        return TokenGrammar(grammar)
    raise TypeError(f"grammar must be a MidiTok tokenizer or a TokenGrammar, got {type(grammar).__name__}")


def grammar_error_ratio(ids: Sequence[int], tokenizer) -> float:
    """MidiTok's ``tokens_errors`` of ids ``(T,)`` (special tokens included): errors / tokens.

    A thin wrapper that builds the ``TokSequence`` MidiTok wants for one stream, whichever the
    tokenizer's track mode; 0.0 for an empty sequence.
    """
    from miditok import TokSequence

    ids = [int(i) for i in np.asarray(ids).reshape(-1).tolist()]
    if not ids:
        return 0.0
    return float(tokenizer.tokens_errors(TokSequence(ids=ids, are_ids_encoded=tokenizer.is_trained)))
