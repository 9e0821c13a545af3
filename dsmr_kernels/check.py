"""Is the op right, and fast, on this machine? ``python -m dsmr_kernels.check`` (also ``dsmr check``).

Every device present (CPU; CUDA, with the Triton kernels when Triton imports; MPS), every dtype the
device runs, and on the CPU every path of the decision table (``flash``, ``tiled``, ``upcast``) as
well as the one the dispatcher picks, over a few small cases that between them cover GQA, per-lane
memory lengths (a full lane, an empty one, a partial one), a sliding window, no memory, a
non-finite row and single-query decode (the Triton split-KV decode kernel on CUDA). Each result,
forward and backward, is held to the package's error rule against a float64 golden: the path's
error at most 2x (output) / 3x (gradients) the reference's own error in the same dtype, plus a
small dtype floor (:mod:`dsmr_kernels.testing`). Non-finite inputs must give non-finite rows
exactly where the reference does. Then a short timing of the op against what a user would write
without the package (one ``F.scaled_dot_product_attention`` over ``cat([mem, seg])`` with a
mask), per dtype, and the CPU paths the dispatcher chose (:func:`describe_cpu`).

One table is printed; the exit status is 1 when any result is wrong (timings never fail the
check). Under a minute on 2 CPU cores. Anchors: ``python -m xformers.info``,
``python -m torch.utils.collect_env``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .testing import DTYPE_FLOOR, make_inputs, max_err

OUT_FACTOR, GRAD_FACTOR = 2.0, 3.0
_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Case:
    """One op call: sizes, per-lane memory lengths, window, and where non-finite entries go."""

    name: str
    B: int
    H: int
    Hkv: int
    S: int
    M: int
    D: int
    mem_len: Optional[Tuple[int, ...]]
    window: Optional[int] = None
    nonfinite: bool = False  # a NaN query entry and an inf value entry: forward only

    @property
    def backward(self) -> bool:
        return not self.nonfinite and self.S > 1  # decode (S = 1) is inference: no gradient


CASES = (
    Case("gqa, lanes M/0/partial", 3, 4, 2, 37, 29, 16, (29, 0, 11)),
    Case("gqa, window 9", 3, 4, 2, 37, 29, 16, (29, 0, 11), window=9),
    Case("no memory", 2, 4, 4, 40, 0, 16, None),
    Case("non-finite rows", 2, 4, 2, 24, 13, 16, (13, 5), window=20, nonfinite=True),
    Case("decode S=1", 3, 4, 2, 1, 40, 16, (40, 3, 0)),
)


@dataclass
class Result:
    """Worst error / bound ratio of one (device, dtype, path) over the cases; <= 1 passes."""

    device: str
    dtype: str
    path: str
    ratio: float = 0.0
    worst: str = ""
    failures: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def record(self, case: str, what: str, err: float, bound: float) -> None:
        r = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
        if not r <= 1.0:  # NaN errors fail too
            self.failures.append(f"{case}: {what} error {err:.2e} > bound {bound:.2e}")
        if r > self.ratio or r != r:
            self.ratio, self.worst = r, f"{case}: {what}"


# --------------------------------------------------------------------------------------------
# Devices, dtypes, paths
# --------------------------------------------------------------------------------------------
def devices() -> List[str]:
    """Devices present: ``cpu``, plus ``cuda`` and ``mps`` where torch sees them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def dtypes_for(device: str) -> List[torch.dtype]:
    if device == "cpu":
        return [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    if device == "mps":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.bfloat16, torch.float16]


def paths_for(device: str, dtype: torch.dtype) -> List[str]:
    """``auto`` (what a user gets), then each forced path that applies (CPU paths, Triton, generic)."""
    if device == "cpu":
        if dtype == torch.float64:
            return ["auto"]  # fp64 always takes flash: forcing another path is ignored
        return ["auto", "cpu:flash", "cpu:tiled"] + (["cpu:upcast"] if dtype in (torch.bfloat16, torch.float16) else [])
    paths = ["auto"]
    if device == "cuda":
        from .interface import triton_importable

        if triton_importable():
            paths.append("triton")
    return paths + ["generic"]


