"""dsmr_kernels: segment-memory attention (the op), its reference, and the drop-in module.

Public names (a contract, see docs/DESIGN.md): ``segment_memory_attention``,
``segment_memory_attention_ref``, ``DSMRAttention``.
"""
from .interface import segment_memory_attention
from .reference import segment_memory_attention_ref

__all__ = ["segment_memory_attention", "segment_memory_attention_ref"]
from .module import AttentionState, DSMRAttention  # noqa: E402

__all__ += ["DSMRAttention", "AttentionState"]
