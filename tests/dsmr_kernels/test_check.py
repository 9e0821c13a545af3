"""The self-check (``python -m dsmr_kernels.check``): it passes here and fails when a path is broken."""
import subprocess
import sys

import pytest
import torch

from dsmr_kernels import check, cpu_paths


def test_every_cpu_path_passes_here():
    results, timings = check.run_check(["cpu"], timing=False, print_fn=lambda s: None)
    assert {(r.dtype, r.path) for r in results} >= {("fp64", "auto"), ("fp32", "cpu:tiled"), ("bf16", "cpu:upcast")}
    assert all(r.ok for r in results), [f for r in results for f in r.failures]
    assert all(0 <= r.ratio <= 1 for r in results)
    assert timings == []


def test_a_broken_path_is_caught_and_exits_non_zero(monkeypatch, capsys):
    """Break the flash path's forward (1% off): its rows fail, the other paths still pass."""
    real = cpu_paths.flash_forward

    def off_by_one_percent(*args, **kw):
        out, lse = real(*args, **kw)
        return out * 1.01, lse

    monkeypatch.setattr(cpu_paths, "flash_forward", off_by_one_percent)
    res = check.check_path("cpu", torch.float32, "cpu:flash")
    assert not res.ok and res.ratio > 1 and any(": out error" in f for f in res.failures)
    assert check.check_path("cpu", torch.float32, "cpu:tiled").ok
    assert check.main(["--device", "cpu", "--no-timing"]) == 1
    assert "WRONG" in capsys.readouterr().out


def test_broken_nonfinite_rule_is_caught(monkeypatch):
    """A path that swallows NaN (here: the non-finite input check says 'all finite') fails the check."""
    from dsmr_kernels import torch_backend

    monkeypatch.setattr(torch_backend, "inputs_finite", lambda *a, **k: True)
    res = check.check_path("cpu", torch.float32, "cpu:flash", [c for c in check.CASES if c.nonfinite])
    assert not res.ok
    assert any("non-finite rows" in f for f in res.failures), res.failures


def test_triton_kernels_under_the_interpreter():
    """The Triton branch of the check (forward, backward and the split-KV decode kernel)."""
    pytest.importorskip("triton")
    cases = [c for c in check.CASES if c.name in ("gqa, window 9", "non-finite rows", "decode S=1")]
    res = check.check_path("cpu", torch.float32, "triton", cases)
    assert res.ok, res.failures


def test_timing_reports_both_variants():
    t = check.time_op("cpu", torch.float32, reps=1)
    assert set(t) == {"op fwd ms", "op fwd+bwd ms", "sdpa-cat fwd ms", "sdpa-cat fwd+bwd ms"}
    assert all(v > 0 for v in t.values())


def test_command_line_entry_points():
    proc = subprocess.run([sys.executable, "-m", "dsmr_kernels.check", "--device", "mps", "--no-timing"],
                          capture_output=True, text=True)
    if "mps" not in check.devices():
        assert proc.returncode == 2 and "not present" in proc.stderr
    from dsmr.cli import build_parser

    args = build_parser().parse_args(["check", "--no-timing", "--device", "cpu"])
    assert args.no_timing and args.device == ["cpu"] and args.func.__module__ == "dsmr.commands.check"
