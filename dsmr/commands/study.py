"""``dsmr study``: train every schedule family on the same data and token budget, and compare them.

    dsmr study --quick --out runs/study-quick        # every row, a short run (<= 10 min on 2 cores)
    dsmr study --out runs/study                      # the default study (demo corpus, tiny preset)
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
    p.add_argument("--quick", action="store_true", help="every row, each trained on fewer tokens (<= 10 min on 2 cores)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model preset (default tiny)")
    p.add_argument("--config", help="JSON or TOML file whose [model] table overrides the preset (its schedule is "
                                    "the two-scale reference)")
    p.add_argument("--schedule", action="append", default=[], metavar="[NAME=]SPEC",
                   help="add a row or replace the row of that name (repeatable): uniform:m=64 replaces uniform, "
                        "fhcr:n_kv_heads=1 replaces fhcr, mine=512,128,0,0 adds 'mine'")
    p.add_argument("--train-tokens", type=int, default=None, help="lane slots of training per row")
    p.add_argument("--batch-lanes", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, help="seeds of full and two_scale (default 2)")
    p.add_argument("--seed", type=int, default=None, help="first seed (default 0)")
    p.add_argument("--reset-at", type=int, default=None, help="KRCU: token R where memory is wiped")
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
        if args.config:
            model = dict(read_config_file(args.config).get("model", {}))
            if "schedule" in model:
                over["two_scale"] = model.pop("schedule")
            over["model"] = model
        cfg = (StudyConfig.quick if args.quick else StudyConfig)(schedules=list(args.schedule), **over)
    except (TypeError, ValueError) as e:
        die(str(e))
    cache = load_data(args)
    try:
        res = run_study(args.out, cfg, data=cache, source=args.source or "demo",
                        progress=False if args.no_progress else None)
    except ValueError as e:
        die(str(e))
    print(Path(res["markdown"]).read_text().split("## Results")[0].strip())
    print(f"\nwritten: {res['csv']}, {res['markdown']}, {res['plot']}")
    return 0
