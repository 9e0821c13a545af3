"""Table 1 — the op: forward and forward+backward time of ``segment_memory_attention``.

One grid: M in {0, 1024, 4096} x {fp32, bf16} x variants, every call timed round-robin in the
same run, so each ratio below compares measurements taken side by side. Variants:

* ``reference``: ``segment_memory_attention_ref`` (materialized scores).
* ``torch``: the op as a user gets it (``backend="torch"``: the dispatcher's choice on this CPU).
* ``torch:flash`` / ``torch:tiled`` / ``torch:upcast`` (bf16): the op forced onto one CPU path by
  ``DSMR_CPU_PATH``; ``torch:flash`` is ATen's flash kernel alone, through the same op.
* ``sdpa-cat``: what a user would write without the package: one
  ``F.scaled_dot_product_attention`` over ``cat([mem, seg])`` with a boolean mask.
* ``triton`` where a CUDA GPU is present.

Times become achieved GFLOP/s with an explicit FLOP count (Triton fused-attention tutorial):

    visible pairs   P = S * M + S * (S + 1) / 2          (all M memory slots valid, no window)
    forward FLOPs   F = 4 * D * P * H * B                (QK^T and PV: 2 matmuls, 2 FLOP per MAC)
    fwd+bwd FLOPs     = 3.5 * F                          (backward: 5 matmuls instead of 2)

The ceiling is the same run's GFLOP/s of a 2048 x 2048 @ 2048 x 2048 matmul per dtype, timed
interleaved with the attention calls (best rate over the section). The header prints the CPU's
features and the path the dispatcher takes for each kind of call. The bf16 diagnosis (where the
bf16 gain comes from) is a separate script: ``python bench/op_diagnose.py``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List

import torch

from bench.common import Section, Table, plt_agg, time_interleaved

S, H, D, B = 512, 8, 64, 1
MEM_LENGTHS = (0, 1024, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CEILING_N = 2048
FORCED = ("flash", "tiled", "upcast")  # CPU paths timed on their own (bf16; fp32 always takes flash)
CEILING_TARGET = 25.0  # issue 10: bf16 forward+backward >= 25% of the bf16 matmul ceiling at M = 4096
#: bf16 vs fp32 where bf16 has no arithmetic units and runs in fp32 (conversions are all it can
#: add): at least this fraction of fp32's speed (issue 22); elsewhere bf16 must not be slower.
EMULATED_BF16_TARGET = 0.95
SLOW_REPS = 3  # repetitions of the slow context rows (emulated-bf16 reference): 1 warm-up + 3 timed


def emulated_bf16() -> bool:
    """True on CPUs without bf16 arithmetic (AVX2 class): bf16 GEMMs there are emulated, 100x+ slower
    than fp32, so the op computes bf16 in fp32 and the table measures it against the fp32 ceiling."""
    if device() != "cpu":
        return False
    from dsmr_kernels.cpu_dispatch import detect_features

    return detect_features().cpu_class == "no_bf16"


def skipped_variants(dtype_name: str) -> Dict[str, str]:
    """Rows not timed on this CPU class, with the reason printed in their note."""
    if dtype_name == "bf16" and emulated_bf16():
        return {"torch:tiled": "not timed: the tiled path's bf16 GEMMs are emulated on this CPU class "
                               "(0.4-2 s per call) and it is no candidate here"}
    return {}


def slow_variants(dtype_name: str) -> List[str]:
    """Context rows timed only SLOW_REPS times (the reference's bf16 GEMMs are emulated here)."""
    return ["reference"] if dtype_name == "bf16" and emulated_bf16() else []


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backends() -> List[str]:
    """Backends of the public op to time: Triton only where its kernels can really run (a CUDA GPU)."""
    names = ["reference", "torch"]
    if torch.cuda.is_available():
        from dsmr_kernels.interface import triton_importable

        if triton_importable():
            names.append("triton")
    return names


def variants(dtype_name: str) -> List[str]:
    """Every row of the grid for one dtype (see the module docstring)."""
    names = backends() + ["sdpa-cat"]
    if device() == "cpu" and dtype_name != "fp32":
        names += [f"torch:{p}" for p in FORCED]
    return names


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def visible_pairs(S: int, M: int) -> int:
    """Count of visible (query, key) entries, taken from the reference's own mask."""
    from dsmr_kernels.reference import visibility_mask

    return int(visibility_mask(S, M, None, None).sum())


def forward_flops(S: int, M: int) -> float:
    return 4.0 * D * visible_pairs(S, M) * H * B


# ----------------------------------------------------------------------------------------------
# Callables


def ceiling_callables() -> Dict[str, Callable]:
    """One N x N @ N x N matmul (N = 2048) per dtype, timed *inside* each interleaved group, so a
    quiet or busy stretch hits the ceiling and the kernels alike. Where bf16 is emulated, its
    ceiling is fp32's (what it runs in; an emulated 2048^3 bf16 matmul takes about a minute)."""
    fns = {}
    for name, dtype in DTYPES.items():
        if name == "bf16" and emulated_bf16():
            continue
        a = torch.randn(CEILING_N, CEILING_N, device=device()).to(dtype)
        b = torch.randn(CEILING_N, CEILING_N, device=device()).to(dtype)

        def mm(a=a, b=b):
            torch.mm(a, b)
            _sync()

        fns[f"ceiling/{name}"] = mm
    return fns


def ceiling_gflops(t: float) -> float:
    return 2.0 * CEILING_N**3 / t / 1e9


def _inputs(M: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device(), dtype)  # noqa: E731
    q, k, v = (mk(B, H, S, D).requires_grad_() for _ in range(3))
    mem_k, mem_v = (mk(B, H, M, D), mk(B, H, M, D)) if M > 0 else (None, None)
    grad_out = mk(B, H, S, D)
    return q, k, v, mem_k, mem_v, grad_out


def sdpa_cat(q, k, v, mem_k, mem_v):
    """The op without the package: SDPA over ``cat([mem, seg])`` with a bottom-right causal bool mask."""
    M = 0 if mem_k is None else mem_k.shape[2]
    keys = k if M == 0 else torch.cat([mem_k, k], dim=2)
    vals = v if M == 0 else torch.cat([mem_v, v], dim=2)
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(M + S, device=q.device)[None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=j <= M + i)


def _op(variant: str):
    """``f(q, k, v, mem_k, mem_v) -> out`` for one variant."""
    from dsmr_kernels import segment_memory_attention

    if variant == "sdpa-cat":
        return sdpa_cat
    backend, _, path = variant.partition(":")

    def f(q, k, v, mem_k, mem_v):
        if not path:
            return segment_memory_attention(q, k, v, mem_k, mem_v, backend=backend)
        # The route (forward and backward path) is fixed when the forward runs.
        saved = os.environ.get("DSMR_CPU_PATH")
        os.environ["DSMR_CPU_PATH"] = path
        try:
            return segment_memory_attention(q, k, v, mem_k, mem_v, backend=backend)
        finally:
            if saved is None:
                os.environ.pop("DSMR_CPU_PATH", None)
            else:
                os.environ["DSMR_CPU_PATH"] = saved

    return f


def _callables(variant: str, M: int, dtype: torch.dtype):
    """(forward, forward+backward) closures for one variant (a backend name too) on fixed inputs."""
    q, k, v, mem_k, mem_v, grad_out = _inputs(M, dtype)
    op = _op(variant)

    def fwd():
        with torch.no_grad():
            op(q, k, v, mem_k, mem_v)
        _sync()

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        op(q, k, v, mem_k, mem_v).backward(grad_out)
        _sync()

    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------
# Measuring


def measure_config(M: int, reps: int):
    """Time every (variant, dtype) at one M and the matmul ceilings, all interleaved round-robin.

    Returns ``(rows, {dtype: ceiling GFLOP/s})``; a variant that fails gets a row with a note.
    """
    fns: Dict[str, Callable] = ceiling_callables()
    slow: Dict[str, Callable] = {}
    errors: Dict[tuple, str] = {}
    for dt_name, dtype in DTYPES.items():
        skipped = skipped_variants(dt_name)
        for var in variants(dt_name):
            if var in skipped:
                errors[(var, dt_name)] = skipped[var]
                continue
            group = slow if var in slow_variants(dt_name) else fns
            try:
                fwd, fwd_bwd = _callables(var, M, dtype)
                fwd_bwd()  # fail early (e.g. a backend that does not support this device)
                group[f"{var}/{dt_name}/fwd"], group[f"{var}/{dt_name}/fwd_bwd"] = fwd, fwd_bwd
            except Exception as exc:  # noqa: BLE001 - a broken variant must not sink the table
                errors[(var, dt_name)] = f"{type(exc).__name__}: {exc}"
    times = time_interleaved(fns, reps)
    if slow:  # context rows only: fewer repetitions, not interleaved with the targets' rows
        times.update(time_interleaved(slow, SLOW_REPS, warmup=1))
    if "ceiling/bf16" not in times:
        times["ceiling/bf16"] = times["ceiling/fp32"]
    flops = forward_flops(S, M)
    rows = []
    for dt_name in DTYPES:
        for var in variants(dt_name):
            row = {"M": M, "dtype": dt_name, "variant": var}
            if dt_name == "bf16" and emulated_bf16():
                row["note"] = "bf16 emulated on this CPU class: % of ceiling against fp32's"
                if var in slow_variants(dt_name):
                    row["note"] += f"; median of {SLOW_REPS}"
            if (var, dt_name) in errors:
                row["note"] = errors[(var, dt_name)][:120]
            else:
                t_f, t_fb = times[f"{var}/{dt_name}/fwd"], times[f"{var}/{dt_name}/fwd_bwd"]
                row["fwd ms"], row["fwd+bwd ms"] = t_f * 1e3, t_fb * 1e3
                row["fwd GFLOP/s"] = flops / t_f / 1e9
                row["fwd+bwd GFLOP/s"] = 3.5 * flops / t_fb / 1e9
            rows.append(row)
    return rows, {name: ceiling_gflops(times[f"ceiling/{name}"]) for name in DTYPES}


def plan(quick: bool) -> List[tuple]:
    """The configurations the progress bar walks over (one per memory length)."""
    return [(M, None) for M in MEM_LENGTHS]


def measure_all(quick: bool, threads: int, progress):
    """Ceilings and the grid's rows. ``progress``: a tqdm bar or None. ``threads`` is set by run.py."""
    reps = 3 if quick else 9
    ceilings: Dict[str, float] = {name: 0.0 for name in DTYPES}
    rows: List[dict] = []
    for M, _ in plan(quick):
        if progress is not None:
            progress.set_postfix_str(f"op: M={M}")
        group_rows, group_ceil = measure_config(M, reps)
        rows.extend(group_rows)
        ceilings = {k: max(ceilings[k], group_ceil[k]) for k in ceilings}
        if progress is not None:
            progress.update(1)
    _add_ratios(rows, ceilings)
    return rows, ceilings


def _find(rows, M, dtype, variant) -> dict:
    return next((r for r in rows if r["M"] == M and r["dtype"] == dtype and r["variant"] == variant), {})


def _add_ratios(rows: List[dict], ceilings: Dict[str, float]) -> None:
    """% of ceiling, and the ``torch`` row's speed relative to each row at the same (M, dtype)."""
    for r in rows:
        torch_row = _find(rows, r["M"], r["dtype"], "torch")
        for kind in ("fwd", "fwd+bwd"):
            if f"{kind} ms" not in r:
                continue
            r[f"{kind} % of ceiling"] = 100.0 * r[f"{kind} GFLOP/s"] / ceilings[r["dtype"]]
            if f"{kind} ms" in torch_row:
                r[f"{kind}: torch speedup over this"] = r[f"{kind} ms"] / torch_row[f"{kind} ms"]


def _verdict(val: float) -> str:
    """A ratio that must be >= 1. Within 5% below is reported as noise: run-to-run noise on a
    shared 2-core machine is that large."""
    return "met" if val >= 1.0 else ("NOT met (within noise)" if val > 0.95 else "NOT met")


def targets(rows: List[dict]) -> List[dict]:
    """Issue 10's op targets, each with the measured value and met / NOT met."""
    out = []
    for M in MEM_LENGTHS:
        for dt in DTYPES:
            t = _find(rows, M, dt, "torch")
            for other in ("sdpa-cat", "torch:flash"):
                o = _find(rows, M, dt, other)
                for kind in ("fwd", "fwd+bwd"):
                    if f"{kind} ms" in t and f"{kind} ms" in o:
                        val = o[f"{kind} ms"] / t[f"{kind} ms"]
                        out.append({"target": f"torch >= {other}, M={M}, {dt}, {kind} (t_{other} / t_torch)",
                                    "measured": f"{val:.2f}x", "met": _verdict(val)})
        a, b = _find(rows, M, "fp32", "torch"), _find(rows, M, "bf16", "torch")
        emulated = emulated_bf16()
        for kind in ("fwd", "fwd+bwd"):
            if f"{kind} ms" in a and f"{kind} ms" in b:
                val = a[f"{kind} ms"] / b[f"{kind} ms"]
                if emulated:
                    need = EMULATED_BF16_TARGET
                    text = f"torch bf16 >= {need:.2f}x fp32 (bf16 runs in fp32 on this CPU class), M={M}, {kind}"
                    met = "met" if val >= need else "NOT met"
                else:
                    text, met = f"torch bf16 never slower than fp32, M={M}, {kind}", _verdict(val)
                out.append({"target": text + " (t_fp32 / t_bf16)", "measured": f"{val:.2f}x", "met": met})
    r = _find(rows, max(MEM_LENGTHS), "bf16", "torch")
    if "fwd+bwd % of ceiling" in r:
        val = r["fwd+bwd % of ceiling"]
        which = "fp32 matmul ceiling (bf16 runs in fp32 on this CPU class)" if emulated_bf16() else "bf16 matmul ceiling"
        out.append({"target": f"torch bf16 fwd+bwd >= {CEILING_TARGET:.0f}% of the {which}, M={max(MEM_LENGTHS)}",
                    "measured": f"{val:.1f}%", "met": "met" if val >= CEILING_TARGET else "NOT met"})
    return out


# ----------------------------------------------------------------------------------------------
# Rendering


def _plot(rows: List[dict], ceilings: Dict[str, float], path) -> bool:
    plt = plt_agg()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {"fp32": "tab:blue", "bf16": "tab:orange"}
    styles = {"reference": ":", "torch": "-", "triton": "--", "sdpa-cat": "-."}
    for ax, kind in zip(axes, ("fwd", "fwd+bwd")):
        for dt in DTYPES:
            for var in ("reference", "torch", "triton", "sdpa-cat"):
                pts = [(r["M"], r[f"{kind} GFLOP/s"]) for r in rows
                       if r["dtype"] == dt and r["variant"] == var and f"{kind} GFLOP/s" in r]
                if pts:
                    ax.plot(*zip(*pts), styles[var], marker="o", color=colors[dt], label=f"{var} {dt}")
            ax.axhline(ceilings[dt], color=colors[dt], alpha=0.4, lw=1)
            ax.text(0, ceilings[dt], f" {dt} matmul ceiling", color=colors[dt], fontsize=7, va="bottom")
        ax.set_title(f"segment_memory_attention {kind} (S={S}, H={H}, D={D}, B={B})", fontsize=9)
        ax.set_xlabel("memory length M")
        ax.set_xticks(list(MEM_LENGTHS))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("achieved GFLOP/s (visible entries only)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cpu_header() -> List[str]:
    """Markdown bullets: the CPU's features and the path of every kind of call (cpu_dispatch)."""
    from dsmr_kernels.cpu_dispatch import describe_cpu

    return [f"- {k}: {v}" for k, v in describe_cpu().items()]


def _render(rows, ceilings, quick) -> Section:
    cols = [
        "M", "dtype", "variant",
        "fwd ms", "fwd GFLOP/s", "fwd % of ceiling", "fwd: torch speedup over this",
        "fwd+bwd ms", "fwd+bwd GFLOP/s", "fwd+bwd % of ceiling", "fwd+bwd: torch speedup over this", "note",
    ]
    main = Table(cols, rows)
    tgt = Table(["target", "measured", "met"], targets(rows))
    name = f"matmul {CEILING_N}x{CEILING_N} @ {CEILING_N}x{CEILING_N} GFLOP/s"
    ceil_rows = [{"dtype": k, name: v} for k, v in ceilings.items()]
    if emulated_bf16():
        ceil_rows[-1]["note"] = "fp32's: bf16 has no arithmetic units on this CPU class and runs in fp32"
    ceil = Table(["dtype", name, "note"], ceil_rows)
    md = [
        "## Configuration",
        "",
        f"- shapes: S = {S}, H = Hkv = {H}, D = {D}, B = {B}; M in {list(MEM_LENGTHS)}, all memory slots valid, no window",
        f"- device: {device()}; variants: {', '.join(variants('bf16'))} (fp32 has no forced-path rows: it always takes flash)",
        "- forward timed under `torch.no_grad()`; forward+backward = forward + `out.backward(grad)` into q, k, v",
        f"- median of {'3' if quick else '9'} repetitions after 2 warm-ups, all variants and dtypes interleaved round-robin",
        *(cpu_header() if device() == "cpu" else []),
        "",
        "**FLOP formula** (Triton fused-attention tutorial style, counting visible score entries only):",
        "visible pairs P = S·M + S·(S+1)/2; forward FLOPs = 4·D·P·H·B; backward = 2.5 × forward;"
        " forward+backward = 3.5 × forward. GFLOP/s = FLOPs / median time. Ceiling = this run's best dense"
        f" {CEILING_N}x{CEILING_N} matmul GFLOP/s in the same dtype, timed interleaved with the attention calls."
        " `torch speedup over this` = t_row / t_torch at the same M and dtype (> 1: the torch row is faster).",
        "",
        "## Matmul ceiling (same run, best of the interleaved timings)",
        "",
        ceil.markdown(),
        "",
        "## Time and achieved GFLOP/s",
        "",
        main.markdown(),
        "",
        "## Targets",
        "",
        tgt.markdown(),
    ]
    return Section("op", "Op benchmark: segment_memory_attention", "\n".join(md), main.csv())


def section(quick: bool, threads: int, progress, out_dir) -> Section:
    """Run the op benchmark and write its plot; the entry point ``run.py`` calls."""
    rows, ceilings = measure_all(quick, threads, progress)
    sec = _render(rows, ceilings, quick)
    if _plot(rows, ceilings, out_dir / "op.png"):
        sec.plots.append("op.png")
    return sec
