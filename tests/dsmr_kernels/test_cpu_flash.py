"""The ``flash`` CPU path (dsmr_kernels/cpu_flash.py): ATen's flash kernel, split-KV, LSE merge.

``test_op.py`` covers the public op over a full grid; these tests pin what that grid does not:
lanes with different ``mem_len`` under a window, float64 exactness, gradcheck, strided inputs,
partial gradients, GQA folding in the backward, and that no copy of the memory is kept for backward.
"""
import pytest
import torch

from dsmr_kernels import segment_memory_attention_ref
from dsmr_kernels.testing import forward_backward, make_inputs, max_err

from .cpu_helpers import check_against_golden, force_route, saved_bytes_beyond_inputs, torch_op

PER_LANE_CASES = [
    ([0, 2, 7, 30, 30, 30], 8),  # lanes below, at and above the band (window - 1 = 7)
    ([30, 30, 0, 0, 12, 12], 8),  # runs of equal lanes -> one kernel call per run
    ([3, 29, 30, 1, 0, 17], 40),  # window longer than S + memory of some lanes
    ([3, 29, 30, 1, 0, 17], 1),  # a query sees only itself
    ([3, 29, 30, 1, 0, 17], None),
]


@pytest.fixture(autouse=True)
def _flash(monkeypatch):
    force_route(monkeypatch, "flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mem_len,window", PER_LANE_CASES)
def test_cpu_path_per_lane_mem_len_with_window(dtype, mem_len, window):
    check_against_golden(torch_op, dtype, 6, 4, 2, 11, 30, 16, window, mem_len=mem_len)


@pytest.mark.parametrize("window", [None, 5, 64])
def test_cpu_path_float64_is_exact(window):
    """In float64 the split-KV merge must agree with the reference to round-off."""
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 13, 21, 8, torch.float64, mem_len=[21, 0, 9])
    do = torch.randn(3, 4, 13, 8, dtype=torch.float64)
    a = forward_backward(torch_op, q, k, v, mk, mv, ml, do, window=window)
    b = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, window=window)
    for x, y in zip(a, b):
        assert max_err(x, y) < 1e-12


def test_cpu_path_gradcheck():
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 5, 6, 4, torch.float64, mem_len=[6, 2])
    for window in (None, 3):
        fn = lambda q, k, v: torch_op(q, k, v, mk, mv, ml, window=window)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_cpu_path_strided_inputs_and_grad_out():
    """The ATen kernel silently misreads a last dim with stride != 1; the backend must not pass one."""
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 9, 7, 16, torch.float64, mem_len=[7, 4], requires_grad=False)
    odd = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    qs, ks, vs, mks, mvs = (odd(t).float() for t in (q, k, v, mk, mv))
    qs, ks, vs = (odd(t).requires_grad_(True) for t in (qs, ks, vs))
    assert qs.stride(-1) != 1 and mks.stride(-1) != 1
    out = torch_op(qs, ks, vs, mks, mvs, ml, window=5)
    out.sum().backward()  # grad_out is an expanded (all-zero-stride) tensor
    qd, kd, vd = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = segment_memory_attention_ref(qd, kd, vd, mk, mv, ml, window=5)
    ref.sum().backward()
    assert max_err(out, ref) < 1e-5
    for a, b in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert max_err(a, b) < 1e-5


def test_cpu_path_grad_for_some_inputs_only():
    q, k, v, mk, mv, ml = make_inputs(2, 4, 1, 6, 5, 8, torch.float64, mem_len=[5, 1], requires_grad=False)
    k = k.clone().requires_grad_(True)
    torch_op(q, k, v, mk, mv, ml).sum().backward()
    kd = k.detach().clone().requires_grad_(True)
    segment_memory_attention_ref(q, kd, v, mk, mv, ml).sum().backward()
    assert max_err(k.grad, kd.grad) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 6])
def test_backward_keeps_no_copy_of_the_memory(window, dtype):
    """Saved-for-backward tensors: views of the inputs, plus out and lse; nothing of size M."""
    B, H, Hkv, S, M, D = 4, 4, 2, 8, 256, 16
    q, k, v, mk, mv, ml = make_inputs(B, H, Hkv, S, M, D, dtype, mem_len=[0, 80, 170, 256])
    extra, out = saved_bytes_beyond_inputs(torch_op, q, k, v, mk, mv, ml, window=window)
    assert extra <= out.numel() * out.element_size() + B * H * S * 4
    out.sum().backward()


@pytest.mark.parametrize("threads", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_backward_folded_and_repeated_gqa(threads, dtype, monkeypatch):
    """The segment backward folds GQA heads when B * Hkv >= threads, else repeats the keys."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the heuristic reads
    check_against_golden(torch_op, dtype, 2, 8, 2, 33, 20, 16, None, mem_len=[20, 7])
    check_against_golden(torch_op, dtype, 2, 8, 2, 33, 20, 16, 9, mem_len=[20, 7])
