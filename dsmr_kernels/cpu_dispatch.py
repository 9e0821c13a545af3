"""Which CPU path runs a call: what this CPU accelerates, one decision table, a short calibration.

The CPU paths (:mod:`.cpu_paths`) differ in how they use the CPU's matrix units:

* ``flash`` -- ATen's fused kernel: many small per-tile GEMMs. On AMX those run on AMX tiles
  (measured on a Xeon: bf16 forward 8-9 ms against 22-25 ms for ``tiled``); without AMX its
  bf16 GEMMs gain only ~1.3x over fp32 (bench/results/op.md, AMD EPYC).
* ``tiled`` -- one large batched bf16 GEMM per 512 x 512 tile: 2-3x over fp32 on AVX512-BF16
  without AMX, where it made bf16 1.5x (forward) and 1.95x (forward + backward) faster than fp32.
  Its backward's few large GEMMs also beat ATen's fp32 flash backward (11-18% on the EPYC), so
  the fp32 segment backward calibrates it against ``flash``.
* ``upcast`` -- ``flash`` in fp32: right where the CPU has no bf16 / fp16 arithmetic (AVX2-only
  laptops), whose half-precision GEMMs are emulated (fp16 ran 2-6x slower than fp32). There the
  bf16 forward calibrates it against ATen's own bf16 kernel, which widens tiles as it goes.

``DECISION_TABLE`` maps (dtype, shape class, CPU class) to the candidates of each direction.
One candidate: the hardware settles it. Several: the first call of that kind times each
candidate on its own inputs (a warm-up and two alternating runs each, best kept) and caches the
winner per (dtype, shape class, memory-size bucket, direction, thread count);
``DSMR_CPU_CALIBRATE=0`` turns that off (the first candidate is then used). ``DSMR_CPU_PATH`` (or ``torch_forward(path=...)``) overrides everything, for
benchmarks: ``flash``, ``tiled``, ``upcast`` or ``fwd=tiled,bwd=flash``.
"""
from __future__ import annotations

import functools
import os
import platform
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch

ENV_PATH = "DSMR_CPU_PATH"
ENV_CALIBRATE = "DSMR_CPU_CALIBRATE"
CPU_PATHS = ("flash", "tiled", "upcast")

#: Queries per call up to which a call is "decode" (token-by-token generation, short prompts):
#: the tiled path's ~20 host-side ops per tile would cost more than the attention itself.
DECODE_MAX_QUERIES = 16


# --------------------------------------------------------------------------------------------
# What this CPU accelerates
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's vector / matrix extensions that decide the paths."""

    capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): ATen's vector ISA
    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False
    amx_fp16: bool = False
    arm_bf16: bool = False  # aarch64 BF16 (BFMMLA) instructions

    @property
    def cpu_class(self) -> str:
        """``"amx"``, ``"bf16"`` (bf16 vector dot products, no AMX) or ``"no_bf16"``."""
        if self.amx_bf16:
            return "amx"
        return "bf16" if self.avx512_bf16 or self.arm_bf16 else "no_bf16"

    @property
    def flags(self) -> str:
        names = ["avx2", "avx512", "avx512_bf16", "amx_bf16", "amx_fp16", "arm_bf16"]
        return ", ".join(n for n in names if getattr(self, n)) or "none of avx2/avx512/amx"


