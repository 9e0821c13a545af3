"""Sampled tokens replayed from an independent segment-wise forward at every step.

For every new token of every lane, the oracle runs the model over that lane's whole sequence so
far, cut into segments of S from position 0 with a fresh state (the model's definition), and
draws from the last position's logits with the documented sampling rule (``sample_next``) and
the documented generator order: one generator seeded with ``seed``, lanes drawn in order at each
step, a lane that stopped at EOS draws nothing. ``generate`` / ``generate_samples`` must produce
exactly the replayed tokens. The models get larger random weights than the default init so their
distributions are peaked and depend on the context (a near-uniform model would draw the same
tokens from slightly wrong logits).
"""
import math

import pytest
import torch

from dsmr import DSMRConfig, DSMRModel
from dsmr.generate import generate, generate_samples, sample_next

V, EOS = 17, 2


def _model(horizons, S, seed=0):
    torch.manual_seed(seed)
    cfg = DSMRConfig(vocab_size=V, n_layers=len(horizons), d_model=16, n_heads=4, n_kv_heads=2,
                     segment_len=S, horizons=horizons)
    model = DSMRModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]))
    return model.eval()


def _last_logits(model, tokens, memory=True):
    """Logits after the last token: the segment-wise forward over ``tokens`` from position 0
    (``memory=False``: only the last token's own segment, as if every memory were empty)."""
    S, state = model.config.segment_len, None
    if not memory:
        tokens = tokens[(len(tokens) - 1) // S * S:]
    t = torch.tensor(tokens, dtype=torch.long)[None]
    with torch.no_grad():
        for s0 in range(0, t.shape[1], S):
            logits, state = model(t[:, s0:s0 + S], state)
    return logits[0, -1]


def _replay(model, prompt, max_new, n, seed, eos_id=None, memory=True, **sampling):
    gen = torch.Generator().manual_seed(seed)
    seqs, stopped = [list(prompt) for _ in range(n)], [False] * n
    for _ in range(max_new):
        for b in range(n):
            if stopped[b]:
                continue
            tok = sample_next(_last_logits(model, seqs[b], memory), generator=gen, **sampling)
            seqs[b].append(tok)
            stopped[b] = eos_id is not None and tok == eos_id
        if all(stopped):
            break
    return seqs, stopped


CASES = [
    # horizons, S, prompt length: prompts ending mid-segment and on a boundary, finite/zero/full memory
    ([3, 0, 7], 5, 7),
    ([None, 2, 4], 4, 8),
    ([6, None], 3, 1),
]


@pytest.mark.parametrize("horizons,S,P", CASES)
def test_several_lanes_sample_what_an_independent_forward_gives(horizons, S, P):
    model = _model(horizons, S)
    prompt = torch.randint(3, V, (P,), generator=torch.Generator().manual_seed(P)).tolist()
    kw = dict(temperature=1.0, top_k=8)
    samples = generate_samples(model, prompt, 24, 3, seed=7, **kw)
    expected, _ = _replay(model, prompt, 24, 3, 7, **kw)
    assert [s["tokens"] for s in samples] == expected
    assert len({tuple(s) for s in expected}) == 3  # the lanes really hold different contexts
    # the draws depend on the memory: without it the same generator gives other tokens
    assert _replay(model, prompt, 24, 3, 7, memory=False, **kw)[0] != expected


@pytest.mark.parametrize("horizons,S,P", CASES)
def test_single_generation_samples_and_logits_follow_the_independent_forward(horizons, S, P):
    model = _model(horizons, S, seed=1)
    prompt = torch.randint(3, V, (P,), generator=torch.Generator().manual_seed(P)).tolist()
    out = generate(model, prompt, 20, seed=3, temperature=0.8, top_p=0.95, return_logits=True)
    expected, _ = _replay(model, prompt, 20, 1, 3, temperature=0.8, top_p=0.95)
    assert out["tokens"] == expected[0]
    for i in range(P, len(out["tokens"])):
        torch.testing.assert_close(out["logits"][i - 1], _last_logits(model, out["tokens"][:i]),
                                   atol=2e-5, rtol=1e-5)


def test_lanes_stop_at_eos_independently_and_draw_nothing_after():
    model = _model([None, 3], 4, seed=2)
    with torch.no_grad():
        model.lm_head.weight.data[EOS] *= 0.0  # EOS logit 0: common enough to stop some lanes
    prompt = [1, 5, 9]
    samples = generate_samples(model, prompt, 20, 4, seed=11, eos_id=EOS, temperature=1.5)
    expected, stopped = _replay(model, prompt, 20, 4, 11, eos_id=EOS, temperature=1.5)
    assert [s["tokens"] for s in samples] == expected
    assert [s["stopped_at_eos"] for s in samples] == stopped
    assert any(stopped) and not all(stopped)
