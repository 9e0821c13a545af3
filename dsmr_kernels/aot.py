"""Ahead-of-time compile gate: build every Triton kernel for real GPUs, on a machine without one.

``python -m dsmr_kernels.aot [--arch 80,90] [--quick] [--out DIR] [--jobs N]``

Triton's wheel ships ``ptxas`` and ``cuobjdump``, so each kernel can be compiled to a cubin for
sm_80 / sm_90 here, and its registers, spill stack and shared memory read back from the cubin.
For every kernel (forward, backward preprocess, dK/dV, dQ, decode and its combine), dtype (fp32,
fp16, bf16), head dim (16, 32, 64, 128) and GQA group (1, which Triton's JIT specializes as a
constant, and > 1), this compiles every config the autotuner may pick on that arch -- exactly the
configs the kernel's own prune rule keeps (``triton_common.make_prune``) -- and writes
``DIR/aot.csv`` (``arch,kernel,dtype,head_dim,config,registers,spill_bytes,shared_bytes,status``)
and ``DIR/aot.md``. ``status`` is ``ok`` or why not. The exit code is non-zero when a pickable
config fails to compile, needs more shared memory than the arch has (or than the prune rule
estimated, which would let it through on a GPU), or spills in fp16/bf16 at head dim <= 128.
fp32 spills are reported (``ok, spills``) but do not fail: fp32 asks for IEEE dots, which
run on CUDA cores and cannot hold 16-bit-sized tiles in registers at every head dim.

``--quick`` compiles a representative subset in a minute or two (sm_90, GQA group > 1, bf16 at
head dims 64 and 128 and fp32 at 128; per kernel the config with the most shared memory and the
one with the largest tile per warp); CI runs it.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

DTYPES = ("fp32", "fp16", "bf16")
ELT = {"fp32": 4, "fp16": 2, "bf16": 2}
HEAD_DIMS = (16, 32, 64, 128)
ARCHS = (80, 90)
# Upper-case kernel arguments that are sizes, not pointers.
INT_ARGS = {"H", "S", "M", "G", "Hkv", "S_BUCKET", "M_BUCKET", "SPLIT_LEN", "N_ROWS", "SPLIT_BUCKET", "N_SPLITS"}
COLUMNS = ["arch", "kernel", "dtype", "head_dim", "config", "registers", "spill_bytes", "shared_bytes", "status"]


@dataclass
class KernelSpec:
    """How to compile one ``@triton.jit`` kernel the way its launcher calls it."""

    name: str
    fn_path: str  # "module:attr" inside dsmr_kernels
    configs: Callable[[int, int, int], list]  # (head_dim, elt, smem_limit) -> pickable triton.Configs
    smem_estimate: Optional[Callable] = None  # (cfg, head_dim, elt) -> bytes; None: no prune rule
    pointer_types: Dict[str, str] = field(default_factory=dict)  # arg -> "*fp32" etc; default "*{dtype}"
    float_args: tuple = ("sm_scale",)
    grouped: bool = True  # takes the GQA group G as a runtime int
    extra_constexprs: Callable[[str], dict] = lambda dtype: {}


def _specs() -> List[KernelSpec]:
    from . import triton_bwd, triton_decode, triton_fwd

    lse = {"Lse2": "*fp32", "Delta": "*fp32", "MemLen": "*i32"}
    mma_flags = lambda dtype: {"UPCAST": False, "FP32_IEEE": dtype == "fp32"}  # noqa: E731
    return [
        KernelSpec("fwd", "triton_fwd:_attn_fwd", triton_fwd.fwd_configs, triton_fwd.fwd_smem,
                   lse, extra_constexprs=mma_flags),
        KernelSpec("bwd_preprocess", "triton_bwd:_attn_bwd_preprocess", triton_bwd.preprocess_configs,
                   None, lse, float_args=(), grouped=False),
        KernelSpec("bwd_dkdv", "triton_bwd:_attn_bwd_dkdv", triton_bwd.dkdv_configs, triton_bwd.dkdv_smem,
                   lse, extra_constexprs=mma_flags),
        KernelSpec("bwd_dq", "triton_bwd:_attn_bwd_dq", triton_bwd.dq_configs, triton_bwd.dq_smem,
                   lse, extra_constexprs=mma_flags),
        *(KernelSpec(f"decode_r{r}", "triton_decode:_decode_split", triton_decode.decode_configs(r),
                     lambda cfg, d, elt, r=r: triton_decode.decode_smem_bytes(cfg, d, elt, r),
                     {**lse, "PartO": "*fp32", "PartLse": "*fp32"},
                     extra_constexprs=lambda dtype, r=r: {**mma_flags(dtype), "BLOCK_R": r})
          for r in (triton_decode.MIN_ROWS, triton_decode.MAX_ROWS)),
        KernelSpec("decode_combine", "triton_decode:_decode_combine", triton_decode.combine_configs, None,
                   {**lse, "PartO": "*fp32", "PartLse": "*fp32"}, float_args=(), grouped=False),
    ]


def _resolve(path: str):
    import importlib

    mod, attr = path.split(":")
    return getattr(importlib.import_module(f"dsmr_kernels.{mod}"), attr)


def _config_label(cfg) -> str:
    blocks = "x".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}"


@dataclass
class Job:
    arch: int
    spec_name: str
    dtype: str
    head_dim: int
    group: int  # 1 or 2 (any G > 1 compiles the same code)
    cfg_kwargs: dict
    num_warps: int
    num_stages: int
    label: str
    estimate: Optional[int]


def _signature(fn, spec: KernelSpec, dtype: str, constexprs: dict):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper() and name not in INT_ARGS:
            sig[name] = spec.pointer_types.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in spec.float_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):  # row/head/batch strides of contiguous tensors: D multiples
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _cuobjdump() -> Optional[str]:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else shutil.which("cuobjdump")


def ptxas_available() -> bool:
    """True when Triton's wheel (or the PATH) has ptxas and cuobjdump, so the gate can run."""
    try:
        import triton
    except ImportError:
        return False
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return (ptxas.exists() or shutil.which("ptxas") is not None) and _cuobjdump() is not None


