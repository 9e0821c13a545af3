"""Parity of the reference (vs float64 brute force) and the torch fast path (vs float64 reference)."""
import itertools

import pytest
import torch

from dsmr_kernels import segment_memory_attention, segment_memory_attention_ref
from dsmr_kernels.reference import segment_memory_attention_bruteforce, visibility_mask
from dsmr_kernels.testing import assert_close_to_golden, forward_backward, make_inputs, max_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _to(t, dtype):
    return None if t is None else t.detach().to(dtype)


def test_mask_picture_from_design():
    """The docs/DESIGN.md example: M = 3, mem_len = 2, S = 3."""
    vis = visibility_mask(3, 3, torch.tensor([2]), None)[0, 0].int()
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    assert torch.equal(vis, expected)


@pytest.mark.parametrize(
    "B,H,Hkv,S,M,D,window",
    [
        (1, 2, 2, 1, 0, 4, None),
        (2, 4, 2, 5, 3, 8, None),
        (3, 4, 1, 7, 6, 4, 4),
        (2, 2, 1, 6, 9, 8, 20),
        (3, 4, 4, 4, 5, 4, 1),
    ],
)
def test_reference_matches_bruteforce(B, H, Hkv, S, M, D, window):
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, torch.float64, requires_grad=False)
    out, lse = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)
    bo, bl = segment_memory_attention_bruteforce(q, k, v, mk, mv, ml, window=window)
    assert max_err(out, bo) < 1e-12
    assert max_err(lse, bl) < 1e-12


def test_reference_mem_len_none_means_all_valid():
    q, k, v, mk, mv, _ = make_inputs(2, 2, 2, 4, 5, 8, torch.float64, requires_grad=False)
    full = torch.tensor([5, 5])
    a = segment_memory_attention_ref(q, k, v, mk, mv, None)
    b = segment_memory_attention_ref(q, k, v, mk, mv, full)
    assert torch.equal(a, b)


def test_invalid_memory_slots_are_ignored():
    """Garbage (inf/NaN, e.g. uninitialized memory) in invalid slots must not change the output."""
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 6, 8, 8, torch.float32, mem_len=[0, 3, 8], requires_grad=False)
    a = segment_memory_attention(q, k, v, mk, mv, ml, backend="torch")
    mk2, mv2 = mk.clone(), mv.clone()
    for b, n in enumerate([0, 3, 8]):
        mk2[b, :, : 8 - n] = 1e4
        mv2[b, :, : 8 - n] = float("nan")
    c = segment_memory_attention(q, k, v, mk2, mv2, ml, backend="torch")
    assert torch.equal(a, c)
    r = segment_memory_attention_ref(q, k, v, mk2, mv2, ml)
    assert torch.isfinite(r).all() and torch.allclose(r, a, atol=1e-5)


CASES = list(
    itertools.product(
        [1, 3],  # B
        [4, 2, 1],  # Hkv (H = 4)
        [1, 17, 64],  # S
        [0, 5, 64, 100],  # M
        [None, 24],  # window
        [16, 64],  # D
    )
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hkv,S,M,window,D", CASES)
def test_torch_backend_matches_reference(dtype, B, Hkv, S, M, window, D):
    H = 4
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, torch.float64, seed=B * 1000 + S + M)
    do = torch.randn(B, H, S, D, dtype=torch.float64)
    kw = dict(window=window)
    gold = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, **kw)
    args = (_to(q, dtype), _to(k, dtype), _to(v, dtype), _to(mk, dtype), _to(mv, dtype), ml, do.to(dtype))
    ref = forward_backward(segment_memory_attention_ref, *args, **kw)
    fast = forward_backward(
        lambda *a, **w: segment_memory_attention(*a, backend="torch", **w), *args, **kw
    )
    for name, f, r, g, factor in zip(["out", "dq", "dk", "dv"], fast, ref, gold, [2, 3, 3, 3]):
        assert f.dtype == dtype
        assert_close_to_golden(name, f, r, g, factor, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_lse(dtype):
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 17, 64, 16, torch.float64, requires_grad=False)
    _, gl = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=30, return_lse=True)
    args = [_to(t, dtype) for t in (q, k, v, mk, mv)]
    _, rl = segment_memory_attention_ref(*args, ml, window=30, return_lse=True)
    out, fl = segment_memory_attention(*args, ml, window=30, backend="torch", return_lse=True)
    assert fl.shape == (3, 4, 17) and fl.dtype == torch.float32
    assert_close_to_golden("lse", fl, rl, gl, 2, dtype)


