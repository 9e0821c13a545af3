"""``dsmr train``: a preset, an optional config file and flags -> :func:`dsmr.train.train`.

Model and training flags are the fields of :class:`dsmr.DSMRConfig` and
:class:`dsmr.config.TrainConfig` (see :func:`dsmr.commands.common.add_config_flags`): a new
config field is a new flag, with nothing to list here.
"""
from __future__ import annotations

import json
import sys

from ..config import PRESETS, TrainConfig, load_settings
from ..model import DSMRConfig
from .common import add_config_flags, add_source_args, add_tokenizer_arg, config_overrides, die, load_data

# Fields the command sets another way: the corpus gives vocab_size, --schedule the horizons, --out the folder.
MODEL_SKIP = ("vocab_size", "horizons")
TRAIN_SKIP = ("out_dir",)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model by streaming whole pieces")
    add_source_args(p)
    add_tokenizer_arg(p)
    p.add_argument("--config", help="JSON or TOML file with [model], [train], [data] tables")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--schedule", help="e.g. two_scale:long=4096,short=512,n_long=2, full, or 64,64,8,8")
    p.add_argument("--out", default=None,
                   help="output folder for checkpoints, metrics and plot (default: [train] out_dir or runs/dsmr)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    add_config_flags(p, DSMRConfig, skip=MODEL_SKIP, title="model (DSMRConfig fields)")
    add_config_flags(p, TrainConfig, skip=TRAIN_SKIP, title="training (TrainConfig fields)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..schedules import describe
    from ..train import train

    try:
        settings = load_settings(args.config, preset=args.preset, schedule=args.schedule,
                                 model=config_overrides(args, DSMRConfig, skip=MODEL_SKIP),
                                 train=config_overrides(args, TrainConfig, skip=TRAIN_SKIP),
                                 data={"source": args.source})
    except ValueError as e:
        die(str(e))
    args.source = settings.data.setdefault("source", "demo")
    # --tokenizer, else the file's [data] tokenizer (a preset or path) or tokenizer_config, else piano.
    tokenizer = args.tokenizer or settings.data.get("tokenizer") or settings.data.get("tokenizer_config")
    cache = load_data(args, tokenizer)
    if not cache.pieces(settings.train.get("train_split", "train")):
        die(f"source {args.source!r} has no training pieces")
    settings.train["out_dir"] = args.out or settings.train.get("out_dir") or "runs/dsmr"
    try:
        model_cfg = settings.model_config(cache.vocab_size)
        train_cfg = settings.train_config()
    except (TypeError, ValueError) as e:
        die(str(e))
    print(f"model: {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, horizons "
          f"{describe(model_cfg.layer_horizons)}, segment {model_cfg.segment_len}; data: {cache.path}",
          file=sys.stderr)
    summary = train(model_cfg, train_cfg, data=cache, tokenizer_config=cache.tokenizer_config, resume=args.resume)
    val = summary.get("val") or {}
    keys = ("step", "epoch", "train_loss", "best_val_ppl", "tokens_per_s", "lane_util", "best_checkpoint",
            "last_checkpoint", "plot")
    print(json.dumps({k: summary.get(k) for k in keys} | {"val_ppl": val.get("ppl")}, indent=2, default=str))
    return 0
