"""``dsmr data prepare|stats|list``: build a token cache, show its statistics, list caches."""
from __future__ import annotations

from .common import add_source_args, add_tokenizer_arg, default_cache_root, die, fmt_int, load_data, print_table


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare or list sources, show token statistics")
    p.add_argument("action", choices=["prepare", "stats", "list"])
    add_source_args(p, positional=True)
    add_tokenizer_arg(p)
    p.add_argument("--pieces", action="store_true", help="with stats: one line per piece")
    p.set_defaults(func=run)


def _list(args) -> int:
    from ..data import TokenCache

    root = default_cache_root(args)
    tokens = root / "tokens"
    # Hidden .tmp-*/.trash-* folders are builds in progress or being removed, not caches.
    folders = sorted(p for p in tokens.glob("*/index.json") if not p.parent.name.startswith(".")) \
        if tokens.exists() else []
    if not folders:
        print(f"no token caches under {tokens}; build one with `dsmr data prepare demo`")
        return 0
    rows = []
    for idx in folders:
        try:
            c = TokenCache.load(idx.parent)
        except Exception as e:  # noqa: BLE001 - a broken cache is listed, not fatal
            rows.append([idx.parent.name, "-", "-", "-", f"unreadable: {e}"])
            continue
        st = c.stats()
        total = sum(v["tokens"] for k, v in st.items() if k != "skipped")
        rows.append([idx.parent.name, len(c), fmt_int(total), c.vocab_size, st["skipped"]])
    print_table(["cache", "pieces", "tokens", "vocab", "skipped"], rows)
    return 0


def run(args) -> int:
    if args.action == "list":
        return _list(args)
    if not args.source:
        die(f"`dsmr data {args.action}` needs a source: demo, music21, a MAESTRO or ASAP folder, or a MIDI folder")
    cache = load_data(args, args.tokenizer)
    st = cache.stats()
    print(f"cache: {cache.path}")
    print(f"vocab size {cache.vocab_size} (pad {cache.pad_id}, bos {cache.bos_id}, eos {cache.eos_id})")
    rows = [[s, v["pieces"], fmt_int(v["tokens"]), fmt_int(v["min"]), fmt_int(v["median"]), fmt_int(v["max"])]
            for s, v in st.items() if s != "skipped"]
    print_table(["split", "pieces", "tokens", "min", "median", "max"], rows)
    print(f"skipped files: {st['skipped']}")
    overlap = cache.demo_overlap
    if overlap.get("pieces"):
        demo = sorted({p[2] for p in overlap["pieces"]})
        state = "left out (--drop-demo-overlap)" if overlap.get("dropped") else \
            "kept; leave them out of comparisons with the demo corpus (--drop-demo-overlap)"
        print(f"demo corpus overlap: {len(overlap['files'])} performances of {len(overlap['pieces'])} pieces are the "
              f"music of {', '.join(demo)} ({len(overlap['recordings'])} cut from those very recordings): {state}; "
              f"listed in {cache.path / 'index.json'}")
    if not args.skips_printed:  # a cache built earlier: its build's skip lines were not shown now
        for item in cache.skipped[:20]:
            print(f"skipped {item['name']}: {item['reason']}")
        if len(cache.skipped) > 20:
            print(f"... and {len(cache.skipped) - 20} more (index.json in the cache folder lists them all)")
    if args.action == "stats" and args.pieces:
        for split in cache.splits:
            for name, n in zip(cache.names(split), cache.lengths(split)):
                print(f"{split:>10}  {int(n):>8,}  {name}")
    return 0
