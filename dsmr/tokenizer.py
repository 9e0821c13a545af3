"""MIDI <-> token ids with MidiTok REMI, from two presets.

One piece is always one token stream. Two presets (:data:`PRESETS`):

- ``"piano"`` (the default): solo piano performance. Piano scores often come as two tracks (one
  per staff, or one per hand); every non-drum track is merged into one piano track before
  tokenizing, and drum tracks are dropped.
- ``"multitrack"``: any General MIDI file. Every track is kept: a ``Program`` token before each
  note names its instrument (all 128 GM programs, plus ``-1`` for drums, whose notes use
  ``PitchDrum`` tokens), in one stream; tempo and time-signature tokens are kept. Decoding writes
  one MIDI track per program, drums on the drum channel.

The configuration is always explicit and saved: MidiTok's defaults have changed between releases,
so a cache or checkpoint keeps the *full* ``TokenizerConfig`` (MidiTok's own ``tokenizer.json``,
which also holds a learned BPE model when there is one) and rebuilds the tokenizer from it.

Token ids are plain ints; PAD is always id 0, BOS and EOS always exist. ``midi_to_ids`` returns a
piece *without* BOS/EOS (the trainer adds them); ``ids_to_score``/``ids_to_midi`` drop every
special token before decoding, so generated sequences can be passed straight in.

    >>> tok = build_tokenizer()
    >>> ids = midi_to_ids("piece.mid", tok)          # (T,) int32
    >>> ids_to_midi(ids, tok, "again.mid")
"""
from __future__ import annotations

import json
import os
import tempfile
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

try:
    import miditok
    import symusic
    from miditok import TokSequence, TokenizerConfig
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dsmr's MIDI pipeline needs MidiTok and symusic: pip install 'dsmr[midi]' "
        "(or: pip install 'miditok>=3.0.4,<3.2' 'symusic>=0.5')"
    ) from e

PathLike = Union[str, os.PathLike]
TokenizerSpec = Union[None, dict, PathLike, "miditok.MusicTokenizer"]

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("PAD", "BOS", "EOS")
PRESETS = ("piano", "multitrack")


def default_tokenizer_config() -> dict:
    """The REMI settings dsmr uses for piano performance, as ``TokenizerConfig`` keyword arguments.

    Every field that matters is spelled out, so the tokenization does not move when MidiTok
    changes a default. Performance MIDI (MAESTRO) has expressive velocities, heavy sustain pedal
    and one nominal tempo, no meaningful time signatures and no drums:

    - 88 piano keys (21-108), 32 velocity bins;
    - positions at 1/8 beat for the first 4 beats of a duration, 1/4 beat up to 12 beats;
    - ``Pedal``/``PedalOff`` tokens for the sustain pedal, ``Tempo`` tokens (32 bins, 40-250 BPM);
    - no ``Program`` tokens: all tracks are merged into one piano stream (see :func:`midi_to_ids`);
    - special tokens ``PAD`` (id 0), ``BOS``, ``EOS`` and nothing else.

    Returns a fresh dict (tuple keys in ``beat_res``); pass it, edited or not, to
    :func:`build_tokenizer`.
    """
    return {
        "pitch_range": (21, 109),
        "beat_res": {(0, 4): 8, (4, 12): 4},
        "num_velocities": 32,
        "special_tokens": list(SPECIAL_TOKENS),
        "encode_ids_split": "bar",
        "use_velocities": True,
        "use_chords": False,
        "use_rests": False,
        "use_tempos": True,
        "use_time_signatures": False,
        "use_sustain_pedals": True,
        "sustain_pedal_duration": False,
        "use_pitch_bends": False,
        "use_programs": False,
        "use_pitch_intervals": False,
        "use_pitchdrum_tokens": False,
        "num_tempos": 32,
        "tempo_range": (40, 250),
        "log_tempos": False,
        # A piano key cannot be struck twice at the same instant; duplicates come from merged staves.
        "remove_duplicated_notes": True,
        "delete_equal_successive_tempo_changes": True,
    }


