"""GPU op benchmark (run by ``bench/gpu_check.sh`` on a CUDA machine; not part of ``bench/run.py``).

Times ``segment_memory_attention(backend="triton")`` forward and forward+backward at the paper's
shapes (B 8, H 8, S 512, D 64, bf16, every lane with M valid memory slots) against

* PyTorch SDPA over the concatenated keys ``cat([mem, seg])`` with a bottom-right causal bias
  (``torch.nn.attention.bias.causal_lower_right``; PyTorch picks flash / cuDNN / efficient), and
* FlexAttention (compiled) with a block mask of the same visibility,

and the decode path (S = 1, no grad) against SDPA. Reports ms, TFLOP/s (causal FLOPs actually
needed: ``4 * B * H * D * sum_i visible_i`` forward, 2.5x that for the backward) and the
percentage of this card's measured bf16 matmul peak. Writes ``OUT/gpu_op.md`` and ``.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import traceback
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmr_kernels import segment_memory_attention  # noqa: E402


def matmul_peak_tflops(n: int = 8192) -> float:
    """Measured bf16 GEMM throughput of this card (TFLOP/s): the ceiling the op is compared to."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300)
    return 2 * n ** 3 / ms / 1e9


def causal_flops(B, H, S, M, D) -> float:
    """Forward FLOPs of the visible (query, key) pairs: query i sees M + i + 1 keys."""
    visible = S * M + S * (S + 1) / 2
    return 4.0 * B * H * D * visible


def inputs(B, H, S, M, D, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    q, k, v = mk(B, H, S, D), mk(B, H, S, D), mk(B, H, S, D)
    mem_k, mem_v = (mk(B, H, M, D), mk(B, H, M, D)) if M else (None, None)
    mem_len = torch.full((B,), M, device="cuda", dtype=torch.int32) if M else None
    return q, k, v, mem_k, mem_v, mem_len


def _contenders(q, k, v, mem_k, mem_v, mem_len, S, M):
    """name -> fn(q, k, v) computing the same attention."""
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def cat(x, mem):
        return x if mem is None else torch.cat([mem, x], dim=2)

    fns = {"dsmr triton": lambda q, k, v: segment_memory_attention(q, k, v, mem_k, mem_v, mem_len, backend="triton")}
    if M == 0:
        fns["sdpa causal"] = lambda q, k, v: sdpa(q, k, v, is_causal=True)
    else:
        bias = causal_lower_right(S, M + S)
        fns["sdpa cat + lower-right causal"] = lambda q, k, v: sdpa(q, cat(k, mem_k), cat(v, mem_v), attn_mask=bias)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(lambda b, h, qi, kj: kj <= qi + M, B=None, H=None, Q_LEN=S, KV_LEN=M + S,
                                       device="cuda")
        fns["flex attention"] = lambda q, k, v: flex(q, cat(k, mem_k), cat(v, mem_v), block_mask=block_mask)
    except Exception:  # noqa: BLE001 -- an older torch without FlexAttention: the row says so
        traceback.print_exc()
    return fns


def bench_training_shapes(B, H, S, D, Ms, peak, rows):
    for M in Ms:
        q, k, v, mem_k, mem_v, mem_len = inputs(B, H, S, M, D)
        flops = causal_flops(B, H, S, M, D)
        for name, fn in _contenders(q, k, v, mem_k, mem_v, mem_len, S, M).items():
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            do = torch.randn_like(q)
            for mode in ("fwd", "fwd+bwd"):
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=200)
                        work = flops
                    else:
                        ms = triton.testing.do_bench(lambda: fn(qg, kg, vg).backward(do), warmup=25, rep=200,
                                                     grad_to_none=[qg, kg, vg])
                        work = 3.5 * flops
                    tf = work / ms / 1e9
                    rows.append(dict(case=f"train M={M}", impl=name, mode=mode, ms=round(ms, 4),
                                     tflops=round(tf, 1), pct_peak=round(100 * tf / peak, 1), note=""))
                except Exception as e:  # noqa: BLE001 -- one failing contender must not hide the rest
                    rows.append(dict(case=f"train M={M}", impl=name, mode=mode, ms="", tflops="", pct_peak="",
                                     note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            print(rows[-1], flush=True)
        q = k = v = mem_k = mem_v = None  # free before the next, larger M
        torch.cuda.empty_cache()


def bench_decode(B, H, D, Ms, peak, rows):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for M in Ms:
        q, k, v, mem_k, mem_v, mem_len = inputs(B, H, 1, M, D)
        kc, vc = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
        flops = causal_flops(B, H, 1, M, D)
        fns = {
            "dsmr triton (decode)": lambda: segment_memory_attention(q, k, v, mem_k, mem_v, mem_len, backend="triton"),
            "sdpa over cat keys": lambda: sdpa(q, kc, vc),
        }
        for name, fn in fns.items():
            with torch.no_grad():
                ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            bytes_moved = 2 * (M + 1) * B * H * D * 2  # K and V read once, bf16
            rows.append(dict(case=f"decode S=1 M={M}", impl=name, mode="fwd", ms=round(ms, 4),
                             tflops=round(flops / ms / 1e9, 2), pct_peak="",
                             note=f"{bytes_moved / ms / 1e6:.0f} GB/s of K/V"))
            print(rows[-1], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    ap.add_argument("--quick", action="store_true", help="M in {0, 4096} only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_op.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak_tflops()
    rows = []
    Ms = (0, 4096) if args.quick else (0, 4096, 16384)
    bench_training_shapes(8, 8, 512, 64, Ms, peak, rows)
    bench_decode(8, 8, 64, (4096, 16384), peak, rows)
    cols = ["case", "impl", "mode", "ms", "tflops", "pct_peak", "note"]
    with open(out / "gpu_op.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# GPU op benchmark: {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; measured bf16 matmul peak "
             f"{peak:.0f} TFLOP/s (8192^3). B 8, H 8, S 512, D 64, bf16; every lane has M valid slots.", "",
             "| case | impl | mode | ms | TFLOP/s | % of matmul peak | note |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['impl']} | {r['mode']} | {r['ms']} | {r['tflops']} | {r['pct_peak']} | {r['note']} |"
              for r in rows]
    (out / "gpu_op.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
