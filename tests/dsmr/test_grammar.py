"""Grammar-constrained sampling: zero MidiTok ``tokens_errors`` from untrained models, real encodings
always accepted, masks never empty over long adversarial runs, prompts advanced first."""
import numpy as np
import pytest
import torch

from dsmr import DSMRConfig, DSMRModel
from dsmr.generate import generate, generate_samples
from dsmr.grammar import TokenGrammar, grammar_error_ratio
from dsmr.tokenizer import build_tokenizer, ids_to_score, midi_to_ids, special_ids

from .midi_fixtures import _multitrack_file, _piano_file

PRESETS = ("piano", "multitrack")


@pytest.fixture(scope="module")
def toks():
    return {p: build_tokenizer(p) for p in PRESETS}


def _random_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = DSMRConfig(vocab_size=vocab, n_layers=2, d_model=32, n_heads=2, segment_len=32, horizons=[16, 8])
    return DSMRModel(cfg).eval()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untrained_model_samples_valid_music(toks, preset, seed):
    tok = toks[preset]
    sp = special_ids(tok)
    model = _random_model(len(tok), seed)
    out = generate(model, [sp["bos"]], 300, seed=seed, eos_id=sp["eos"], stop_at_eos=False, grammar=tok)
    assert len(out["new_tokens"]) == 300 and sp["eos"] not in out["new_tokens"]
    assert grammar_error_ratio(out["tokens"], tok) == 0.0
    assert ids_to_score(out["tokens"], tok).note_num() >= 1
    # The same model without the grammar: MidiTok finds errors (what the mask removes).
    free = generate(model, [sp["bos"]], 300, seed=seed, eos_id=sp["eos"], stop_at_eos=False)
    assert grammar_error_ratio(free["tokens"], tok) > 0.3