def multitrack_tokenizer_config() -> dict:
    """The REMI settings of the ``"multitrack"`` preset, as ``TokenizerConfig`` keyword arguments.

    The piano settings (:func:`default_tokenizer_config`: velocities, beat resolution, tempos)
    with, for General MIDI files of any instrumentation:

    - ``use_programs`` with ``one_token_stream_for_programs``: one stream for every track, a
      ``Program`` token before each note (``program_changes=False``), programs ``-1`` (drums) and
      ``0..127``; tracks of one program are merged by MidiTok;
    - the full MIDI pitch range (0-127) for pitched notes, ``PitchDrum`` tokens for drum keys 27-87;
    - ``TimeSig`` tokens (MidiTok's default set, 3/8 to 12/8) after every bar;
    - no sustain-pedal tokens (they would cost a token per pedal per program).
    """
    cfg = default_tokenizer_config()
    cfg.update({
        "pitch_range": (0, 127),
        "use_programs": True,
        "one_token_stream_for_programs": True,
        "program_changes": False,
        "programs": list(range(-1, 128)),
        "use_pitchdrum_tokens": True,
        "drums_pitch_range": (27, 88),
        "use_time_signatures": True,
        "use_sustain_pedals": False,
        "delete_equal_successive_time_sig_changes": True,
    })
    return cfg


def preset_config(name: str) -> dict:
    """``TokenizerConfig`` keyword arguments of a preset: ``"piano"`` or ``"multitrack"``."""
    if name == "piano":
        return default_tokenizer_config()
    if name == "multitrack":
        return multitrack_tokenizer_config()
    raise ValueError(f"unknown tokenizer preset {name!r}; presets are {PRESETS} (or give a tokenizer.json path)")


def _is_tokenizer_dict(d: dict) -> bool:
    # MidiTok's tokenizer.json: {"config": {...}, "tokenization": "REMI", ...[BPE model]}
    return isinstance(d.get("config"), dict) and "tokenization" in d


