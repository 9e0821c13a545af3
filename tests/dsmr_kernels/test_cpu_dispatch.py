"""The decision table and calibration (dsmr_kernels/cpu_dispatch.py), with mocked CPUs; no timing."""
import pytest
import torch

from dsmr_kernels import cpu_dispatch as cd
from dsmr_kernels import torch_backend as tb
from dsmr_kernels._validate import OpDims

from .cpu_helpers import check_against_golden, torch_op

AMX_XEON = cd.CpuFeatures("AVX512", avx2=True, avx512=True, avx512_bf16=True, amx_bf16=True, amx_fp16=True)
EPYC = cd.CpuFeatures("AVX512", avx2=True, avx512=True, avx512_bf16=True)
LAPTOP = cd.CpuFeatures("AVX2", avx2=True)
SEG, DEC = 512, 1  # query counts of a training segment and of one generated token


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(cd.ENV_PATH, raising=False)
    monkeypatch.delenv(cd.ENV_CALIBRATE, raising=False)
    cd.clear_calibration()
    yield
    cd.clear_calibration()


def _record_backward_paths(monkeypatch) -> list:
    """The CPU path of every backward run from now on, calibration runs included, in order."""
    from dsmr_kernels import cpu_paths

    ran = []
    real = cpu_paths.path_backward
    monkeypatch.setattr(cpu_paths, "path_backward", lambda path, *a, **k: ran.append(path) or real(path, *a, **k))
    return ran


@pytest.mark.parametrize("cpu,dtype,S,fwd,bwd", [
    # AMX: ATen's kernel runs on AMX tiles; which backward wins is calibrated
    (AMX_XEON, torch.bfloat16, SEG, ("flash", "upcast"), ("flash", "tiled", "upcast")),
    (AMX_XEON, torch.bfloat16, DEC, ("flash",), ("flash",)),
    (AMX_XEON, torch.float16, SEG, ("flash",), ("flash",)),  # AMX-FP16: native fp16
    # AVX512-BF16 without AMX: large batched bf16 GEMMs
    (EPYC, torch.bfloat16, SEG, ("tiled",), ("tiled",)),
    (EPYC, torch.bfloat16, DEC, ("flash",), ("flash",)),
    (EPYC, torch.float16, SEG, ("upcast",), ("upcast",)),
    # AVX2 only: no bf16 / fp16 arithmetic, both computed in fp32
    (LAPTOP, torch.bfloat16, SEG, ("flash", "upcast"), ("upcast",)),
    (LAPTOP, torch.bfloat16, DEC, ("upcast",), ("upcast",)),
    (LAPTOP, torch.float16, DEC, ("upcast",), ("upcast",)),
    # fp32: ATen's forward; the segment backward calibrates the tiled path's large fp32 GEMMs
    (AMX_XEON, torch.float32, SEG, ("flash",), ("flash", "tiled")),
    (EPYC, torch.float32, SEG, ("flash",), ("flash", "tiled")),
    (LAPTOP, torch.float32, SEG, ("flash",), ("flash", "tiled")),
    (EPYC, torch.float32, DEC, ("flash",), ("flash",)),
])
def test_decision_table(cpu, dtype, S, fwd, bwd):
    assert cd.choose(dtype, S, cpu) == (fwd, bwd)


@pytest.mark.parametrize("cpu", [AMX_XEON, EPYC, LAPTOP])
def test_float64_takes_flash_everywhere_and_fp32_honours_the_override(cpu, monkeypatch):
    monkeypatch.setenv(cd.ENV_PATH, "tiled")  # not even an override moves fp64 off ATen's kernel
    assert cd.choose(torch.float64, SEG, cpu) == (("flash",), ("flash",))
    assert cd.choose(torch.float32, SEG, cpu) == (("tiled",), ("tiled",))


