"""``dsmr check``: the op's self-check on this machine (``python -m dsmr_kernels.check``)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check", help="is the attention op right and fast here? (every device, dtype and CPU path)",
                       description="Runs the op on every device present, every dtype and every CPU path against "
                                   "a float64 reference, then times it against plain SDPA; exits 1 on a wrong result.")
    p.add_argument("--device", action="append", choices=["cpu", "cuda", "mps"],
                   help="only this device (repeatable; default: every device present)")
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per call (median; default 3)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dsmr_kernels.check import main

    argv = [f"--device={d}" for d in args.device or []] + (["--no-timing"] if args.no_timing else [])
    return main(argv + [f"--reps={args.reps}"])
