"""The static-cache decode engine on a GPU (for ``bench/gpu_check.sh``; ``--device cpu`` runs the
same checks on the CPU as a smoke test).

1. Logits: for the ``tiny`` and ``small`` preset shapes (random weights scaled up so attention
   is peaked), fp32 and bf16 weights, 4 lanes each fed their own tokens across several segment
   boundaries after a prompt that ends mid-segment: the engine on the device against a float64
   segment-wise ``model.forward`` on the CPU (the definition). The engine's error must stay
   within 3x the device's own ``model.forward`` error in the same dtype (plus a small floor).
2. Speed: ``generate`` / ``generate_samples`` tokens/s through the engine and with
   ``engine=False`` (``model.forward`` per token: the op's split-KV decode kernel on CUDA), batch 1
   and 8, caches at their bound, and the time to first token after a 32k-token prompt.

Writes ``OUT/gpu_decode.md`` and ``.json``; exits 1 when a logits check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model(name: str, dtype, device, vocab: int = 255):
    import torch

    from dsmr import DSMRConfig, DSMRModel, schedules
    from dsmr.config import PRESETS

    p = dict(PRESETS[name])
    spec = p.pop("schedule")
    torch.manual_seed(0)
    model = DSMRModel(DSMRConfig(vocab_size=vocab, horizons=schedules.parse(spec, p["n_layers"]), **p))
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() >= 2:
                w.normal_(0.0, 1.5 / math.sqrt(w.shape[1]))
            else:
                w.normal_(1.0, 0.2)
    return model.eval().to(device=device, dtype=dtype)


def _segment_forward(model, tokens):
    import torch

    S, state, outs = model.config.segment_len, None, []
    t = torch.tensor(tokens, device=next(model.parameters()).device)[None]
    with torch.no_grad():
        for s0 in range(0, t.shape[1], S):
            lg, state = model(t[:, s0:s0 + S], state)
            outs.append(lg[0].double().cpu())
    return torch.cat(outs)


def check_logits(name: str, dtype_name: str, device: str) -> dict:
    import torch

    from dsmr.decode import DecodeEngine

    dtype = getattr(torch, dtype_name)
    model = _model(name, dtype, device)
    truth = _model(name, torch.float64, "cpu")
    S = model.config.segment_len
    g = torch.Generator().manual_seed(0)
    P, n, B = S + S // 2, 2 * S + 7, 4  # the prompt ends mid-segment; decoding crosses two boundaries
    prompt = torch.randint(0, 255, (P,), generator=g).tolist()
    lanes = torch.randint(0, 255, (B, n), generator=g).tolist()
    eng = DecodeEngine(model, B, max_len=P + n)
    with torch.inference_mode():
        rows = [eng.prefill(torch.tensor(prompt, device=device))]
        for i in range(n):
            rows.append(eng.step(torch.tensor([lane[i] for lane in lanes], device=device)))
        got = torch.stack(rows, 1).double().cpu()  # (B, n + 1, V)
    worst = {"engine_err": 0.0, "forward_err": 0.0}
    ok = True
    for b, lane in enumerate(lanes):
        toks = prompt + lane
        exact = _segment_forward(truth, toks)[P - 1:]
        fwd = _segment_forward(model, toks)[P - 1:]
        e_err = float((got[b] - exact).abs().max())
        f_err = float((fwd - exact).abs().max())
        ok &= e_err <= 3 * f_err + (1e-4 if dtype_name == "float32" else 2e-2)
        worst = {"engine_err": max(worst["engine_err"], e_err), "forward_err": max(worst["forward_err"], f_err)}
    return {"shape": name, "dtype": dtype_name, "ok": bool(ok), **worst}


def rates(name: str, dtype_name: str, device: str, batch: int, n: int, n_ref: int) -> dict:
    import torch

    from dsmr.generate import generate, generate_samples

    model = _model(name, getattr(torch, dtype_name), device)
    cfg = model.config
    P = max(cfg.layer_horizons) + cfg.segment_len  # every cache at its bound
    prompt = torch.randint(0, 255, (P,), generator=torch.Generator().manual_seed(1)).tolist()

    def call(k, engine):
        kw = dict(seed=0, stop_at_eos=False, engine=engine)
        if batch == 1:
            return generate(model, prompt, k, **kw)
        return generate_samples(model, prompt, k, batch, **kw)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out = {"shape": name, "dtype": dtype_name, "batch": batch}
    with torch.inference_mode():
        for engine, k in ((True, n), (False, n_ref)):
            call(4, engine)  # warm-up (kernel compiles, allocator)
            sync()
            t0 = time.perf_counter()
            call(1, engine)
            sync()
            t1 = time.perf_counter()
            call(1 + k, engine)
            sync()
            t2 = time.perf_counter()
            out["engine tokens/s" if engine else "model.forward tokens/s"] = batch * k / ((t2 - t1) - (t1 - t0))
    out["engine / model.forward"] = out["engine tokens/s"] / out["model.forward tokens/s"]
    return out


def ttft(name: str, dtype_name: str, device: str, prompt_len: int) -> dict:
    import torch

    from dsmr.generate import generate

    model = _model(name, getattr(torch, dtype_name), device)
    prompt = torch.randint(0, 255, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.inference_mode():
        generate(model, prompt[:1000], 2, seed=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, prompt, 1, seed=0)
        s = time.perf_counter() - t0
    return {"shape": name, "dtype": dtype_name, "prompt tokens": prompt_len, "time to first token s": s}


def _table(rows) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-out"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="fewer tokens, no 32k prompt (a CPU smoke test)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    checks = [check_logits(s, d, args.device) for s in ("tiny", "small") for d in ("float32", "bfloat16")]
    print(_table(checks), flush=True)
    n, n_ref = (16, 4) if args.quick else (256, 64)
    speed = [rates(s, d, args.device, b, n, n_ref) for s in ("tiny", "small") for d in ("float32", "bfloat16")
             for b in (1, 8)]
    print(_table(speed), flush=True)
    first = [] if args.quick else [ttft("small", d, args.device, 32768) for d in ("float32", "bfloat16")]
    if first:
        print(_table(first), flush=True)
    md = ["# Decode engine on " + args.device, "", "## Logits against a float64 segment-wise forward", "",
          _table(checks), "", "## Tokens/s (caches at their bound)", "", _table(speed)]
    if first:
        md += ["", "## Time to first token", "", _table(first)]
    (args.out / "gpu_decode.md").write_text("\n".join(md) + "\n")
    (args.out / "gpu_decode.json").write_text(json.dumps({"checks": checks, "rates": speed, "ttft": first}, indent=2))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
