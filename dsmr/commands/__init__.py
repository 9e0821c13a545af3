"""The ``dsmr`` commands, one module each: ``register(subparsers)`` adds the command's parser
and sets ``func`` to its ``run(args) -> int``. :mod:`dsmr.cli` wires them in this order."""
from . import data, diagnose, evaluate, generate, schedules, study, train

COMMANDS = (data, schedules, train, evaluate, diagnose, generate, study)

__all__ = ["COMMANDS"]
