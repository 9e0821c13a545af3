"""Table 1 — the op: forward and forward+backward time of ``segment_memory_attention``.

For every memory length M, dtype and backend we time the forward (under ``no_grad``) and the
forward+backward (grads w.r.t. q, k, v), and turn times into achieved GFLOP/s with an explicit
FLOP count in the spirit of the Triton fused-attention tutorial:

    visible pairs   P = number of (query, key) entries the mask lets through
                      = S * M + S * (S + 1) / 2          (all M memory slots valid, no window)
    forward FLOPs   F = 4 * D * P * H * B                (QK^T and PV: 2 matmuls, 2 FLOP per MAC)
    backward FLOPs    = 2.5 * F                          (5 matmuls instead of 2)
    fwd+bwd FLOPs     = 3.5 * F

Masked-out entries are not counted, so a kernel that wastes time on them scores lower. The
ceiling is the same run's GFLOP/s of a 2048 x 2048 @ 2048 x 2048 matmul in that dtype, timed
interleaved with the attention calls (best rate over the section).

A second, smaller table shows where the bf16 gain of the torch path comes from (see ``diagnose_bf16``).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from bench.common import Section, Table, fmt, plt_agg, time_interleaved

S, H, D, B = 512, 8, 64, 1
MEM_LENGTHS = (0, 1024, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CEILING_N = 2048
TILE_Q, TILE_KV = 64, 512  # ATen's CPU flash kernel tiles for a 512-query call (q_split, kv_split)
TARGET_SPEEDUP = 1.5  # the target: torch path >= 1.5x the reference at M = 4096


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backends() -> List[str]:
    """Backends to time: Triton only where its kernels can really run (a CUDA GPU)."""
    names = ["reference", "torch"]
    if torch.cuda.is_available():
        from dsmr_kernels.interface import triton_importable

        if triton_importable():
            names.append("triton")
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
# Ceiling


def ceiling_callables() -> Dict[str, Callable]:
    """One N x N @ N x N matmul (N = 2048) per dtype, to be timed *inside* each interleaved group.

    Timing the ceiling among the attention calls, not once up front, keeps it honest on a shared
    machine: a quiet or busy stretch hits the ceiling and the kernels alike. The table uses the
    best rate seen over the whole section.
    """
    fns = {}
    for name, dtype in DTYPES.items():
        a = torch.randn(CEILING_N, CEILING_N, device=device()).to(dtype)
        b = torch.randn(CEILING_N, CEILING_N, device=device()).to(dtype)

        def mm(a=a, b=b):
            torch.mm(a, b)
            _sync()

        fns[f"ceiling/{name}"] = mm
    return fns


def ceiling_gflops(t: float) -> float:
    return 2.0 * CEILING_N**3 / t / 1e9


# ----------------------------------------------------------------------------------------------
# One configuration


def _inputs(M: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device(), dtype)  # noqa: E731
    q, k, v = (mk(B, H, S, D).requires_grad_() for _ in range(3))
    mem_k, mem_v = (mk(B, H, M, D), mk(B, H, M, D)) if M > 0 else (None, None)
    grad_out = mk(B, H, S, D)
    return q, k, v, mem_k, mem_v, grad_out


def _callables(backend: str, M: int, dtype: torch.dtype):
    """(forward, forward+backward) closures for one backend on fixed random inputs."""
    from dsmr_kernels import segment_memory_attention

    q, k, v, mem_k, mem_v, grad_out = _inputs(M, dtype)

    def fwd():
        with torch.no_grad():
            segment_memory_attention(q, k, v, mem_k, mem_v, backend=backend)
        _sync()

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        out = segment_memory_attention(q, k, v, mem_k, mem_v, backend=backend)
        out.backward(grad_out)
        _sync()

    return fwd, fwd_bwd


def measure_config(M: int, reps: int):
    """Time every (backend, dtype) at one M and the matmul ceilings, all interleaved round-robin.

    Interleaving dtypes as well as backends matters: both the torch/reference and the bf16/fp32
    ratios are read off this table, and load from other processes drifts over seconds.
    Returns ``(rows, {dtype: ceiling GFLOP/s})``.
    """
    fns: Dict[str, Callable] = ceiling_callables()
    errors: Dict[tuple, str] = {}
    for dt_name, dtype in DTYPES.items():
        for be in backends():
            try:
                fwd, fwd_bwd = _callables(be, M, dtype)
                fwd_bwd()  # fail early (e.g. a backend that does not support this device)
                fns[f"{be}/{dt_name}/fwd"], fns[f"{be}/{dt_name}/fwd_bwd"] = fwd, fwd_bwd
            except Exception as exc:  # noqa: BLE001 - a broken backend must not sink the table
                errors[(be, dt_name)] = f"{type(exc).__name__}: {exc}"
    times = time_interleaved(fns, reps)
    flops = forward_flops(S, M)
    rows = []
    for dt_name in DTYPES:
        for be in backends():
            row = {"M": M, "dtype": dt_name, "backend": be, "visible pairs": visible_pairs(S, M)}
            if (be, dt_name) in errors:
                row["note"] = errors[(be, dt_name)][:120]
            else:
                t_f, t_fb = times[f"{be}/{dt_name}/fwd"], times[f"{be}/{dt_name}/fwd_bwd"]
                row["fwd ms"], row["fwd+bwd ms"] = t_f * 1e3, t_fb * 1e3
                row["fwd GFLOP/s"] = flops / t_f / 1e9
                row["fwd+bwd GFLOP/s"] = 3.5 * flops / t_fb / 1e9
            rows.append(row)
    return rows, {name: ceiling_gflops(times[f"ceiling/{name}"]) for name in DTYPES}


# ----------------------------------------------------------------------------------------------
# bf16 diagnosis


def diagnose_bf16(reps: int, threads: int) -> List[dict]:
    """Where the bf16 gain of the torch path comes from. Times the pieces at M = 4096.

    * ``op (torch)``: the public op (bf16: the tiled path of ``dsmr_kernels.cpu_tiled``).
    * ``op (torch) through ATen's flash kernel``: the same op with ``BF16_TILES = None``, i.e. bf16
      through ``_scaled_dot_product_flash_attention_for_cpu`` like fp32 (the pre-tiled behaviour).
    * ``matmuls only``: QK^T and PV as two batched matmuls with no softmax — what the attention
      FLOPs cost at full-matrix matmul speed, the bound a kernel could approach.
    * the GEMM shapes each path issues, timed alone with one thread: ATen's 64-query x 512-key tile
      GEMMs, and the tiled path's batched 256 x 512 tiles over all heads.
    """
    from dsmr_kernels import segment_memory_attention
    from dsmr_kernels import torch_backend as tb
    from dsmr_kernels.cpu_tiled import DEFAULT_TILES

    M = 4096
    tiles = tb.BF16_TILES or DEFAULT_TILES
    rows = []
    fns: Dict[str, Callable] = {}

    def through_aten(f):
        def g():
            saved, tb.BF16_TILES = tb.BF16_TILES, None
            try:
                f()
            finally:
                tb.BF16_TILES = saved
        return g

    def one_thread(f):
        def g():
            torch.set_num_threads(1)
            try:
                f()
            finally:
                torch.set_num_threads(threads)
        return g

    for name, dtype in DTYPES.items():
        q, k, v, mem_k, mem_v, grad_out = _inputs(M, dtype)
        keys = torch.cat([mem_k, k.detach()], 2)
        vals = torch.cat([mem_v, v.detach()], 2)
        qd, kt, vd = q.detach(), keys.transpose(-1, -2).contiguous(), vals
        scores = torch.empty(B, H, S, M + S, dtype=dtype)

        def op_fwd(q=q, k=k, v=v, mk=mem_k, mv=mem_v):
            with torch.no_grad():
                segment_memory_attention(q, k, v, mk, mv, backend="torch")

        def op_fb(q=q, k=k, v=v, mk=mem_k, mv=mem_v, g=grad_out):
            q.grad = k.grad = v.grad = None
            segment_memory_attention(q, k, v, mk, mv, backend="torch").backward(g)

        def mm_only(qd=qd, kt=kt, vd=vd, sc=scores):
            torch.matmul(qd, kt, out=sc)
            torch.matmul(sc, vd)

        # ATen's kernel walks (64-query x 512-key) tiles with one small GEMM per tile for QK^T and
        # one for PV; the tiled path does one batched GEMM over all heads per (rows x cols) tile.
        n_tiles = B * H * (S // TILE_Q) * -(-(M + S) // TILE_KV)
        qa, kb = torch.randn(TILE_Q, D).to(dtype), torch.randn(D, TILE_KV).to(dtype)
        pa, vb = torch.randn(TILE_Q, TILE_KV).to(dtype), torch.randn(TILE_KV, D).to(dtype)
        n_big = -(-S // tiles.rows) * -(-(M + S) // tiles.cols)
        qb, kbb = torch.randn(B * H, tiles.rows, D).to(dtype), torch.randn(B * H, D, tiles.cols).to(dtype)
        pb, vbb = torch.randn(B * H, tiles.rows, tiles.cols).to(dtype), torch.randn(B * H, tiles.cols, D).to(dtype)

        def aten_tile_gemms(qa=qa, kb=kb, pa=pa, vb=vb, n=n_tiles):
            for _ in range(n):
                torch.mm(qa, kb)
                torch.mm(pa, vb)

        def tiled_gemms(qb=qb, kb=kbb, pb=pb, vb=vbb, n=n_big):
            for _ in range(n):
                torch.bmm(qb, kb)
                torch.bmm(pb, vb)

        big_a, big_b = torch.randn(CEILING_N, CEILING_N).to(dtype), torch.randn(CEILING_N, CEILING_N).to(dtype)

        for label, f in [
            ("op (torch) fwd", op_fwd),
            ("op (torch) fwd+bwd", op_fb),
            ("op (torch) through ATen's flash kernel, fwd", through_aten(op_fwd)),
            ("op (torch) through ATen's flash kernel, fwd+bwd", through_aten(op_fb)),
            ("matmuls only (QK^T, PV over all M+S keys) fwd", mm_only),
            (f"ATen tile GEMMs ({TILE_Q}x{D} @ {D}x{TILE_KV}, {TILE_Q}x{TILE_KV} @ {TILE_KV}x{D}) x {n_tiles}, "
             "1 thread", one_thread(aten_tile_gemms)),
            (f"tiled-path GEMMs ({B * H} x {tiles.rows}x{D} @ {D}x{tiles.cols}, {tiles.rows}x{tiles.cols} @ "
             f"{tiles.cols}x{D}) x {n_big}, 1 thread", one_thread(tiled_gemms)),
            (f"dense {CEILING_N} matmul, 1 thread", one_thread(lambda a=big_a, b=big_b: torch.mm(a, b))),
        ]:
            fns[f"{label}|{name}"] = f
    times = time_interleaved(fns, reps)
    labels = list(dict.fromkeys(k.split("|")[0] for k in fns))
    for label in labels:
        t32, t16 = times[f"{label}|fp32"], times[f"{label}|bf16"]
        rows.append(
            {
                "variant (M = 4096)": label,
                "fp32 ms": t32 * 1e3,
                "bf16 ms": t16 * 1e3,
                "bf16 speedup (t_fp32 / t_bf16)": t32 / t16,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Section


def plan(quick: bool) -> List[tuple]:
    """The configurations the progress bar walks over."""
    steps = [(M, None) for M in MEM_LENGTHS]
    # The bf16 diagnosis costs about as much as the main table; the quick run leaves it out.
    return steps if quick else steps + [("diagnosis", None)]


def measure_all(quick: bool, threads: int, progress):
    """Ceilings, the main table's rows and the bf16 diagnosis. ``progress``: a tqdm bar or None."""
    reps = 3 if quick else 9
    ceilings: Dict[str, float] = {name: 0.0 for name in DTYPES}
    rows: List[dict] = []
    diag: List[dict] = []
    for M, dt in plan(quick):
        if progress is not None:
            progress.set_postfix_str(f"op: {M if isinstance(M, str) else f'M={M}'}")
        if M == "diagnosis":
            if not torch.cuda.is_available():
                diag = diagnose_bf16(max(3, reps // 2), threads)
        else:
            group_rows, group_ceil = measure_config(M, reps)
            rows.extend(group_rows)
            ceilings = {k: max(ceilings[k], group_ceil[k]) for k in ceilings}
        if progress is not None:
            progress.update(1)
    _add_ratios(rows, ceilings)
    return rows, ceilings, diag


def _add_ratios(rows: List[dict], ceilings: Dict[str, float]) -> None:
    """% of ceiling and speed relative to the reference at the same (M, dtype)."""
    ref = {(r["M"], r["dtype"]): r for r in rows if r["backend"] == "reference"}
    for r in rows:
        ceil = ceilings[r["dtype"]]
        for kind in ("fwd", "fwd+bwd"):
            if f"{kind} ms" not in r:
                continue
            r[f"{kind} % of ceiling"] = 100.0 * r[f"{kind} GFLOP/s"] / ceil
            base = ref.get((r["M"], r["dtype"]), {})
            if f"{kind} ms" in base:
                r[f"{kind} speedup vs reference"] = base[f"{kind} ms"] / r[f"{kind} ms"]


def _find(rows, M, dtype, backend) -> dict:
    return next((r for r in rows if r["M"] == M and r["dtype"] == dtype and r["backend"] == backend), {})


def targets(rows: List[dict]) -> List[dict]:
    """The issue's two targets, each with the measured value and met / NOT met."""
    out = []
    for dt in DTYPES:
        r = _find(rows, 4096, dt, "torch")
        for kind in ("fwd", "fwd+bwd"):
            val = r.get(f"{kind} speedup vs reference")
            out.append(
                {
                    "target": f"torch >= {TARGET_SPEEDUP}x reference, M=4096, {dt}, {kind}",
                    "measured": None if val is None else f"{val:.2f}x",
                    "met": "—" if val is None else ("met" if val >= TARGET_SPEEDUP else "NOT met"),
                }
            )
    for M in MEM_LENGTHS:
        a, b = _find(rows, M, "fp32", "torch"), _find(rows, M, "bf16", "torch")
        for kind in ("fwd", "fwd+bwd"):
            if f"{kind} ms" in a and f"{kind} ms" in b:
                val = a[f"{kind} ms"] / b[f"{kind} ms"]
                # Within 5% is not "faster": run-to-run noise on a shared 2-core machine is that large.
                verdict = "met" if val >= 1.05 else ("NOT met (within noise)" if val > 0.95 else "NOT met")
                out.append(
                    {
                        "target": f"torch bf16 faster than fp32, M={M}, {kind} (t_fp32 / t_bf16)",
                        "measured": f"{val:.2f}x",
                        "met": verdict,
                    }
                )
    return out


def _plot(rows: List[dict], ceilings: Dict[str, float], path) -> bool:
    plt = plt_agg()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {"fp32": "tab:blue", "bf16": "tab:orange"}
    styles = {"reference": ":", "torch": "-", "triton": "--"}
    for ax, kind in zip(axes, ("fwd", "fwd+bwd")):
        for dt in DTYPES:
            for be in backends():
                pts = [(r["M"], r[f"{kind} GFLOP/s"]) for r in rows
                       if r["dtype"] == dt and r["backend"] == be and f"{kind} GFLOP/s" in r]
                if pts:
                    ax.plot(*zip(*pts), styles.get(be, "-"), marker="o", color=colors[dt], label=f"{be} {dt}")
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


def _render(rows, ceilings, diag, quick) -> Section:
    cols = [
        "M", "dtype", "backend", "visible pairs",
        "fwd ms", "fwd GFLOP/s", "fwd % of ceiling", "fwd speedup vs reference",
        "fwd+bwd ms", "fwd+bwd GFLOP/s", "fwd+bwd % of ceiling", "fwd+bwd speedup vs reference", "note",
    ]
    main = Table(cols, rows)
    tgt = Table(["target", "measured", "met"], targets(rows))
    ceil = Table(
        ["dtype", f"matmul {CEILING_N}x{CEILING_N} @ {CEILING_N}x{CEILING_N} GFLOP/s"],
        [{"dtype": k, f"matmul {CEILING_N}x{CEILING_N} @ {CEILING_N}x{CEILING_N} GFLOP/s": v} for k, v in ceilings.items()],
    )
    md = [
        "## Configuration",
        "",
        f"- shapes: S = {S}, H = Hkv = {H}, D = {D}, B = {B}; M in {list(MEM_LENGTHS)}, all memory slots valid, no window",
        f"- device: {device()}; backends: {', '.join(backends())}"
        + ("" if torch.cuda.is_available() else " (triton is timed only where a CUDA GPU is present)"),
        "- forward timed under `torch.no_grad()`; forward+backward = forward + `out.backward(grad)` into q, k, v",
        f"- median of {'3' if quick else '9'} repetitions after 2 warm-ups, backends interleaved round-robin",
        "",
        "**FLOP formula** (Triton fused-attention tutorial style, counting visible score entries only):",
        "visible pairs P = S·M + S·(S+1)/2; forward FLOPs = 4·D·P·H·B; backward = 2.5 × forward;"
        " forward+backward = 3.5 × forward. GFLOP/s = FLOPs / median time. "
        "Ceiling = this run's best dense 2048x2048 matmul GFLOP/s in the same dtype, timed interleaved with the "
        "attention calls. "
        "Speedup vs reference = t_reference / t_backend at the same M and dtype (> 1 is faster).",
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
    if diag:
        dt = Table(list(diag[0].keys()), diag)
        md += ["", "## bf16 vs fp32 in the torch path: where the gain comes from (M = 4096)", "", dt.markdown(), "",
               _diagnosis_text(diag, ceilings)]
    csv = main.csv()
    return Section("op", "Op benchmark: segment_memory_attention", "\n".join(md), csv)


def _diagnosis_text(diag: List[dict], ceilings: Dict[str, float]) -> str:
    """One paragraph reading the diagnosis table, numbers filled in from this run."""
    def gain(prefix: str) -> str:
        row = next((d for d in diag if d["variant (M = 4096)"].startswith(prefix)), {})
        return fmt(row.get("bf16 speedup (t_fp32 / t_bf16)"))

    aten_fb = gain("op (torch) through ATen's flash kernel, fwd+bwd")
    return (
        "**Reading.** fp32 runs through ATen's CPU flash kernel in every row; bf16 runs through the tiled "
        "path (`dsmr_kernels/cpu_tiled.py`) in the `op (torch)` rows and through ATen's kernel in the "
        f"`through ATen` rows. bf16 pays off for large GEMMs on this CPU (dense {CEILING_N} matmul: "
        f"{gain('dense')}x with one thread; matmuls of the attention done as two big batched matmuls: "
        f"{gain('matmuls only')}x), but ATen's kernel gains only {gain('op (torch) through ATen')}x forward and "
        f"{aten_fb}x forward+backward from it: it issues one small "
        f"GEMM per 64-query x 512-key tile, and GEMMs of that shape gain {gain('ATen tile GEMMs')}x alone "
        "(a bf16 GEMM's fixed per-call cost eats most of what AVX-512 BF16 saves at that size; ATen's packed "
        "brgemm path is enabled for fp16 with AMX only, see `aten/src/ATen/native/cpu/FlashAttentionKernel.cpp`). "
        "The tiled path batches all heads into one GEMM per 256-row x 512-key tile "
        f"({gain('tiled-path GEMMs')}x for those GEMMs alone) and keeps the softmax, its `exp2` and all "
        "accumulators in fp32, so the op gains "
        f"{gain('op (torch) fwd')}x forward and {gain('op (torch) fwd+bwd')}x forward+backward over fp32. "
        "The forward gains less than the GEMMs because the fp32 softmax passes (convert, max, exp2, sum, "
        "convert back) cost the same in both dtypes."
    )


def section(quick: bool, threads: int, progress, out_dir) -> Section:
    """Run the op benchmark and write its plot; the entry point ``run.py`` calls."""
    rows, ceilings, diag = measure_all(quick, threads, progress)
    sec = _render(rows, ceilings, diag, quick)
    if _plot(rows, ceilings, out_dir / "op.png"):
        sec.plots.append("op.png")
    return sec
