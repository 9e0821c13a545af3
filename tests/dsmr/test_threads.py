"""CPU thread policy: parsing, the /proc/stat reading, the governor's decisions, and its use in
the trainer, evaluation, generation and the command line."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dsmr import DSMRConfig, DSMRModel
from dsmr import threads as th
from dsmr.config import TrainConfig
from dsmr.evaluate import evaluate
from dsmr.generate import generate
from dsmr.train import train


@pytest.fixture
def two_threads():
    """The governor never goes above the count it starts with; start tests at two."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# policy values


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (None, None), ("none", None), (3, 3), ("2", 2),
                                            (" AUTO ", "auto")])
def test_parse_policy_accepts(value, expected):
    assert th.parse_policy(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "two", 1.5, True, "1.5"])
def test_parse_policy_rejects_with_the_value_named(value):
    with pytest.raises(ValueError, match="threads"):
        th.parse_policy(value)


def test_train_config_checks_threads():
    assert th.parse_policy(TrainConfig(max_steps=1, threads="4").threads) == 4
    assert TrainConfig(max_steps=1).threads == "auto"
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(max_steps=1, threads="many")
    cfg = TrainConfig(max_steps=1, threads=2)
    assert TrainConfig.from_json(cfg.to_json()).threads == 2


def test_env_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv("DSMR_THREADS", "1")
    with th.governed("auto") as gov:
        assert isinstance(gov, th.FixedThreads) and torch.get_num_threads() == 1
    monkeypatch.setenv("DSMR_THREADS", "lots")
    with pytest.raises(ValueError, match="DSMR_THREADS"):
        with th.governed("auto"):
            pass


# ---------------------------------------------------------------------------------------------
# /proc/stat and the decision


PROC_STAT = """cpu  300 0 100 900 50 0 0 0 0 0
cpu0 100 0 50 400 10 0 0 0 0 0
cpu1 200 5 50 500 40 3 2 1 7 0
cpu2 999 0 0 0 0 0 0 0 0 0
intr 12345
ctxt 999
"""


def test_parse_proc_stat_sums_busy_columns_of_allowed_cpus_only():
    # busy = user + nice + system + irq + softirq + steal (guest is inside user); idle and iowait are not
    assert th.parse_proc_stat(PROC_STAT, [0, 1]) == (100 + 50) + (200 + 5 + 50 + 3 + 2 + 1)
    assert th.parse_proc_stat(PROC_STAT, [2]) == 999
    assert th.parse_proc_stat(PROC_STAT, None) == 150 + 261 + 999
    assert th.parse_proc_stat(PROC_STAT, [7]) is None
    assert th.parse_proc_stat("intr 1\n", None) is None


@pytest.mark.parametrize("n,others,current,max_threads,expected", [
    (2, 0.0, 2, 2, 2),    # idle: every core
    (2, 1.0, 2, 2, 1),    # one busy process: the free core
    (2, 0.97, 1, 2, 1),   # ... and it stays there while the process runs
    (2, 0.05, 1, 2, 2),   # the process ended: back to both
    (2, 0.5, 2, 2, 2),    # a half-busy core neither drops ...
    (2, 0.5, 1, 2, 1),    # ... nor adds a thread (hysteresis)
    (2, 0.65, 2, 2, 1),
    (2, 0.35, 1, 2, 2),
    (2, 3.0, 2, 2, 1),    # never below one
    (16, 1.0, 8, 8, 8),   # never above the starting count
    (16, 10.0, 8, 8, 6),
])
def test_target_threads(n, others, current, max_threads, expected):
    assert th.target_threads(n, others, current, max_threads) == expected


class FakeSampler:
    """Scripted /proc/stat: each sample advances 1 s; ``others`` and ``mine`` are cores' worth of CPU."""

    def __init__(self, script, n_cpus=2):
        self.script, self.n_cpus = list(script), n_cpus
        self.t = self.busy = self.mine = 0.0

    def sample(self):
        if not self.script:
            return None
        others, mine = self.script.pop(0)
        self.t += 1.0
        self.busy += others + mine
        self.mine += mine
        return self.t, self.busy, self.mine


def test_governor_follows_a_busy_process_and_returns(two_threads):
    applied = []
    # (others' cores, our cores) over each one-second window, after the first baseline sample
    sampler = FakeSampler([(0, 0), (0.0, 2.0), (0.8, 1.2), (1.0, 1.0), (1.0, 1.0), (0.02, 1.0), (0.0, 2.0)])
    gov = th.ThreadGovernor(interval_s=0.0, sampler=sampler, set_threads=applied.append)
    seen = [gov.tick() for _ in range(6)]
    assert seen == [2, 1, 1, 1, 2, 2]
    assert applied == [1, 2]
    assert [h[2] for h in gov.history] == [1, 2] and gov.history[0][1] == pytest.approx(0.8)
    assert gov.tick() == 2 and not gov.active  # the sampler ran dry: the governor stops deciding


