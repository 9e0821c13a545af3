"""The dispatcher (dsmr_kernels/torch_backend.py) and what every path must share."""
import pytest
import torch

from dsmr_kernels import cpu_paths, segment_memory_attention_ref
from dsmr_kernels import torch_backend as tb
from dsmr_kernels.testing import forward_backward, make_inputs, max_err

from .cpu_helpers import force_route, generic, torch_op

# Every way a call can run: each CPU route, and the generic path (here on CPU tensors).
PATHS = ["flash", "tiled", "upcast", "generic"]


def _run(path, monkeypatch):
    if path == "generic":
        return generic
    force_route(monkeypatch, path)
    return torch_op


def test_tiled_bf16_path_is_the_default_and_can_be_turned_off(monkeypatch):
    """On an AVX512-BF16 CPU without AMX (the table's "bf16" class) bf16 segments take the tiled path."""
    from dsmr_kernels import cpu_dispatch

    monkeypatch.setattr(cpu_dispatch, "detect_features", lambda: cpu_dispatch.CpuFeatures(avx512_bf16=True))
    monkeypatch.delenv("DSMR_CPU_PATH", raising=False)
    calls = []
    real = cpu_paths.tiled_forward
    monkeypatch.setattr(cpu_paths, "tiled_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, mk, mv, ml = make_inputs(2, 4, 2, 17, 6, 16, torch.bfloat16, requires_grad=False)
    a = torch_op(q, k, v, mk, mv, ml)
    assert len(calls) == 1
    torch_op(q.float(), k.float(), v.float(), mk.float(), mv.float(), ml)
    torch_op(q.half(), k.half(), v.half(), mk.half(), mv.half(), ml)
    assert len(calls) == 1  # fp32 and fp16 stay on ATen's kernel
    monkeypatch.setattr(tb, "BF16_TILES", None)
    b = torch_op(q, k, v, mk, mv, ml)
    assert len(calls) == 1
    assert max_err(a, b) < 0.05  # same op through two paths, each within bf16 rounding


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_memory", [False, True])
def test_empty_batch(path, with_memory, monkeypatch):
    fn = _run(path, monkeypatch)
    q, k, v, mk, mv, ml = make_inputs(0, 4, 2, 5, 6 if with_memory else 0, 8, torch.float32)
    if with_memory:
        ml = torch.zeros(0, dtype=torch.long)
    out, lse = fn(q, k, v, mk, mv, ml, window=3, return_lse=True)
    assert out.shape == (0, 4, 5, 8) and out.dtype == torch.float32
    assert lse.shape == (0, 4, 5) and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [None, 4])
def test_return_lse(path, window, monkeypatch):
    fn = _run(path, monkeypatch)
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 7, 9, 8, torch.float64, requires_grad=False)
    ro, rl = segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)
    args = [t.float() for t in (q, k, v, mk, mv)]
    out, lse = fn(*args, ml, window=window, return_lse=True)
    assert lse.shape == (3, 4, 7) and lse.dtype == torch.float32
    assert max_err(lse, rl) < 1e-5 and max_err(out, ro) < 1e-5
    # no memory at all, and memory given but every lane empty: the LSE is the segment's alone
    for mem in ((None, None, None), (mk.float(), mv.float(), torch.zeros(3, dtype=torch.long))):
        _, l0 = fn(*args[:3], *mem, window=window, return_lse=True)
        _, r0 = segment_memory_attention_ref(q, k, v, window=window, return_lse=True)
        assert max_err(l0, r0) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [None, 3, 7])
def test_garbage_in_invalid_slots_reaches_neither_output_nor_grads(path, window, dtype, monkeypatch):
    fn = _run(path, monkeypatch)
    lens = [0, 3, 8, 5]
    q, k, v, mk, mv, ml = make_inputs(4, 4, 2, 6, 8, 8, dtype, mem_len=lens, requires_grad=False)
    do = torch.randn(4, 4, 6, 8).to(dtype)
    clean = forward_backward(fn, q, k, v, mk, mv, ml, do, window=window)
    mk2, mv2 = mk.clone(), mv.clone()
    for b, n in enumerate(lens):
        mk2[b, :, : 8 - n] = float("nan")
        mv2[b, :, : 8 - n] = float("inf")
        mk2[b, 0, : 8 - n] = 1e30
    dirty = forward_backward(fn, q, k, v, mk2, mv2, ml, do, window=window)
    for name, a, c in zip(["out", "dq", "dk", "dv"], clean, dirty):
        assert torch.isfinite(c).all(), name
        assert torch.equal(a, c), name


# ------------------------------------------------------------------------------------------
# Devices: CPU tensors take the CPU routes, every other device the generic (public SDPA) path
# ------------------------------------------------------------------------------------------
def test_auto_on_mps_and_other_devices_takes_the_generic_path():
    """``backend="auto"`` on MPS resolves to ``torch``, which sends non-CPU tensors to public SDPA."""
    from dsmr_kernels.interface import resolve_backend

    for dev in ("mps", "xpu", "cuda"):
        assert tb.device_path(torch.device(dev)) == "generic"
    assert resolve_backend("auto", torch.device("mps")) == "torch"
    assert tb.device_path(torch.device("cpu")) == "cpu"


def test_generic_path_without_enable_gqa_matches_reference(monkeypatch):
    """On devices not known to take ``enable_gqa`` (MPS, ...) the kv heads are repeated instead."""
    from dsmr_kernels import sdpa_generic

    from .cpu_helpers import check_against_golden

    seen = []
    real = sdpa_generic.F.scaled_dot_product_attention
    monkeypatch.setattr(sdpa_generic, "GQA_DEVICES", ())
    monkeypatch.setattr(sdpa_generic.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(sorted(kw)) or real(*a, **kw))
    check_against_golden(generic, torch.float32, 3, 4, 2, 9, 20, 16, 6, mem_len=[20, 3, 11])
    assert seen and all("enable_gqa" not in kw for kw in seen)


def test_cpu_path_names_need_cpu_tensors():
    from dsmr_kernels._validate import validate_inputs

    q, k, v, mk, mv, ml = make_inputs(1, 2, 1, 3, 0, 4, torch.float32, requires_grad=False)
    dims = validate_inputs(q, k, v, None, None, None, None)
    meta = [t.to("meta") for t in (q, k, v)]
    with pytest.raises(ValueError, match="CPU path"):
        tb.torch_forward(*meta, None, None, None, 0.5, None, dims, path="flash")
