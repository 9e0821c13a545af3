"""Streaming evaluation equals a one-shot forward; position buckets; the KV-reset diagnostic."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsmr import DSMRConfig, DSMRModel
from dsmr.diagnostics import DISTANCE_LABELS, kv_reset_diagnostic
from dsmr.evaluate import BUCKET_LABELS, OFFSET_LABELS, evaluate

PAD, BOS, EOS = 0, 1, 2


def _one_shot_nll(model, piece):
    """Straightforward reference: the whole piece in one forward, mean over its L + 1 targets."""
    seq = torch.tensor(np.concatenate([[BOS], piece, [EOS]]), dtype=torch.long)
    logits, _ = model(seq[None, :-1])
    return F.cross_entropy(logits[0], seq[1:], reduction="sum").item(), len(piece) + 1


def test_streaming_perplexity_equals_one_shot_full_memory():
    cfg = DSMRConfig(vocab_size=23, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, segment_len=64)
    model = DSMRModel(cfg).double().eval()
    rng = np.random.default_rng(0)
    pieces = [rng.integers(3, 23, size=int(n)) for n in (1, 7, 40, 62, 15, 33, 9)]
    with torch.no_grad():
        ref = [_one_shot_nll(model, p) for p in pieces]
    total, n = sum(r[0] for r in ref), sum(r[1] for r in ref)
    for lanes, seg in ((3, 8), (2, 13), (7, 64)):
        res = evaluate(model, pieces, pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_lanes=lanes, segment_len=seg)
        assert res["tokens"] == n
        assert res["nll"] == pytest.approx(total / n, rel=1e-10, abs=1e-10)
        assert res["ppl"] == pytest.approx(math.exp(total / n), rel=1e-9)
    assert model.training is False


def test_position_buckets_sum_and_positions():
    cfg = DSMRConfig(vocab_size=11, n_layers=1, d_model=16, n_heads=2, segment_len=256, horizons=[0])
    model = DSMRModel(cfg).eval()
    model.train()  # evaluate must restore the mode
    rng = np.random.default_rng(1)
    lens = (1500, 5000, 100)
    pieces = [rng.integers(3, 11, size=n) for n in lens]
    res = evaluate(model, pieces, pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_lanes=2)
    assert model.training
    b = res["buckets"]
    assert list(b) == list(BUCKET_LABELS)
    assert sum(v["tokens"] for v in b.values()) == res["tokens"] == sum(n + 1 for n in lens)
    assert sum(v["nll_sum"] for v in b.values()) == pytest.approx(res["nll_sum"], rel=1e-12)
    # targets 1..1024 of every piece, 1025..4096 of the two long ones, 4097..5001 of the longest
    assert b["1-1k"]["tokens"] == 1024 + 1024 + 101
    assert b["1k-4k"]["tokens"] == (1501 - 1024) + (4096 - 1024)
    assert b["4k-8k"]["tokens"] == 5001 - 4096
    assert b["8k-16k"]["tokens"] == 0 and b["8k-16k"]["nll"] is None
    assert res["nll"] == pytest.approx(res["nll_sum"] / res["tokens"])


def test_segment_offset_buckets_count_columns_and_sum_to_the_totals():
    cfg = DSMRConfig(vocab_size=11, n_layers=1, d_model=16, n_heads=2, segment_len=80, horizons=[40])
    model = DSMRModel(cfg).double().eval()
    rng = np.random.default_rng(2)
    lens = (200, 10)  # 201 targets: segments of 80, 80, 41; 11 targets: one segment
    pieces = [rng.integers(3, 11, size=n) for n in lens]
    res = evaluate(model, pieces, pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_lanes=2)
    o = res["offsets"]
    assert list(o) == list(OFFSET_LABELS)
    assert o["0-15"]["tokens"] == 16 + 16 + 16 + 11
    assert o["16-63"]["tokens"] == 48 + 48 + (41 - 16)
    assert o["64+"]["tokens"] == 16 + 16
    assert sum(v["tokens"] for v in o.values()) == res["tokens"]
    assert sum(v["nll_sum"] for v in o.values()) == pytest.approx(res["nll_sum"], rel=1e-12)
    # The first 16 columns of a segment: by hand, from one forward per segment with the carried state.
    ref, state = 0.0, model.init_state(1)
    seq = torch.tensor(np.concatenate([[BOS], pieces[0], [EOS]]), dtype=torch.long)
    with torch.no_grad():
        for s0 in range(0, len(seq) - 1, 80):
            x, y = seq[s0:s0 + 80][:len(seq) - 1 - s0], seq[s0 + 1:s0 + 81]
            logits, state = model(x[None], state)
            ref += F.cross_entropy(logits[0, :16], y[:16], reduction="sum").item()
        logits, _ = model(torch.tensor(np.concatenate([[BOS], pieces[1]]))[None])
        ref += F.cross_entropy(logits[0, :11], torch.tensor(np.concatenate([pieces[1], [EOS]])),
                               reduction="sum").item()
    assert o["0-15"]["nll_sum"] == pytest.approx(ref, rel=1e-10)


def test_evaluate_bad_input():
    model = DSMRModel(DSMRConfig(vocab_size=11, n_layers=1, d_model=16, n_heads=2, segment_len=8))
    with pytest.raises(ValueError, match="evaluation piece 1 is empty"):
        evaluate(model, [np.array([3]), np.array([], dtype=np.int64)], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="outside the model's vocab"):
        evaluate(model, [np.array([3, 11])], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="segment_len must be a positive int"):
        evaluate(model, [np.array([3])], pad_id=PAD, bos_id=BOS, eos_id=EOS, segment_len=0)
    with pytest.raises(ValueError, match="exceeds the model's segment_len"):
        evaluate(model, [np.array([3])], pad_id=PAD, bos_id=BOS, eos_id=EOS, segment_len=9)


# ---------------------------------------------------------------------------------------------
# KV-reset diagnostic


@pytest.mark.parametrize("horizons", [[0, 0, 0], [None, 4, 0], [None, None, None]])
def test_kv_reset_diagnostic_shapes_and_zero_without_memory(tmp_path, horizons):
    cfg = DSMRConfig(vocab_size=17, n_layers=3, d_model=16, n_heads=2, segment_len=8, horizons=horizons)
    model = DSMRModel(cfg).eval()
    piece = np.random.default_rng(2).integers(3, 17, size=100)
    res = kv_reset_diagnostic(model, piece, bos_id=BOS, eos_id=EOS, reset_at=45,
                              plot_path=tmp_path / "kv.png")
    assert res["reset_at"] == 40 and res["requested_reset_at"] == 45  # rounded down to the segment
    assert res["n_inputs"] == 101 and res["window"] == 61
    assert len(res["increase"]) == len(res["nll_normal"]) == len(res["nll_wiped"]) == 61
    assert res["auc"] == pytest.approx(sum(res["increase"]))
    assert res["mean_increase"] == pytest.approx(res["auc"] / 61)
    assert set(res["buckets"]) <= set(DISTANCE_LABELS) and res["buckets"]["0-256"]["tokens"] == 61
    assert (tmp_path / "kv.png").exists()
    if horizons == [0, 0, 0]:
        assert all(x == 0.0 for x in res["increase"]) and res["auc"] == 0.0
    else:
        # the wiped run equals the suffix run alone from an empty state (rotary attention is
        # relative), and it differs from the normal run right after R
        seq = torch.tensor(np.concatenate([[BOS], piece, [EOS]]), dtype=torch.long)
        with torch.no_grad():
            wiped, st = [], None
            for s0 in range(40, 101, 8):
                lg, st = model(seq[None, s0:min(s0 + 8, 101)], st)
                wiped.append(F.cross_entropy(lg[0], seq[s0 + 1:min(s0 + 9, 102)], reduction="none"))
        assert res["nll_wiped"] == pytest.approx(torch.cat(wiped).tolist(), abs=1e-4)
        assert max(abs(x) for x in res["increase"][:8]) > 1e-3
        # and the normal run equals an ordinary streaming evaluation of the piece
        ev = evaluate(model, [piece], pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_lanes=1)
        tail = ev["nll_sum"] - res["nll_before"] * 40
        assert sum(res["nll_normal"]) == pytest.approx(tail, rel=1e-4)


def test_kv_reset_diagnostic_default_r_window_and_errors():
    cfg = DSMRConfig(vocab_size=17, n_layers=1, d_model=16, n_heads=2, segment_len=16)
    model = DSMRModel(cfg).eval()
    piece = np.random.default_rng(3).integers(3, 17, size=99)
    res = kv_reset_diagnostic(model, piece, bos_id=BOS, eos_id=EOS, window=10)
    assert res["requested_reset_at"] == 50 and res["reset_at"] == 48 and res["window"] == 10
    with pytest.raises(ValueError, match="rounds down to R=0"):
        kv_reset_diagnostic(model, piece[:20], bos_id=BOS, eos_id=EOS)


def test_kv_reset_diagnostic_over_pieces_averages_by_distance_and_skips_short_pieces(tmp_path):
    from dsmr.diagnostics import kv_reset_diagnostic_pieces

    cfg = DSMRConfig(vocab_size=17, n_layers=2, d_model=16, n_heads=2, segment_len=8, horizons=[None, 4])
    model = DSMRModel(cfg).eval()
    rng = np.random.default_rng(4)
    pieces = [rng.integers(3, 17, size=n) for n in (100, 60, 5, 81)]  # the 5-token piece is too short
    kw = dict(bos_id=BOS, eos_id=EOS, reset_at=40)
    res = kv_reset_diagnostic_pieces(model, pieces, names=["a", "b", "c", "d"], plot_path=tmp_path / "kv.png", **kw)
    singles = [kv_reset_diagnostic(model, pieces[i], **kw) for i in (0, 1, 3)]
    assert res["pieces"] == ["a", "b", "d"] and [s["piece"] for s in res["skipped"]] == ["c"]
    assert "rounds down" in res["skipped"][0]["reason"]
    W = max(s["window"] for s in singles)
    assert len(res["increase"]) == W == 61
    for d in (0, 15, 25, 45):
        reach = [s["increase"][d] for s in singles if d < s["window"]]
        assert res["pieces_at_distance"][d] == len(reach)
        assert res["increase"][d] == pytest.approx(np.mean(reach))
    pooled = sum(s["auc"] for s in singles) / sum(s["window"] for s in singles)
    assert res["mean_increase"] == pytest.approx(pooled)
    assert res["buckets"]["0-256"]["tokens"] == sum(s["window"] for s in singles)
    assert [p["auc"] for p in res["per_piece"]] == pytest.approx([s["auc"] for s in singles])
    assert (tmp_path / "kv.png").exists()
    with pytest.raises(ValueError, match="no piece could be diagnosed"):
        kv_reset_diagnostic_pieces(model, [pieces[2]], **kw)
