"""The ``dsmr`` commands, one module each: ``register(subparsers)`` adds the command's parser
and sets ``func`` to its ``run(args) -> int``. :mod:`dsmr.cli` wires them in this order."""
from . import check, data, diagnose, evaluate, generate, schedules, study, train

COMMANDS = (data, schedules, train, evaluate, diagnose, generate, study, check)

__all__ = ["COMMANDS"]
