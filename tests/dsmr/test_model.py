"""DSMRModel streaming parity, config round trip and input errors; schedules."""
import copy

import pytest
import torch

from dsmr import DSMRConfig, DSMRModel, schedules


def _stream(model, tokens, seg, state=None):
    outs = []
    for s0 in range(0, tokens.shape[1], seg):
        lg, state = model(tokens[:, s0:s0 + seg], state)
        outs.append(lg)
    return torch.cat(outs, 1), state


def test_full_schedule_streaming_equals_one_shot():
    cfg = DSMRConfig(vocab_size=50, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, segment_len=64,
                     horizons=schedules.full(3))
    model = DSMRModel(cfg).double().eval()
    tok = torch.randint(0, 50, (2, 60))
    with torch.no_grad():
        one, _ = model(tok)
        streamed, state = _stream(model, tok, 13)
    assert torch.allclose(one, streamed, atol=1e-10, rtol=0)
    assert state.pos.tolist() == [60, 60]


def _masked_forward(model, tokens, seg):
    """Brute force: whole sequence at once, each layer with its own segment-granular mask."""
    import dsmr_kernels.module as mod

    horizons = model.config.layer_horizons
    T = tokens.shape[1]
    p = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    s0 = (p // seg) * seg

    def fake_op(q, k, v, mem_k=None, mem_v=None, mem_len=None, *, window=None, backend="auto", **kw):
        h = horizons[fake_op.layer]
        fake_op.layer += 1
        vis = (j <= p) if h is None else (j <= p) & (j >= s0 - h)
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        sc = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(sc.masked_fill(~vis, float("-inf")), -1) @ v

    fake_op.layer = 0
    orig = mod.segment_memory_attention
    mod.segment_memory_attention = fake_op
    try:
        logits, _ = model(tokens)
    finally:
        mod.segment_memory_attention = orig
    return logits


@pytest.mark.parametrize("horizons", [[8, 3, 0], [0, 0, 20], [5, 5, 5], [None, 2, 11]])
def test_finite_schedule_matches_bruteforce_mask(horizons):
    cfg = DSMRConfig(vocab_size=40, n_layers=3, d_model=32, n_heads=4, n_kv_heads=1, segment_len=64,
                     horizons=horizons)
    model = DSMRModel(cfg).double().eval()
    tok = torch.randint(0, 40, (2, 45))
    with torch.no_grad():
        streamed, _ = _stream(model, tok, 9)
        brute = _masked_forward(model, tok, 9)
    assert torch.allclose(streamed, brute, atol=1e-10, rtol=0)


def test_state_reset_lane_matches_fresh():
    cfg = DSMRConfig(vocab_size=30, n_layers=2, d_model=16, n_heads=2, segment_len=16, horizons=[10, 4])
    model = DSMRModel(cfg).double().eval()
    tok = torch.randint(0, 30, (3, 32))
    with torch.no_grad():
        _, st = _stream(model, tok, 16)
        st = st.reset([0, 2])
        nxt = torch.randint(0, 30, (3, 16))
        lg, _ = model(nxt, st)
        fresh, _ = model(nxt[[0, 2]])
    assert torch.allclose(lg[[0, 2]], fresh, atol=1e-12, rtol=0)


def test_config_json_round_trip():
    cfg = DSMRConfig(vocab_size=100, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2,
                     horizons=schedules.two_scale(4, 256, 32, 1), dropout=0.1)
    again = DSMRConfig.from_json(cfg.to_json())
    assert again == cfg and again.d_ff == 256 and again.horizons == [256, 32, 32, 32]


def test_tied_embeddings():
    m = DSMRModel(DSMRConfig(vocab_size=10, n_layers=1, d_model=8, n_heads=2))
    assert m.lm_head.weight is m.embed.weight
    m2 = DSMRModel(DSMRConfig(vocab_size=10, n_layers=1, d_model=8, n_heads=2, tie_embeddings=False))
    assert m2.lm_head.weight is not m2.embed.weight


def test_with_horizons_keeps_the_weights_and_changes_only_the_memory():
    cfg = DSMRConfig(vocab_size=30, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, segment_len=16,
                     horizons=[24, 8])
    model = DSMRModel(cfg).double().train()
    tok = torch.randint(0, 30, (2, 48))
    wiped = model.with_horizons([0, 0])
    assert wiped.config.horizons == [0, 0] and model.config.horizons == [24, 8]
    assert wiped.training and wiped.lm_head.weight is wiped.embed.weight
    assert next(wiped.parameters()).dtype == torch.float64
    assert all(a is not b and torch.equal(a, b) for a, b in zip(model.parameters(), wiped.parameters()))
    model.eval(), wiped.eval()
    fresh = DSMRModel(DSMRConfig.from_dict({**cfg.to_dict(), "horizons": [0, 0]})).double().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, _ = _stream(model, tok, 16)
        b, _ = _stream(wiped, tok, 16)
        c, _ = _stream(fresh, tok, 16)
        # The first segment has no memory either way; later ones differ only through it.
        assert torch.equal(a[:, :16], b[:, :16]) and not torch.allclose(a[:, 16:], b[:, 16:])
        assert torch.equal(b, c)
        full, _ = _stream(model.with_horizons(None), tok, 16)
        one, _ = model.with_horizons(None)(tok[:, :16])
    assert torch.allclose(full[:, :16], one, atol=1e-12)
    with pytest.raises(ValueError, match="schedule has 3 horizons but the model has 2 layers"):
        model.with_horizons([0, 0, 0])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(segment_len=0), "segment_len must be a positive int"),
        (dict(horizons=[4, 4]), "schedule has 2 horizons but the model has 3 layers"),
        (dict(horizons=[4, -1, 4]), "horizon of layer 1"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_bad_config(kw, match):
    base = dict(vocab_size=10, n_layers=3, d_model=16, n_heads=2)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        DSMRConfig(**base)


def test_bad_tokens():
    m = DSMRModel(DSMRConfig(vocab_size=10, n_layers=1, d_model=8, n_heads=2, segment_len=4))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        m(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="exceeds segment_len=4"):
        m(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no positions"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be \(B, S\)"):
        m(torch.zeros(5, dtype=torch.long))


def test_schedules_values():
    assert schedules.two_scale(6, 64, 8, 2) == [64, 64, 8, 8, 8, 8]
    assert schedules.reverse_two_scale(6, 64, 8, 2) == [8, 8, 8, 8, 64, 64]
    assert schedules.full(3) == [None, None, None]
    assert schedules.none(3) == [0, 0, 0]
    assert schedules.uniform(3, 7) == [7, 7, 7]
    assert schedules.selective(4, 16, [0, 2]) == [16, 0, 16, 0]
    assert schedules.perceiver_ar_like(3, 99) == [99, 0, 0]
    up = schedules.progressive(4, 8, 64)
    assert up[0] == 8 and up[-1] == 64 and up == sorted(up)
    assert schedules.progressive(4, 8, 64, ascending=False) == up[::-1]


def test_schedule_parse():
    assert schedules.parse("two_scale:long=4096,short=512,n_long=2", 6) == [4096] * 2 + [512] * 4
    assert schedules.parse("full", 2) == [None, None]
    assert schedules.parse("selective:m=10,layers=0+3", 4) == [10, 0, 0, 10]
    assert schedules.parse("progressive:low=4,high=64,ascending=false", 3)[0] == 64
    assert schedules.parse("64,none,0", 3) == [64, None, 0]
    # The word alone is the no-memory control; inside a list `none` stays one whole-history layer.
    assert schedules.parse("none", 3) == [0, 0, 0] and schedules.parse("none,none", 2) == [None, None]
    with pytest.raises(ValueError, match="unknown schedule family"):
        schedules.parse("nope:x=1", 3)
    with pytest.raises(ValueError, match="takes"):
        schedules.parse("uniform:q=1", 3)
    with pytest.raises(ValueError, match="3 horizons but the model has 2"):
        schedules.parse("1,2,3", 2)


def test_budget_and_equal_budget_helper():
    b = schedules.budget([64, 64, 8], n_kv_heads=2, head_dim=16, batch=3, bytes_per_elem=4)
    assert b["slots"] == 136 and b["bytes"] == 2 * 136 * 2 * 16 * 3 * 4
    assert schedules.budget([None, 8], piece_len=100)["slots"] == 108
    assert schedules.budget([None])["slots"] == float("inf")
    for fam, kw in [("uniform", {}), ("two_scale", dict(short=32, n_long=2)),
                    ("progressive", dict(low=16)), ("selective", dict(layers=[0, 1])),
                    ("perceiver_ar_like", {}), ("reverse_two_scale", dict(short=32, n_long=1))]:
        hs = schedules.at_budget(fam, 6, 3000, **kw)
        total = sum(hs)
        assert len(hs) == 6 and 3000 - 6 <= total <= 3000, (fam, hs)


def test_incremental_decoding_with_truncate_equals_segment_forward():
    """Token-by-token steps with truncate=False inside a segment reproduce the segment-wise logits."""
    cfg = DSMRConfig(vocab_size=30, n_layers=3, d_model=16, n_heads=2, n_kv_heads=1, segment_len=6,
                     horizons=[4, 0, None])
    model = DSMRModel(cfg).double().eval()
    tok = torch.randint(0, 30, (2, 20))
    with torch.no_grad():
        ref, _ = _stream(model, tok, 6)
        st, outs = None, []
        for t in range(20):
            lg, st = model(tok[:, t:t + 1], st, truncate=False)
            outs.append(lg)
            if (t + 1) % 6 == 0:
                st = st.truncate(cfg.layer_horizons)
    assert torch.allclose(torch.cat(outs, 1), ref, atol=1e-10, rtol=0)


def test_state_with_wrong_layer_count_is_refused():
    small = DSMRModel(DSMRConfig(vocab_size=10, n_layers=1, d_model=8, n_heads=2))
    big = DSMRModel(DSMRConfig(vocab_size=10, n_layers=3, d_model=8, n_heads=2))
    _, st = small(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="state has 1 layers but the model has 3"):
        big(torch.zeros(1, 3, dtype=torch.long), st)
    with pytest.raises(ValueError, match="3 horizons for a state of 1 layers"):
        st.truncate([None, None, None])


def test_reset_accepts_a_boolean_lane_mask():
    cfg = DSMRConfig(vocab_size=10, n_layers=1, d_model=8, n_heads=2, horizons=[8])
    m = DSMRModel(cfg)
    _, st = m(torch.zeros(3, 5, dtype=torch.long))
    st = st.reset(torch.tensor([True, False, True]))
    assert st.layers[0].mem_len.tolist() == [0, 5, 0] and st.pos.tolist() == [0, 5, 0]
    with pytest.raises(ValueError, match="boolean lanes mask must have shape"):
        st.reset(torch.tensor([True, False]))


def test_budget_caps_horizons_at_piece_length():
    assert schedules.budget([4096], piece_len=1000)["slots"] == 1000
    with pytest.raises(ValueError, match="below n \\* low"):
        schedules.at_budget("progressive", 4, 10, low=8)


def test_bf16_autocast_gradients_through_the_tiled_path(monkeypatch):
    """End to end under bf16 autocast (3 segments, memory carried, GQA, a finite and a full horizon):
    parameter gradients via the tiled bf16 attention, with its default tiles and with 16 x 16 tiles
    (many online-softmax rescales per row), obey the op's rule at model level: their error against
    a float64 golden is at most 3x that of the same model on the readable reference op in bf16.
    The attention projections get a unit-gain init so the scores spread and the rescale matters."""
    from dsmr_kernels import torch_backend as tb
    from dsmr_kernels.cpu_tiled import TileConfig

    torch.manual_seed(0)
    kw = dict(vocab_size=31, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, segment_len=32, horizons=[40, None])
    model = DSMRModel(DSMRConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.normal_(0.0, p.shape[1] ** -0.5)
    ref_model = DSMRModel(DSMRConfig(**kw, backend="reference"))
    ref_model.load_state_dict(model.state_dict())
    golden_model = copy.deepcopy(ref_model).double()
    tokens = torch.randint(0, 31, (2, 97))

    def grads(m, autocast):
        m.zero_grad()
        state, loss = None, 0.0
        for s0 in range(0, 96, 32):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits, state = m(tokens[:, s0:s0 + 32], state)
            loss = loss + torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, s0 + 1:s0 + 33].flatten())
        loss.backward()
        return torch.cat([p.grad.flatten().double() for p in m.parameters()])

    g64 = grads(golden_model, False)
    err = lambda g: float((g - g64).norm() / g64.norm())  # noqa: E731
    ref_err = err(grads(ref_model, True))
    assert err(grads(model, False)) < 1e-5  # fp32 is near exact: the golden is the right one
    g_tiled = grads(model, True)
    monkeypatch.setattr(tb, "BF16_TILES", TileConfig(rows=16, cols=16))
    g_small = grads(model, True)
    monkeypatch.setattr(tb, "BF16_TILES", None)
    g_flash = grads(model, True)
    for name, g in (("default tiles", g_tiled), ("16x16 tiles", g_small), ("flash path", g_flash)):
        assert err(g) <= 3 * ref_err + 1e-4, f"{name}: error {err(g):.3e} > 3 x reference bf16 error {ref_err:.3e}"
    assert err(g_tiled) <= 1.5 * err(g_flash) + 1e-3