def _config_from_flat(d: dict) -> "TokenizerConfig":
    """``TokenizerConfig`` from keyword arguments, also accepting their JSON-serialized form."""
    d = deepcopy(d)
    d.update(d.pop("additional_params", None) or {})
    # JSON turns the tuple keys of beat_res into "0_4" strings and int keys into strings.
    for key in ("beat_res", "beat_res_rest"):
        if key in d:
            d[key] = {
                (tuple(int(x) for x in k.split("_")) if isinstance(k, str) else tuple(k)): v
                for k, v in d[key].items()
            }
    if "time_signature_range" in d:
        d["time_signature_range"] = {int(k): v for k, v in d["time_signature_range"].items()}
    if "chord_maps" in d:
        d["chord_maps"] = {k: tuple(v) for k, v in d["chord_maps"].items()}
    for key in ("pitch_range", "tempo_range", "drums_pitch_range", "pitch_bend_range", "chord_unknown"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    # Bookkeeping keys MidiTok writes into its config dict but does not accept back.
    for key in ("_frozen", "one_token_stream"):
        d.pop(key, None)
    return TokenizerConfig(**d)


def _check_special_ids(tok: "miditok.MusicTokenizer") -> "miditok.MusicTokenizer":
    vocab = tok.vocab if not tok.is_multi_voc else {}
    for name, want in (("PAD_None", 0), ("BOS_None", None), ("EOS_None", None)):
        if name not in vocab or (want is not None and vocab[name] != want):
            raise ValueError(
                f"tokenizer config must put PAD first and include BOS and EOS "
                f"(special_tokens={tok.config.special_tokens!r}); dsmr pads with id 0 and marks "
                f"piece boundaries with BOS/EOS. Use special_tokens=['PAD', 'BOS', 'EOS', ...]."
            )
    return tok


def build_tokenizer(config: TokenizerSpec = None) -> "miditok.REMI":
    """Build the tokenizer.

    ``config`` may be:

    - ``None`` or ``"piano"``: :func:`default_tokenizer_config` (solo piano, the default);
    - ``"multitrack"``: :func:`multitrack_tokenizer_config` (every GM program and drums, one stream);
    - a dict of ``TokenizerConfig`` fields: applied *over* :func:`default_tokenizer_config`
      (so ``{"num_velocities": 16}`` changes one thing); the JSON-serialized form
      (``"0_4"`` keys, lists for tuples) is accepted too;
    - a whole MidiTok tokenizer dict (``{"config": ..., "tokenization": ...}``, what
      :attr:`dsmr.data.TokenCache.tokenizer_config` and ``tokenizer.json`` hold): rebuilt exactly,
      including a learned BPE vocabulary;
    - a path to a ``tokenizer.json`` (or its folder), or an existing MidiTok tokenizer (returned as is).

    Raises ``ValueError`` when PAD is not id 0 or BOS/EOS are missing, or for a string that is
    neither a preset nor an existing path.
    """
    if isinstance(config, miditok.MusicTokenizer):
        return _check_special_ids(config)
    if isinstance(config, str) and config in PRESETS:
        return _check_special_ids(miditok.REMI(_config_from_flat(preset_config(config))))
    if isinstance(config, (str, os.PathLike)):
        if not Path(config).exists():
            raise ValueError(f"tokenizer {str(config)!r} is neither a preset {PRESETS} nor an existing "
                             f"tokenizer.json file or folder")
        return load_tokenizer(config)
    if config is None:
        config = default_tokenizer_config()
    if not isinstance(config, dict):
        raise TypeError(f"config must be None, a dict, a path or a MidiTok tokenizer, got {type(config)!r}")
    if _is_tokenizer_dict(config):
        return _tokenizer_from_dict(config)
    merged = default_tokenizer_config()
    merged.update(config)
    return _check_special_ids(miditok.REMI(_config_from_flat(merged)))


def _tokenizer_from_dict(params: dict) -> "miditok.MusicTokenizer":
    # MidiTok only restores a trained (BPE) tokenizer from a file, so go through one.
    cls = getattr(miditok, params["tokenization"], None)
    if cls is None:
        raise ValueError(f"unknown MidiTok tokenization {params['tokenization']!r}")
    fd, tmp = tempfile.mkstemp(suffix=".json", prefix="dsmr-tokenizer-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(params, f)
        return _check_special_ids(cls(params=tmp))
    finally:
        os.unlink(tmp)


def tokenizer_dict(tokenizer: "miditok.MusicTokenizer") -> dict:
    """The JSON-able dict that rebuilds ``tokenizer`` exactly (full config + BPE model if trained).

    This is the content of ``tokenizer.json``; :func:`build_tokenizer` accepts it back.
    """
    return json.loads(json.dumps(tokenizer.to_dict()))


def save_tokenizer_config(tokenizer: "miditok.MusicTokenizer", path: PathLike) -> Path:
    """Write ``tokenizer`` as JSON (full ``TokenizerConfig`` + BPE model if trained); returns the file.

    ``path`` is a file, or a folder that gets ``tokenizer.json``. The write is atomic (temp file +
    rename), so a reader never sees half a file.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(tokenizer_dict(tokenizer), f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_tokenizer(path: PathLike) -> "miditok.MusicTokenizer":
    """Rebuild the tokenizer saved by :func:`save_tokenizer_config` (a file, or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    with path.open() as f:
        params = json.load(f)
    if not _is_tokenizer_dict(params):
        # A bare TokenizerConfig JSON (e.g. from TokenizerConfig.save_to_json).
        return build_tokenizer(params)
    return _tokenizer_from_dict(params)


def special_ids(tokenizer: "miditok.MusicTokenizer") -> dict:
    """``{"pad": 0, "bos": .., "eos": ..}`` for ``tokenizer``."""
    v = tokenizer.vocab
    return {"pad": v["PAD_None"], "bos": v["BOS_None"], "eos": v["EOS_None"]}


# ---------------------------------------------------------------------------------------------
# MIDI in


def load_piano_score(source: Union[PathLike, "symusic.Score"]) -> "symusic.Score":
    """Read a MIDI file (or copy a ``symusic.Score``) as one piano track.

    Drum tracks are dropped; every other track (two staves, two hands, a stray second piano) is
    merged into one, with its notes, sustain pedals and controls, and set to program 0. The
    result has zero or one track.
    """
    if isinstance(source, (str, os.PathLike)):
        score = symusic.Score(str(source))
    else:
        score = source.copy()
    kept = [t for t in score.tracks if not t.is_drum]
    if len(kept) > 1:
        merged = miditok.utils.merge_tracks(kept)
    elif kept:
        merged = kept[0]
    else:
        merged = None
    if merged is None:
        score.tracks = []
    else:
        merged.program = 0
        merged.is_drum = False
        score.tracks = [merged]
    return score


def is_multitrack(tokenizer: "miditok.MusicTokenizer") -> bool:
    """True when ``tokenizer`` keeps instruments apart (``Program`` tokens in one stream)."""
    return bool(tokenizer.config.use_programs and tokenizer.config.one_token_stream_for_programs)


def load_score(source: Union[PathLike, "symusic.Score"], tokenizer: "miditok.MusicTokenizer") -> "symusic.Score":
    """Read a MIDI file (or copy a ``symusic.Score``) the way ``tokenizer`` will see it.

    A multitrack tokenizer (:func:`is_multitrack`) gets every track as is (MidiTok merges tracks
    of one program itself); any other gets one merged piano track (:func:`load_piano_score`).
    """
    if not is_multitrack(tokenizer):
        return load_piano_score(source)
    if isinstance(source, (str, os.PathLike)):
        return symusic.Score(str(source))
    return source.copy()


def midi_to_ids(source: Union[PathLike, "symusic.Score"], tokenizer: "miditok.MusicTokenizer") -> np.ndarray:
    """Tokenize one piece: a MIDI path or ``symusic.Score`` -> token ids, shape ``(T,)``, int32.

    The piece becomes one stream: a multitrack tokenizer keeps every track (``Program`` tokens),
    the piano one merges tracks first (:func:`load_score`). No BOS/EOS.
    A trained (BPE) tokenizer returns BPE ids. A file with no notes in the tokenizer's pitch
    range gives an empty array; an unreadable file raises (``RuntimeError`` from symusic).
    """
    score = load_score(source, tokenizer)
    seq = tokenizer.encode(score)
    if isinstance(seq, list):
        # use_programs=False: one TokSequence per track; merging left at most one.
        if len(seq) > 1:
            raise RuntimeError(f"expected one token stream after merging tracks, got {len(seq)}")
        ids = seq[0].ids if seq else []
    else:
        ids = seq.ids
    return np.asarray(ids, dtype=np.int32)


def parse_bar_range(spec: str) -> tuple:
    """``"A:B"`` (bars A to B), ``"A:"``, ``":B"`` or ``"A"`` -> ``(first, last)``, 1-based, None = open end."""
    parts = str(spec).split(":")
    try:
        if len(parts) == 1:
            first = last = int(parts[0])
        elif len(parts) == 2:
            first, last = (int(p) if p.strip() else None for p in parts)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"bar range {spec!r} must look like A:B, A:, :B or A (bar numbers from 1)") from None
    if (first is not None and first < 1) or (last is not None and last < 1) or \
            (first is not None and last is not None and last < first):
        raise ValueError(f"bar range {spec!r}: bars count from 1 and B must not come before A")
    return first, last


def slice_bars(ids: Union[Sequence[int], np.ndarray], tokenizer: "miditok.MusicTokenizer",
               first: Optional[int] = None, last: Optional[int] = None) -> np.ndarray:
    """Bars ``first`` to ``last`` (1-based, inclusive, as a score numbers them) of a piece's ids ``(T,)``.

    REMI writes one ``Bar`` token per bar, leading empty bars included, so bar numbers are those
    of the MIDI file. The tempo in force at the cut is carried: when the slice's first position
    has no ``Tempo`` token, the last one before the cut is inserted after it (time signatures
    need nothing, REMI repeats them after every ``Bar``). Returns an int32 array; raises
    ``ValueError`` when the range lies outside the piece.
    """
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    starts = np.flatnonzero(arr == tokenizer.vocab["Bar_None"])
    n_bars = len(starts)
    first = 1 if first is None else int(first)
    last = n_bars if last is None else int(last)
    if not 1 <= first <= last <= n_bars:
        raise ValueError(f"bars {first}:{last} lie outside the piece, which has {n_bars} bars (1:{n_bars})")
    lo, hi = starts[first - 1], (starts[last] if last < n_bars else arr.size)
    out = arr[lo:hi].tolist()
    types = [tokenizer[int(i)].split("_")[0] for i in arr[:hi]]
    tempos = [i for i in range(lo) if types[i] == "Tempo"]
    first_pos = next((i for i in range(lo, hi) if types[i] == "Position"), None)
    if tempos and first_pos is not None and (first_pos + 1 >= hi or types[first_pos + 1] != "Tempo"):
        k = first_pos - lo + 1
        out = out[:k] + [int(arr[tempos[-1]])] + out[k:]
    return np.asarray(out, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# MIDI out


def ids_to_score(ids: Union[Sequence[int], np.ndarray, Any], tokenizer: "miditok.MusicTokenizer") -> "symusic.Score":
    """Decode token ids, shape ``(T,)`` (list, numpy array or 1-D torch tensor), to a ``symusic.Score``.

    Every special token (PAD/BOS/EOS, wherever it sits) is removed first, so model output can be
    passed as is. The score's time division is the tokenizer's (``tokenizer.time_division``).
    """
    if hasattr(ids, "detach"):  # torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    special = np.asarray(tokenizer.special_tokens_ids, dtype=np.int64)
    arr = arr[~np.isin(arr, special)]
    if arr.size and (arr.min() < 0 or arr.max() >= len(tokenizer)):
        raise ValueError(f"token ids must lie in [0, {len(tokenizer)}), got range [{arr.min()}, {arr.max()}]")
    seq = TokSequence(ids=arr.tolist(), are_ids_encoded=tokenizer.is_trained)
    return tokenizer.decode(seq if tokenizer.one_token_stream else [seq])


def ids_to_midi(ids: Union[Sequence[int], np.ndarray, Any], tokenizer: "miditok.MusicTokenizer",
                path: PathLike) -> Path:
    """Decode token ids, shape ``(T,)``, and write a MIDI file at ``path`` (parents created).

    MidiTok 3.1.0's ``decode(..., output_path=...)`` creates a *folder* at the path and then fails,
    so this decodes and dumps separately. Returns the path.
    """
    path = Path(path)
    score = ids_to_score(ids, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# BPE


class _MergedTrainingIterator:
    """Yields each file's base-token ids as MidiTok's byte strings, tracks loaded like ``midi_to_ids``.

    MidiTok's own iterator tokenizes every track separately; ours matches what the cache stores.
    Unreadable files yield nothing.
    """

    def __init__(self, tokenizer, files_paths: Sequence[PathLike]):
        self.tokenizer = tokenizer
        self.files_paths = list(files_paths)

    def __len__(self) -> int:
        return len(self.files_paths)

    def __iter__(self):
        tok = self.tokenizer
        for path in self.files_paths:
            try:
                seqs = tok.encode(load_score(path, tok), encode_ids=False)
            except Exception:  # noqa: BLE001 - a bad file must not stop training
                continue
            seqs = seqs if isinstance(seqs, list) else [seqs]
            if tok.config.encode_ids_split in ("bar", "beat"):
                split = [s.split_per_bars() if tok.config.encode_ids_split == "bar" else s.split_per_beats()
                         for s in seqs]
                seqs = [s for parts in split for s in parts if len(s) > 0]
            if not seqs:
                continue
            out = tok._ids_to_bytes([s.ids for s in seqs], as_one_str=True)
            yield [out] if isinstance(out, str) else out


def train_bpe(tokenizer: "miditok.MusicTokenizer", vocab_size: int, files_paths: Iterable[PathLike],
              **kwargs) -> "miditok.MusicTokenizer":
    """Learn a BPE vocabulary of ``vocab_size`` tokens in place (MidiTok ``tokenizer.train``); returns it.

    Trains on the same merged-track streams the cache stores. Learned ids come after the base
    vocabulary, so PAD stays 0. Save the result with :func:`save_tokenizer_config` (or pass it to
    :func:`dsmr.data.prepare_cache`): the BPE model lives in the tokenizer file, not in the config.
    ``kwargs`` go to ``tokenizer.train`` (e.g. ``model="Unigram"``).
    """
    files = [Path(p) for p in files_paths]
    tokenizer.train(vocab_size=vocab_size, iterator=_MergedTrainingIterator(tokenizer, files), **kwargs)
    return tokenizer
