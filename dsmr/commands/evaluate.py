"""``dsmr eval``: perplexity of a checkpoint over a split, NLL per note, NLL by position in the piece and by
offset in the segment; ``--schedule`` evaluates the same weights with other memory horizons."""
from __future__ import annotations

from .common import add_checkpoint_args, add_source_args, add_threads_arg, load_checkpoint, load_data, print_table, \
    split_pieces, write_json


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and NLL by position of a checkpoint")
    add_checkpoint_args(p)
    add_threads_arg(p)
    add_source_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--batch-lanes", type=int, default=8)
    p.add_argument("--max-pieces", type=int, default=None)
    p.add_argument("--autocast", action="store_true")
    p.add_argument("--schedule", metavar="SPEC",
                   help="evaluate the same weights with these memory horizons instead of the trained ones: "
                        "'none' wipes every layer's memory at each segment start (what does memory give?), "
                        "'full', 'uniform:m=512', '1024,128,128,128', ... (dsmr schedules)")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate import evaluate

    model, info = load_checkpoint(args)
    if args.schedule:
        from .. import schedules
        from .common import die

        try:
            horizons = schedules.parse(args.schedule, model.config.n_layers)
        except ValueError as e:
            die(f"--schedule: {e}")
        print(f"memory: {schedules.describe(horizons)} (trained with {schedules.describe(model.config.layer_horizons)})")
        model = model.with_horizons(horizons)
    cache = load_data(args, info.get("tokenizer_config"))
    pieces, _ = split_pieces(args, cache)
    res = evaluate(model, pieces, pad_id=cache.pad_id, bos_id=cache.bos_id, eos_id=cache.eos_id,
                   batch_lanes=args.batch_lanes, max_pieces=args.max_pieces, progress=True,
                   autocast=args.autocast, tokenizer=cache.tokenizer(), threads=args.threads or "auto")
    print(f"{args.split}: {res['pieces']} pieces, {res['tokens']:,} tokens, NLL {res['nll']:.4f}, "
          f"perplexity {res['ppl']:.3f}")
    if res["nll_per_note"] is not None:
        print(f"{res['notes']:,} notes, NLL per note {res['nll_per_note']:.4f} "
              f"(a piece's total NLL over its note count; compares across tokenizers)")
    rows = [[label, f"{b['tokens']:,}", f"{b['nll']:.4f}" if b["tokens"] else "-",
             f"{b['ppl']:.3f}" if b["tokens"] else "-"] for label, b in res["buckets"].items()]
    print_table(["position", "tokens", "NLL", "ppl"], rows)
    rows = [[label, f"{b['tokens']:,}", f"{b['nll']:.4f}" if b["tokens"] else "-"]
            for label, b in res["offsets"].items()]
    print_table(["segment offset", "tokens", "NLL"], rows)
    write_json(args.json, res)
    return 0
