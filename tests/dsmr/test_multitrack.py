"""Tokenizer presets: multitrack round trips (programs, drums, overlapping same-pitch notes), saved
configs, bar slicing of prompts."""
import json

import numpy as np
import pytest
import symusic

from dsmr.tokenizer import (
    PRESETS,
    build_tokenizer,
    ids_to_midi,
    ids_to_score,
    load_tokenizer,
    midi_to_ids,
    parse_bar_range,
    save_tokenizer_config,
    slice_bars,
    tokenizer_dict,
)

from .midi_fixtures import MULTI_PROGRAMS, TPQ, _multitrack_file


@pytest.fixture(scope="module")
def multi():
    return build_tokenizer("multitrack")


def _notes(score):
    """{(program or -1 for drums, onset in beats, pitch, duration in beats)} over all tracks."""
    tpq = score.ticks_per_quarter
    return sorted((-1 if t.is_drum else t.program, n.time / tpq, n.pitch, n.duration / tpq)
                  for t in score.tracks for n in t.notes)


def _instruments(score):
    return sorted((-1 if t.is_drum else t.program) for t in score.tracks if len(t.notes))


def test_presets_and_their_vocabularies(multi):
    assert PRESETS == ("piano", "multitrack")
    piano = build_tokenizer("piano")
    assert piano.vocab == build_tokenizer().vocab == build_tokenizer(None).vocab
    assert not any(t.startswith("Program_") for t in piano.vocab)
    programs = {int(t.split("_")[1]) for t in multi.vocab if t.startswith("Program_")}
    assert programs == set(range(-1, 128))
    assert any(t.startswith("PitchDrum_") for t in multi.vocab)
    assert any(t.startswith("TimeSig_") for t in multi.vocab) and any(t.startswith("Tempo_") for t in multi.vocab)
    assert multi.vocab["PAD_None"] == 0 and "BOS_None" in multi.vocab and "EOS_None" in multi.vocab
    assert multi.one_token_stream


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="preset"):
        build_tokenizer("orchestra")


@pytest.mark.parametrize("seed,time_sig", [(0, None), (1, (3, 4)), (2, (6, 8)), (3, (4, 4))])
def test_multitrack_round_trip_keeps_instruments_and_notes(multi, tmp_path, seed, time_sig):
    src = _multitrack_file(tmp_path / "song.mid", seed=seed, time_sig=time_sig)
    original = symusic.Score(str(src))
    ids = midi_to_ids(src, multi)
    assert ids.ndim == 1 and ids.size > 0
    decoded = ids_to_score(ids, multi)
    assert _instruments(decoded) == sorted(list(MULTI_PROGRAMS) + [-1])
    assert _notes(decoded) == _notes(original)
    # Every instrument plays pitch 60 at beat 0: all of them survive, none merged away.
    assert sum(1 for p, t, pitch, d in _notes(decoded) if t == 0 and pitch == 60) == len(MULTI_PROGRAMS)
    if time_sig is not None:
        assert (decoded.time_signatures[0].numerator, decoded.time_signatures[0].denominator) == time_sig
    # Written to disk: one track per program, the drums on the drum channel (read back as drums).
    back = symusic.Score(str(ids_to_midi(ids, multi, tmp_path / "out" / "back.mid")))
    assert _instruments(back) == _instruments(decoded)
    assert [t.is_drum for t in back.tracks].count(True) == 1
    assert _notes(back) == _notes(original)


def test_piano_preset_still_merges_tracks(tmp_path):
    src = _multitrack_file(tmp_path / "song.mid", seed=4)
    piano = build_tokenizer("piano")
    decoded = ids_to_score(midi_to_ids(src, piano), piano)
    assert len(decoded.tracks) == 1 and decoded.tracks[0].program == 0 and not decoded.tracks[0].is_drum


def test_multitrack_config_saved_and_rebuilt(multi, tmp_path):
    path = save_tokenizer_config(multi, tmp_path)
    for again in (load_tokenizer(path), build_tokenizer(str(path)), build_tokenizer(tokenizer_dict(multi)),
                  build_tokenizer(json.loads(path.read_text()))):
        assert again.vocab == multi.vocab
        assert again.config.use_programs and again.config.use_time_signatures
    with pytest.raises(ValueError, match="neither a preset"):
        build_tokenizer(str(tmp_path / "nothing.json"))


def test_parse_bar_range():
    assert parse_bar_range("3:8") == (3, 8)
    assert parse_bar_range("3:") == (3, None)
    assert parse_bar_range(":8") == (None, 8)
    assert parse_bar_range("5") == (5, 5)
    for bad in ("0:3", "5:2", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError, match="bar"):
            parse_bar_range(bad)


def test_slice_bars_keeps_those_bars_and_the_tempo(multi, tmp_path):
    src = _multitrack_file(tmp_path / "song.mid", seed=5, n=40, time_sig=(3, 4))
    ids = midi_to_ids(src, multi)
    bar = multi.vocab["Bar_None"]
    n_bars = int((ids == bar).sum())
    assert n_bars >= 4
    part = slice_bars(ids, multi, 2, 3)
    assert part[0] == bar and int((part == bar).sum()) == 2
    toks = [multi[int(i)] for i in part]
    assert toks[1] == "TimeSig_3/4" and toks[2].startswith("Position_") and toks[3].startswith("Tempo_")
    # The notes of bars 2-3 (3/4: 3 beats a bar), shifted to start at 0.
    beats = 3.0
    want = [(p, t - beats, pitch, d) for p, t, pitch, d in _notes(ids_to_score(ids, multi))
            if beats <= t < 3 * beats]
    assert _notes(ids_to_score(part, multi)) == want and want
    assert np.array_equal(slice_bars(ids, multi), ids)
    with pytest.raises(ValueError, match=f"has {n_bars} bars"):
        slice_bars(ids, multi, n_bars + 1, None)


def test_fixture_is_really_multitrack(tmp_path):
    score = symusic.Score(str(_multitrack_file(tmp_path / "a.mid")))
    assert score.ticks_per_quarter == TPQ
    assert sorted(t.program for t in score.tracks if not t.is_drum) == sorted(MULTI_PROGRAMS)
    assert sum(t.is_drum for t in score.tracks) == 1
