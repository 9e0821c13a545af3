"""Shared plumbing for the benchmarks: machine description, timing, peak memory, worker processes,
and the markdown / CSV writers.

Nothing here knows about a particular table; ``bench/op.py``, ``bench/model_level.py``,
``bench/peer.py`` and ``bench/generation.py`` build their tables from these pieces.
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import io
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from dsmr.metrics import pyplot as plt_agg  # noqa: F401 - the sections' plots import it from here

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
RESULT_PREFIX = "RESULT "  # a worker's last stdout line: RESULT {json}


# ----------------------------------------------------------------------------------------------
# Machine description


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_matmul_features() -> str:
    """The CPU flags that decide how fast bf16 matmuls can be (AMX tiles, AVX-512 BF16, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    present = [f for f in wanted if f in flags]
    if "amx_tile" not in flags:
        present.append("no AMX")
    return ", ".join(present)


def cpu_class_line() -> str:
    """The CPU class the op's paths follow, and whether it is emulated (``ATEN_CPU_CAPABILITY``,
    ``ONEDNN_MAX_CPU_ISA``, ``DSMR_CPU_CLASS``): every table says which class its rows ran as."""
    from dsmr_kernels.cpu_dispatch import ENV_CLASS, detect_features, onednn_isa_cap

    feats = detect_features()
    caps = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", ENV_CLASS)
            if os.environ.get(k)]
    text = f"{feats.cpu_class} (ATen vector ISA {feats.capability}"
    text += f", oneDNN cap {onednn_isa_cap()})" if onednn_isa_cap() else ")"
    return text + (f"; emulated on a larger CPU with {' '.join(caps)}" if caps else "")


def model_precision() -> str:
    """Precision of the model-level rows: ``"bf16"`` (autocast) where the CPU has bf16 arithmetic,
    ``"fp32"`` where bf16 would be emulated (AVX2 class: emulated bf16 GEMMs made one training
    step take minutes, and no user would train that way there)."""
    from dsmr_kernels.cpu_dispatch import detect_features

    return "fp32" if detect_features().cpu_class == "no_bf16" else "bf16"


def precision_text(precision: str) -> str:
    """How a table names its rows' precision."""
    if precision == "bf16":
        return "bf16 autocast"
    return "fp32 (no bf16 arithmetic on this CPU class, so no bf16 autocast)"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """Short HEAD commit, flagged when the measured code (dsmr/, dsmr_kernels/) has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dsmr", "dsmr_kernels"],
            cwd=REPO, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + (" + uncommitted changes in dsmr/ or dsmr_kernels/" if dirty else "")


def machine_info(threads: int) -> Dict[str, str]:
    """Everything a reader needs to judge the numbers: CPU, threads, versions, date, load."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cpu features": cpu_matmul_features(),
        "cpu class (dsmr's decision table)": cpu_class_line(),
        "logical CPUs": str(os.cpu_count()),
        "torch threads": str(threads),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "x-transformers": _version("x-transformers"),
        "dsmr commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # Other processes on the same cores distort timings; the load average says whether they did.
        "load average at start (1/5/15 min)": "/".join(f"{x:.2f}" for x in load),
    }


def machine_markdown(info: Dict[str, str]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in info.items())


# ----------------------------------------------------------------------------------------------
# Threads and timing


def set_threads(threads: int) -> None:
    """Pin torch's intra-op pool; called first thing in every measuring process."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def time_interleaved(
    fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 2, max_seconds: float = 60.0
) -> Dict[str, float]:
    """Median wall time (s) of each callable, timed round-robin.

    Round-robin (a, b, a, b, ...) instead of (a, a, ..., b, b, ...) so that a burst of load from
    another process hits every candidate alike and the *ratios* stay fair. The order is shuffled
    every repetition (seeded): in a fixed order the call after a large one (the reference's score
    matrices) always ran on cold caches and freshly faulted pages, which cost the op 0.3 ms
    (18%) at M = 0 on the Xeon; shuffled, such a neighbour hits a row now and then, and the
    median drops it. ``max_seconds`` stops adding repetitions once spent (at least 3
    are always taken).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    items = list(fns.items())
    order = random.Random(0)
    start = time.perf_counter()
    for r in range(reps):
        order.shuffle(items)
        for name, fn in items:
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return {k: statistics.median(v) for k, v in samples.items()}


# ----------------------------------------------------------------------------------------------
# Peak memory


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_high_water_mark() -> int:
    """Peak RSS in bytes: VmHWM if readable (resettable), else ``ru_maxrss`` (lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def trimmed_rss() -> Optional[int]:
    """RSS after ``gc.collect()`` and glibc's ``malloc_trim(0)`` (None where there is no glibc).

    The difference to the plain RSS is memory the C allocator holds on to after tensors were
    freed (fragmentation), not live data.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return current_rss()