def test_state_compact_and_wipe():
    """compact drops only slots no lane can see (same logits after); wipe empties memory, keeps positions."""
    from dsmr_kernels import AttentionState

    torch.manual_seed(0)
    model = DSMRModel(DSMRConfig(vocab_size=11, n_layers=2, d_model=16, n_heads=2, segment_len=4,
                                 horizons=[None, 3])).eval()
    x = torch.randint(0, 11, (2, 4))
    with torch.no_grad():
        _, st = model(x, model.init_state(2))
        _, st = model(x, st)  # layer 0 holds 8 slots per lane
        # As after a reset: lane 0 sees only its newest 4 slots, lane 1 its newest 3.
        st = type(st)([AttentionState(s.mem_k, s.mem_v, torch.minimum(s.mem_len, torch.tensor([4, 3])), s.pos)
                       for s in st.layers])
        assert st.layers[0].capacity == 8 and st.layers[1].capacity == 3
        small = st.compact(4)
        assert small.layers[0].capacity == 4 and small.layers[1].capacity == 3
        a, _ = model(x, st)
        b, _ = model(x, small)
        assert torch.equal(a, b)
        w = st.wipe()
        assert all(int(s.mem_len.sum()) == 0 for s in w.layers) and torch.equal(w.pos, st.pos)
        c, _ = model(x, w)
        empty = type(st)([AttentionState(None, None, torch.zeros(2, dtype=torch.long), st.pos.clone())
                          for _ in st.layers])
        d, _ = model(x, empty)
        assert torch.allclose(c, d) and not torch.allclose(a, c)


