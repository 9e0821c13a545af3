"""``dsmr diagnose``: the KV-reset diagnostic of a checkpoint on one piece or many."""
from __future__ import annotations

from .common import add_checkpoint_args, add_source_args, add_threads_arg, die, load_checkpoint, load_data, \
    print_table, split_pieces, write_json


def register(sub) -> None:
    p = sub.add_parser("diagnose", help="KV-reset diagnostic: how much long context a model really uses")
    add_checkpoint_args(p)
    add_threads_arg(p)
    add_source_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--piece", type=int, default=0, help="index of the piece within the split")
    p.add_argument("--pieces", default=None, metavar="N|all",
                   help="average over the first N pieces of the split (or all); pieces too short for R are "
                        "skipped and listed")
    p.add_argument("--reset-at", type=int, default=None, help="token R where memory is wiped (default 8192 or half)")
    p.add_argument("--window", type=int, default=None, help="tokens after R to report")
    p.add_argument("--plot", default="kv_reset.png")
    p.add_argument("--json")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..threads import governed

    # The loops inside tick this governor (dsmr.threads.tick / train's own, which reuses it).
    with governed(args.threads or "auto"):
        return _run(args)


def _run(args) -> int:
    from ..diagnostics import kv_reset_diagnostic

    model, info = load_checkpoint(args)
    cache = load_data(args, info.get("tokenizer_config"))
    pieces, names = split_pieces(args, cache)
    if args.pieces is not None:
        return _many(args, model, cache, pieces, names)
    if not 0 <= args.piece < len(pieces):
        die(f"--piece must lie in [0, {len(pieces)}) for split {args.split!r}")
    try:
        res = kv_reset_diagnostic(model, pieces[args.piece], bos_id=cache.bos_id, eos_id=cache.eos_id,
                                  reset_at=args.reset_at, window=args.window, plot_path=args.plot)
    except ValueError as e:
        die(str(e))
    print(f"piece {names[args.piece]} ({len(pieces[args.piece]):,} tokens), memory wiped at token "
          f"{res['reset_at']:,}; NLL before R {res['nll_before']:.4f}")
    print(f"over the {res['window']:,} tokens after R: NLL {res['nll_after_normal']:.4f} normal vs "
          f"{res['nll_after_wiped']:.4f} wiped; area under the increase {res['auc']:.2f} "
          f"(mean {res['mean_increase']:.4f} nats/token)")
    return _finish(args, res, "tokens")


def _count(text: str, available: int) -> int:
    if text == "all":
        return available
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        die(f"--pieces must be a positive int or 'all', got {text!r}")
    return min(n, available)


def _many(args, model, cache, pieces, names) -> int:
    from ..diagnostics import kv_reset_diagnostic_pieces

    n = _count(args.pieces, len(pieces))
    try:
        res = kv_reset_diagnostic_pieces(model, pieces[:n], names=names[:n], bos_id=cache.bos_id,
                                         eos_id=cache.eos_id, reset_at=args.reset_at, window=args.window,
                                         plot_path=args.plot, progress=True)
    except ValueError as e:
        die(str(e))
    rows = [[p["piece"], f"{p['n_inputs'] - 1:,}", f"{p['reset_at']:,}", f"{p['window']:,}",
             f"{p['nll_before']:.4f}", f"{p['nll_after_normal']:.4f}", f"{p['nll_after_wiped']:.4f}",
             f"{p['mean_increase']:+.4f}"] for p in res["per_piece"]]
    print_table(["piece", "tokens", "R", "tokens after R", "NLL before R", "NLL after (normal)",
                 "NLL after (wiped)", "mean increase"], rows)
    print(f"{len(res['pieces'])} piece(s) diagnosed, {len(res['skipped'])} skipped (too short for R)")
    for s in res["skipped"]:
        print(f"  skipped {s['piece']}: {s['reason']}")
    print(f"pooled over every token after R: mean NLL increase {res['mean_increase']:+.4f} nats/token; "
          f"mean area per piece {res['mean_auc_per_piece']:.2f}")
    return _finish(args, res, "tokens (all pieces)")


def _finish(args, res: dict, tokens_header: str) -> int:
    """The by-distance bucket table, the plot path and the JSON: shared by one piece and many."""
    rows = [[label, f"{b['tokens']:,}", f"{b['mean_increase']:+.4f}"] for label, b in res["buckets"].items()]
    print_table(["distance after R", tokens_header, "mean NLL increase"], rows)
    if args.plot:
        print(f"plot: {args.plot}")
    write_json(args.json, res)
    return 0