@pytest.mark.parametrize("preset", PRESETS)
def test_samples_in_a_batch_are_each_valid_and_may_end_at_eos(toks, preset):
    tok = toks[preset]
    sp = special_ids(tok)
    model = _random_model(len(tok), 3)
    samples = generate_samples(model, [sp["bos"]], 200, 3, seed=4, eos_id=sp["eos"], grammar=tok)
    for s in samples:
        assert grammar_error_ratio(s["tokens"], tok) == 0.0
        assert ids_to_score(s["tokens"], tok).note_num() >= 1
        if s["stopped_at_eos"]:
            assert s["new_tokens"][-1] == sp["eos"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("time_sig", [None, (3, 4), (6, 8)])
def test_real_encodings_pass_the_grammar(toks, preset, time_sig, tmp_path):
    """The mask never refuses what MidiTok's own encoder writes (it is not stricter than music)."""
    tok = toks[preset]
    sp = special_ids(tok)
    g = TokenGrammar(tok)
    for path in (_multitrack_file(tmp_path / "m.mid", seed=7, time_sig=time_sig), _piano_file(tmp_path / "p.mid")):
        ids = [sp["bos"]] + midi_to_ids(path, tok).tolist() + [sp["eos"]]
        assert g.first_violation(ids) is None


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("cut", [5, 6, 7, 8, 33, 101])
def test_prompt_is_advanced_before_sampling(toks, preset, cut, tmp_path):
    """A prompt cut anywhere (mid-note, after a Program or Position) continues without errors."""
    tok = toks[preset]
    sp = special_ids(tok)
    ids = midi_to_ids(_multitrack_file(tmp_path / "m.mid", seed=8), tok).tolist()
    prompt = [sp["bos"]] + ids[:cut]
    out = generate(_random_model(len(tok), cut), prompt, 120, seed=cut, eos_id=sp["eos"], stop_at_eos=False,
                   grammar=tok)
    assert out["tokens"][:len(prompt)] == prompt
    assert grammar_error_ratio(out["tokens"], tok) == 0.0


def _adversarial_run(g, tok, steps, rng, favour):
    """Sample uniformly among allowed tokens, but ``favour`` token types 50x: every mask row is checked."""
    sp = special_ids(tok)
    weight = np.ones(g.vocab_size)
    for i in range(g.vocab_size):
        if tok[i].split("_")[0] in favour:
            weight[i] = 50.0
    st = g.start(4)
    g.advance_many(st, [sp["bos"]])
    seqs = [[sp["bos"]] for _ in range(4)]
    for _ in range(steps):
        m = g.mask(st, allow_eos=False)
        assert m.any(1).all()
        assert not m[:, [sp["pad"], sp["bos"], sp["eos"]]].any()
        step = []
        for b in range(4):
            w = weight * m[b]
            step.append(int(rng.choice(g.vocab_size, p=w / w.sum())))
            seqs[b].append(step[-1])
        g.advance(st, step)
    assert st.fallbacks == 0  # the rules themselves never left a lane without a token
    return seqs


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("favour", [(), ("Pitch", "PitchDrum", "Program"), ("Position", "Bar", "TimeSig", "Tempo")])
def test_mask_never_empty_over_long_runs(toks, preset, favour):
    tok = toks[preset]
    g = TokenGrammar(tok)
    seqs = _adversarial_run(g, tok, 2500, np.random.default_rng(len(favour)), favour)
    for s in seqs:
        assert grammar_error_ratio(s, tok) == 0.0


def test_onset_full_of_pitches_hides_that_program(toks):
    """When a program has played every pitch at one onset, its Program token is not offered."""
    tok = toks["multitrack"]
    g = TokenGrammar(tok)
    v = tok.vocab
    st = g.start(1)
    seq = [v["Bar_None"], v["TimeSig_4/4"], v["Position_0"]]
    for p in range(128):
        seq += [v["Program_5"], v[f"Pitch_{p}"], v["Velocity_63"], v["Duration_1.0.8"]]
    g.advance_many(st, seq)
    m = g.mask(st)[0]
    assert not m[v["Program_5"]] and m[v["Program_6"]] and m[v["Program_-1"]]
    g.advance(st, [v["Program_-1"]])
    m = g.mask(st)[0]
    assert m[v["PitchDrum_36"]] and not m[v["Pitch_36"]]  # drums take PitchDrum tokens only
    assert grammar_error_ratio(seq, tok) == 0.0


def test_positions_move_forward_within_the_bar(toks):
    tok = toks["multitrack"]
    g = TokenGrammar(tok)
    v = tok.vocab
    st = g.start(1)
    g.advance_many(st, [v["Bar_None"], v["TimeSig_3/4"], v["Position_10"], v["Program_0"], v["Pitch_60"],
                        v["Velocity_63"], v["Duration_1.0.8"]])
    m = g.mask(st)[0]
    pos = {int(t.split("_")[1]): m[i] for t, i in v.items() if t.startswith("Position_")}
    assert [p for p, ok in pos.items() if ok] == list(range(11, 24))  # 3/4: 3 beats x 8 positions
    assert m[v["Program_0"]] and not m[v["Pitch_60"]]  # after a Duration a note starts with its Program
    g.advance(st, [v["Program_0"]])
    m = g.mask(st)[0]
    assert not m[v["Pitch_60"]] and m[v["Pitch_61"]]


def test_time_signature_only_right_after_a_bar(toks):
    tok = toks["multitrack"]
    g = TokenGrammar(tok)
    v = tok.vocab
    ts = [i for t, i in v.items() if t.startswith("TimeSig_")]
    st = g.start(1)
    assert [tok[int(i)] for i in np.flatnonzero(g.mask(st)[0])] == ["Bar_None"]  # a piece opens with a Bar
    g.advance(st, [v["Bar_None"]])
    m = g.mask(st)[0]
    assert m[ts].all() and m.sum() == len(ts)
    g.advance(st, [v["TimeSig_4/4"]])
    m = g.mask(st)[0]  # notes need a Position first
    assert sorted(tok[int(i)] for i in np.flatnonzero(m)) == sorted(["Bar_None"] + [f"Position_{p}" for p in range(32)])
    g.advance_many(st, [v["Position_0"], v["Tempo_121.29"]])
    m = g.mask(st)[0]
    assert not m[ts].any() and m[v["Bar_None"]] and m[v["Position_1"]]  # MidiTok's graph allows Tempo -> TimeSig
    assert not m[v["EOS_None"]]  # a piece ends only once it has a note
    g.advance_many(st, [v["Program_0"], v["Pitch_60"], v["Velocity_63"], v["Duration_1.0.8"]])
    assert g.mask(st)[0, v["EOS_None"]] and not g.mask(st, allow_eos=False)[0, v["EOS_None"]]


def test_unsupported_tokenizers_are_clear_errors():
    with pytest.raises(ValueError, match="use_rests"):
        TokenGrammar(build_tokenizer({"use_rests": True}))
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="model only"):
        generate(_random_model(10), [1], 3, grammar=tok)
    with pytest.raises(TypeError, match="grammar must be"):
        generate(_random_model(10), [1], 3, grammar="piano")
