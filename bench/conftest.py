"""Setup for the pytest-benchmark suite in bench/ (never collected by a bare ``pytest``).

Threads are pinned once so numbers are comparable with ``python bench/run.py`` (all logical CPUs
unless ``DSMR_BENCH_THREADS`` says otherwise).
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("DSMR_BENCH_THREADS", os.cpu_count() or 1)))