def _rms_norm_float64(x, w, eps):
    """The norm's formula in float64 (no intermediate rounding): the accuracy yardstick."""
    x, w = x.double(), w.double()
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
def test_rms_norm_hand_written_backward_matches_float64(x_dtype, w_dtype):
    """RMSNorm's custom autograd function: output dtype as the plain formula's, and output and
    gradients (x and weight) within a few roundings of the input dtype of a float64 autograd."""
    from dsmr.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(24).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24) * 0.5 + 1)
    x = (torch.randn(3, 7, 24) * 3).to(x_dtype).requires_grad_()
    g = torch.randn(3, 7, 24)
    y = norm(x)
    assert y.dtype == torch.promote_types(x_dtype, w_dtype)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g.to(y.dtype))
    xd = x.detach().double().requires_grad_()
    wd = norm.weight.detach().double().requires_grad_()
    y64 = _rms_norm_float64(xd, wd, norm.eps)
    gx64, gw64 = torch.autograd.grad(y64, (xd, wd), g.double())
    unit = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2 ** -8}
    eps = max(unit[x_dtype], unit[w_dtype])  # the normalized x is rounded to x's dtype
    for got, want in ((y, y64), (gx, gx64), (gw, gw64)):
        assert (got.double() - want).abs().max() <= 4 * eps * want.abs().max()


def test_rms_norm_gradcheck_and_frozen_weight():
    from dsmr.model import RMSNorm

    norm = RMSNorm(8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    norm.weight.requires_grad_(False)
    norm(x).sum().backward()  # no weight gradient is asked for: none is computed
    assert norm.weight.grad is None and x.grad is not None
    norm.weight.requires_grad_(True)
    v = torch.randn(8, dtype=torch.float64, requires_grad=True)  # one vector, no batch dims
    assert torch.autograd.gradcheck(norm, (v,))
    (g,) = torch.autograd.grad(norm(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):  # first derivatives only: no silently wrong second ones
        g.sum().backward()
