"""``dsmr schedules``: every schedule family and its KV budget for one model shape (``none``, the
no-memory control, included)."""
from __future__ import annotations

from typing import List

from .. import schedules as sch
from .common import die, fmt_int, print_table


def register(sub) -> None:
    p = sub.add_parser("schedules", help="table of schedules and their KV budget for a model config")
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--segment-len", type=int, default=512)
    p.add_argument("--piece-len", type=int, default=16384, help="tokens a whole-history layer holds at the end")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--long", type=int, default=4096)
    p.add_argument("--short", type=int, default=512)
    p.add_argument("--n-long", type=int, default=2)
    p.add_argument("--schedule", action="append", help="a schedule spec to show (repeatable); default: all families")
    p.set_defaults(func=run)


def standard_schedules(n: int, long: int, short: int, n_long: int) -> List[tuple]:
    """``(spec, horizons)`` of every family at the given sizes."""
    mid = max(1, n // 2)
    return [
        ("full", sch.full(n)),
        ("none", sch.none(n)),  # the no-memory control: each segment sees only itself
        (f"uniform:m={short}", sch.uniform(n, short)),
        (f"uniform:m={long}", sch.uniform(n, long)),
        (f"two_scale:long={long},short={short},n_long={n_long}", sch.two_scale(n, long, short, n_long)),
        (f"reverse_two_scale:long={long},short={short},n_long={n_long}",
         sch.reverse_two_scale(n, long, short, n_long)),
        (f"progressive:low={short},high={long}", sch.progressive(n, short, long)),
        (f"progressive:low={short},high={long},ascending=false", sch.progressive(n, short, long, False)),
        (f"selective:m={long},layers=0+{mid}", sch.selective(n, long, [0, mid])),
        (f"perceiver_ar_like:long={long}", sch.perceiver_ar_like(n, long)),
    ]


def run(args) -> int:
    n = args.n_layers
    n_kv = args.n_kv_heads or args.n_heads
    for name in ("n_layers", "d_model", "n_heads", "piece_len", "batch"):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % args.n_heads:
        die(f"--d-model {args.d_model} must be a multiple of --n-heads {args.n_heads}")
    head_dim = args.d_model // args.n_heads
    bpe = {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype]
    try:
        items = [(s, sch.parse(s, n)) for s in args.schedule] if args.schedule else \
            standard_schedules(n, args.long, args.short, args.n_long)
    except ValueError as e:
        die(str(e))
    full_slots = sch.budget(sch.full(n), piece_len=args.piece_len)["slots"]
    rows = []
    for name, hs in items:
        b = sch.budget(hs, piece_len=args.piece_len, segment_len=args.segment_len, n_kv_heads=n_kv,
                       head_dim=head_dim, batch=args.batch, bytes_per_elem=bpe)
        rows.append([name, sch.describe(hs), fmt_int(b["slots"]), f"{b['bytes'] / 2**20:,.1f}",
                     f"{b['slots'] / full_slots:.3f}"])
    print(f"{n} layers, d_model {args.d_model}, {args.n_heads} heads ({n_kv} kv), head dim {head_dim}, "
          f"segment {args.segment_len}, piece {args.piece_len:,} tokens, batch {args.batch}, {args.dtype} KV")
    print("budget = KV slots per lane summed over layers (whole-history layers count the piece length)\n")
    print_table(["schedule", "horizons (layer 0 first)", "slots", "KV MiB", "vs full"], rows)
    return 0
