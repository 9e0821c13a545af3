"""The static-cache decode engine (dsmr/decode.py): its logits against a one-shot segment-wise
forward over the same tokens (the model's definition), across segment boundaries, horizons
None/0/int, windows, GQA, lanes with their own tokens, caches that grow; and generation through
it against the model-forward path (same tokens, same logits, same cache sizes)."""
import math

import pytest
import torch

from dsmr import DSMRConfig, DSMRModel
from dsmr import threads as th
from dsmr.decode import DecodeEngine, engine_supports
from dsmr.generate import generate, generate_samples, sample_next, sample_rows

V = 29


def _model(horizons, S=5, n_heads=4, n_kv_heads=2, window=None, dtype=torch.float64, seed=0):
    """Random weights large enough that attention is peaked and every norm weight matters."""
    torch.manual_seed(seed)
    cfg = DSMRConfig(vocab_size=V, n_layers=len(horizons), d_model=16, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     segment_len=S, horizons=horizons, window=window)
    model = DSMRModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]))
            else:
                p.normal_(1.0, 0.3)  # norm weights away from 1: a missed fold would show
    return model.eval().to(dtype)


def _segment_forward(model, tokens):
    """The definition: tokens (T,) cut into segments of S from position 0, fresh state -> (T, V)."""
    S, state, outs = model.config.segment_len, None, []
    t = torch.as_tensor(tokens)[None]
    with torch.no_grad():
        for s0 in range(0, t.shape[1], S):
            lg, state = model(t[:, s0:s0 + S], state)
            outs.append(lg[0])
    return torch.cat(outs)


def _engine_logits(model, prompt, lanes, max_len="exact", inference=True, compute_dtype=None):
    """Prefill ``prompt``, then feed lane b the ids ``lanes[b]``: logits (B, n + 1, V) of every
    position from the prompt's last on."""
    B, n = len(lanes), len(lanes[0])
    ml = {"exact": len(prompt) + n, "none": None, "short": len(prompt) + 1}[max_len]
    eng = DecodeEngine(model, B, max_len=ml, compute_dtype=compute_dtype)
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        rows = [eng.prefill(torch.tensor(prompt))]
        for i in range(n):
            rows.append(eng.step(torch.tensor([lane[i] for lane in lanes])))
        out = torch.stack(rows, 1).clone()
    assert eng.pos == len(prompt) + n
    return out, eng


S = 5
PROMPTS = [1, S - 1, S, S + 1, 3 * S + 2]  # one token, around one boundary, several segments
HORIZONS = [[None, None], [0, 0], [3, 7], [0, None], [12, 2], [100, 1]]  # 100: never cuts here


@pytest.mark.parametrize("horizons", HORIZONS)
@pytest.mark.parametrize("P", PROMPTS)
def test_engine_equals_segment_forward_float64(horizons, P):
    model = _model(horizons)
    g = torch.Generator().manual_seed(P)
    prompt = torch.randint(0, V, (P,), generator=g).tolist()
    lanes = torch.randint(0, V, (3, 2 * S + 3), generator=g).tolist()  # lanes differ: own caches
    got, eng = _engine_logits(model, prompt, lanes)
    for b, lane in enumerate(lanes):
        ref = _segment_forward(model, prompt + lane)[P - 1:]
        torch.testing.assert_close(got[b], ref, atol=1e-11, rtol=1e-11)
    # the cache sizes the model path has after each of these positions: horizon + S at most
    last = P + len(lanes[0]) - 1
    for h, held in zip(horizons, eng.held_max):
        sizes = [p + 1 - (0 if h is None else max(0, p - p % S - h)) for p in range(P - 1, last + 1)]
        assert held == max(sizes) and (h is None or held <= h + S)


@pytest.mark.parametrize("max_len", ["none", "short"])
@pytest.mark.parametrize("horizons", [[None, 3], [8, 0], [40, 11], [9, 4]])
def test_caches_that_grow_or_change_layout_give_the_same_logits(horizons, max_len):
    """max_len None (whole-history caches start small and double) or below what is fed (a
    finite horizon allocated small switches to its h + S window at its first cut)."""
    model = _model(horizons)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, V, (S + 2,), generator=g).tolist()
    lanes = torch.randint(0, V, (2, 12 * S), generator=g).tolist()
    got, _ = _engine_logits(model, prompt, lanes, max_len=max_len)
    for b, lane in enumerate(lanes):
        torch.testing.assert_close(got[b], _segment_forward(model, prompt + lane)[len(prompt) - 1:],
                                   atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("n_heads,n_kv_heads,window", [(4, 4, None), (4, 1, None), (2, 2, 3), (4, 2, 7)])
def test_gqa_mha_and_windows(n_heads, n_kv_heads, window):
    model = _model([6, None, 0], n_heads=n_heads, n_kv_heads=n_kv_heads, window=window)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (2 * S + 1,), generator=g).tolist()
    lanes = torch.randint(0, V, (2, 3 * S), generator=g).tolist()
    got, _ = _engine_logits(model, prompt, lanes)
    for b, lane in enumerate(lanes):
        torch.testing.assert_close(got[b], _segment_forward(model, prompt + lane)[len(prompt) - 1:],
                                   atol=1e-11, rtol=1e-11)


