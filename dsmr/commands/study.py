"""``dsmr study``: train every schedule family on the same data and token budget, and compare them.

    dsmr study --quick --out runs/study-quick        # every row, a short run (<= 10 min on 2 cores)
    dsmr study --out runs/study                      # the default study (demo corpus, tiny preset)
    dsmr study --long --source ~/data/asap-dataset --out runs/study-long   # when does memory pay? (54-86 min)
    dsmr study --long --plan                         # the rows and token budget, without training
    dsmr study --schedule uniform:m=64 --schedule mine=512,128,0,0

Writes ``OUT/study.csv``, ``OUT/study.md`` and ``OUT/study.png``; rerun the same command after an
interruption and finished rows are reused (see :mod:`dsmr.study`).
"""
from __future__ import annotations

from pathlib import Path

from ..config import PRESETS, read_config_file
from .common import add_source_args, add_threads_arg, die


def register(sub) -> None:
    p = sub.add_parser("study", help="the schedule study: every schedule family, one table (study.csv/md/png)")
    add_source_args(p)
    p.add_argument("--out", default="runs/study", help="study folder (default runs/study); rerun to resume")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="every row, each trained on fewer tokens (<= 10 min on 2 cores)")
    size.add_argument("--long", action="store_true",
                      help="when does memory pay? none, two_scale (2 seeds each) and reach8k=[8192, 128x3], each "
                           "on 27x the default's tokens, learning curves, KRCU at 4096 and 8192; meant for an ASAP "
                           "folder (--source), 54-86 min on 2 idle cores")
    p.add_argument("--plan", action="store_true", help="print the rows and token budget, then exit (no training)")
    p.add_argument("--families", default=None, metavar="NAME[,NAME...]",
                   help="only these family rows (of full, none, two_scale, reverse_two_scale, uniform, "
                        "progressive_asc, progressive_desc, selective, perceiver_ar_like, fhcr); --schedule rows "
                        "are always added")
    p.add_argument("--rows", default=None, metavar="NAME[,NAME...]",
                   help="only the rows of these names, families and --schedule/--long rows alike "
                        "(--long --rows none,two_scale leaves out reach8k)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model preset (default tiny)")
    p.add_argument("--config", help="JSON or TOML file whose [model] table overrides the preset (its schedule is "
                                    "the two-scale reference)")
    p.add_argument("--schedule", action="append", default=[], metavar="[NAME=]SPEC",
                   help="add a row or replace the row of that name (repeatable): uniform:m=64 replaces uniform, "
                        "fhcr:n_kv_heads=1 replaces fhcr, mine=512,128,0,0 adds 'mine'")
    p.add_argument("--train-tokens", type=int, default=None, help="lane slots of training per row")
    p.add_argument("--batch-lanes", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, help="seeds of full, two_scale and none (default 2)")
    p.add_argument("--seed", type=int, default=None, help="first seed (default 0)")
    p.add_argument("--reset-at", type=int, default=None, help="KRCU: token R where memory is wiped (default 4096)")
    p.add_argument("--long-reset-at", default=None, metavar="R|none",
                   help="KRCU's second reset point (default 8192, as in DSMR v3; none: only --reset-at)")
    p.add_argument("--device", default=None, help="cpu (default), cuda or auto")
    add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..threads import governed

    # The loops inside tick this governor (dsmr.threads.tick / train's own, which reuses it).
    with governed(args.threads or "auto"):
        return _run(args)


def _run(args) -> int:
    from ..study import StudyConfig, run_study
    from .common import load_data

    over = {k: v for k, v in (("preset", args.preset), ("train_tokens", args.train_tokens),
                              ("batch_lanes", args.batch_lanes), ("noise_seeds", args.seeds), ("seed", args.seed),
                              ("krcu_reset_at", args.reset_at), ("device", args.device)) if v is not None}
    try:
        if args.long_reset_at is not None:
            text = args.long_reset_at.strip().lower()
            if text != "none" and not text.isdigit():
                raise ValueError(f"--long-reset-at takes a token count or none, got {args.long_reset_at!r}")
            over["krcu_long_reset_at"] = None if text == "none" else int(text)
        if args.families:
            over["families"] = tuple(f.strip() for f in args.families.split(",") if f.strip())
        if args.rows is not None:
            over["rows"] = tuple(f.strip() for f in args.rows.split(",") if f.strip())
        if args.config:
            model = dict(read_config_file(args.config).get("model", {}))
            if "schedule" in model:
                over["two_scale"] = model.pop("schedule")
            over["model"] = model
        make = StudyConfig.quick if args.quick else StudyConfig.long if args.long else StudyConfig
        if args.schedule:
            # --long brings a row of its own (reach8k); --schedule adds to it instead of replacing it.
            over["schedules"] = list(make().schedules) + list(args.schedule)
        cfg = make(**over)
    except (TypeError, ValueError) as e:
        die(str(e))
    if args.plan:
        return _print_plan(cfg)
    if args.long and not args.source:
        die("--long is meant for long pieces in quantity: pass --source with an ASAP folder (clone "
            "https://github.com/fosfrancesco/asap-dataset; see the README's data section), or --plan to see it")
    cache = load_data(args)
    try:
        res = run_study(args.out, cfg, data=cache, source=args.source or "demo",
                        progress=False if args.no_progress else None)
    except ValueError as e:
        die(str(e))
    print(Path(res["markdown"]).read_text().split("## Results")[0].strip())
    print(f"\nwritten: {res['csv']}, {res['markdown']}, {res['plot']}")
    return 0


def _print_plan(cfg) -> int:
    from .. import schedules
    from ..study import study_plan
    from .common import print_table

    try:
        plan = study_plan(cfg)
    except ValueError as e:
        die(str(e))
    m = plan["model"]
    print(f"preset {cfg.preset}: {m['n_layers']} layers x {m['d_model']}, {m['n_heads']} heads, segment "
          f"{m['segment_len']}; {plan['steps']:,} steps of {cfg.batch_lanes} lanes per row "
          f"({plan['lane_slots_per_row']:,} lane slots), a validation every {plan['eval_every']} steps")
    print_table(["row", "spec", "horizons", "KV heads"],
                [[r["key"], r["spec"], schedules.describe(r["horizons"]), r["n_kv_heads"]] for r in plan["rows"]])
    print(f"{len(plan['rows'])} rows, {plan['lane_slots']:,} lane slots of training in all; KRCU at "
          + ", ".join(f"R = {R} (window {W})" for R, W in plan["krcu"]))
    return 0