@contextlib.contextmanager
def _cpu_path(path: Optional[str]) -> Iterator[None]:
    """Force one CPU path for the calls inside (the route is fixed when the forward runs)."""
    if path is None:
        yield
        return
    saved = os.environ.get("DSMR_CPU_PATH")
    os.environ["DSMR_CPU_PATH"] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DSMR_CPU_PATH", None)
        else:
            os.environ["DSMR_CPU_PATH"] = saved


def op_for(path: str) -> Callable:
    """``f(q, k, v, mem_k, mem_v, mem_len, window=...) -> (out, lse)`` for one path name."""
    from .interface import segment_memory_attention
    from .torch_backend import torch_forward
    from ._validate import validate_inputs

    if path == "generic":
        def generic(q, k, v, mk, mv, ml, window=None):
            dims = validate_inputs(q, k, v, mk, mv, ml, window)
            return torch_forward(q, k, v, mk, mv, ml, dims.D ** -0.5, window, dims, path="generic")

        return generic
    cpu_path = path.split(":", 1)[1] if path.startswith("cpu:") else None
    backend = "triton" if path == "triton" else ("torch" if cpu_path else "auto")

    def run(q, k, v, mk, mv, ml, window=None):
        with _cpu_path(cpu_path):
            return segment_memory_attention(q, k, v, mk, mv, ml, window=window, backend=backend, return_lse=True)

    return run


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------
def _inputs(case: Case, dtype: torch.dtype, device: str):
    q, k, v, mk, mv, ml = make_inputs(case.B, case.H, case.Hkv, case.S, case.M, case.D, torch.float64,
                                      mem_len=list(case.mem_len) if case.mem_len else None,
                                      requires_grad=False, seed=zlib.crc32(case.name.encode()) % 1000)
    if case.nonfinite:
        q[1, 2, 5, 3] = float("nan")  # one query row
        v[0, 1, 7, 0] = float("inf")  # a segment value row: rows 7.. of lane 0's heads 2-3 see it
        if mv is not None:
            mv[1, 0, case.M - 2, 1] = float("nan")  # a valid memory slot of lane 1
            mv[1, 0, 0, 2] = float("nan")  # an invalid slot (lane 1 sees the newest 5): never read
    g = torch.Generator().manual_seed(7)
    do = torch.randn(case.B, case.H, case.S, case.D, generator=g, dtype=torch.float64)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    dev = (to(q), to(k), to(v), to(mk), to(mv), None if ml is None else ml.to(device), to(do))
    return (q, k, v, mk, mv, ml, do), dev


def _run(fn, q, k, v, mk, mv, ml, do, window, backward: bool):
    """``(out, lse, dq, dk, dv)`` on the CPU, grads None without backward."""
    if not backward:
        with torch.no_grad():
            out, lse = fn(q, k, v, mk, mv, ml, window=window)
        return out.cpu(), (None if lse is None else lse.cpu()), None, None, None
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v, mk, mv, ml, window=window)
    out.backward(do)
    return out.detach().cpu(), None if lse is None else lse.detach().cpu(), q.grad.cpu(), k.grad.cpu(), v.grad.cpu()


