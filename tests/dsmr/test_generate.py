"""Generation: logits equal a segment-wise forward, bounded caches, seeding, sampling controls."""
import pytest
import torch

from dsmr import DSMRConfig, DSMRModel
from dsmr.generate import generate, sample_next

EOS = 2


def _model(horizons, seg=5, vocab=23):
    cfg = DSMRConfig(vocab_size=vocab, n_layers=3, d_model=16, n_heads=2, n_kv_heads=1, segment_len=seg,
                     horizons=horizons)
    return DSMRModel(cfg).eval()


def _segment_forward(model, tokens):
    """Reference: the token sequence cut into segments of segment_len from position 0."""
    S, state, outs = model.config.segment_len, None, []
    t = torch.tensor(tokens)[None]
    with torch.no_grad():
        for s0 in range(0, t.shape[1], S):
            lg, state = model(t[:, s0:s0 + S], state)
            outs.append(lg[0])
    return torch.cat(outs)


@pytest.mark.parametrize("horizons", [[None, None, None], [3, 3, 3], [7, 0, None], [0, 2, 11]])
@pytest.mark.parametrize("prompt_len", [1, 5, 8])
def test_logits_equal_segment_forward(horizons, prompt_len):
    model = _model(horizons)
    prompt = torch.randint(3, 23, (prompt_len,)).tolist()
    out = generate(model, prompt, 13, seed=0, return_logits=True)
    toks = out["tokens"]
    assert toks[:prompt_len] == prompt and len(toks) == prompt_len + 13
    ref = _segment_forward(model, toks[:-1])
    assert out["logits"].shape == ref.shape == (len(toks) - 1, 23)
    torch.testing.assert_close(out["logits"], ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("horizons", [[3, 3, 3], [7, 0, 4]])
def test_cache_bounded_by_horizon_plus_segment(horizons):
    model = _model(horizons, seg=4)
    out = generate(model, [1, 5, 6], 40, seed=1)
    S = model.config.segment_len
    for cap, h in zip(out["max_capacity"], horizons):
        assert cap <= h + S, (cap, h)
    # and it is actually reached: a long generation fills each cache to horizon + S - 1 at least
    assert all(cap >= h + S - 1 for cap, h in zip(out["max_capacity"], horizons) if h > 0)


def test_full_memory_cache_grows_with_the_piece():
    model = _model([None, 2, None], seg=4)
    out = generate(model, [1, 4], 20, seed=0)
    assert out["max_capacity"][0] == 2 + 20 - 1 and out["max_capacity"][1] <= 2 + 4


def test_seed_determinism_and_length():
    model = _model([4, None, 0])
    a = generate(model, [1, 3, 4], 25, seed=123)
    b = generate(model, [1, 3, 4], 25, seed=123)
    c = generate(model, [1, 3, 4], 25, seed=124)
    assert a["new_tokens"] == b["new_tokens"]
    assert a["new_tokens"] != c["new_tokens"]
    assert len(a["new_tokens"]) == 25 and not a["stopped_at_eos"]
    assert generate(model, [1], 0, seed=0)["tokens"] == [1]


def test_stop_at_eos():
    model = _model([None, None, None])
    # A head with constant logits: EOS has twice any other token's odds.
    head = torch.nn.Linear(16, 23, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[EOS] = 0.7
    model.lm_head = head
    out = generate(model, [1, 3], 60, seed=0, eos_id=EOS)
    assert out["stopped_at_eos"] and out["new_tokens"][-1] == EOS
    assert 1 < len(out["new_tokens"]) < 60 and EOS not in out["new_tokens"][:-1]
    cont = generate(model, [1, 3], 60, seed=0, eos_id=EOS, stop_at_eos=False)
    assert len(cont["new_tokens"]) == 60 and cont["new_tokens"].count(EOS) > 1


def test_sampling_controls():
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0, -2.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0) == 1
    assert {sample_next(logits, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, top_k=2, temperature=5.0, generator=g) for _ in range(200)} == {1, 2}
    # top-p: token 1 has ~0.72 of the mass, tokens 1 and 2 ~0.99
    assert {sample_next(logits, top_p=0.5, generator=g) for _ in range(50)} == {1}
    assert {sample_next(logits, top_p=0.9, temperature=1.0, generator=g) for _ in range(300)} == {1, 2}


def test_generate_bad_input():
    model = _model([None, None, None])
    with pytest.raises(ValueError, match="at least one id"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="outside the model's vocab"):
        generate(model, [1, 23], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], 3, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 3, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)


# ---------------------------------------------------------------------------------------------
# Several samples decoded as a batch
@pytest.mark.parametrize("horizons", [[None, None, None], [3, 0, 7]])
def test_samples_follow_their_own_context(horizons):
    """Every sampled token must be in the top-2 of a segment-wise forward over *its own* lane's tokens:
    lanes that mixed up their caches would break this almost surely."""
    from dsmr.generate import generate_samples

    torch.manual_seed(0)
    model = _model(horizons)
    prompt = torch.randint(3, 23, (7,)).tolist()
    samples = generate_samples(model, prompt, 16, 4, top_k=2, seed=3)
    assert len(samples) == 4 and len({tuple(s["tokens"]) for s in samples}) > 1  # lanes really differ
    for s in samples:
        toks = s["tokens"]
        assert toks[:7] == prompt and len(toks) == 7 + 16
        ref = _segment_forward(model, toks[:-1])
        top2 = ref.topk(2, dim=-1).indices
        for p in range(6, len(toks) - 1):
            assert toks[p + 1] in top2[p].tolist()


def test_greedy_samples_equal_single_generation():
    from dsmr.generate import generate_samples

    model = _model([4, None, 2])
    prompt = [1, 5, 9, 4, 7, 3]
    single = generate(model, prompt, 20, temperature=0)["tokens"]
    for s in generate_samples(model, prompt, 20, 3, temperature=0):
        assert s["tokens"] == single


def test_samples_stop_at_eos_per_lane_and_seed_determinism():
    from dsmr.generate import generate_samples

    model = _model([None, None, None], vocab=5)  # small vocab: EOS (2) comes soon
    a = generate_samples(model, [1], 60, 5, seed=11, eos_id=EOS)
    b = generate_samples(model, [1], 60, 5, seed=11, eos_id=EOS)
    assert a == b
    for s in a:
        if s["stopped_at_eos"]:
            assert s["new_tokens"][-1] == EOS and EOS not in s["new_tokens"][:-1]
        else:
            assert len(s["new_tokens"]) == 60
    assert any(s["stopped_at_eos"] for s in a)
    with pytest.raises(ValueError, match="num_samples"):
        generate_samples(model, [1], 5, 0)