def _cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_says(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001 - a probe that fails means "not known to be there"
        return False


#: oneDNN's ISA names (``ONEDNN_MAX_CPU_ISA``) by rank; aliases share one. bf16 GEMMs, in ATen's
#: flash kernel and in ``torch.matmul`` alike, go through oneDNN, so its cap decides what they run on.
ONEDNN_ISA_RANK = {
    "SSE41": 0, "AVX": 1, "AVX2": 2, "AVX2_VNNI": 3, "AVX2_VNNI_2": 4, "AVX512_CORE": 5, "AVX512_CORE_VNNI": 6,
    "AVX512_CORE_BF16": 7, "AVX512_CORE_FP16": 8, "AVX10_1_512": 8, "AVX512_CORE_AMX": 9, "AVX10_1_512_AMX": 9,
    "AVX512_CORE_AMX_FP16": 10, "AVX10_1_512_AMX_FP16": 10, "AVX10_2_512": 11, "AVX10_2_512_AMX_2": 12, "ALL": 99,
}
ENV_CLASS = "DSMR_CPU_CLASS"
CPU_CLASSES = ("amx", "bf16", "no_bf16")


def onednn_isa_cap() -> Optional[str]:
    """``$ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``) upper-cased, None if unset."""
    text = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return text or None


#: ``MKL_ENABLE_INSTRUCTIONS`` values that leave MKL no bf16 GEMM: ATen's flash kernel multiplies
#: bf16 blocks through MKL, which ignores oneDNN's cap (AVX2 emulation needs both caps).
MKL_NO_BF16 = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_E1", "AVX512_E2")


def mkl_cap() -> Optional[str]:
    """``$MKL_ENABLE_INSTRUCTIONS`` upper-cased, None if unset."""
    text = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper()
    return text or None


def isa_allows(cap: Optional[str], isa: str) -> bool:
    """Whether a oneDNN cap admits ``isa``; no cap, or a name oneDNN would ignore, admits all."""
    if cap is None or cap not in ONEDNN_ISA_RANK or cap == "ALL":
        return True
    if "AMX" in isa and "AMX" not in cap:  # AVX10_2_512 ranks above the AMX levels but has no AMX
        return False
    return ONEDNN_ISA_RANK[cap] >= ONEDNN_ISA_RANK[isa]


def _probe_features() -> CpuFeatures:
    """This machine's features: /proc/cpuinfo flags (or torch's cpuinfo probes elsewhere), narrowed
    to what the process may use: ``ATEN_CPU_CAPABILITY`` (ATen's vector ISA),
    ``ONEDNN_MAX_CPU_ISA`` (oneDNN's GEMMs) and ``MKL_ENABLE_INSTRUCTIONS`` (MKL's, which ATen's
    flash kernel uses for bf16 blocks) emulate a smaller CPU with the real kernels."""
    flags = _cpuinfo_flags()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    capability = torch.backends.cpu.get_cpu_capability()
    cap = onednn_isa_cap()
    avx512_hw = "avx512f" in flags or _torch_says("_is_avx512_supported")
    feats = CpuFeatures(
        capability=capability,
        avx2=("avx2" in flags or _torch_says("_is_avx2_supported")) and capability != "DEFAULT",
        avx512=avx512_hw and capability.startswith("AVX512") and isa_allows(cap, "AVX512_CORE"),
        avx512_bf16=("avx512_bf16" in flags or _torch_says("_is_avx512_bf16_supported"))
        and isa_allows(cap, "AVX512_CORE_BF16") and mkl_cap() not in MKL_NO_BF16,
        amx_bf16=("amx_bf16" in flags or _torch_says("_is_amx_tile_supported")) and isa_allows(cap, "AVX512_CORE_AMX")
        and mkl_cap() not in MKL_NO_BF16,
        amx_fp16=("amx_fp16" in flags or _torch_says("_is_amx_fp16_supported"))
        and isa_allows(cap, "AVX512_CORE_AMX_FP16"),
        arm_bf16=arm and "bf16" in flags,
    )
    return feats


@functools.lru_cache(maxsize=1)
def detect_features() -> CpuFeatures:
    """:func:`_probe_features`, the paths following what the caps leave; ``$DSMR_CPU_CLASS`` then
    sets the matrix-unit flags of the class it names, so that class's row of the table is taken
    (read once per process)."""
    feats = _probe_features()
    forced = forced_class()
    if forced is None:
        return feats
    bf16 = forced != "no_bf16"
    return replace(feats, amx_bf16=forced == "amx", amx_fp16=forced == "amx" and feats.amx_fp16,
                   avx512_bf16=bf16 and not feats.arm_bf16, arm_bf16=bf16 and feats.arm_bf16)


def forced_class() -> Optional[str]:
    """``$DSMR_CPU_CLASS`` (``amx``, ``bf16`` or ``no_bf16``): take that row of the decision table
    whatever this CPU is (tests and benchmarks of another CPU class's choices), None if unset."""
    text = os.environ.get(ENV_CLASS, "").strip().lower()
    if text in ("", "auto"):
        return None
    if text not in CPU_CLASSES:
        raise ValueError(f"{ENV_CLASS}={text!r}: use one of {CPU_CLASSES} (or unset it)")
    return text


# --------------------------------------------------------------------------------------------
# The decision table
# --------------------------------------------------------------------------------------------
Candidates = Tuple[str, ...]

#: (dtype, shape class, CPU class) -> (forward candidates, backward candidates); "*" matches any.
#: fp32 forwards take ``flash`` (ATen's fp32 kernel reached 60-66% of the fp32 matmul ceiling);
#: the fp32 segment backward calibrates ``tiled`` against it: on the AMD EPYC its few large fp32
#: GEMMs beat ATen's flash backward by 11-18% at S = 512, H = 8, M = 0-4096 (same golden
#: tolerances). ``flash`` stays first, i.e. what runs with calibration off: ``tiled`` has not
#: been timed in fp32 on other CPUs. Without bf16 arithmetic (AVX2) ATen's bf16 flash forward,
#: which widens each tile as it goes, beat converting everything first (``upcast``): 3.7 vs 6.4
#: ms at S = 512, M = 0 under AVX2 emulation, 23 vs 31 ms at M = 1024 on an AMD Zen 3; so the
#: forward calibrates the two. Its bf16 backward is 4-8x slower than ``upcast``'s fp32 one (110
#: vs 13 ms; 405 vs 98 ms), so the backward is ``upcast``. fp64 takes ``flash`` everywhere (the tiled buffers are
#: fp32). fp16: AMX-FP16 is the only CPU feature that makes fp16 GEMMs fast ("amx_fp16" below is
#: looked up in place of the CPU class for fp16).
DECISION_TABLE: Dict[Tuple[str, str, str], Tuple[Candidates, Candidates]] = {
    # dtype    shape      CPU class       forward                      backward
    ("bf16", "segment", "amx"): (("flash", "upcast"), ("flash", "tiled", "upcast")),
    ("bf16", "segment", "bf16"): (("tiled",), ("tiled",)),
    ("bf16", "segment", "no_bf16"): (("flash", "upcast"), ("upcast",)),
    ("bf16", "decode", "amx"): (("flash",), ("flash",)),
    ("bf16", "decode", "bf16"): (("flash",), ("flash",)),
    ("bf16", "decode", "no_bf16"): (("upcast",), ("upcast",)),
    ("fp16", "*", "amx_fp16"): (("flash",), ("flash",)),
    ("fp16", "*", "no_fp16"): (("upcast",), ("upcast",)),
    ("fp32", "segment", "*"): (("flash",), ("flash", "tiled")),
    ("fp32", "decode", "*"): (("flash",), ("flash",)),
    ("fp64", "*", "*"): (("flash",), ("flash",)),
}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def shape_class(S: int) -> str:
    """``"decode"`` for calls of at most :data:`DECODE_MAX_QUERIES` queries, else ``"segment"``."""
    return "decode" if S <= DECODE_MAX_QUERIES else "segment"


def decide(dtype: torch.dtype, shape: str, features: CpuFeatures) -> Tuple[Candidates, Candidates]:
    """The table's ``(forward candidates, backward candidates)`` for one kind of call."""
    name = _DTYPE_NAMES[dtype]
    cls = ("amx_fp16" if features.amx_fp16 else "no_fp16") if name == "fp16" else features.cpu_class
    for key in ((name, shape, cls), (name, shape, "*"), (name, "*", cls), (name, "*", "*")):
        if key in DECISION_TABLE:
            return DECISION_TABLE[key]
    raise KeyError(f"no CPU path for {name} {shape} on a {cls} CPU")


def parse_override(text: Optional[str]) -> Optional[Tuple[str, str]]:
    """``"tiled"`` -> ("tiled", "tiled"); ``"fwd=tiled,bwd=flash"`` -> ("tiled", "flash"); ""/"auto" -> None."""
    text = (text or "").strip().lower()
    if text in ("", "auto"):
        return None
    parts = dict(p.split("=", 1) if "=" in p else ("both", p) for p in text.replace(" ", "").split(","))
    fwd = parts.get("fwd", parts.get("both"))
    bwd = parts.get("bwd", parts.get("both", fwd))
    fwd = fwd or bwd
    if fwd not in CPU_PATHS or bwd not in CPU_PATHS or set(parts) - {"fwd", "bwd", "both"}:
        raise ValueError(f"{ENV_PATH}={text!r}: use one of {CPU_PATHS}, or fwd=PATH,bwd=PATH with those paths")
    return fwd, bwd


def choose(dtype: torch.dtype, S: int, features: Optional[CpuFeatures] = None,
           override: Optional[str] = None) -> Tuple[Candidates, Candidates]:
    """Candidates per direction for a CPU call in ``dtype`` with ``S`` queries.

    ``override`` (else ``$DSMR_CPU_PATH``) wins for every dtype but fp64, which always takes
    ``flash`` (the tiled path's buffers are fp32). For fp32 ``upcast`` is plain ``flash``.
    """
    if dtype == torch.float64:
        return ("flash",), ("flash",)
    forced = parse_override(override if override is not None else os.environ.get(ENV_PATH))
    if forced is not None:
        return (forced[0],), (forced[1],)
    return decide(dtype, shape_class(S), features or detect_features())


# --------------------------------------------------------------------------------------------
# Calibration: first use of an unsettled kind of call
# --------------------------------------------------------------------------------------------
_CALIBRATED: Dict[tuple, str] = {}
_LOCK = threading.Lock()
_clock: Callable[[], float] = time.perf_counter


def calibration_enabled() -> bool:
    return os.environ.get(ENV_CALIBRATE, "1").strip().lower() not in ("0", "false", "no", "off")


#: Timed runs per candidate after its warm-up run, alternating between candidates.
CALIBRATION_RUNS = 2


def calibrate(key: tuple, candidates: Candidates, run: Callable[[str], object]):
    """``(choice, result)``: the cached choice for ``key`` (result None), else time each candidate.

    ``run(candidate)`` does the real work of the call. Each candidate runs once to pay its
    one-time costs, then :data:`CALIBRATION_RUNS` more times, alternating between candidates so
    that a burst of load hits them alike; the fastest run counts. The winner's last result is
    returned, so the calibrating call's work is not wasted. With one candidate or calibration
    off, the first candidate is returned without running anything.
    """
    if len(candidates) == 1 or not calibration_enabled():
        return candidates[0], None
    with _LOCK:
        # A choice restored from a checkpoint written on another CPU may not be a candidate here.
        if _CALIBRATED.get(key) in candidates:
            return _CALIBRATED[key], None
    times, results = {name: float("inf") for name in candidates}, {}
    for name in candidates:
        results[name] = run(name)
    for _ in range(CALIBRATION_RUNS):
        for name in candidates:
            t0 = _clock()
            results[name] = run(name)
            times[name] = min(times[name], _clock() - t0)
    choice = min(candidates, key=lambda n: times[n])
    with _LOCK:
        _CALIBRATED[key] = choice
    return choice, results[choice]


def memory_bucket(M: int) -> str:
    """Memory sizes calibrated apart: which path wins moves with M (fp32 backward, AVX2
    emulation: ATen's flash at M = 0, the tiled backward by 11% at M = 4096)."""
    if M <= 0:
        return "m0"
    return "m<=1k" if M <= 1024 else ("m<=4k" if M <= 4096 else "m>4k")


def calibration_key(direction: str, dtype: torch.dtype, S: int, M: int = 0) -> tuple:
    """``(direction, dtype, shape class/memory bucket, threads)``: one calibrated choice each."""
    return (direction, _DTYPE_NAMES[dtype], f"{shape_class(S)}/{memory_bucket(M)}", torch.get_num_threads())


def clear_calibration() -> None:
    """Forget every calibrated choice (the next call of each kind calibrates again)."""
    with _LOCK:
        _CALIBRATED.clear()


def calibration_state() -> list:
    """Every calibrated choice as ``[[direction, dtype, shape class, threads, path], ...]``.

    Plain lists, so a training checkpoint can carry them: timings differ from process to
    process, and a resumed run that re-calibrated could take another path and round differently
    from the run it continues."""
    with _LOCK:
        return [[*key, path] for key, path in sorted(_CALIBRATED.items())]


def load_calibration(state: list) -> None:
    """Adopt choices saved by :func:`calibration_state` (entries naming unknown paths are skipped;
    a choice that is not a candidate of this CPU's table is ignored when the call comes)."""
    with _LOCK:
        for *key, path in state or []:
            if path in CPU_PATHS and len(key) == 4:
                _CALIBRATED[(str(key[0]), str(key[1]), str(key[2]), int(key[3]))] = path


def describe_cpu(features: Optional[CpuFeatures] = None) -> Dict[str, str]:
    """The CPU's features and the path of every kind of call, for bench table headers.

    Example: ``{"cpu features": "avx2, avx512, avx512_bf16", "ATen capability": "AVX512",
    "bf16 segment": "fwd tiled, bwd tiled", ...}``.
    """
    feats = features or detect_features()
    forced = forced_class() if features is None else None
    info = {"cpu features": feats.flags, "ATen capability": feats.capability,
            "cpu class": feats.cpu_class if forced is None else f"{forced} (forced by {ENV_CLASS}; CPU: {_probe_features().cpu_class})"}
    if onednn_isa_cap():
        info["oneDNN ISA cap"] = onednn_isa_cap()
    if mkl_cap():
        info["MKL instructions cap"] = mkl_cap()
    override = os.environ.get(ENV_PATH)
    if parse_override(override) is not None:
        info["override"] = f"{ENV_PATH}={override}"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for S, shape in ((DECODE_MAX_QUERIES + 1, "segment"), (1, "decode")):
            fwd, bwd = choose(dtype, S, features)
            text = []
            for direction, cands in (("fwd", fwd), ("bwd", bwd)):
                if len(cands) > 1:
                    prefix = calibration_key(direction, dtype, S)[:2]
                    got = [(k[2].split("/", 1)[1], p) for k, p in sorted(_CALIBRATED.items())
                           if k[:2] == prefix and k[2].startswith(shape + "/") and k[3] == torch.get_num_threads()]
                    if got:
                        pick = ", ".join(f"{p} at {b}" for b, p in got)
                    else:
                        pick = "calibrated on first use" if calibration_enabled() else cands[0]
                    text.append(f"{direction} {pick} (of {'/'.join(cands)})")
                else:
                    text.append(f"{direction} {cands[0]}")
            info[f"{_DTYPE_NAMES[dtype]} {shape}"] = ", ".join(text)
    return info