def test_fp32_error_is_the_models_own():
    """In fp32 the engine rounds differently from model.forward (folded weights, another
    reduction order); its error against the float64 definition stays within 3x the model
    path's own fp32 error (plus a small floor)."""
    m64 = _model([4, None, 0, 9], S=8)
    m32 = _model([4, None, 0, 9], S=8, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (19,), generator=g).tolist()
    lanes = torch.randint(0, V, (2, 30), generator=g).tolist()
    got, _ = _engine_logits(m32, prompt, lanes)
    for b, lane in enumerate(lanes):
        toks = prompt + lane
        truth = _segment_forward(m64, toks)[len(prompt) - 1:]
        model_err = (_segment_forward(m32, toks)[len(prompt) - 1:].double() - truth).abs().max()
        engine_err = (got[b].double() - truth).abs().max()
        assert engine_err <= 3 * model_err + 1e-6, (engine_err, model_err)


def test_no_grad_without_inference_mode_and_a_fresh_engine_only():
    model = _model([3, None])
    prompt, lanes = [1, 2, 3, 4, 5, 6, 7], [[8, 9, 10, 11, 12, 13]]
    a, _ = _engine_logits(model, prompt, lanes, inference=True)
    b, eng = _engine_logits(model, prompt, lanes, inference=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="fresh engine"):
        eng.prefill(torch.tensor(prompt))


@pytest.mark.parametrize("compute", [None, "same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_follow_the_model_path(dtype, compute):
    """bf16/fp16 weights, computed in fp32 (the CPU default) or in their own dtype with fp32 norms,
    rotary, GELU and softmax (the GPU default): logits as close to the exact ones as
    model.forward's in that dtype."""
    model = _model([4, None], S=6, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, V, (8,), generator=g).tolist()
    lanes = torch.randint(0, V, (2, 10), generator=g).tolist()
    got, eng = _engine_logits(model, prompt, lanes, compute_dtype=None if compute is None else dtype)
    assert got.dtype == dtype and eng.dtype == (torch.float32 if compute is None else dtype)
    truth = _model([4, None], S=6, dtype=torch.float64)
    for b, lane in enumerate(lanes):
        toks = prompt + lane
        exact = _segment_forward(truth, toks)[len(prompt) - 1:]
        model_err = (_segment_forward(model, toks)[len(prompt) - 1:].double() - exact).abs().max()
        engine_err = (got[b].double() - exact).abs().max()
        assert engine_err <= 2 * model_err + 0.02, (engine_err, model_err)


def test_projection_biases_are_applied():
    """DSMRModel has no biases, but the engine reads any nn.Linear: a biased qkv / out / head."""
    model = _model([3, None])
    with torch.no_grad():
        for blk in model.blocks:
            for name in ("qkv", "out"):
                old = getattr(blk.attn, name)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=True).double()
                new.weight.copy_(old.weight)
                new.bias.normal_(0, 0.5)
                setattr(blk.attn, name, new)
        head = torch.nn.Linear(16, V, bias=True).double()
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 0.5)
        model.lm_head = head
    assert engine_supports(model) is None
    prompt, lanes = [1, 2, 3, 4, 5, 6], [[7, 8, 9, 10, 11, 12, 13]]
    got, _ = _engine_logits(model, prompt, lanes)
    torch.testing.assert_close(got[0], _segment_forward(model, prompt + lanes[0])[5:], atol=1e-11, rtol=1e-11)


def test_unsupported_models_fall_back_to_the_forward_path(monkeypatch):
    model = _model([3, None], dtype=torch.float32)
    assert engine_supports(model) is None
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(16, V))
    assert "head" in engine_supports(model)
    with pytest.raises(ValueError, match="cannot run"):
        DecodeEngine(model)
    out = generate(model, [1, 2, 3], 6, seed=0, return_logits=True)  # the reference path runs it
    torch.testing.assert_close(out["logits"], _segment_forward(model, out["tokens"][:-1]), atol=2e-5, rtol=1e-5)

    model = _model([3, None], dtype=torch.float32)
    real = DSMRModel.forward
    monkeypatch.setattr(DSMRModel, "forward", lambda self, *a, **kw: real(self, *a, **kw))
    assert "forward replaced" in engine_supports(model)


