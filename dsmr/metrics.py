"""The run's record: a JSON-lines metrics file that survives kill-and-resume, and its plots.

``metrics.jsonl`` holds one JSON object per logged training step (``type: "train"``) and per
evaluation (``type: "val"``). :func:`pyplot` is the one place that imports matplotlib (headless,
optional: without it a plot is skipped with a warning, never an error).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import List, Optional

from .checkpoint import atomic_write_text


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a warning) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'dsmr[plot]'); skipping the plot")
        return None
    return plt


def read_metrics(path: Path) -> List[dict]:
    """Every record of a metrics file (a line cut short by a kill is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


class MetricsLog:
    """JSON-lines writer (rank 0 only); on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        keep = []
        if resume_step is not None:
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        # Atomic: a kill during the rewrite must not lose the history before the checkpoint.
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def plot_curves(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Train loss and validation NLL against step, from the JSON-lines metrics file."""
    plt = pyplot()
    if plt is None:
        return None
    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("type") == "train"]
    va = [(r["step"], r["nll"]) for r in recs if r.get("type") == "val" and r.get("nll") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val NLL", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
