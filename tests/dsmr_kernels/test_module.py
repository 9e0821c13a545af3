"""DSMRAttention: streaming vs one-shot, finite horizons vs a brute-force mask, lane reset."""
import pytest
import torch

from dsmr_kernels import DSMRAttention
from dsmr_kernels.module import apply_rotary, rotary_cos_sin


def _stream(attn, x, seg, state=None):
    ys = []
    for s0 in range(0, x.shape[1], seg):
        y, state = attn(x[:, s0:s0 + seg], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _bruteforce(attn, x, horizon, seg):
    """Whole-sequence attention with the segment-granular memory rule written as one mask.

    A query at position p in the segment starting at s0 sees keys j <= p with j >= s0 - horizon
    (horizon None: every j <= p).
    """
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = attn.qkv(x.double() if x.dtype == torch.float64 else x)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = v.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    pos = torch.arange(T).expand(B, T)
    cos, sin = rotary_cos_sin(pos, D, attn.rope_base)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    p = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    vis = j <= p
    if horizon is not None:
        s0 = (p // seg) * seg
        vis &= j >= s0 - horizon
    if attn.window is not None:
        vis &= p - j < attn.window
    scores = (q @ k.transpose(-1, -2)) * D ** -0.5
    scores = scores.masked_fill(~vis, float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return attn.out(y.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("seg", [7, 16])
def test_full_horizon_streaming_equals_one_shot(n_kv_heads, seg):
    torch.manual_seed(1)
    attn = DSMRAttention(32, 4, n_kv_heads, horizon=None, backend="torch").double()
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    with torch.no_grad():
        y_one, _ = attn(x)
        y_str, state = _stream(attn, x, seg)
    assert torch.allclose(y_one, y_str, atol=1e-10, rtol=0)
    assert state.capacity == 45 and state.mem_len.tolist() == [45, 45]
    assert state.pos.tolist() == [45, 45]


@pytest.mark.parametrize("horizon", [0, 3, 10, 40])
@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_finite_horizon_matches_bruteforce_mask(horizon, window, backend):
    torch.manual_seed(2)
    attn = DSMRAttention(32, 4, 2, horizon=horizon, window=window, backend=backend).double()
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    with torch.no_grad():
        y_str, state = _stream(attn, x, 8)
        y_bf = _bruteforce(attn, x, horizon, 8)
    assert torch.allclose(y_str, y_bf, atol=1e-10, rtol=0)
    assert state.capacity == min(horizon, 50)


def test_lane_reset_equals_fresh_state():
    torch.manual_seed(3)
    attn = DSMRAttention(32, 4, 1, horizon=12, backend="torch").double()
    x = torch.randn(3, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        _, state = _stream(attn, x, 8)
        state = state.reset([1])
        new_piece = torch.randn(3, 8, 32, dtype=torch.float64)
        y, _ = attn(new_piece, state)
        y_fresh, _ = attn(new_piece[1:2])
        y_cont, _ = attn(new_piece, _stream(attn, x, 8)[1])
    assert torch.allclose(y[1], y_fresh[0], atol=1e-12, rtol=0)
    # Lanes that were not reset keep their memory.
    assert torch.allclose(y[[0, 2]], y_cont[[0, 2]], atol=1e-12, rtol=0)


def test_state_is_detached_and_gradients_flow_to_params():
    attn = DSMRAttention(16, 2, horizon=None, backend="torch").double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    y, state = attn(x[:, :5])
    assert not state.mem_k.requires_grad and not state.mem_v.requires_grad
    y2, _ = attn(x[:, 5:], state)
    (y.sum() + y2.sum()).backward()
    # The gradient is the derivative with the memory held fixed: a central difference along a
    # random direction of the weights, the second segment re-run from the *same* state, matches it;
    # letting the memory follow the weights gives another derivative (what a non-detached state has).
    w, u, eps = attn.qkv.weight, torch.randn_like(attn.qkv.weight), 1e-6

    def loss(delta, memory_follows):
        with torch.no_grad():
            w.add_(delta)
            y1, st = attn(x[:, :5])
            out = float(y1.sum() + attn(x[:, 5:], st if memory_follows else state)[0].sum())
            w.sub_(delta)
        return out

    directional = float((w.grad * u).sum())
    fixed = (loss(eps * u, False) - loss(-eps * u, False)) / (2 * eps)
    follows = (loss(eps * u, True) - loss(-eps * u, True)) / (2 * eps)
    assert directional == pytest.approx(fixed, rel=1e-6)
    assert abs(follows - fixed) > 1e-3 * abs(fixed)


def test_memory_does_not_alias_segment_activations():
    attn = DSMRAttention(16, 2, horizon=3, backend="torch")
    _, state = attn(torch.randn(2, 10, 16))
    assert state.mem_k.is_contiguous()
    assert state.mem_k.untyped_storage().nbytes() == state.mem_k.numel() * state.mem_k.element_size()


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="n_kv_heads"):
        DSMRAttention(32, 4, 3)
    with pytest.raises(ValueError, match="horizon"):
        DSMRAttention(32, 4, horizon=-1)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        DSMRAttention(30, 4)
    attn = DSMRAttention(32, 4)
    with pytest.raises(ValueError, match=r"x must be \(B, S, d_model=32\)"):
        attn(torch.randn(2, 5, 16))
    _, st = attn(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="state has 2 lanes"):
        attn(torch.randn(3, 5, 32), st)
    with pytest.raises(ValueError, match="lanes must lie"):
        st.reset([5])


# ------------------------------------------------------------------------------------------
# No-grad decode buffers: appends in place, identical results, safe for branches and backward
# ------------------------------------------------------------------------------------------
def _decode(attn, x, state, truncate_every=None, horizon=None):
    """Feed x one token at a time with truncate=False; truncate to ``horizon`` every few tokens."""
    ys = []
    for t in range(x.shape[1]):
        y, state = attn(x[:, t:t + 1], state, truncate=False)
        ys.append(y)
        if truncate_every and (t + 1) % truncate_every == 0:
            state = state.truncate(horizon)
    return torch.cat(ys, 1), state


@pytest.mark.parametrize("horizon", [None, 6])
def test_no_grad_decoding_appends_in_place_and_matches_grad_mode(horizon):
    torch.manual_seed(0)
    attn = DSMRAttention(32, 4, 2, horizon=horizon, backend="torch").double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    with torch.enable_grad():  # the cat path (what training uses)
        want, _ = _decode(attn, x, attn.init_state(2), truncate_every=8, horizon=horizon)
    buffers = set()
    with torch.no_grad():
        state = attn.init_state(2)
        ys = []
        for t in range(40):
            y, state = attn(x[:, t:t + 1], state, truncate=False)
            ys.append(y)
            if state._buf is not None:
                buffers.add(id(state._buf[0]))
            if (t + 1) % 8 == 0:
                state = state.truncate(horizon)
    assert torch.allclose(torch.cat(ys, 1), want.detach(), atol=1e-12, rtol=0)
    assert len(buffers) <= 3  # grown geometrically, not re-allocated per token


def test_branching_from_one_state_never_corrupts_the_other_branch():
    torch.manual_seed(1)
    attn = DSMRAttention(32, 4, 4, horizon=None, backend="torch").double()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    a, b = torch.randn(1, 5, 32, dtype=torch.float64), torch.randn(1, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        _, s0 = _decode(attn, x, attn.init_state(1))
        ya, sa = _decode(attn, a, s0)  # appends in s0's buffer
        yb, sb = _decode(attn, b, s0)  # s0 no longer owns the buffer's end: must copy, not overwrite sa
        probe = torch.randn(1, 3, 32, dtype=torch.float64)
        pa, _ = attn(probe, sa)
        pb, _ = attn(probe, sb)
    with torch.enable_grad():
        _, g0 = _decode(attn, x, attn.init_state(1))
        _, ga = _decode(attn, a, g0)
        _, gb = _decode(attn, b, g0)
        wa, _ = attn(probe, ga)
        wb, _ = attn(probe, gb)
    assert torch.allclose(pa, wa.detach(), atol=1e-12) and torch.allclose(pb, wb.detach(), atol=1e-12)


def test_grad_forward_then_no_grad_forward_from_the_same_state_keeps_backward_valid():
    torch.manual_seed(2)
    attn = DSMRAttention(32, 4, 2, horizon=None, backend="torch")
    x0, x1, x2 = torch.randn(1, 6, 32), torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    with torch.no_grad():
        _, s0 = _decode(attn, x0, attn.init_state(1))
    y, _ = attn(x1, s0)  # grad mode: reads s0's buffer views, saves them
    with torch.no_grad():
        attn(x2, s0)  # must not write into s0's buffer now
    y.sum().backward()  # would raise "modified by an inplace operation" otherwise
    # and the gradient is the one of a run without the no-grad forward in between
    got = attn.qkv.weight.grad.clone()
    attn.zero_grad()
    with torch.no_grad():
        _, s0 = _decode(attn, x0, attn.init_state(1))
    y_clean, _ = attn(x1, s0)
    y_clean.sum().backward()
    assert torch.equal(y, y_clean) and torch.equal(got, attn.qkv.weight.grad)


def test_compact_and_model_state_to_dict_drop_the_spare_buffer():
    from dsmr.model import ModelState

    attn = DSMRAttention(32, 4, 2, horizon=None, backend="torch")
    with torch.no_grad():
        _, st = _decode(attn, torch.randn(1, 9, 32), attn.init_state(1))
    assert st._buf is not None and st.mem_k.untyped_storage().nbytes() > st.mem_k.numel() * 4
    d = ModelState([st]).to_dict()
    assert d["0.mem_k"].untyped_storage().nbytes() == d["0.mem_k"].numel() * 4
    assert torch.equal(d["0.mem_k"], st.mem_k)


@pytest.mark.parametrize("grad", [False, True])
def test_whole_history_capacity_drops_dead_slots_after_resets(grad):
    """Slots older than every lane's valid memory are dropped, so capacity does not grow across pieces."""
    torch.manual_seed(3)
    attn = DSMRAttention(32, 4, 2, horizon=None, backend="torch").double()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        state = attn.init_state(2)
        for _ in range(4):
            _, state = attn(x, state)
        assert state.capacity == 32
        _, s1 = attn(x, state.reset([0]))  # lane 1 still needs all 32 slots
        assert s1.capacity == 40
        y_reset, s2 = attn(x, state.reset())  # nobody needs the old slots
        assert s2.capacity == 8 and s2.mem_len.tolist() == [8, 8]
        y_fresh, s3 = attn(x, attn.init_state(2))
        assert torch.allclose(y_reset, y_fresh, atol=1e-12)
        ya, _ = attn(x, s2)
        yb, _ = attn(x, s3)
        assert torch.allclose(ya, yb, atol=1e-12)


def test_state_to_same_device_keeps_the_buffer_fence():
    """A state moved with .to() to its own device still reads the decode buffer; a grad-mode forward
    from it must keep a later no-grad forward from the original state from writing into it."""
    torch.manual_seed(4)
    attn = DSMRAttention(32, 4, 2, horizon=None, backend="torch")
    x0, x1, x2 = torch.randn(1, 6, 32), torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    with torch.no_grad():
        _, s = _decode(attn, x0, attn.init_state(1))
    t = s.to("cpu")
    assert t.mem_k is s.mem_k and t._buf is not None
    y, _ = attn(x1, t)
    with torch.no_grad():
        attn(x2, s)
    y.sum().backward()
    # the same gradient as a run where nothing else touched the buffer
    got = attn.qkv.weight.grad.clone()
    attn.zero_grad()
    with torch.no_grad():
        _, s = _decode(attn, x0, attn.init_state(1))
    y_clean, _ = attn(x1, s.to("cpu"))
    y_clean.sum().backward()
    assert torch.equal(y, y_clean) and torch.equal(got, attn.qkv.weight.grad)


def test_reset_with_no_lanes_changes_nothing():
    attn = DSMRAttention(32, 4, 2, horizon=8, backend="torch")
    _, s = attn(torch.randn(2, 5, 32))
    r = s.reset([])
    assert torch.equal(r.mem_len, s.mem_len) and torch.equal(r.pos, s.pos)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_rotate_qk_matches_apply_rotary_values_and_gradients(dtype, n_kv_heads):
    """The fused q/k rotation (one autograd node, hand-written backward) against the plain
    :func:`apply_rotary` on q and k separately: outputs and the gradient reaching the projection."""
    from dsmr_kernels.module import rotate_qk

    torch.manual_seed(3)
    B, S, H, D = 2, 9, 4, 8
    qkv = torch.randn(B, S, (H + 2 * n_kv_heads) * D, dtype=dtype, requires_grad=True)
    pos = torch.tensor([[5], [40_000]]) + torch.arange(S)  # a large position: the tables' precision
    cos, sin = rotary_cos_sin(pos, D, 10000.0)
    q, k = rotate_qk(qkv[..., :(H + n_kv_heads) * D].view(B, S, H + n_kv_heads, D), cos, sin, H)
    assert q.shape == (B, H, S, D) and k.shape == (B, n_kv_heads, S, D) and q.dtype == k.dtype == dtype
    assert q.is_contiguous() and k.is_contiguous()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    (g_fused,) = torch.autograd.grad((q.float() * gq.float()).sum() + (k.float() * gk.float()).sum(), qkv)
    q_ref = apply_rotary(qkv[..., :H * D].view(B, S, H, D).transpose(1, 2), cos, sin)
    k_ref = apply_rotary(qkv[..., H * D:(H + n_kv_heads) * D].view(B, S, n_kv_heads, D).transpose(1, 2), cos, sin)
    (g_ref,) = torch.autograd.grad((q_ref.float() * gq.float()).sum() + (k_ref.float() * gk.float()).sum(), qkv)
    # Both compute in fp32 (fp64) and round once: equal up to one rounding of the result.
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for a, b in ((q, q_ref), (k, k_ref), (g_fused, g_ref)):
        assert (a.double() - b.double()).abs().max() <= tol * b.double().abs().max()
    assert g_fused[..., (H + n_kv_heads) * D:].abs().max() == 0  # v's columns get nothing from here


def test_rotate_qk_gradcheck_and_table_shape_error():
    from dsmr_kernels.module import rotate_qk

    qkv = torch.randn(2, 5, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(5).expand(2, 5) + 7, 4, 10000.0)
    assert torch.autograd.gradcheck(lambda t: rotate_qk(t[..., :16].reshape(2, 5, 4, 4), cos, sin, 2), (qkv,))
    attn = DSMRAttention(8, 2, backend="torch")
    with pytest.raises(ValueError, match="rotary tables"):
        attn(torch.randn(2, 5, 8), rotary=rotary_cos_sin(torch.arange(4).expand(2, 4), 4, 10000.0))
    good = rotary_cos_sin(torch.arange(5).expand(2, 5), 4, 10000.0)
    with pytest.raises(ValueError, match="rotary tables"):
        attn(torch.randn(2, 5, 8), rotary=(good[0], good[1][:, :, :4]))
    # First derivatives only: a double backward raises instead of giving a wrong answer.
    q, k = rotate_qk(qkv[..., :16].reshape(2, 5, 4, 4), cos, sin, 2)
    (g,) = torch.autograd.grad(q.sum() + k.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_shared_rotary_tables_give_the_modules_own_result():
    """A caller's tables (as a model passes to every layer) equal the ones the module computes."""
    torch.manual_seed(0)
    attn = DSMRAttention(16, 4, 2, horizon=6, backend="torch")
    x = torch.randn(2, 5, 16)
    state = attn.init_state(2)
    _, state = attn(torch.randn(2, 3, 16), state)  # positions now start at 3
    own, _ = attn(x, state)
    tables = rotary_cos_sin(state.pos[:, None] + torch.arange(5), 4, attn.rope_base)
    shared, _ = attn(x, state, rotary=tables)
    assert torch.equal(own, shared)