def check_path(device: str, dtype: torch.dtype, path: str, cases: Sequence[Case] = CASES) -> Result:
    """Run every case through one path and hold it to the error rule (see the module docstring)."""
    from .reference import segment_memory_attention_ref

    def ref(q, k, v, mk, mv, ml, window=None):
        return segment_memory_attention_ref(q, k, v, mk, mv, ml, window=window, return_lse=True)

    res = Result(device, _NAMES[dtype], path)
    fn = op_for(path)
    floor = DTYPE_FLOOR[dtype]
    for case in cases:
        if path == "triton" and case.D not in (16, 32, 64, 128):
            continue
        gold_in, dev_in = _inputs(case, dtype, device)
        try:
            golden = _run(ref, *gold_in, case.window, case.backward)
            same = _run(ref, *dev_in, case.window, case.backward)
            got = _run(fn, *dev_in, case.window, case.backward)
        except Exception as exc:  # noqa: BLE001 - a path that raises is a failing path, not a crash
            res.failures.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:120]}")
            res.ratio, res.worst = float("inf"), case.name
            continue
        out_g, out_s, out_f = golden[0], same[0], got[0]
        if case.nonfinite:
            want = ~torch.isfinite(out_g).all(-1)
            have = ~torch.isfinite(out_f).all(-1)
            if not torch.equal(want, have):
                res.failures.append(f"{case.name}: non-finite rows {int(have.sum())} where the reference has "
                                    f"{int(want.sum())} ({int((want != have).sum())} rows differ)")
                res.ratio, res.worst = float("inf"), f"{case.name}: non-finite rows"
                continue
            keep = ~want[..., None].expand_as(out_g)
            out_g, out_s, out_f = out_g[keep], out_s[keep], out_f[keep]
        res.record(case.name, "out", max_err(out_f, out_g), OUT_FACTOR * max_err(out_s, out_g) + floor)
        if case.backward:
            for name, i in (("dq", 2), ("dk", 3), ("dv", 4)):
                res.record(case.name, name, max_err(got[i], golden[i]),
                           GRAD_FACTOR * max_err(same[i], golden[i]) + floor)
    return res


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def sdpa_cat(q, k, v, mem_k, mem_v):
    """The op without the package: SDPA over ``cat([mem, seg])`` with a bottom-right causal mask."""
    S, M = q.shape[2], 0 if mem_k is None else mem_k.shape[2]
    keys = k if M == 0 else torch.cat([mem_k, k], dim=2)
    vals = v if M == 0 else torch.cat([mem_v, v], dim=2)
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(M + S, device=q.device)[None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=j <= M + i)


def _median_time(fn: Callable[[], object], device: str, reps: int) -> float:
    fn()  # warm-up (and, on the CPU, the dispatcher's calibration of this kind of call)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_shape(device: str) -> Dict[str, int]:
    """The paper's segment shape; a longer memory and more lanes on a GPU."""
    if device == "cpu":
        return dict(B=1, H=8, S=512, M=1024, D=64)
    return dict(B=4, H=8, S=512, M=4096, D=64)


def time_op(device: str, dtype: torch.dtype, reps: int = 3) -> Dict[str, float]:
    """Median ms of the op (``backend="auto"``) and of SDPA over concatenated keys, fwd and fwd+bwd."""
    from .interface import segment_memory_attention

    s = timing_shape(device)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = (rnd(s["B"], s["H"], s["S"], s["D"]).requires_grad_() for _ in range(3))
    mk, mv = rnd(s["B"], s["H"], s["M"], s["D"]), rnd(s["B"], s["H"], s["M"], s["D"])
    do = rnd(s["B"], s["H"], s["S"], s["D"])
    fns = {"op": lambda: segment_memory_attention(q, k, v, mk, mv), "sdpa-cat": lambda: sdpa_cat(q, k, v, mk, mv)}
    out = {}
    for name, f in fns.items():
        def fwd(f=f):
            with torch.no_grad():
                f()

        def fwd_bwd(f=f):
            q.grad = k.grad = v.grad = None
            f().backward(do)

        out[f"{name} fwd ms"] = 1e3 * _median_time(fwd, device, reps)
        out[f"{name} fwd+bwd ms"] = 1e3 * _median_time(fwd_bwd, device, reps)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def environment() -> List[str]:
    """One line each: versions, threads, the CPU and the paths the dispatcher takes."""
    from .cpu_dispatch import describe_cpu

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} CPU threads, {platform.machine()}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    except Exception:  # noqa: BLE001 - any import failure means "no Triton here"
        lines.append("triton: not importable (CUDA tensors take the generic path)")
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name()}")
    lines += [f"{k}: {v}" for k, v in describe_cpu().items()]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsmr_kernels.check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", action="append", choices=["cpu", "cuda", "mps"],
                   help="only this device (repeatable; default: every device present)")
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per call (median; default 3)")
    return p.parse_args(argv)


