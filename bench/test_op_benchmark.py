"""pytest-benchmark suite for ``segment_memory_attention`` (the op table's grid, as benchmarks).

    pytest bench/ --benchmark-only                       # all of it
    pytest bench/ --benchmark-only -k "torch and 4096"   # a slice
    pytest bench/ --benchmark-only --benchmark-json=op.json

Kept out of the default test run: pyproject's ``testpaths = ["tests"]`` means a bare ``pytest``
never collects ``bench/``. Each benchmark stores its FLOP count (same formula as
``bench/op.py``: forward 4·D·P·H·B over the P visible pairs, backward 2.5x forward) and the
achieved GFLOP/s at the median in ``extra_info``.
"""
import pytest

from bench import op

pytest.importorskip("pytest_benchmark")

GRID = [
    pytest.param(be, M, dt, id=f"{be}-M{M}-{dt}")
    for be in op.backends()
    for M in op.MEM_LENGTHS
    for dt in op.DTYPES
]


def _run(benchmark, fn, flops):
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info["flops"] = flops
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["gflop_per_s"] = flops / median / 1e9 if median > 0 else None


@pytest.mark.parametrize("backend, M, dtype", GRID)
def test_forward(benchmark, backend, M, dtype):
    """Forward under no_grad, S=512, H=8, D=64, B=1, all M memory slots valid."""
    fwd, _ = op._callables(backend, M, op.DTYPES[dtype])
    _run(benchmark, fwd, op.forward_flops(op.S, M))


@pytest.mark.parametrize("backend, M, dtype", GRID)
def test_forward_backward(benchmark, backend, M, dtype):
    """Forward + backward into q, k, v; FLOPs = 3.5x the forward's."""
    _, fwd_bwd = op._callables(backend, M, op.DTYPES[dtype])
    _run(benchmark, fwd_bwd, 3.5 * op.forward_flops(op.S, M))