class PeakMemory:
    """Peak memory a workload adds on top of this process's state right before it.

    CPU: peak RSS minus the RSS taken at ``start()`` (called right before the model is built,
    after torch and the data are loaded). The kernel's high-water mark is reset at ``start()`` so
    import-time spikes cannot leak in; where that is impossible ``ru_maxrss`` is used instead.
    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (allocator view, not RSS).
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.baseline = 0
        self.method = ""

    def start(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated - allocated before building the model"
        else:
            reset = _reset_rss_high_water_mark()
            self.baseline = current_rss()
            self.method = (
                "peak RSS (VmHWM, reset before building the model) - RSS before building the model"
                if reset
                else "peak RSS (ru_maxrss) - RSS before building the model"
            )

    def peak_bytes(self) -> int:
        """Peak added bytes since ``start()``."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return max(0, _rss_high_water_mark() - self.baseline)


# ----------------------------------------------------------------------------------------------
# Worker processes


@dataclass
class WorkerResult:
    ok: bool
    data: dict = field(default_factory=dict)
    error: str = ""
    wall_s: float = 0.0


def run_worker(module: str, config: dict, threads: int, timeout_s: float) -> WorkerResult:
    """Run ``python -m <module> --worker '<json>'`` in a fresh process and parse its result.

    A fresh process per configuration is what makes peak memory honest: no allocator cache, no
    tensors or oneDNN primitives left over from the previous configuration.
    """
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(config), "--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return WorkerResult(False, error=f"timed out after {timeout_s:.0f} s", wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return WorkerResult(True, json.loads(line[len(RESULT_PREFIX):]), wall_s=wall)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return WorkerResult(False, error=f"exit {proc.returncode}: " + " | ".join(tail), wall_s=wall)


def merge_rounds(rounds: List[WorkerResult]) -> WorkerResult:
    """Fold repeated runs of one configuration into one result, keeping the fastest times.

    Minimum-of-N is the usual defence against interference (``timeit`` reports the minimum too): on
    a shared machine other processes can only slow a run down, never speed it up. Streaming runs
    repeat exactly the same work segment by segment, so the minimum is taken per segment and
    tokens/s recomputed from the sum of those minima; a burst of load in one round then costs only
    the segments it hit. Peak memory is the largest of the rounds; every round's own tokens/s is
    kept to show the spread.
    """
    ok = [r for r in rounds if r.ok]
    if not ok:
        return rounds[-1]
    best = max(ok, key=lambda r: r.data.get("tokens_per_s", 0.0))
    data = dict(best.data)
    data["rounds_tokens_per_s"] = [r.data.get("tokens_per_s") for r in ok]
    seg = [r.data.get("segment_times") for r in ok]
    if len(ok) > 1 and all(seg) and len({len(t) for t in seg}) == 1:
        data["segment_times"] = [min(ts) for ts in zip(*seg)]
        data["tokens_per_s"] = data["n_tokens"] / sum(data["segment_times"])
    if all("peak_bytes" in r.data for r in ok):
        data["peak_bytes"] = max(r.data["peak_bytes"] for r in ok)
    data["load_1min_end"] = max(r.data.get("load_1min_end", 0.0) for r in ok)
    return WorkerResult(True, data, wall_s=sum(r.wall_s for r in rounds))


def spread(data: dict) -> str:
    """'min–max' of the rounds' tokens/s, or '' for a single round."""
    vals = data.get("rounds_tokens_per_s") or []
    return f"{fmt(min(vals))}–{fmt(max(vals))}" if len(vals) > 1 else ""


def worker_main(measure: Callable[[dict], dict], argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of a worker module: ``--worker JSON --threads N`` -> prints ``RESULT {json}``."""
    import argparse

    p = argparse.ArgumentParser(description="benchmark worker (one configuration per process)")
    p.add_argument("--worker", required=True, help="JSON configuration")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    set_threads(args.threads)
    result = measure(json.loads(args.worker))
    # Other processes on the same cores distort timings; record how busy the machine was.
    result["load_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# Tables


@dataclass
class Table:
    """One results table: rows of dicts with a fixed column order, rendered to markdown and CSV."""

    columns: List[str]
    rows: List[Dict[str, object]] = field(default_factory=list)

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        sep = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(fmt(r.get(c, "")) for c in self.columns) + " |" for r in self.rows]
        return "\n".join([head, sep, *body])

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: r.get(c, "") for c in self.columns})
        return buf.getvalue()


def fmt(x) -> str:
    """Compact cell text: 3 significant digits for floats, '—' for missing."""
    if x is None or x == "":
        return "—"
    if isinstance(x, float):
        if x != x:  # NaN
            return "—"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    return str(x)


def mib(nbytes: Optional[float]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


@dataclass
class Section:
    """What one benchmark section hands back to ``run.py``."""

    name: str  # file stem under results/: op, schedules, peer, generation
    title: str
    markdown: str  # body (tables, notes, findings); the machine block is added by run.py
    csv: str
    plots: List[str] = field(default_factory=list)  # file names written under results/
    console: str = ""  # what to print (defaults to the markdown)


def write_section(section: Section, out_dir: Path, machine_md: str) -> Path:
    """Write ``<name>.md`` (machine block + body) and ``<name>.csv``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = f"# {section.title}\n\n## Machine\n\n{machine_md}\n\n{section.markdown.strip()}\n"
    for plot in section.plots:
        md += f"\n![{plot}]({plot})\n"
    path = out_dir / f"{section.name}.md"
    path.write_text(md)
    (out_dir / f"{section.name}.csv").write_text(section.csv)
    return path
