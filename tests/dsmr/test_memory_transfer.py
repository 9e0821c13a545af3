"""Memory transfer: a skill that works inside one segment keeps working through the recurrent memory.

The model is a 2-layer ``DSMRModel`` whose weights are set by hand (no training: instant and
deterministic) to copy at a fixed distance: on a sequence that repeats a random block of P = 24
tokens, the token at position t + 1 equals the token at t + 1 - P, so every query attends to the
key exactly P - 1 = 23 positions back and copies its token. The attention is purely positional:
constant query and key vectors, pre-rotated so that their rotary score peaks at a relative
distance of 23 (three high rotary frequencies; the peak beats every other distance in reach by
over 10 logits). The vocabulary of 24 tokens is dealt in quarters to (layer 0, KV head 0),
(layer 0, KV head 1), (layer 1, KV head 0), (layer 1, KV head 1) (4 query heads, 2 KV heads:
GQA), so every layer and every KV group carries a quarter of the copies.

Inside one segment the copy is exact. Streamed in segments of S = P = 24 tokens, every copy
source of segments 1.. lies in the previous segment: the copy survives only if each layer's
memory holds the source keys with their rotary angles at their absolute positions, truncated to
the horizon, read by the right query heads, in fp32 or bf16; it breaks when the memory is wiped,
when a horizon is too short, or when one layer keeps none.
"""
import pytest
import torch
import torch.nn.functional as F

from dsmr import DSMRConfig, DSMRModel
from dsmr_kernels.module import apply_rotary, rotary_cos_sin

V, P, D_MODEL, H, HKV = 24, 24, 64, 4, 2
D = D_MODEL // H  # head dim 16
CONST = V  # residual dim that is 1 for every token (the source of the positional queries and keys)
COPY = 32  # residual dims COPY..COPY+V-1 receive the copied token
AMP = 11.2  # key amplitude: 11.2^2 / sqrt(16) x 0.514 (the score gap to the neighbours) = 16 logits
N_FREQ = 3  # rotary pairs that carry the positional key: the three highest frequencies
GAMMA, BETA = 0.5, 6.0  # size of a copy in the residual; lm_head gain


