"""dsmr: Depth-Structured Music Recurrence — a streaming long-context music model on top of
``dsmr_kernels``.

Public names (a contract, see docs/DESIGN.md): ``DSMRConfig``, ``DSMRModel``, ``schedules``.
"""
from . import schedules
from .model import DSMRConfig, DSMRModel, ModelState

__all__ = ["DSMRConfig", "DSMRModel", "ModelState", "schedules"]
__version__ = "0.1.0"
