"""Helpers shared by the CPU-path tests: the op through one path, and the golden comparison."""
import torch

from dsmr_kernels import segment_memory_attention, segment_memory_attention_ref
from dsmr_kernels import torch_backend as tb
from dsmr_kernels._validate import validate_inputs
from dsmr_kernels.cpu_paths import Route
from dsmr_kernels.testing import assert_close_to_golden, forward_backward, make_inputs


def to(t, dtype):
    return None if t is None else t.detach().to(dtype)


def generic(q, k, v, mem_k, mem_v, mem_len, *, window=None, return_lse=False):
    """The generic (non-CPU) path, called directly on CPU tensors."""
    dims = validate_inputs(q, k, v, mem_k, mem_v, mem_len, window)
    out, lse = tb.torch_forward(q, k, v, mem_k, mem_v, mem_len, dims.D ** -0.5, window, dims, path="generic")
    return (out, lse) if return_lse else out


def torch_op(*args, **kw):
    return segment_memory_attention(*args, backend="torch", **kw)


def force_route(monkeypatch, fwd: str, bwd: str = None, tiles=None) -> Route:
    """Make every CPU call of this test take ``Route(fwd, bwd or fwd)`` whatever the dispatcher says."""
    route = Route(fwd, bwd or fwd, tiles)
    monkeypatch.setattr(tb, "cpu_route", lambda *a, **k: route)
    return route


def check_against_golden(fn, dtype, B, H, Hkv, S, M, D, window, mem_len=None, seed=0):
    """out/dq/dk/dv and lse of ``fn`` in ``dtype`` vs the reference in ``dtype``, both vs float64."""
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, torch.float64, mem_len=mem_len, seed=seed)
    do = torch.randn(B, H, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    gold = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, window=window)
    args = (to(q, dtype), to(k, dtype), to(v, dtype), to(mk, dtype), to(mv, dtype), ml, do.to(dtype))
    ref = forward_backward(segment_memory_attention_ref, *args, window=window)
    fast = forward_backward(fn, *args, window=window)
    for name, f, r, g, factor in zip(["out", "dq", "dk", "dv"], fast, ref, gold, [2, 3, 3, 3]):
        assert f.dtype == dtype and f.shape == g.shape
        assert_close_to_golden(name, f, r, g, factor, dtype)
    _, gl = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)
    _, rl = segment_memory_attention_ref(*args[:6], window=window, return_lse=True)
    _, fl = fn(*args[:6], window=window, return_lse=True)
    assert fl.shape == (B, H, S) and fl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_golden("lse", fl, rl, gl, 2, dtype)


def saved_bytes_beyond_inputs(fn, q, k, v, mk, mv, ml, **kw):
    """Bytes of saved-for-backward tensors that are not views of the inputs; returns (bytes, out)."""
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, mk, mv)}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            extra.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v, mk, mv, ml, **kw)
    return sum(extra), out