def test_governor_waits_for_its_interval(two_threads):
    sampler = FakeSampler([(0, 0), (2.0, 0.0)])
    gov = th.ThreadGovernor(interval_s=3600.0, sampler=sampler, set_threads=lambda n: None)
    assert gov.tick() == 2 and len(sampler.script) == 1  # no second sample within the interval


def test_governor_is_inert_without_proc_stat(two_threads, tmp_path):
    gov = th.ThreadGovernor(interval_s=0.0, sampler=th.CpuSampler(str(tmp_path / "missing")))
    assert not gov.active and gov.tick() == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="/proc/stat is Linux-only")
def test_sampler_sees_another_busy_process():
    sampler = th.CpuSampler()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let the interpreter start
        a = sampler.sample()
        time.sleep(1.2)
        b = sampler.sample()
    finally:
        busy.kill()
        busy.wait()
    others = ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0])
    assert others > 0.5, others


# ---------------------------------------------------------------------------------------------
# governed blocks


def test_governed_fixed_count_restores(two_threads):
    with th.governed(1) as gov:
        assert torch.get_num_threads() == 1 and gov.tick() == 1
        with th.governed("auto") as inner:  # nested: the outer policy holds
            assert inner is gov and th.tick() == 1
    assert torch.get_num_threads() == 2
    assert th.tick() == 2  # outside any block: torch's count, nothing changed


def test_governed_none_and_non_cpu_devices_leave_torch_alone(two_threads):
    with th.governed(None) as gov:
        assert isinstance(gov, th.FixedThreads) and torch.get_num_threads() == 2
    with th.governed(1, device="meta") as gov:
        assert torch.get_num_threads() == 2


class _Contended(th.ThreadGovernor):
    """A governor whose /proc/stat says another process holds a full core (every decision)."""

    def __init__(self, *a, **kw):
        script = [(0.0, 0.0)] + [(1.0, 1.0)] * 10_000
        super().__init__(*a, **{**kw, "interval_s": 0.0, "sampler": FakeSampler(script)})


PAD, BOS, EOS = 0, 1, 2


def _tiny():
    torch.manual_seed(0)
    return DSMRConfig(vocab_size=19, n_layers=2, d_model=32, n_heads=2, segment_len=16, horizons=[32, 16])


def _pieces(n=4, length=60):
    rng = np.random.default_rng(0)
    return [rng.integers(3, 19, size=length) for _ in range(n)]


def test_train_runs_under_its_policy_and_restores(two_threads, tmp_path, monkeypatch):
    seen = []
    cb = lambda step, rec: seen.append((torch.get_num_threads(), rec.get("threads")))  # noqa: E731
    common = dict(vocab_size=19, pad_id=PAD, bos_id=BOS, eos_id=EOS, callback=cb)
    cfg = TrainConfig(out_dir=str(tmp_path / "a"), batch_lanes=2, max_steps=3, eval_every=0, log_every=1,
                      progress=False, plot=False, threads=1)
    train(_tiny(), cfg, _pieces(), None, **common)
    assert [s[0] for s in seen] == [1, 1, 1] and [s[1] for s in seen] == [1, 1, 1]
    assert torch.get_num_threads() == 2

    # "auto" beside a (simulated) busy process: the trainer drops to the free core, then restores.
    monkeypatch.setattr(th, "ThreadGovernor", _Contended)
    seen.clear()
    cfg = TrainConfig(out_dir=str(tmp_path / "b"), batch_lanes=2, max_steps=3, eval_every=0, log_every=1,
                      progress=False, plot=False)
    train(_tiny(), cfg, _pieces(), None, **common)
    assert [s[0] for s in seen] == [1, 1, 1] and [s[1] for s in seen] == [1, 1, 1]
    assert torch.get_num_threads() == 2


def test_evaluate_and_generate_tick_the_governor(two_threads, monkeypatch):
    monkeypatch.setattr(th, "ThreadGovernor", _Contended)
    model = DSMRModel(_tiny())
    counts = []
    real_forward = DSMRModel.forward

    def spy(self, *a, **kw):
        counts.append(torch.get_num_threads())
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(DSMRModel, "forward", spy)
    evaluate(model, _pieces(2, 40), pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_lanes=2)
    assert counts and set(counts) == {1} and torch.get_num_threads() == 2
    counts.clear()
    generate(model, [BOS, 5, 6], 5, seed=0)
    assert counts and set(counts[1:]) == {1} and torch.get_num_threads() == 2
    counts.clear()
    generate(model, [BOS, 5, 6], 5, seed=0, threads=None)  # None: torch's setting, no governor
    assert set(counts) == {2}