def test_torch_backend_non_contiguous_inputs():
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 9, 7, 16, torch.float32, requires_grad=False)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, S, H, D) storage
    assert not qt.is_contiguous()
    a = segment_memory_attention(qt, k, v, mk, mv, ml, backend="torch")
    b = segment_memory_attention_ref(q.double(), k.double(), v.double(), mk.double(), mv.double(), ml)
    assert max_err(a, b) < 1e-5


def test_auto_backend_on_cpu_is_torch():
    from dsmr_kernels.interface import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "dtype, head_dim, expected",
    [
        (torch.bfloat16, 64, "triton"),
        (torch.float16, 128, "triton"),
        (torch.float32, 16, "triton"),
        (torch.bfloat16, 80, "torch"),  # the model accepts any even head dim; Triton compiles 16..128 powers of 2
        (torch.float16, 96, "torch"),
        (torch.float32, 8, "torch"),
        (torch.float64, 64, "torch"),  # the kernels have no fp64 path
    ],
)
def test_auto_on_cuda_never_picks_a_triton_call_that_would_raise(monkeypatch, dtype, head_dim, expected):
    """A config the CPU path accepts must not crash on a GPU: `auto` falls back to torch (SDPA)."""
    from dsmr_kernels import interface

    monkeypatch.setattr(interface, "triton_importable", lambda: True)
    cuda = torch.device("cuda", 0)  # a device object only: nothing is allocated on it
    assert interface.resolve_backend("auto", cuda, dtype, head_dim) == expected
    monkeypatch.setattr(interface, "triton_importable", lambda: False)
    assert interface.resolve_backend("auto", cuda, dtype, head_dim) == "torch"
    # mps and other accelerators take the torch path (public SDPA there)
    assert interface.resolve_backend("auto", torch.device("mps"), dtype, head_dim) == "torch"
    # an explicit choice is kept: it raises later with a message if it cannot run
    assert interface.resolve_backend("triton", cuda, dtype, head_dim) == "triton"


def test_mem_len_range_is_not_read_back_from_a_gpu(monkeypatch):
    """Validation must not sync with the device: only CPU mem_len is range-checked on the host."""
    from dsmr_kernels import _validate

    q, k, v, mk, mv, ml = make_inputs(2, 2, 2, 3, 4, 8, torch.float32, requires_grad=False)
    bad = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"mem_len values must lie in \[0, M\]"):
        _validate.validate_inputs(q, k, v, mk, mv, bad, None)

    class FakeDeviceTensor(torch.Tensor):
        """A CPU tensor that claims to live on a GPU and fails if anything reads it back."""

        @property
        def device(self):
            return q.device if _as_cpu[0] else torch.device("cuda", 0)

        def min(self, *a, **kw):
            raise AssertionError("mem_len.min() would be a device-to-host sync")

        def max(self, *a, **kw):
            raise AssertionError("mem_len.max() would be a device-to-host sync")

    _as_cpu = [False]
    fake = bad.as_subclass(FakeDeviceTensor)
    qd = q.as_subclass(FakeDeviceTensor)
    kd, vd, mkd, mvd = (t.as_subclass(FakeDeviceTensor) for t in (k, v, mk, mv))
    dims = _validate.validate_inputs(qd, kd, vd, mkd, mvd, fake, None)  # no read-back, no error
    assert (dims.B, dims.M) == (2, 4)
    monkeypatch.setattr(_validate, "CHECK_DEVICE_MEM_LEN", True)  # the opt-in debug check reads it
    with pytest.raises(AssertionError, match="device-to-host sync"):
        _validate.validate_inputs(qd, kd, vd, mkd, mvd, fake, None)


