"""``evaluate`` and the KV-reset diagnostic against brute-force recomputations.

Brute force here means: each piece on its own, batch 1, from an empty state, cut into segments of
S from its start; per-target NLL from the model's logits. The models get larger random weights
than the default init so that attention is far from uniform and the memory visibly matters (a
default-init model barely uses its context, and a bug in memory handling would hide in rounding).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsmr import DSMRConfig, DSMRModel
from dsmr.diagnostics import kv_reset_diagnostic
from dsmr.evaluate import evaluate

PAD, BOS, EOS = 0, 1, 2
V = 29


def _model(horizons, S, n_kv_heads=1, seed=0):
    torch.manual_seed(seed)
    cfg = DSMRConfig(vocab_size=V, n_layers=len(horizons), d_model=16, n_heads=2, n_kv_heads=n_kv_heads,
                     segment_len=S, horizons=horizons)
    model = DSMRModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.2 / math.sqrt(p.shape[1]))
    return model.eval()


def _seq(piece):
    return torch.tensor(np.concatenate([[BOS], piece, [EOS]]), dtype=torch.long)


def _nll_per_target(model, inputs, targets, S, carry=True):
    """NLL of every target (float64), segments of S from the start of ``inputs``, fresh state
    (and, with ``carry=False``, a fresh state for every segment: no memory at all)."""
    out, state = [], None
    with torch.no_grad():
        for s0 in range(0, len(inputs), S):
            logits, state = model(inputs[s0:s0 + S][None], state if carry else None)
            out.append(F.cross_entropy(logits[0].double(), targets[s0:s0 + S], reduction="none"))
    return torch.cat(out)


def _bucket(position):
    """Bucket label of a 1-based target position, from the documented edges."""
    for edge, label in ((1024, "1-1k"), (4096, "1k-4k"), (8192, "4k-8k"), (16384, "8k-16k"), (32768, "16k-32k")):
        if position <= edge:
            return label
    return "32k+"


@pytest.mark.parametrize(
    "horizons,n_kv_heads,model_S,S,B",
    [
        ([None, 5], 1, 16, 16, 2),  # whole history + short; more pieces than lanes
        ([3, 0, None], 2, 16, 8, 3),  # evaluated at a shorter segment than the model's
        ([None], 2, 64, 64, 1),
    ],
)
def test_evaluate_equals_brute_force_per_piece(horizons, n_kv_heads, model_S, S, B):
    model = _model(horizons, model_S, n_kv_heads)
    rng = np.random.default_rng(1)
    # 1023 ids: its EOS is target 1024, the last of the first bucket; 1030 ids reach into "1k-4k".
    lengths = [1030, 5, 1023, 17, 1]
    pieces = [rng.integers(3, V, size=n) for n in lengths]
    res = evaluate(model, pieces, pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_lanes=B, segment_len=S)

    sums, counts, total, n = {}, {}, 0.0, 0
    for piece in pieces:
        seq = _seq(piece)
        nll = _nll_per_target(model, seq[:-1], seq[1:], S)
        assert len(nll) == len(piece) + 1  # every id and the EOS; never BOS, never padding
        total += float(nll.sum())
        n += len(nll)
        for pos, x in enumerate(nll.tolist(), start=1):
            lab = _bucket(pos)
            sums[lab] = sums.get(lab, 0.0) + x
            counts[lab] = counts.get(lab, 0) + 1

    assert res["tokens"] == n == sum(lengths) + len(lengths)
    assert res["pieces"] == len(pieces)
    assert res["nll_sum"] == pytest.approx(total, rel=1e-6)
    assert res["nll"] == pytest.approx(total / n, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(total / n), rel=1e-6)
    assert counts == {"1-1k": 1024 + 6 + 1024 + 18 + 2, "1k-4k": 7}
    got = {lab: b for lab, b in res["buckets"].items() if b["tokens"]}
    assert {lab: b["tokens"] for lab, b in got.items()} == counts
    for lab in counts:
        assert got[lab]["nll_sum"] == pytest.approx(sums[lab], rel=1e-6)
        assert got[lab]["nll"] == pytest.approx(sums[lab] / counts[lab], rel=1e-6)
    # the memory matters for these models: without it the NLL is clearly different
    if any(h != 0 for h in horizons):
        nomem = sum(float(_nll_per_target(model, _seq(p)[:-1], _seq(p)[1:], S, carry=False).sum()) for p in pieces)
        assert abs(nomem - total) > 1e-2 * n ** 0.5


@pytest.mark.parametrize("horizons,S,reset_at", [([None, 4, None], 8, 45), ([6, None], 16, 64), ([None], 8, 8)])
def test_kv_reset_equals_brute_force_wiped_recomputation(horizons, S, reset_at):
    """The wiped run from R on equals the model run on the suffix alone from an empty state
    (rotary attention depends only on relative positions, so "positions keep counting" gives the
    same logits as starting over at 0); the normal run equals the plain segment-wise pass."""
    model = _model(horizons, S, seed=3)
    piece = np.random.default_rng(5).integers(3, V, size=100)
    seq = _seq(piece)
    inputs, targets = seq[:-1], seq[1:]
    res = kv_reset_diagnostic(model, piece, bos_id=BOS, eos_id=EOS, reset_at=reset_at)
    R = reset_at // S * S
    W = len(inputs) - R
    assert res["reset_at"] == R and res["window"] == W

    normal = _nll_per_target(model, inputs, targets, S)
    wiped = _nll_per_target(model, inputs[R:], targets[R:], S)
    assert len(wiped) == W
    torch.testing.assert_close(torch.tensor(res["nll_normal"], dtype=torch.float64), normal[R:], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(res["nll_wiped"], dtype=torch.float64), wiped, atol=1e-4, rtol=0)
    inc = wiped - normal[R:]
    torch.testing.assert_close(torch.tensor(res["increase"], dtype=torch.float64), inc, atol=2e-4, rtol=0)
    assert res["auc"] == pytest.approx(float(inc.sum()), abs=2e-4 * W)
    assert res["nll_before"] == pytest.approx(float(normal[:R].mean()), abs=1e-5)
    assert res["nll_after_normal"] == pytest.approx(float(normal[R:].mean()), abs=1e-5)
    assert res["nll_after_wiped"] == pytest.approx(float(wiped.mean()), abs=1e-5)
    assert res["buckets"]["0-256"]["tokens"] == W
    # the wipe matters: right after R the increase is far above the tolerance
    assert float(inc[:S].abs().max()) > 0.05
