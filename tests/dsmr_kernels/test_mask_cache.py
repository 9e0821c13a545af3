"""The byte-bounded mask cache (dsmr_kernels/mask_cache.py) and its use by the CPU paths."""
import pytest
import torch

from dsmr_kernels import DSMRAttention
from dsmr_kernels.mask_cache import MASK_CACHE, MaskCache, mask_cache_nbytes

from .cpu_helpers import force_route


@pytest.mark.parametrize("path", ["flash", "tiled"])
@pytest.mark.parametrize("window", [None, 48])
def test_full_history_streaming_keeps_mask_cache_bounded(window, path, monkeypatch):
    """A full-history layer sees a new memory length every segment; the cache must not follow it."""
    force_route(monkeypatch, path)
    MASK_CACHE.clear()
    dtype = torch.float32 if path == "flash" else torch.bfloat16
    attn = DSMRAttention(64, 4, 2, horizon=None, window=window, backend="torch").to(dtype)
    state = attn.init_state(3)
    x = torch.randn(3, 32, 64).to(dtype)
    for seg in range(40):
        if seg == 15:
            state = state.reset([1])  # lanes now disagree on mem_len
        with torch.no_grad():
            _, state = attn(x, state)
    assert state.capacity == 40 * 32
    if window is None and path == "flash":
        assert mask_cache_nbytes() == 0  # without a window no mask is needed at all
    else:
        assert mask_cache_nbytes() < 64 << 10
    assert mask_cache_nbytes() <= MASK_CACHE.max_bytes


def test_mask_cache_is_bounded_in_bytes():
    cache = MaskCache(max_bytes=1 << 20, max_entry_bytes=256 << 10)
    for n in range(1, 400):
        t = cache.get(("x", n), lambda n=n: torch.zeros(n * 64))  # n * 256 bytes
        assert t.numel() == n * 64
        assert cache.nbytes <= cache.max_bytes
    calls = []
    cache.get(("x", 399), lambda: calls.append(1))
    assert not calls  # the most recent entry is still cached
    big = cache.get(("big",), lambda: torch.zeros(1 << 20))  # 4 MiB: returned, never kept
    assert big.numel() == 1 << 20 and cache.nbytes <= cache.max_bytes