def copy_model(horizons, rope_base: float = 10000.0) -> DSMRModel:
    """The hand-set copy-at-distance-23 model (see the module docstring) with the given horizons."""
    cfg = DSMRConfig(vocab_size=V, n_layers=2, d_model=D_MODEL, n_heads=H, n_kv_heads=HKV, segment_len=48,
                     horizons=list(horizons), tie_embeddings=False, rope_base=rope_base)
    model = DSMRModel(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [blk.norm1 for blk in model.blocks] + [blk.norm2 for blk in model.blocks] + [model.norm]:
            norm.weight.fill_(1.0)
        model.embed.weight[torch.arange(V), torch.arange(V)] = 1.0
        model.embed.weight[:, CONST] = 1.0
        c0 = (2.0 / D_MODEL) ** -0.5  # what RMSNorm makes of a 1 in a token's residual (two 1s in 64 dims)
        key = torch.zeros(D, dtype=torch.float64)
        key[:N_FREQ] = AMP  # half-split rotary: pair f is dims (f, f + D/2); only the first half is set
        # A query rotated back by 23 positions: <R(t) q, R(s) k> = <R(t - s - 23) k, k>, largest at t - s = 23.
        cos, sin = rotary_cos_sin(torch.tensor([[-(P - 1)]]), D, rope_base)
        query = apply_rotary(key.view(1, 1, 1, D), cos, sin).view(D)
        for layer, blk in enumerate(model.blocks):
            w = blk.attn.qkv.weight  # rows: H query heads, then HKV key heads, then HKV value heads (D each)
            out = blk.attn.out.weight  # (d_model, H * D)
            for g in range(HKV):
                head = g * (H // HKV)  # the first query head of KV group g (GQA: heads [g*H/HKV, (g+1)*H/HKV))
                w[head * D:(head + 1) * D, CONST] = query / c0
                w[(H + g) * D:(H + g + 1) * D, CONST] = key / c0
                first = (2 * layer + g) * (V // 4)  # this (layer, group)'s quarter of the vocabulary
                for j in range(V // 4):
                    w[(H + HKV + g) * D + j, first + j] = 1.0 / c0  # value: the token, one-hot
                    out[COPY + first + j, head * D + j] = GAMMA
        model.lm_head.weight[torch.arange(V), COPY + torch.arange(V)] = BETA
    return model.eval()


def repeated_blocks(batch: int, blocks: int, seed: int = 0) -> torch.Tensor:
    """``(batch, blocks * P)`` ids: a random block of P tokens, repeated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, P), generator=g).repeat(1, blocks)


def copy_nll(model, x, segment: int, *, wipe: bool = False, autocast: bool = False, dtype=None):
    """Mean NLL of the copies (targets from position P on), streaming ``x`` in segments of ``segment``.

    Returns ``(nll, last state)``. ``wipe``: every layer's memory emptied before each segment.
    """
    state, out = model.init_state(x.shape[0]), []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for a in range(0, x.shape[1] - 1, segment):
            seg, tgt = x[:, a:a + segment], x[:, a + 1:a + segment + 1]
            if wipe:
                state = state.wipe()
            logits, state = model(seg, state)
            nll = F.cross_entropy(logits[:, : tgt.shape[1]].double().transpose(1, 2), tgt, reduction="none")
            keep = torch.arange(a + 1, a + 1 + tgt.shape[1]) >= P  # targets that have a source
            out.append(nll[:, keep])
    return torch.cat(out, dim=1).mean().item(), state


def _as(model, dtype):
    return model.to(dtype) if dtype is not None else model


@pytest.fixture(scope="module")
def x():
    return repeated_blocks(3, 5)  # 120 tokens per lane: 5 segments of 24


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_copy_inside_one_segment(x, dtype):
    """No memory at all: two blocks in one segment of 48; the construction copies exactly."""
    model = _as(copy_model([0, 0]), dtype)
    nll, _ = copy_nll(model, x[:, :48], 48)
    assert nll < 1e-3


@pytest.mark.parametrize("horizon", [P - 1, 32, None])
def test_copy_through_the_memory_of_the_previous_segment(x, horizon):
    """Segments of 24: every source lies in the previous segment, reached only through the memory.

    23 is the shortest horizon that reaches: the first query of a segment needs the key 23 back.
    """
    model = _as(copy_model([horizon, horizon]), torch.float32)
    nll, state = copy_nll(model, x, P)
    assert nll < 1e-3, nll
    for layer in state.layers:  # truncated to the horizon (a whole-history layer keeps all 96 + 24)
        assert layer.mem_k.shape[2] == (x.shape[1] if horizon is None else horizon)
        assert int(layer.pos[0]) == x.shape[1]


def test_copy_through_bf16_memory_under_autocast(x):
    model = _as(copy_model([32, 32]), torch.float32)
    nll, state = copy_nll(model, x, P, autocast=True)
    assert state.layers[0].mem_k.dtype == torch.bfloat16  # the state itself is bf16
    assert nll < 0.01, nll


def test_copy_deep_into_a_piece():
    """Rotary angles at absolute positions in the tens of thousands: still one distance of 23."""
    model = _as(copy_model([32, 32]), torch.float32)
    x = repeated_blocks(2, 3, seed=1)
    state = model.init_state(2)
    for st in state.layers:
        st.pos += 40_000  # every lane as if 40,000 tokens had streamed by (and their memory been wiped)
    with torch.no_grad():
        out = []
        for a in range(0, x.shape[1] - 1, P):
            logits, state = model(x[:, a:a + P], state)
            tgt = x[:, a + 1:a + P + 1]
            if a >= P:
                out.append(F.cross_entropy(logits[:, : tgt.shape[1]].transpose(1, 2), tgt, reduction="none"))
    assert int(state.layers[0].pos[0]) == 40_000 + x.shape[1]
    assert torch.cat(out, dim=1).mean().item() < 1e-3


def test_one_slot_short_loses_exactly_the_first_query_of_each_segment(x):
    """Horizon 22: only the first query of each segment (1 in 24) misses its source (truncation is exact)."""
    model = _as(copy_model([P - 2, P - 2]), torch.float32)
    nll, _ = copy_nll(model, x, P)
    wrong, _ = copy_nll(model, x, P, wipe=True)  # the cost of a miss: every copy wrong
    assert nll == pytest.approx(wrong / P, rel=0.2)


@pytest.mark.parametrize("case", ["wiped", "horizon 8", "layer 1 without memory", "no memory"])
def test_copy_is_lost_without_the_memory(x, case):
    """The same model fails when the source is out of reach: the skill lives in the memory."""
    horizons = {"horizon 8": [8, 8], "layer 1 without memory": [32, 0], "no memory": [0, 0]}.get(case, [32, 32])
    model = _as(copy_model(horizons), torch.float32)
    nll, _ = copy_nll(model, x, P, wipe=case == "wiped")
    # Layer 1 carries half the vocabulary: without its memory about half the copies fail.
    assert nll > (4.0 if case == "layer 1 without memory" else 8.0), (case, nll)
