"""CPU thread policy, shared by the op and by dsmr's loops: keep torch's intra-op threads on the
cores other processes leave free.

Why: torch's CPU kernels run on OpenMP threads that spin at every barrier. When another process
holds one of the cores, one of our threads is descheduled and the others spin until it returns,
so a 2-thread run beside one busy process was measured 3.4x (AMD EPYC) to 12x (Intel Xeon) slower
than idle, while one thread loses only the second core. Changing OpenMP's wait policy
(``OMP_WAIT_POLICY=PASSIVE``) avoids the collapse but costs idle speed and only works before torch
is imported. So :class:`ThreadGovernor` measures instead: every ``interval_s`` it reads how much
CPU time the other processes used on the cores this process may run on (``/proc/stat`` minus this
process's own CPU time) and sets ``torch.set_num_threads`` to the cores they leave free, between 1
and the count it started with.

Two users:

* :func:`op_tick` -- every CPU call of the op ticks it, so a user's own loop around
  ``segment_memory_attention`` or ``DSMRAttention`` survives background work with no code of its
  own: outside a governed block a process-wide *ambient* governor (created on the first call,
  ``$DSMR_THREADS`` = ``auto``, the default) decides; ``DSMR_THREADS=none`` leaves torch's setting
  alone, ``DSMR_THREADS=N`` fixes N threads. A thread count the caller sets with
  ``torch.set_num_threads`` becomes the new ceiling.
* :func:`dsmr.threads.governed` -- dsmr's trainer, evaluation and generation run their loops in a
  governed block (restored on exit); the op then ticks that block's governor instead.

Where ``/proc/stat`` does not exist (macOS, Windows) the governor keeps the starting count.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

Policy = Union[None, int, str]

# /proc/stat columns: user nice system idle iowait irq softirq steal guest guest_nice.
# Busy = everything but idle and iowait; guest time is already inside user/nice.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def parse_policy(threads: Policy) -> Policy:
    """``"auto"`` | a positive int (also as text) | None or ``"none"`` (leave torch's setting alone).

    ValueError naming the bad value otherwise.
    """
    if threads is None or threads == "auto":
        return threads
    if isinstance(threads, str):
        text = threads.strip().lower()
        if text in ("auto", "none"):
            return None if text == "none" else "auto"
        if text.isdigit():
            threads = int(text)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be 'auto', a positive int or None, got {threads!r}")
    return threads


def default_policy() -> Policy:
    """What ``"auto"`` resolves to: ``$DSMR_THREADS`` if set (``auto``, ``none`` or N), else ``"auto"``."""
    env = os.environ.get("DSMR_THREADS")
    if env is None or not env.strip():
        return "auto"
    try:
        return parse_policy(env)
    except ValueError:
        raise ValueError(f"DSMR_THREADS must be 'auto', 'none' or a positive int, got {env!r}") from None


def _allowed_cpus() -> Optional[Sequence[int]]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def parse_proc_stat(text: str, cpus: Optional[Sequence[int]]) -> Optional[float]:
    """Busy ticks (USER_HZ) summed over the ``cpuN`` lines of ``cpus`` (all of them if None)."""
    want = None if cpus is None else set(cpus)
    total, seen = 0, False
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *cols = line.split()
        try:
            idx = int(name[3:])
        except ValueError:
            continue
        if want is not None and idx not in want:
            continue
        vals = [int(c) for c in cols]
        total += sum(vals[i] for i in _BUSY_COLUMNS if i < len(vals))
        seen = True
    return float(total) if seen else None


class CpuSampler:
    """``sample() -> (wall s, busy CPU s on our cores, this process's CPU s)`` or None if unknown."""

    def __init__(self, path: str = "/proc/stat"):
        self.path = path
        self.cpus = _allowed_cpus()
        self.hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0

    @property
    def n_cpus(self) -> int:
        return len(self.cpus) if self.cpus else (os.cpu_count() or 1)

    def sample(self) -> Optional[Tuple[float, float, float]]:
        try:
            with open(self.path) as f:
                busy = parse_proc_stat(f.read(), self.cpus)
        except OSError:
            return None
        if busy is None:
            return None
        return time.monotonic(), busy / self.hz, time.process_time()


def target_threads(n_cpus: int, others: float, current: int, max_threads: int) -> int:
    """Thread count for ``others`` cores' worth of CPU used by other processes.

    A core counts as free when other processes use less than about half of it; the two
    thresholds (0.6 to add a thread, 0.4 to drop one) keep a half-busy core from flapping.
    """
    free = n_cpus - max(others, 0.0)
    up, down = math.ceil(free - 0.6), math.ceil(free - 0.4)
    new = up if up > current else (down if down < current else current)
    return max(1, min(max_threads, new))


class ThreadGovernor:
    """Sets torch's intra-op thread count to the cores other processes leave free.

    Args:
        max_threads: the most threads to use (default: torch's count when the governor starts).
        interval_s: least seconds between two decisions (shorter windows are noise at USER_HZ).
        sampler: a :class:`CpuSampler` (tests pass a fake one).
        set_threads: how to apply a count (default ``torch.set_num_threads``).

    ``tick()`` is cheap between decisions (one clock read). ``history`` records every change as
    ``(seconds since start, others' cores, new thread count)``; :meth:`close` restores the
    starting count.
    """

    def __init__(self, max_threads: Optional[int] = None, *, interval_s: float = 1.0,
                 sampler: Optional[CpuSampler] = None,
                 set_threads: Optional[Callable[[int], None]] = None):
        self.start_threads = torch.get_num_threads()
        self.max_threads = max(1, int(max_threads or self.start_threads))
        self.threads = self.start_threads
        self.interval_s = float(interval_s)
        self.sampler = sampler or CpuSampler()
        self._set = set_threads or torch.set_num_threads
        self._last = self.sampler.sample()
        self._due = time.monotonic() + self.interval_s
        self.active = self._last is not None
        self._t0 = self._last[0] if self._last else time.monotonic()
        self.others = 0.0
        self.history = []
        if self.threads > self.max_threads:
            self._apply(self.max_threads)

    def _apply(self, n: int) -> None:
        self._set(n)
        self.threads = n
        stamp = (self._last[0] - self._t0) if self._last else 0.0
        self.history.append((round(stamp, 3), round(self.others, 3), n))

    def tick(self) -> int:
        """Re-decide if ``interval_s`` has passed since the last decision; returns the count in use."""
        if not self.active or time.monotonic() < self._due:
            return self.threads
        self._due = time.monotonic() + self.interval_s
        now = self.sampler.sample()
        if now is None:
            self.active = False
            return self.threads
        dt = now[0] - self._last[0]
        busy, mine = now[1] - self._last[1], now[2] - self._last[2]
        self._last = now
        self.others = max(0.0, (busy - mine) / max(dt, 1e-9))
        n = target_threads(self.sampler.n_cpus, self.others, self.threads, self.max_threads)
        if n != self.threads:
            self._apply(n)
        return self.threads

    def close(self) -> None:
        if torch.get_num_threads() != self.start_threads:
            self._set(self.start_threads)
        self.threads = self.start_threads


class FixedThreads:
    """A fixed thread count for the duration (``tick`` does nothing); :meth:`close` restores."""

    active = False

    def __init__(self, n: Optional[int]):
        self.start_threads = torch.get_num_threads()
        self.threads = self.start_threads if n is None else n
        self.history = []
        if n is not None and n != self.start_threads:
            torch.set_num_threads(n)

    def tick(self) -> int:
        return self.threads

    def close(self) -> None:
        if torch.get_num_threads() != self.start_threads:
            torch.set_num_threads(self.start_threads)


#: The governor of the enclosing :func:`dsmr.threads.governed` block, per Python thread.
_local = threading.local()


class _Ambient:
    """The process-wide governor of op calls made outside any governed block (see :func:`op_tick`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.gov: Optional[Union[ThreadGovernor, FixedThreads]] = None
        self.policy: Policy = "unset"


_AMBIENT = _Ambient()


def _ambient_governor() -> Optional[Union[ThreadGovernor, FixedThreads]]:
    amb = _AMBIENT
    with amb.lock:
        if amb.gov is None:
            try:
                policy = default_policy()
            except ValueError:
                policy = None  # a bad DSMR_THREADS is reported by the commands that read it; the op carries on
            if policy is None:
                return None
            amb.policy = policy
            amb.gov = ThreadGovernor() if policy == "auto" else FixedThreads(policy)
        return amb.gov


def op_tick() -> int:
    """Called by every CPU call of the op: tick the governor in charge; returns torch's thread count.

    Inside a governed block that block's governor ticks (a loop that forgot to tick is still
    governed). Outside, the ambient governor does, created on the first call from
    ``$DSMR_THREADS`` (``auto`` by default; ``none`` turns this off). Between decisions a tick
    costs one clock read; a decision (at most once a second) one read of ``/proc/stat``.
    """
    gov = getattr(_local, "gov", None)
    if gov is not None:
        return gov.tick()
    if _AMBIENT.policy is None:
        return torch.get_num_threads()
    gov = _ambient_governor()
    if gov is None:
        _AMBIENT.policy = None
        return torch.get_num_threads()
    now = torch.get_num_threads()
    if now != gov.threads:
        # The caller set another count since our last decision: that count is the new ceiling.
        gov.start_threads = gov.threads = now
        if isinstance(gov, ThreadGovernor):
            gov.max_threads = now
    return gov.tick()


def reset_ambient() -> None:
    """Forget the ambient governor (tests; or after changing ``$DSMR_THREADS`` at run time)."""
    with _AMBIENT.lock:
        _AMBIENT.gov, _AMBIENT.policy = None, "unset"


def ambient_history() -> list:
    """The ambient governor's changes ``[(seconds, others' cores, threads), ...]`` (empty if none)."""
    gov = _AMBIENT.gov
    return list(gov.history) if gov is not None else []
