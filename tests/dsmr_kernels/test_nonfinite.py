"""NaN and inf in the inputs (dsmr_kernels/nonfinite.py): every path propagates them like the reference.

The rule: an output row (and its LSE) is non-finite iff its query row, or a key or value row it
sees, has a NaN or inf entry. Regression: ATen's fp32 kernel returned a finite row for a NaN query.
"""
import itertools

import pytest
import torch

from dsmr_kernels import nonfinite, segment_memory_attention_ref
from dsmr_kernels.testing import make_inputs, max_err

from .cpu_helpers import force_route, generic, torch_op

PATHS = ["flash", "tiled", "upcast", "generic"]
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _fn(path, monkeypatch):
    if path == "generic":
        return generic
    force_route(monkeypatch, path)
    return torch_op


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 3])
def test_nonfinite_rows_match_the_reference(path, dtype, window, monkeypatch):
    fn = _fn(path, monkeypatch)
    for which, bad in itertools.product(["q", "k", "v", "mk", "mv"], BAD):
        q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 70, 9, 8, dtype, mem_len=[9, 4], requires_grad=False)
        t = dict(q=q, k=k, v=v, mk=mk, mv=mv)[which]
        t[1, 0, 2 if which in "qkv" else 7, 3] = BAD[bad]  # one entry; row 7 of memory is valid in lane 1
        t[0, 1, 40 if which in "qkv" else 1, 0] = BAD[bad]  # row 40 of the segment: a late key, row 1: old slot
        ro, rl = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)
        out, lse = fn(q, k, v, mk, mv, ml, window=window, return_lse=True)
        want = ~torch.isfinite(ro).all(-1)
        assert want.any() or (which in ("mk", "mv") and window == 3), (which, bad)
        assert torch.equal(~torch.isfinite(out).all(-1), want), (which, bad)
        assert torch.equal(~torch.isfinite(lse), ~torch.isfinite(rl)), (which, bad)
        ok = ~want[..., None].expand_as(out)
        assert max_err(out[ok], ro[ok]) < (1e-5 if dtype == torch.float32 else 0.05), (which, bad)


@pytest.mark.parametrize("path", PATHS)
def test_nan_query_row_is_not_swallowed(path, monkeypatch):
    """Regression: ATen's fp32 flash kernel returned a finite row for a NaN query."""
    fn = _fn(path, monkeypatch)
    q, k, v, mk, mv, ml = make_inputs(1, 2, 2, 5, 4, 8, torch.float32, requires_grad=False)
    q[0, 1, 3, 0] = float("nan")
    out, lse = fn(q, k, v, mk, mv, ml, return_lse=True)
    assert torch.isnan(out[0, 1, 3]).all() and torch.isnan(lse[0, 1, 3])
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, :3]).all() and torch.isfinite(out[0, 1, 4]).all()


def test_reference_rule_on_the_mask_picture():
    """M = 3 with mem_len = 2, S = 3 (the docstring's picture): only rows that see a bad input turn NaN."""
    q, k, v, mk, mv, ml = make_inputs(1, 1, 1, 3, 3, 4, torch.float64, mem_len=[2], requires_grad=False)
    nan = float("nan")

    def bad_rows(window=None, **where):
        tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "mk": mk.clone(), "mv": mv.clone()}
        for name, row in where.items():
            tensors[name][0, 0, row, 0] = nan
        out = segment_memory_attention_ref(tensors["q"], tensors["k"], tensors["v"], tensors["mk"],
                                           tensors["mv"], ml, window=window)
        return (~torch.isfinite(out[0, 0]).all(-1)).tolist()

    assert bad_rows(v=2) == [False, False, True]  # a future value must not leak through 0 * NaN
    assert bad_rows(k=1) == [False, True, True]
    assert bad_rows(q=1) == [False, True, False]
    assert bad_rows(mk=0, mv=0) == [False, False, False]  # an invalid slot
    assert bad_rows(mv=2) == [True, True, True]
    assert bad_rows(window=2, mv=1) == [False, False, False]  # slot 1 is out of every query's window
    assert bad_rows(window=2, mv=2) == [True, False, False]


@pytest.mark.parametrize("path", PATHS)
def test_finite_inputs_and_invalid_slot_garbage_skip_the_slow_path(path, monkeypatch):
    fn = _fn(path, monkeypatch)
    calls = []
    real = nonfinite.nonfinite_rows
    monkeypatch.setattr(nonfinite, "nonfinite_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 6, 8, 8, torch.float32, mem_len=[3, 0])
    mk[0, :, :5] = float("nan")  # invalid slots of lane 0, all of lane 1
    mv[1] = float("inf")
    out = fn(q, k, v, mk, mv, ml, window=4)
    assert not calls and torch.isfinite(out).all()
    q2 = q.detach().clone()
    q2[0, 0, 0, 0] = float("inf")
    fn(q2, k, v, mk, mv, ml)
    assert calls == [1]


@pytest.mark.parametrize("path", ["flash", "tiled", "upcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_finite_inputs_whose_sum_overflows_take_the_exact_path(path, dtype, monkeypatch):
    """The check sums each tensor: huge finite values can overflow the sum. That may only cost the
    slower zeroed-copy path, never change a result (no row is marked)."""
    fn = _fn(path, monkeypatch)
    calls = []
    real = nonfinite.nonfinite_rows
    monkeypatch.setattr(nonfinite, "nonfinite_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, mk, mv, ml = make_inputs(1, 2, 2, 8, 4, 8, dtype, mem_len=[4], requires_grad=False)
    # 128 entries of max/64 sum to 2x max (inf), while a row of attention adds at most 12 of them.
    big = torch.finfo(dtype).max / 64
    v[0, :, :, :] = big
    assert not nonfinite.inputs_finite(q, k, v, mk, mv, [4], 4) or dtype == torch.float16
    out = fn(q, k, v, mk, mv, ml)
    ref = segment_memory_attention_ref(q.double(), k.double(), v.double(), mk.double(), mv.double(), ml)
    assert torch.isfinite(out).all()
    assert calls or dtype == torch.float16  # fp16 sums in fp32: no overflow, the fast path ran
    assert max_err(out.double(), ref) <= 2e-2 * big  # rows mix small memory values with big segment ones


@pytest.mark.parametrize("path", PATHS)
def test_backward_runs_with_a_nan_row_and_keeps_other_lanes_exact(path, monkeypatch):
    fn = _fn(path, monkeypatch)
    q, k, v, mk, mv, ml = make_inputs(2, 2, 1, 5, 4, 8, torch.float64 if path == "flash" else torch.float32)
    q0 = q.detach().clone()
    q0[1, 0, 2, 0] = float("nan")
    q0.requires_grad_(True)
    out = fn(q0, k, v, mk, mv, ml)
    out[0].sum().backward()  # lane 0 is finite: its gradients must be too
    assert torch.isfinite(q0.grad[0]).all()
