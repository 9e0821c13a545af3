"""The generic path (dsmr_kernels/sdpa_generic.py), exercised on CPU tensors since no GPU is assumed."""
import itertools

import pytest
import torch

from dsmr_kernels import segment_memory_attention_ref
from dsmr_kernels.testing import forward_backward, make_inputs, max_err

from .cpu_helpers import check_against_golden, generic, torch_op

GENERIC_CASES = list(
    itertools.product(
        [1, 3],  # B (B = 3 gets mem_len [0, M/2, M])
        [4, 2, 1],  # Hkv (H = 4)
        [1, 17],  # S
        [0, 5, 40],  # M
        [None, 1, 8, 24],  # window
    )
)


@pytest.mark.parametrize("B,Hkv,S,M,window", GENERIC_CASES)
def test_generic_path_matches_reference_fp32(B, Hkv, S, M, window):
    check_against_golden(generic, torch.float32, B, 4, Hkv, S, M, 16, window, seed=B * 100 + S + M)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("window", [None, 6])
def test_generic_path_matches_reference_other_dtypes(dtype, window):
    check_against_golden(generic, dtype, 3, 4, 2, 9, 20, 16, window, mem_len=[20, 3, 11])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 5])
def test_torch_backend_on_cuda_matches_reference(window):
    q, k, v, mk, mv, ml = make_inputs(3, 4, 2, 9, 12, 16, torch.float32, device="cuda", mem_len=[12, 0, 7])
    do = torch.randn_like(q)
    fast = forward_backward(torch_op, q, k, v, mk, mv, ml, do, window=window)
    ref = forward_backward(segment_memory_attention_ref, q, k, v, mk, mv, ml, do, window=window)
    for a, b in zip(fast, ref):
        assert max_err(a, b) < 1e-4