# ---------------------------------------------------------------------------------------------
# Generation through the engine against the model-forward path


def _both(fn, *args, **kw):
    return fn(*args, **kw, engine=True), fn(*args, **kw, engine=False)


@pytest.mark.parametrize("horizons,P", [([3, 0, None], 1), ([None, 4, 2], S - 1), ([7, 7, 0], S),
                                        ([2, None, 11], S + 1), ([0, 6, None], 3 * S + 2)])
def test_generate_engine_equals_forward_path(horizons, P):
    model = _model(horizons, dtype=torch.float32)
    prompt = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(P)).tolist()
    kw = dict(seed=4, temperature=0.9, top_p=0.95, return_logits=True)
    a, b = _both(generate, model, prompt, 3 * S + 1, **kw)
    assert a["tokens"] == b["tokens"] and a["max_capacity"] == b["max_capacity"]
    torch.testing.assert_close(a["logits"], b["logits"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a["logits"], _segment_forward(model, a["tokens"][:-1]), atol=2e-5, rtol=1e-5)
    g_a, g_b = _both(generate, model, prompt, 2 * S, temperature=0)
    assert g_a["tokens"] == g_b["tokens"]


@pytest.mark.parametrize("n", [2, 5])
def test_samples_engine_equals_forward_path(n):
    model = _model([None, 3, 0], dtype=torch.float32, seed=2)
    with torch.no_grad():
        model.lm_head.weight.data[2] *= 0.0  # EOS (2) likely enough that some lanes stop early
    a, b = _both(generate_samples, model, [1, 5, 9, 4], 4 * S, n, seed=11, eos_id=2, temperature=1.3, top_k=9)
    assert a == b
    assert len({tuple(s["tokens"]) for s in a}) == n


def test_grammar_on_and_off_engine_equals_forward_path():
    from dsmr.tokenizer import build_tokenizer

    tok = build_tokenizer("piano")
    torch.manual_seed(0)
    model = DSMRModel(DSMRConfig(vocab_size=len(tok), n_layers=2, d_model=16, n_heads=4, n_kv_heads=2,
                                 segment_len=8, horizons=[6, None])).eval()
    bos = tok.vocab["BOS_None"]
    for grammar in (None, tok):
        a, b = _both(generate_samples, model, [bos], 40, 3, seed=5, grammar=grammar, stop_at_eos=False)
        assert a == b


def test_sample_rows_draws_what_sample_next_draws():
    """The vectorized sampler is the lane-by-lane rule: same ids from the same generator."""
    torch.manual_seed(0)
    for settings in (dict(), dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8, temperature=1.4),
                     dict(top_k=5, top_p=0.5), dict(temperature=0)):
        for n, vocab in ((1, 7), (4, 255), (9, 556)):
            logits = torch.randn(n, vocab) * 3
            logits[0, : vocab // 2] = float("-inf")  # a masked row, as under the grammar
            g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            for _ in range(3):
                rows = sample_rows(logits, generator=g1, **settings).tolist()
                one = [sample_next(logits[i], generator=g2, **settings) for i in range(n)]
                assert rows == one, settings


def test_engine_path_ticks_the_governor(monkeypatch):
    """Generation through the engine follows the thread governor like the forward path."""
    from tests.dsmr.test_threads import _Contended

    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(th, "ThreadGovernor", _Contended)
        model = _model([3, None], dtype=torch.float32)
        counts = []
        real_step = DecodeEngine.step

        def spy(self, tokens):
            counts.append(torch.get_num_threads())
            return real_step(self, tokens)

        monkeypatch.setattr(DecodeEngine, "step", spy)
        generate(model, [1, 5, 6], 6, seed=0)
        assert len(counts) == 5 and set(counts) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_equals_cpu():
    model = _model([3, None, 0], dtype=torch.float32)
    prompt, lanes = list(range(1, 12)), [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5, 4, 3]]
    cpu, _ = _engine_logits(model, prompt, lanes)
    model.cuda()
    eng = DecodeEngine(model, 2, max_len=len(prompt) + 10)
    with torch.inference_mode():
        rows = [eng.prefill(torch.tensor(prompt, device="cuda"))]
        for i in range(10):
            rows.append(eng.step(torch.tensor([lane[i] for lane in lanes], device="cuda")))
        gpu = torch.stack(rows, 1).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    out = generate(model, prompt, 12, seed=0, return_logits=True)
    model.cpu()
    torch.testing.assert_close(out["logits"], _segment_forward(model, out["tokens"][:-1]), atol=1e-4, rtol=1e-4)