@pytest.mark.parametrize("fwd,bwd", [("flash", "tiled"), ("tiled", "tiled")])
@pytest.mark.parametrize("window", [None, 5])
def test_fp32_through_the_tiled_backward_meets_the_golden_tolerances(fwd, bwd, window, monkeypatch):
    """The fp32 routes the table (and an override) can pick: flash or tiled forward, tiled
    backward, with GQA, per-lane memory and several row blocks / key tiles."""
    from dsmr_kernels.cpu_tiled import TileConfig

    from .cpu_helpers import force_route

    force_route(monkeypatch, fwd, bwd, tiles=TileConfig(8, 16, 1 << 12))
    check_against_golden(torch_op, torch.float32, 3, 4, 2, 30, 40, 16, window, mem_len=[40, 0, 17])
    force_route(monkeypatch, fwd, bwd)
    check_against_golden(torch_op, torch.float32, 2, 4, 1, 300, 700, 32, window, mem_len=[700, 333])


def test_fp32_backward_calibration_runs_both_candidates_once(monkeypatch):
    """First fp32 segment backward: tiled and flash both run (three times each), the choice is cached,
    the gradients are golden whichever wins, and the next call reuses the choice."""
    monkeypatch.setattr(cd, "detect_features", lambda: EPYC)
    ran = _record_backward_paths(monkeypatch)
    check_against_golden(torch_op, torch.float32, 2, 4, 2, 40, 30, 16, None, mem_len=[30, 11])
    key = cd.calibration_key("bwd", torch.float32, 40, 30)
    assert sorted(ran[:6]) == ["flash"] * 3 + ["tiled"] * 3 and cd._CALIBRATED[key] in ("tiled", "flash")
    ran.clear()
    check_against_golden(torch_op, torch.float32, 2, 4, 2, 40, 30, 16, None, mem_len=[30, 11])
    assert ran == [cd._CALIBRATED[key]]


def test_cpu_classes():
    assert (AMX_XEON.cpu_class, EPYC.cpu_class, LAPTOP.cpu_class) == ("amx", "bf16", "no_bf16")
    assert cd.CpuFeatures(arm_bf16=True).cpu_class == "bf16"
    assert "amx_bf16" in AMX_XEON.flags and "avx512" not in LAPTOP.flags


def test_every_table_row_names_real_paths():
    for key, (fwd, bwd) in cd.DECISION_TABLE.items():
        assert fwd and bwd and set(fwd + bwd) <= set(cd.CPU_PATHS), key


def test_override_env_and_argument(monkeypatch):
    assert cd.parse_override("fwd=tiled,bwd=flash") == ("tiled", "flash")
    assert cd.parse_override("upcast") == ("upcast", "upcast")
    assert cd.parse_override("bwd=tiled") == ("tiled", "tiled")
    assert cd.parse_override("auto") is None and cd.parse_override(None) is None
    for bad in ("fast", "fwd=tiled,bwd=nope", "side=flash"):
        with pytest.raises(ValueError, match="DSMR_CPU_PATH"):
            cd.parse_override(bad)
    monkeypatch.setenv(cd.ENV_PATH, "fwd=flash,bwd=tiled")
    assert cd.choose(torch.bfloat16, SEG, LAPTOP) == (("flash",), ("tiled",))
    assert cd.choose(torch.bfloat16, SEG, LAPTOP, override="upcast") == (("upcast",), ("upcast",))
    dims = OpDims(1, 2, 1, SEG, 0, 8)
    assert tb.cpu_route(torch.bfloat16, dims).bwd == ("tiled",)


def test_calibration_picks_the_fastest_once_and_can_be_turned_off(monkeypatch):
    now = [0.0]
    cost = {"flash": 3.0, "tiled": 1.0, "upcast": 2.0}
    runs = []

    def run(name):
        runs.append(name)
        now[0] += cost[name]
        return f"result of {name}"

    monkeypatch.setattr(cd, "_clock", lambda: now[0])
    key = ("bwd", "bf16", "segment", 2)
    assert cd.calibrate(key, ("flash", "tiled", "upcast"), run) == ("tiled", "result of tiled")
    # a warm-up each, then alternating timed runs: a burst of load hits every candidate alike
    assert runs == ["flash", "tiled", "upcast"] * (1 + cd.CALIBRATION_RUNS)
    n = len(runs)
    assert cd.calibrate(key, ("flash", "tiled", "upcast"), run) == ("tiled", None)  # cached: nothing runs
    assert len(runs) == n
    assert cd.calibrate(("other",), ("upcast",), run) == ("upcast", None)  # one candidate: nothing to time
    monkeypatch.setenv(cd.ENV_CALIBRATE, "0")
    assert cd.calibrate(("new",), ("flash", "tiled"), run) == ("flash", None)
    assert len(runs) == n