def test_memory_requiring_grad_is_an_error():
    q, k, v, mk, mv, ml = make_inputs(1, 2, 2, 3, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="mem_k requires grad"):
        segment_memory_attention(q, k, v, mk.requires_grad_(True), mv, ml, backend="torch")


def _base():
    return make_inputs(2, 4, 2, 5, 6, 8, torch.float32, requires_grad=False)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q=a["q"][0]), r"q must have 4 dims"),
        (lambda a: a.update(k=a["k"][:, :, :, :4], v=a["v"][:, :, :, :4]), r"head dim"),
        (lambda a: a.update(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8),
                            mem_k=None, mem_v=None, mem_len=None), r"not a multiple of the 3 kv heads"),
        (lambda a: a.update(k=a["k"].double()), r"k.dtype"),
        (lambda a: a.update(mem_k=a["mem_k"].half()), r"mem_k.dtype"),
        (lambda a: a.update(mem_len=torch.tensor([0, 7])), r"mem_len values must lie in \[0, M\]"),
        (lambda a: a.update(mem_len=torch.tensor([-1, 2])), r"mem_len values"),
        (lambda a: a.update(mem_len=torch.tensor([1, 2, 3])), r"mem_len must have shape"),
        (lambda a: a.update(mem_len=torch.tensor([1.0, 2.0])), r"mem_len must be an integer"),
        (lambda a: a.update(mem_v=None), r"both mem_k and mem_v"),
        (lambda a: a.update(mem_k=a["mem_k"][:, :, :3]), r"mem_k and mem_v must have the same shape"),
        (lambda a: a.update(mem_k=torch.randn(2, 1, 6, 8), mem_v=torch.randn(2, 1, 6, 8)), r"mem_k has shape"),
        (lambda a: a.update(v=a["v"][:, :, :4]), r"k and v must have the same shape"),
        (lambda a: a.update(k=a["k"][:, :, :4], v=a["v"][:, :, :4]), r"segment length"),
        (lambda a: a.update(window=0), r"window must be >= 1"),
        (lambda a: a.update(q=a["q"].int()), r"q must be float16"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_input_raises_value_error(mutate, match, backend):
    q, k, v, mk, mv, ml = _base()
    args = dict(q=q, k=k, v=v, mem_k=mk, mem_v=mv, mem_len=ml, window=None)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        segment_memory_attention(**args, backend=backend)


def test_unknown_backend():
    q, k, v, *_ = _base()
    with pytest.raises(ValueError, match="backend must be one of"):
        segment_memory_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("G,M", [(1, 0), (3, 0), (3, 3)])
@pytest.mark.parametrize("which", ["k", "v"])
def test_torch_backend_keys_with_non_unit_last_stride(G, M, which):
    """k/v stored (B, Hkv, D, S) and viewed as (B, Hkv, S, D): ATen's kernel ignores the last
    stride, so GQA's repeated view must be made unit-stride first (fp32, ATen path)."""
    q, k, v, mk, mv, ml = make_inputs(2, G, 1, 3, M, 8, torch.float64, requires_grad=False)
    args = {"k": k, "v": v}
    args[which] = args[which].transpose(2, 3).contiguous().transpose(2, 3)
    assert args[which].stride(-1) != 1
    f = lambda t: None if t is None else t.float()  # noqa: E731
    out = segment_memory_attention(f(q), f(args["k"]), f(args["v"]), f(mk), f(mv), ml, backend="torch")
    assert max_err(out, segment_memory_attention_ref(q, k, v, mk, mv, ml)) < 1e-5
