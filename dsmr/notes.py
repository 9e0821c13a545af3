"""Counting notes in token ids, for NLL per note (a number that compares across tokenizers).

A REMI note is written as one pitch token followed by its velocity and duration: ``Pitch_x`` for
pitched notes and, in the ``multitrack`` preset, ``PitchDrum_x`` for drum notes (``Program``
tokens in front name the instrument and are not notes). So the note count of a piece is the
number of ``Pitch`` and ``PitchDrum`` base tokens it holds. Counting the tokens, not decoding the
ids to a score, keeps every note the tokenizer wrote (a decoder may drop or merge notes, e.g.
duplicated pitches of a merged track) and needs no MIDI round trip. A trained (BPE) vocabulary
is expanded to its base tokens first, so one learned id may hold several notes.

    >>> table = notes_per_id(build_tokenizer("multitrack"))   # (V,) int64
    >>> count_notes(ids, table)                                 # notes in a piece
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NOTE_TOKEN_TYPES = ("Pitch", "PitchDrum")


def _base_tokens(tokenizer, i: int) -> list:
    """The base token strings behind vocabulary id ``i`` (one, unless the vocabulary is trained)."""
    if getattr(tokenizer, "is_trained", False):
        return list(tokenizer._vocab_learned_bytes_to_tokens[tokenizer._model.id_to_token(i)])
    return [tokenizer[i]]


def notes_per_id(tokenizer) -> np.ndarray:
    """``(V,)`` int64: how many notes (``Pitch``/``PitchDrum`` base tokens) each id of ``tokenizer`` holds."""
    return np.asarray([sum(t.split("_")[0] in NOTE_TOKEN_TYPES for t in _base_tokens(tokenizer, i))
                       for i in range(len(tokenizer))], dtype=np.int64)


def count_notes(ids: Sequence[int], table: np.ndarray) -> int:
    """Notes in the token ids ``ids`` ``(T,)``, given ``table = notes_per_id(tokenizer)``.

    Special tokens (PAD/BOS/EOS) hold no note. Raises ``ValueError`` for ids outside the table.
    """
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= len(table)):
        raise ValueError(f"token ids must lie in [0, {len(table)}) for this tokenizer, got range "
                         f"[{arr.min()}, {arr.max()}]; pass the tokenizer the pieces were encoded with")
    return int(table[arr].sum())


__all__ = ["NOTE_TOKEN_TYPES", "notes_per_id", "count_notes"]