def run_check(device_list: Sequence[str], timing: bool = True, reps: int = 3,
              print_fn: Callable[[str], None] = print) -> Tuple[List[Result], List[Dict[str, object]]]:
    """Correctness of every (device, dtype, path), then timings; returns both (nothing exits)."""
    results: List[Result] = []
    t0 = time.perf_counter()
    for device in device_list:
        for dtype in dtypes_for(device):
            for path in paths_for(device, dtype):
                results.append(check_path(device, dtype, path))
    rows = [[r.device, r.dtype, r.path, f"{r.ratio:.2f}", "ok" if r.ok else "WRONG", r.worst] for r in results]
    print_fn(_table(["device", "dtype", "path", "worst err/bound", "result", "worst case"], rows))
    print_fn(f"({len(results)} paths x {len(CASES)} cases in {time.perf_counter() - t0:.1f} s; "
             f"bound = {OUT_FACTOR:g}x (output) / {GRAD_FACTOR:g}x (gradients) the float64-golden error "
             "of the reference in the same dtype + a dtype floor)")
    for r in results:
        for f in r.failures:
            print_fn(f"WRONG {r.device} {r.dtype} {r.path}: {f}")
    timings: List[Dict[str, object]] = []
    if timing:
        t1 = time.perf_counter()
        for device in device_list:
            for dtype in (torch.float32, torch.bfloat16):
                if device == "mps" and dtype == torch.bfloat16:
                    continue
                try:
                    t = time_op(device, dtype, reps)
                except Exception as exc:  # noqa: BLE001 - a timing that cannot run is reported, not fatal
                    timings.append({"device": device, "dtype": _NAMES[dtype], "error": f"{type(exc).__name__}: {exc}"})
                    continue
                timings.append({"device": device, "dtype": _NAMES[dtype], **t})
        s = timing_shape("cpu")
        print_fn("")
        trows = []
        for t in timings:
            if "error" in t:
                trows.append([t["device"], t["dtype"], "-", "-", "-", "-", str(t["error"])[:60]])
                continue
            trows.append([t["device"], t["dtype"], f"{t['op fwd ms']:.2f}", f"{t['sdpa-cat fwd ms']:.2f}",
                          f"{t['sdpa-cat fwd ms'] / t['op fwd ms']:.2f}x", f"{t['op fwd+bwd ms']:.2f}",
                          f"{t['sdpa-cat fwd+bwd ms'] / t['op fwd+bwd ms']:.2f}x"])
        print_fn(_table(["device", "dtype", "op fwd ms", "sdpa-cat fwd ms", "op speedup", "op fwd+bwd ms",
                         "fwd+bwd speedup"], trows))
        print_fn(f"(median of {reps}; CPU shape B={s['B']} H={s['H']} S={s['S']} M={s['M']} D={s['D']}, GPU "
                 f"B=4 M=4096; sdpa-cat = F.scaled_dot_product_attention over cat([mem, seg]) with a mask; "
                 f"{time.perf_counter() - t1:.1f} s)")
    return results, timings


def main(argv=None) -> int:
    """Print the environment, the correctness table and the timings; 1 if any result is wrong."""
    args = parse_args(argv)
    device_list = args.device or devices()
    missing = [d for d in device_list if d not in devices()]
    if missing:
        print(f"dsmr check: device(s) {missing} not present here (present: {devices()})", file=sys.stderr)
        return 2
    print("dsmr_kernels self-check\n" + "\n".join("  " + ln for ln in environment()) + "\n", flush=True)
    results, _ = run_check(device_list, timing=not args.no_timing, reps=args.reps)
    from .cpu_dispatch import calibration_state

    chosen = calibration_state()
    if chosen:
        print("calibrated CPU paths: " + "; ".join(f"{d} {dt} {sh} ({n} threads): {p}" for d, dt, sh, n, p in chosen))
    bad = [r for r in results if not r.ok]
    print(f"\n{'WRONG: ' + str(len(bad)) + ' path(s) failed' if bad else 'all paths right'} "
          f"({len(results)} checked on {', '.join(device_list)})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
