"""NLL per note: note counts against a hand count of the score, for both tokenizer presets."""
import numpy as np
import pytest
import torch

pytest.importorskip("miditok")
symusic = pytest.importorskip("symusic")

from dsmr import DSMRConfig, DSMRModel  # noqa: E402
from dsmr.evaluate import evaluate  # noqa: E402
from dsmr.notes import count_notes, notes_per_id  # noqa: E402
from dsmr.tokenizer import build_tokenizer, midi_to_ids, special_ids  # noqa: E402
from tests.dsmr.midi_fixtures import _multitrack_file, _piano_file  # noqa: E402


def _hand_count(path):
    return sum(len(t.notes) for t in symusic.Score(str(path)).tracks)


@pytest.mark.parametrize("preset,make", [("piano", _piano_file), ("multitrack", _multitrack_file)])
def test_note_count_matches_the_score(tmp_path, preset, make):
    tok = build_tokenizer(preset)
    table = notes_per_id(tok)
    for seed in range(3):
        path = make(tmp_path / f"{preset}_{seed}.mid", seed=seed)
        ids = midi_to_ids(path, tok)
        assert count_notes(ids, table) == _hand_count(path)
    if preset == "multitrack":  # drum notes are PitchDrum tokens and count as notes
        drums = [i for i in range(len(tok)) if tok[i].startswith("PitchDrum_")]
        assert drums and all(table[i] == 1 for i in drums)
    assert table[special_ids(tok)["bos"]] == 0
    with pytest.raises(ValueError, match="token ids must lie"):
        count_notes([len(tok)], table)


def test_evaluate_reports_nll_per_note(tmp_path):
    tok = build_tokenizer("multitrack")
    paths = [_multitrack_file(tmp_path / f"s{i}.mid", seed=i, n=10 + 3 * i) for i in range(3)]
    pieces = [midi_to_ids(p, tok) for p in paths]
    sp = special_ids(tok)
    torch.manual_seed(0)
    model = DSMRModel(DSMRConfig(vocab_size=len(tok), n_layers=2, d_model=32, n_heads=2, segment_len=32,
                                 horizons=[40, 8]))
    ids = dict(pad_id=sp["pad"], bos_id=sp["bos"], eos_id=sp["eos"], batch_lanes=2)
    res = evaluate(model, pieces, tokenizer=tok, **ids)
    hand = [_hand_count(p) for p in paths]
    singles = [evaluate(model, [p], **ids)["nll_sum"] for p in pieces]
    assert res["notes"] == sum(hand)
    np.testing.assert_allclose(res["piece_nll"], singles, rtol=1e-6)  # fp32 lanes batched vs alone
    assert res["nll_per_note"] == pytest.approx(sum(singles) / sum(hand), rel=1e-6)
    assert evaluate(model, pieces, notes=hand, **ids)["nll_per_note"] == pytest.approx(res["nll_per_note"])
    assert "nll_per_note" not in evaluate(model, pieces, **ids)
    with pytest.raises(ValueError, match="one count"):
        evaluate(model, pieces, notes=[1], **ids)
