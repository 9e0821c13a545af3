"""The ahead-of-time compile gate (``python -m dsmr_kernels.aot --quick``) in CI.

Compiles real sm_90 cubins with the ptxas that ships in Triton's wheel and reads their
registers, spills and shared memory; no GPU is needed. The gate itself is the assertion: it
exits non-zero when a config the autotuner may pick fails to compile, overflows shared memory or
its prune estimate, or spills in 16-bit.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsmr_kernels import aot

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not aot.ptxas_available(), reason="ptxas/cuobjdump not found (Triton's Linux wheel ships them)")
def test_quick_aot_gate_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "dsmr_kernels.aot", "--quick", "--out", str(tmp_path), "--jobs", "2"],
                         capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "aot.csv")))
    assert list(rows[0].keys()) == aot.COLUMNS
    kernels = {r["kernel"].rsplit("_g", 1)[0] for r in rows}
    assert {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"} <= kernels
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    for r in rows:
        assert r["arch"] == "90" and r["status"].startswith("ok"), r
        regs, spill, shared = int(r["registers"]), int(r["spill_bytes"]), int(r["shared_bytes"])
        assert 0 < regs <= 255 and shared <= 232448
        if r["dtype"] == "bf16":
            assert spill == 0, r
    assert (tmp_path / "aot.md").read_text().count("| sm_90 |") >= len(kernels)


def test_plan_follows_the_prune_rule():
    """The gate compiles exactly what the autotuner may pick: the kernels' own config functions."""
    from dsmr_kernels import triton_fwd
    from dsmr_kernels.triton_common import SMEM_LIMIT

    jobs = aot.plan([80], ("fp32",), (128,), groups=(2,), kernels=["fwd"])
    picked = triton_fwd.fwd_configs(128, 4, SMEM_LIMIT[80])
    assert len(jobs) == len(picked) > 0
    assert all(j.estimate <= SMEM_LIMIT[80] for j in jobs)
    # a card with little shared memory gets fewer configs, never none
    small = triton_fwd.fwd_configs(128, 2, 48 * 1024)
    assert 1 <= len(small) < len(triton_fwd.fwd_configs(128, 2, SMEM_LIMIT[90]))


def test_bad_arch_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        aot.main(["--arch", "75x"])
    assert "--arch" in capsys.readouterr().err