def _compile(job: Job) -> dict:
    """Compile one job in this (worker) process; returns one CSV row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = {s.name: s for s in _specs()}[job.spec_name]
    fn = _resolve(spec.fn_path)
    constexprs = {"HEAD_DIM": job.head_dim, **spec.extra_constexprs(job.dtype), **job.cfg_kwargs}
    for name in fn.arg_names:  # the JIT specializes ints equal to 1 as constants
        if name.startswith("stride_") and name.endswith("d"):
            constexprs[name] = 1
    if spec.grouped and job.group == 1:
        constexprs["G"] = 1
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig, attrs = _signature(fn, spec, job.dtype, constexprs)
    row = dict(arch=job.arch, kernel=spec.name + ("" if not spec.grouped else f"_g{'1' if job.group == 1 else 'n'}"),
               dtype=job.dtype, head_dim=job.head_dim, config=job.label,
               registers="", spill_bytes="", shared_bytes="", status="")
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", job.arch, 32),
                                  options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as e:  # noqa: BLE001 -- any compiler error is this config's status
        msg = str(e).strip().splitlines()
        row["status"] = "compile error: " + (msg[-1] if msg else type(e).__name__)[:160]
        return row
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split(":", 1) for line in dump.splitlines() if "REG:" in line for tok in line.split())
    shared = int(compiled.metadata.shared) + int(fields.get("SHARED", 0))
    row.update(registers=int(fields["REG"]), spill_bytes=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
               shared_bytes=shared)
    row["status"] = _status(row, job)
    return row


def _status(row: dict, job: Job) -> str:
    from .triton_common import SMEM_LIMIT

    limit = SMEM_LIMIT[job.arch]
    problems = []
    if row["shared_bytes"] > limit:
        problems.append(f"shared {row['shared_bytes']} > {limit}")
    if job.estimate is not None and row["shared_bytes"] > job.estimate:
        problems.append(f"shared {row['shared_bytes']} above the prune estimate {job.estimate}")
    if row["spill_bytes"] > 0 and job.dtype != "fp32":
        problems.append(f"spills {row['spill_bytes']} B")
    if problems:
        return "; ".join(problems)
    return "ok, spills" if row["spill_bytes"] > 0 else "ok"


def _extremes(configs: list, spec: KernelSpec, head_dim: int, elt: int) -> list:
    """The two configs most likely to fail: the most shared memory and the largest tile per warp."""
    if len(configs) <= 2:
        return configs
    smem = max(configs, key=lambda c: spec.smem_estimate(c, head_dim, elt) if spec.smem_estimate else 0)
    tile = max(configs, key=lambda c: _tile_elems(c) / c.num_warps)
    return [smem] if tile is smem else [smem, tile]


def _tile_elems(cfg) -> int:
    n = 1
    for k, v in cfg.kwargs.items():
        if k.startswith("BLOCK"):
            n *= v
    return n


def plan(archs, dtypes, head_dims, groups=(1, 2), kernels=None, extremes_only=False) -> List[Job]:
    """Every (arch, kernel, dtype, head dim, group, pickable config) to compile.

    ``extremes_only`` keeps, per kernel/dtype/head dim, only the config with the most shared
    memory and the one with the largest tile per warp (the ``--quick`` subset).
    """
    from .triton_common import SMEM_LIMIT

    jobs = []
    for arch in archs:
        for spec in _specs():
            if kernels and spec.name not in kernels:
                continue
            for dtype in dtypes:
                for d in head_dims:
                    configs = spec.configs(d, ELT[dtype], SMEM_LIMIT[arch])
                    if extremes_only:
                        configs = _extremes(configs, spec, d, ELT[dtype])
                    for cfg in configs:
                        est = spec.smem_estimate(cfg, d, ELT[dtype]) if spec.smem_estimate else None
                        for g in (groups if spec.grouped else (1,)):
                            jobs.append(Job(arch, spec.name, dtype, d, g, dict(cfg.kwargs), cfg.num_warps,
                                            cfg.num_stages, _config_label(cfg), est))
    return jobs


def _write(rows: List[dict], out: Path, elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["dtype"], r["head_dim"], r["config"]))
    with open(out / "aot.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if not str(r["status"]).startswith("ok")]
    import triton

    lines = [
        "# Ahead-of-time compile of the Triton kernels",
        "",
        f"Triton {triton.__version__}; {len(rows)} compiles in {elapsed:.0f} s; "
        f"{len(bad)} failing. Every config the autotuner may pick on each arch (after the prune rule). "
        "`registers` per thread, `spill_bytes` = stack + local, `shared_bytes` = dynamic + static per block.",
        "",
        "Worst case per kernel, dtype and head dim (max registers / spill / shared over configs and both GQA groups):",
        "",
        "| arch | kernel | dtype | D | configs | max registers | max spill B | max shared B | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["kernel"].rsplit("_g", 1)[0], r["dtype"], r["head_dim"]), []).append(r)
    for (arch, kernel, dtype, d), rs in groups.items():
        nums = [r for r in rs if r["registers"] != ""]
        status = "ok" if all(str(r["status"]).startswith("ok") for r in rs) else "FAIL"
        if status == "ok" and any(r["status"] == "ok, spills" for r in rs):
            status = "ok (fp32 spills)"
        lines.append(
            f"| sm_{arch} | {kernel} | {dtype} | {d} | {len(rs)} | "
            f"{max((r['registers'] for r in nums), default='-')} | {max((r['spill_bytes'] for r in nums), default='-')} | "
            f"{max((r['shared_bytes'] for r in nums), default='-')} | {status} |"
        )
    if bad:
        lines += ["", "Failing rows:", ""] + [f"- {r['arch']} {r['kernel']} {r['dtype']} D={r['head_dim']} "
                                             f"{r['config']}: {r['status']}" for r in bad]
    (out / "aot.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsmr_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--quick", action="store_true", help="a representative subset: sm_90, bf16 D 64/128 + fp32 D 128, the extreme configs")
    parser.add_argument("--out", default="aot-out", help="output folder for aot.csv and aot.md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable), e.g. fwd, bwd_dq")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="only this dtype (repeatable)")
    parser.add_argument("--head-dim", action="append", type=int, choices=HEAD_DIMS, help="only this head dim")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch must be comma-separated integers such as 80,90, got {args.arch!r}")
    from .triton_common import SMEM_LIMIT

    unknown = [a for a in archs if a not in SMEM_LIMIT]
    if unknown:
        parser.error(f"--arch {unknown}: known compute capabilities are {sorted(SMEM_LIMIT)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # @triton.jit functions built for the interpreter cannot be compiled: rerun without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "dsmr_kernels.aot", *(argv or sys.argv[1:])], env=env)
    if not ptxas_available():
        print("ptxas/cuobjdump not found (they ship in the triton wheel for Linux x86_64/aarch64); "
              "pip install triton", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default; silences a 3.9 warning
    if args.quick:
        arch = [90] if 90 in archs else archs[:1]
        jobs = plan(arch, ("bf16",), (64, 128), groups=(2,), kernels=args.kernel, extremes_only=True)
        jobs += plan(arch, ("fp32",), (128,), groups=(2,), kernels=args.kernel, extremes_only=True)
    else:
        jobs = plan(archs, args.dtype or DTYPES, args.head_dim or HEAD_DIMS, kernels=args.kernel)
    t0 = time.time()
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep the gate usable without it
        tqdm = lambda it, **kw: it  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Rows also stream to a partial file, so a long run shows (and keeps) its progress.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool, open(out / "aot.partial.csv", "w") as part:
        part.write(",".join(COLUMNS) + "\n")
        for row in tqdm(pool.map(_compile, jobs), total=len(jobs), desc="compiling", unit="kernel"):
            rows.append(row)
            part.write(",".join(f'"{row[c]}"' if c in ("config", "status") else str(row[c]) for c in COLUMNS) + "\n")
            part.flush()
    (out / "aot.partial.csv").unlink()
    _write(rows, out, time.time() - t0)
    bad = [r for r in rows if not str(r["status"]).startswith("ok")]
    print(f"{len(rows)} kernels compiled for sm_{','.join(map(str, sorted({j.arch for j in jobs})))}, "
          f"{len(bad)} failing; table in {out / 'aot.md'}")
    for r in bad:
        print(f"FAIL {r['arch']} {r['kernel']} {r['dtype']} D={r['head_dim']} {r['config']}: {r['status']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