def test_memory_sizes_calibrate_apart():
    keys = {cd.calibration_key("bwd", torch.float32, 512, M) for M in (0, 512, 1024, 4096, 16384)}
    assert len(keys) == 4 and cd.calibration_key("fwd", torch.float32, 1, 0)[2] == "decode/m0"


def test_a_restored_choice_that_is_no_candidate_here_is_timed_again(monkeypatch):
    """Checkpoints carry calibrated paths; one written on another CPU class may name a path this
    CPU's table does not offer for the call: it is ignored and the candidates are timed."""
    now = [0.0]

    def run(name):
        now[0] += {"flash": 2.0, "tiled": 1.0}[name]
        return name

    monkeypatch.setattr(cd, "_clock", lambda: now[0])
    key = ("bwd", "fp32", "segment", 2)
    cd.load_calibration([[*key, "upcast"], ["bwd", "fp32", "segment", 2, "no-such-path"]])
    assert cd.calibration_state() == [[*key, "upcast"]]
    assert cd.calibrate(key, ("flash", "tiled"), run) == ("tiled", "tiled")
    assert cd.calibration_state() == [[*key, "tiled"]]
    cd.load_calibration([[*key, "flash"]])
    assert cd.calibrate(key, ("flash", "tiled"), run) == ("flash", None)  # a valid restored choice wins


def test_fp32_backward_without_calibration_keeps_atens_kernel(monkeypatch):
    """With calibration off the table's first candidate runs: ATen's fp32 flash backward, as
    before the tiled candidate existed (tiled is timed in fp32 on the EPYC only)."""
    monkeypatch.setenv(cd.ENV_CALIBRATE, "0")
    ran = _record_backward_paths(monkeypatch)
    check_against_golden(torch_op, torch.float32, 2, 4, 2, 40, 30, 16, None, mem_len=[30, 11])
    assert ran == ["flash"] and cd.calibration_state() == []


@pytest.mark.parametrize("window", [None, 9])
def test_calibrated_amx_routes_are_correct_end_to_end(window, monkeypatch):
    """On a (mocked) AMX CPU bf16 calibrates its forward and backward on first use; every
    candidate is correct, and the second call reuses the choice."""
    monkeypatch.setattr(cd, "detect_features", lambda: AMX_XEON)
    check_against_golden(torch_op, torch.bfloat16, 2, 4, 2, 40, 30, 16, window, mem_len=[30, 11])
    chosen = dict(cd._CALIBRATED)
    assert {k[0] for k in chosen} == {"fwd", "bwd"}
    assert chosen[cd.calibration_key("fwd", torch.bfloat16, 40, 30)] in ("flash", "upcast")
    check_against_golden(torch_op, torch.bfloat16, 2, 4, 2, 40, 30, 16, window, mem_len=[30, 11])
    assert cd._CALIBRATED == chosen


def test_describe_cpu_reports_features_and_paths(monkeypatch):
    info = cd.describe_cpu(EPYC)
    assert info["cpu features"] == "avx2, avx512, avx512_bf16" and info["cpu class"] == "bf16"
    assert info["bf16 segment"] == "fwd tiled, bwd tiled"
    assert info["fp32 segment"] == "fwd flash, bwd calibrated on first use (of flash/tiled)"
    assert info["fp32 decode"] == "fwd flash, bwd flash"
    assert "calibrated on first use" in cd.describe_cpu(AMX_XEON)["bf16 segment"]
    monkeypatch.setenv(cd.ENV_PATH, "flash")
    assert cd.describe_cpu(EPYC)["override"] == "DSMR_CPU_PATH=flash"


