"""The benchmark's target rows are checks that can fail, on every CPU class (no timing here)."""
import pytest

from bench import op


def _rows(t):
    """Synthetic op rows: ``t[(M, dtype, variant)] = (fwd ms, fwd+bwd ms)``."""
    rows = []
    for (M, dt, var), (f, fb) in t.items():
        rows.append({"M": M, "dtype": dt, "variant": var, "fwd ms": f, "fwd+bwd ms": fb,
                     "fwd GFLOP/s": 1e3 / f, "fwd+bwd GFLOP/s": 3.5e3 / fb})
    return rows


def _grid(bf16_scale):
    t = {}
    for M in op.MEM_LENGTHS:
        t[(M, "fp32", "torch")] = (10.0, 30.0)
        t[(M, "fp32", "sdpa-cat")] = (11.0, 33.0)
        t[(M, "bf16", "torch")] = (10.0 * bf16_scale, 30.0 * bf16_scale)
        t[(M, "bf16", "sdpa-cat")] = (12.0, 40.0)
        t[(M, "bf16", "torch:flash")] = (12.0, 90.0)
    return _rows(t)


@pytest.mark.parametrize("emulated", [False, True])
def test_bf16_vs_fp32_target_follows_the_cpu_class(monkeypatch, emulated):
    monkeypatch.setattr(op, "emulated_bf16", lambda: emulated)
    # bf16 3% slower than fp32: a miss within noise where bf16 has units, met where it runs in fp32
    got = {r["target"]: r["met"] for r in op.targets(_grid(1.03)) if "fp32 (" in r["target"] or "slower than" in r["target"]}
    assert got and all(("met" == v) if emulated else v.startswith("NOT met") for v in got.values())
    # 10% slower fails everywhere
    got = [r["met"] for r in op.targets(_grid(1.10)) if "fp32" in r["target"] and "sdpa" not in r["target"]]
    assert got and all(v.startswith("NOT met") for v in got)


def test_ceiling_target_uses_fp32_ceiling_where_bf16_is_emulated(monkeypatch):
    rows = _grid(1.0)
    monkeypatch.setattr(op, "emulated_bf16", lambda: True)
    op._add_ratios(rows, {"fp32": 100.0, "bf16": 100.0})
    tgt = [r for r in op.targets(rows) if "ceiling" in r["target"]]
    assert len(tgt) == 1 and "fp32 matmul ceiling" in tgt[0]["target"]
    val = float(tgt[0]["measured"].rstrip("%"))
    assert tgt[0]["met"] == ("met" if val >= op.CEILING_TARGET else "NOT met")
    op._add_ratios(rows, {"fp32": 1e6, "bf16": 1e6})  # a ceiling the op cannot reach: the check fails
    assert [r["met"] for r in op.targets(rows) if "ceiling" in r["target"]] == ["NOT met"]


def test_speedup_targets_fail_when_the_op_is_slower():
    rows = _grid(1.0)
    for r in rows:
        if r["variant"] == "sdpa-cat":
            r["fwd ms"] = r["fwd ms"] / 2
    fwd = [r for r in op.targets(rows) if "sdpa-cat" in r["target"] and r["target"].endswith("fwd (t_sdpa-cat / t_torch)")]
    assert fwd and all(r["met"] == "NOT met" for r in fwd)


def test_emulated_class_skips_the_tiled_row_and_slows_the_reference(monkeypatch):
    monkeypatch.setattr(op, "emulated_bf16", lambda: True)
    assert "torch:tiled" in op.skipped_variants("bf16") and op.skipped_variants("fp32") == {}
    assert op.slow_variants("bf16") == ["reference"] and op.slow_variants("fp32") == []
    assert "ceiling/bf16" not in op.ceiling_callables()
