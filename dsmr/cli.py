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
import sys
import warnings
from typing import Optional, Sequence

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    """The ``dsmr`` parser: one sub-command per module of :mod:`dsmr.commands`."""
    p = argparse.ArgumentParser(prog="dsmr", description="Budgeted recurrent attention for whole pieces of music.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one plain line each, never the Python source line."""
    from .data import warning_line

    print(warning_line(message), file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dsmr`` console script."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # the Python API keeps the standard warnings
        warnings.showwarning = _show_warning
        try:
            return args.func(args) or 0
        except KeyboardInterrupt:
            print("dsmr: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