def test_detected_features_agree_with_cpuinfo():
    """What the CPU has, narrowed by the caps this process runs under (the CI matrix sets them)."""
    flags = cd._cpuinfo_flags()
    feats = cd.detect_features()
    cap = cd.onednn_isa_cap()
    assert feats.capability == torch.backends.cpu.get_cpu_capability()
    if cd.forced_class() is not None:
        assert feats.cpu_class == cd.forced_class()
        return
    if "avx2" in flags and feats.capability != "DEFAULT":
        assert feats.avx2
    mkl_ok = cd.mkl_cap() not in cd.MKL_NO_BF16
    if "avx512_bf16" in flags and cd.isa_allows(cap, "AVX512_CORE_BF16") and mkl_ok:
        assert feats.avx512_bf16 and feats.cpu_class in ("bf16", "amx")
    if not cd.isa_allows(cap, "AVX512_CORE_BF16") or not mkl_ok:
        assert feats.cpu_class == "no_bf16"


@pytest.mark.parametrize("cap,isa,allowed", [
    (None, "AVX512_CORE_AMX", True), ("AVX2", "AVX512_CORE", False), ("AVX2", "AVX2", True),
    ("AVX512_CORE", "AVX512_CORE_BF16", False), ("AVX512_CORE_BF16", "AVX512_CORE_BF16", True),
    ("AVX512_CORE_BF16", "AVX512_CORE_AMX", False), ("AVX10_1_512_AMX", "AVX512_CORE_AMX", True),
    ("AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", False), ("AVX10_2_512", "AVX512_CORE_AMX", False),
    ("AVX10_2_512", "AVX512_CORE_BF16", True), ("ALL", "AVX512_CORE_AMX_FP16", True), ("NONSENSE", "AVX512_CORE", True),
])
def test_onednn_isa_cap_ranks(cap, isa, allowed):
    assert cd.isa_allows(cap, isa) is allowed


@pytest.mark.parametrize("env,cls", [
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "no_bf16"),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, "bf16"),
    ({"DNNL_MAX_CPU_ISA": "AVX512_CORE"}, "no_bf16"),
    ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "no_bf16"),
])
def test_onednn_cap_narrows_the_cpu_class(monkeypatch, env, cls):
    """An emulated smaller CPU takes that CPU's row of the table (only where this CPU has more)."""
    monkeypatch.setattr(cd, "_cpuinfo_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", cd.ENV_CLASS):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cd.detect_features.cache_clear()
    try:
        assert cd.detect_features().cpu_class == cls
    finally:
        cd.detect_features.cache_clear()


def test_forced_class_takes_that_row_and_bad_names_raise(monkeypatch):
    """``DSMR_CPU_CLASS`` replaces this CPU's class in the detected features (explicit features,
    as the table's unit tests pass, are what they say)."""
    monkeypatch.setattr(cd, "_cpuinfo_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.delenv(cd.ENV_PATH, raising=False)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    try:
        for forced, row in (("no_bf16", "no_bf16"), ("bf16", "bf16"), ("amx", "amx")):
            monkeypatch.setenv(cd.ENV_CLASS, forced)
            cd.detect_features.cache_clear()
            assert cd.detect_features().cpu_class == row
            assert cd.choose(torch.bfloat16, 512) == cd.DECISION_TABLE[("bf16", "segment", row)]
        monkeypatch.setenv(cd.ENV_CLASS, "no_bf16")
        cd.detect_features.cache_clear()
        info = cd.describe_cpu()
        assert info["cpu class"].startswith("no_bf16 (forced") and "CPU: amx" in info["cpu class"]
        assert info["bf16 segment"].endswith("(of flash/upcast), bwd upcast")
        monkeypatch.setenv(cd.ENV_CLASS, "avx9000")
        cd.detect_features.cache_clear()
        with pytest.raises(ValueError, match="DSMR_CPU_CLASS"):
            cd.detect_features()
    finally:
        cd.detect_features.cache_clear()
