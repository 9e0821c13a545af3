"""CPU thread policy: keep torch's intra-op threads on the cores other processes leave free.

    from dsmr.threads import governed
    with governed("auto") as gov:          # or an int (fixed count), or None (leave torch alone)
        for batch in batches:
            gov.tick()                     # cheap; re-decides at most once a second
            ...

Why: torch's CPU kernels run on OpenMP threads that spin at every barrier. When another process
holds one of the cores, one of our threads is descheduled and the others spin until it returns,
so a 2-thread run beside one busy process was measured 3.4x (AMD EPYC) to 12x (Intel Xeon) slower
than idle, while one thread loses only the second core. Changing OpenMP's wait policy
(``OMP_WAIT_POLICY=PASSIVE``) avoids the collapse but costs idle speed (25 s vs 18.5 s for the
same run) and only works before torch is imported. So :class:`ThreadGovernor` measures instead:
every ``interval_s`` it reads how much CPU time the other processes used on the cores this
process may run on (``/proc/stat`` minus this process's own CPU time) and sets
``torch.set_num_threads`` to the cores they leave free, between 1 and the count it started with.
Idle, nothing changes (one file read per second); beside a busy process the run drops to the
free cores within a second and climbs back when the other process ends.

Where ``/proc/stat`` does not exist (macOS, Windows) the governor keeps the starting count.
Used by :func:`dsmr.train.train`, :func:`dsmr.evaluate.evaluate`, :mod:`dsmr.generate` and the
``dsmr`` command line (``--threads auto|N``); ``DSMR_THREADS`` sets the default policy. Outside
such a block the op itself ticks a process-wide governor (:func:`dsmr_kernels.threads.op_tick`),
so a user's own loop around the op is governed too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch

# The policy, the /proc/stat sampler and the governor live beside the op, which ticks them too
# (dsmr_kernels.threads.op_tick); dsmr's loops run them in governed blocks.
from dsmr_kernels.threads import (  # noqa: F401 - re-exported: dsmr.threads is the documented home
    CpuSampler,
    FixedThreads,
    Policy,
    ThreadGovernor,
    _local,
    default_policy,
    parse_policy,
    parse_proc_stat,
    target_threads,
)



def tick() -> int:
    """Tick the governor of the enclosing :func:`governed` block, if any; returns torch's thread count.

    For loops that run inside a governed block without owning it (diagnostics, a study's rows).
    """
    gov = getattr(_local, "gov", None)
    return gov.tick() if gov is not None else torch.get_num_threads()


@contextlib.contextmanager
def governed(threads: Policy = "auto", *, device=None) -> Iterator[Union[ThreadGovernor, FixedThreads]]:
    """Run a block under a thread policy; yields an object with ``tick()`` and ``threads``.

    Args:
        threads: ``"auto"`` (a :class:`ThreadGovernor`, unless ``$DSMR_THREADS`` says otherwise),
            a positive int (that many threads) or None (torch's setting as it is).
        device: the device the work runs on; on anything but CPU the policy is None (the host
            threads only launch kernels there).

    Nested blocks reuse the outermost one (an evaluation inside training follows the trainer's
    governor), and the starting thread count is restored on exit.
    """
    outer = getattr(_local, "gov", None)
    if outer is not None:
        yield outer
        return
    policy = parse_policy(threads)
    if policy == "auto":
        policy = default_policy()
    if device is not None and torch.device(device).type != "cpu":
        policy = None
    gov = ThreadGovernor() if policy == "auto" else FixedThreads(policy)
    _local.gov = gov
    try:
        yield gov
    finally:
        _local.gov = None
        gov.close()
