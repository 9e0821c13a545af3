"""The op ticks the thread governor (dsmr_kernels.threads.op_tick): a user's own loop around the op
drops to the cores other processes leave free, with no code of its own."""
import pytest
import torch

from dsmr_kernels import threads as kt
from dsmr_kernels import torch_backend
from dsmr_kernels.testing import make_inputs

from ..dsmr.test_threads import FakeSampler  # scripted /proc/stat
from .cpu_helpers import torch_op


@pytest.fixture
def ambient(monkeypatch):
    """Two threads, a fresh ambient governor whose /proc/stat shows another process on one core
    for three decisions, then nothing; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    script = [(0.0, 0.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)] + [(0.0, 2.0)] * 100

    class Scripted(kt.ThreadGovernor):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "interval_s": 0.0, "sampler": FakeSampler(script)})

    monkeypatch.setattr(kt, "ThreadGovernor", Scripted)
    monkeypatch.delenv("DSMR_THREADS", raising=False)
    kt.reset_ambient()
    yield
    kt.reset_ambient()
    torch.set_num_threads(n)


def _call():
    q, k, v, mk, mv, ml = make_inputs(1, 2, 2, 20, 7, 8, torch.float32, requires_grad=False)
    torch_op(q, k, v, mk, mv, ml)


def test_op_calls_drop_to_free_cores_and_climb_back(ambient):
    seen = []
    for _ in range(5):
        _call()
        seen.append(torch.get_num_threads())
    assert seen[:3] == [1, 1, 1] and seen[-1] == 2
    assert [h[2] for h in kt.ambient_history()] == [1, 2]


def test_none_leaves_torch_alone(ambient, monkeypatch):
    monkeypatch.setenv("DSMR_THREADS", "none")
    kt.reset_ambient()
    for _ in range(4):
        _call()
        assert torch.get_num_threads() == 2
    assert kt.ambient_history() == []


def test_a_count_the_caller_sets_becomes_the_ceiling(ambient):
    for _ in range(5):
        _call()
    assert torch.get_num_threads() == 2  # the busy stretch is over
    torch.set_num_threads(1)  # the caller's own choice
    for _ in range(3):
        _call()
        assert torch.get_num_threads() == 1  # idle cores do not override it


def test_inside_a_governed_block_the_block_governor_ticks(ambient, monkeypatch):
    ticks = []

    class Gov:
        threads = 2

        def tick(self):
            ticks.append(1)
            return 2

    monkeypatch.setattr(kt._local, "gov", Gov(), raising=False)
    _call()
    assert ticks == [1] and kt.ambient_history() == [] and kt._AMBIENT.gov is None


def test_every_cpu_call_ticks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_backend, "op_tick", lambda: calls.append(1))
    _call()
    _call()
    assert calls == [1, 1]
