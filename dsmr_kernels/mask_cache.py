"""A small LRU cache for the additive masks of the CPU paths, bounded in bytes.

The CPU paths need only small masks (a window edge, a diagonal tile, a GQA-folded causal block);
none scales with the memory length M. They are rebuilt rarely, so one process-wide cache keeps
them, bounded both in total bytes and per entry, so that a full-history layer whose memory grows
every segment cannot make it grow.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Optional

import torch


class MaskCache:
    """LRU cache of small masks, bounded in bytes; masks above ``max_entry_bytes`` are not kept."""

    def __init__(self, max_bytes: int, max_entry_bytes: int, max_entries: int = 256):
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.max_entries = max_entries
        self._store: "OrderedDict[tuple, Optional[torch.Tensor]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(t: Optional[torch.Tensor]) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    def get(self, key: tuple, build: Callable[[], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """The cached value for ``key``, else ``build()`` (kept only if small enough)."""
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                return self._store[key]
        value = build()
        size = self._size(value)
        if size <= self.max_entry_bytes:
            with self._lock:
                if key not in self._store:
                    self._store[key] = value
                    self._bytes += size
                while self._bytes > self.max_bytes or len(self._store) > self.max_entries:
                    _, old = self._store.popitem(last=False)
                    self._bytes -= self._size(old)
        return value

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self._bytes = 0


#: The one cache every CPU path uses (16 MiB in all, 4 MiB per mask at most).
MASK_CACHE = MaskCache(max_bytes=16 << 20, max_entry_bytes=4 << 20)


def mask_cache_nbytes() -> int:
    """Bytes currently held by the CPU paths' mask cache (bounded by ``MASK_CACHE.max_bytes``)."""
    return MASK_CACHE.nbytes
