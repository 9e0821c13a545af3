"""Routes (dsmr_kernels/cpu_paths.py): the fp32 ``upcast`` path and forward/backward on different paths."""
import pytest
import torch

from dsmr_kernels.cpu_paths import Route
from dsmr_kernels.testing import forward_backward, make_inputs

from .cpu_helpers import check_against_golden, force_route, to, torch_op


@pytest.mark.parametrize("window", [None, 5])
def test_fp16_is_computed_in_fp32_and_returned_in_fp16(window, monkeypatch):
    force_route(monkeypatch, "upcast")
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 9, 12, 16, torch.float16, mem_len=[12, 0, 7])
    do = torch.randn(3, 4, 9, 16).to(torch.float16)
    fast = forward_backward(torch_op, q, k, v, mk, mv, ml, do, window=window)
    f32 = forward_backward(torch_op, *(to(t, torch.float32) for t in (q, k, v, mk, mv)), ml,
                           do.float(), window=window)
    for a, b in zip(fast, f32):
        assert a.dtype == torch.float16
        assert torch.equal(a, b.to(torch.float16))  # exactly the fp32 result, rounded once
    out, lse = torch_op(q, k, v, mk, mv, ml, window=window, return_lse=True)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("path", ["upcast", "flash"])
def test_fp16_paths_match_reference(path, monkeypatch):
    force_route(monkeypatch, path)
    check_against_golden(torch_op, torch.float16, 3, 4, 2, 17, 30, 16, None, mem_len=[30, 0, 11])
    check_against_golden(torch_op, torch.float16, 3, 4, 1, 17, 30, 16, 6, mem_len=[30, 0, 11])


@pytest.mark.parametrize("fwd,bwd", [("tiled", "flash"), ("flash", "tiled"), ("tiled", "upcast"),
                                     ("flash", "upcast"), ("upcast", "tiled"), ("upcast", "upcast")])
@pytest.mark.parametrize("window", [None, 7])
def test_mixed_routes_match_reference_bf16(fwd, bwd, window, monkeypatch):
    """Every backward works from any forward's final out and LSE."""
    force_route(monkeypatch, fwd, bwd)
    check_against_golden(torch_op, torch.bfloat16, 3, 4, 2, 13, 40, 16, window, mem_len=[40, 0, 9])


def test_route_rejects_unknown_paths():
    with pytest.raises(ValueError, match="CPU path must be one of"):
        Route("flash", "fast")


@pytest.mark.parametrize("path", ["upcast", "tiled"])
def test_buffers_made_under_inference_mode_serve_training_calls(path, monkeypatch):
    """The paths' reused scratch buffers, first made under inference_mode (generation), must not
    become inference tensors that a later training call cannot write into."""
    from dsmr_kernels.cpu_tiled import release_workspaces

    force_route(monkeypatch, path)
    release_workspaces()
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 20, 9, 16, torch.bfloat16, mem_len=[9, 4])
    with torch.inference_mode():
        torch_op(q.detach(), k.detach(), v.detach(), mk, mv, ml)
    check_against_golden(torch_op, torch.bfloat16, 2, 4, 2, 20, 9, 16, None, mem_len=[9, 4])
    release_workspaces()
