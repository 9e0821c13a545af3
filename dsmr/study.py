"""The schedule study: which memory budget keeps the music?

    from dsmr.study import StudyConfig, run_study
    result = run_study("runs/study", StudyConfig.quick())      # or StudyConfig() for the default
    result["rows"]        # one dict per schedule and seed; OUT/study.csv, study.md, study.png

Every schedule family trains from the same seed on the same corpus for the same number of
optimizer steps over the same batches (the lane batcher does not depend on the model, so every
row sees exactly the same training tokens):

=====================  =============================================================================
``full``               every layer keeps the whole piece
``two_scale``          the preset's schedule (tiny: ``[1024, 128x3]``); its sum of horizons is the
                       study's *budget*
``reverse_two_scale``  ``uniform``  ``progressive_asc``  ``progressive_desc``  ``selective``
                       ``perceiver_ar_like``: each at two-scale's budget (``schedules.at_budget``)
``fhcr``               full horizon everywhere, fewer KV heads (GQA): fewer KV bytes per token
=====================  =============================================================================

``full`` and ``two_scale`` train with two seeds (``noise_seeds``), so the table shows which
differences are noise. Per row: the best checkpoint by validation perplexity is measured for
validation perplexity, NLL per token by position bucket, NLL per note, and KRCU (the KV-reset
diagnostic averaged over the validation and test pieces, memory wiped at a fixed R); training
tokens/s and peak memory come from the training itself; KV slots and MiB per lane at the end of a
16k-token piece from :func:`dsmr.schedules.budget`.

Resumable: each row lives in ``OUT/rows/<name>-s<seed>/`` (the trainer's checkpoints, then
``train.json`` and ``result.json``, each written atomically). A rerun reuses every finished row,
continues a row whose training stopped from its ``last.pt``, and logs what it did to
``OUT/study.log``. The report (:mod:`dsmr.study_report`) is rebuilt from the row files.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import schedules
from .checkpoint import atomic_write_text, load_model
from .config import TrainConfig, load_settings
from .diagnostics import kv_reset_diagnostic_pieces
from .evaluate import evaluate
from .model import DSMRConfig

AT_BUDGET = ("reverse_two_scale", "uniform", "progressive_asc", "progressive_desc", "selective",
             "perceiver_ar_like")
FAMILY_ROWS = ("full", "two_scale") + AT_BUDGET + ("fhcr",)


@dataclass
class StudyConfig:
    """What the study trains and measures (``StudyConfig()`` is the default study).

    ``preset``/``model``: the model (a :data:`dsmr.config.PRESETS` name plus ``DSMRConfig``
    overrides); ``two_scale``: the reference schedule whose budget the other families match
    (default: the preset's). ``train_tokens``: the training budget of every row in lane slots
    (``steps = train_tokens // (batch_lanes * segment_len)``). ``noise_seeds`` seeds
    (``seed, seed + 1, ...``) for the rows in ``noise_rows``, one for the others.
    ``eval_max_pieces`` / ``eval_max_tokens``: validation on the first pieces / the first tokens of
    each (None: all). KRCU: memory wiped at ``krcu_reset_at``, reported over ``krcu_window``
    tokens, on up to ``krcu_max_pieces`` pieces of ``krcu_splits`` (pieces too short are
    skipped). ``kv_piece_len``: the piece length of the KV columns. ``fhcr_kv_heads``: KV heads of
    the ``fhcr`` row (default: half the preset's, at least 1). ``schedules``: extra or replacing
    rows, ``"SPEC"`` or ``"NAME=SPEC"`` (see :func:`study_rows`).
    """

    preset: str = "tiny"
    model: Dict = field(default_factory=dict)
    two_scale: Optional[str] = None
    schedules: List[str] = field(default_factory=list)
    train_tokens: int = 307_200
    batch_lanes: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 40
    evals: int = 3
    seed: int = 0
    noise_seeds: int = 2
    noise_rows: Tuple[str, ...] = ("full", "two_scale")
    eval_max_pieces: Optional[int] = None
    eval_max_tokens: Optional[int] = 16_384
    krcu_reset_at: int = 4096
    krcu_window: int = 4096
    krcu_max_pieces: Optional[int] = None
    krcu_splits: Tuple[str, ...] = ("validation", "test")
    kv_piece_len: int = 16_384
    fhcr_kv_heads: Optional[int] = None
    device: str = "cpu"

    @classmethod
    def quick(cls, **over) -> "StudyConfig":
        """The ``--quick`` study: every row, each trained on ~11% of the default's tokens."""
        base = dict(train_tokens=32_768, warmup_steps=4, evals=2, eval_max_pieces=2, eval_max_tokens=4096,
                    krcu_reset_at=1024, krcu_window=1024, krcu_max_pieces=2)
        return cls(**{**base, **over})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Row:
    """One line of the study: a schedule, its KV heads and a seed."""

    name: str
    spec: str
    horizons: list
    n_kv_heads: Optional[int]
    seed: int

    @property
    def key(self) -> str:
        return f"{self.name}-s{self.seed}"


# ----------------------------------------------------------------------------------------------
# the rows


def _family_rows(n: int, two_scale: list, fhcr_kv: int) -> Dict[str, Tuple[str, list, Optional[int]]]:
    """``{name: (spec, horizons, n_kv_heads or None)}`` of every family at two-scale's budget."""
    total = sum(two_scale)
    short, n_long = min(two_scale), max(1, sum(h == max(two_scale) for h in two_scale))
    every_other = list(range(0, n, 2))
    made = {
        "reverse_two_scale": schedules.at_budget("reverse_two_scale", n, total, short=short, n_long=n_long),
        "uniform": schedules.at_budget("uniform", n, total),
        "progressive_asc": schedules.at_budget("progressive", n, total, low=short, ascending=True),
        "progressive_desc": schedules.at_budget("progressive", n, total, low=short, ascending=False),
        "selective": schedules.at_budget("selective", n, total, layers=every_other),
        "perceiver_ar_like": schedules.at_budget("perceiver_ar_like", n, total),
    }
    rows = {"full": ("full", schedules.full(n), None), "two_scale": ("two_scale", two_scale, None)}
    rows.update({k: (k, h, None) for k, h in made.items()})
    rows["fhcr"] = (f"fhcr:n_kv_heads={fhcr_kv}", schedules.full(n), fhcr_kv)
    return rows


def _parse_extra(text: str, n: int, fhcr_kv: int) -> Tuple[str, str, list, Optional[int]]:
    """``"NAME=SPEC"`` or ``"SPEC"`` -> ``(name, spec, horizons, n_kv_heads)``."""
    name, eq, spec = text.partition("=")
    if not eq or ":" in name or "," in name:
        name, spec = "", text
    spec = spec.strip()
    family, _, rest = spec.partition(":")
    if family == "fhcr":
        kv = fhcr_kv
        if rest:
            key, _, val = rest.partition("=")
            if key.strip() != "n_kv_heads" or not val.strip().isdigit() or int(val) < 1:
                raise ValueError(f"--schedule {text!r}: fhcr takes n_kv_heads=K (K >= 1), e.g. fhcr:n_kv_heads=1")
            kv = int(val)
        return name or "fhcr", spec, schedules.full(n), kv
    horizons = schedules.parse(spec, n)
    if not name:
        name = family if family in schedules.FAMILIES else spec
        if family == "progressive":
            name = "progressive_desc" if "ascending=false" in spec.replace(" ", "").lower() or \
                "ascending=0" in spec.replace(" ", "") else "progressive_asc"
    return name, spec, horizons, None


def study_rows(cfg: StudyConfig, n_layers: int, n_kv_heads: int) -> List[Row]:
    """Every row of the study, in training order: each schedule's first seed, then the extra seeds.

    ``cfg.schedules`` entries ``"NAME=SPEC"`` or ``"SPEC"`` replace the row of that name or add
    one; without a name the family names it (``uniform:m=64`` replaces ``uniform``;
    ``progressive:...,ascending=false`` replaces ``progressive_desc``; ``fhcr:n_kv_heads=1``
    replaces ``fhcr``; an explicit list names itself). A replaced ``two_scale`` also moves the
    budget of the families set at it. Raises ``ValueError`` for a bad spec.
    """
    fhcr_kv = cfg.fhcr_kv_heads or max(1, n_kv_heads // 2)
    if n_kv_heads % fhcr_kv or fhcr_kv > n_kv_heads:
        raise ValueError(f"fhcr_kv_heads={fhcr_kv} must divide the model's n_kv_heads={n_kv_heads}")
    extra = [_parse_extra(t, n_layers, fhcr_kv) for t in cfg.schedules]
    ref = cfg.two_scale or load_settings(preset=cfg.preset).schedule
    two = next((e[2] for e in extra if e[0] == "two_scale"), None) or schedules.parse(ref, n_layers)
    if any(h is None for h in two) or sum(two) <= 0:
        raise ValueError(f"the two_scale reference {two} needs finite horizons with a positive sum (the budget)")
    table = _family_rows(n_layers, two, fhcr_kv)
    table["two_scale"] = (ref, two, None)
    for name, spec, horizons, kv in extra:
        table[name] = (spec, horizons, kv)
    names = list(table)
    rows = [Row(k, table[k][0], table[k][1], table[k][2], cfg.seed) for k in names]
    for k in names:
        if k in cfg.noise_rows:
            rows += [Row(k, table[k][0], table[k][1], table[k][2], cfg.seed + s) for s in range(1, cfg.noise_seeds)]
    return rows


# ----------------------------------------------------------------------------------------------
# one row


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so a block's RSS growth is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then include reusable memory
        pass


class PeakMemory:
    """Peak memory of a block in MiB: CUDA's allocator peak, or on CPU the peak resident set size
    above its level at entry (after freed memory is handed back), sampled every 20 ms (psutil)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        _release_freed_memory()
        self._proc, self._stop = psutil.Process(os.getpid()), threading.Event()
        self._base = self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mib = (peak - self._base) / 2 ** 20
        return False


class _StepClock:
    """Training tokens/s over the optimizer steps alone: steps that follow an evaluation are left
    out (their interval holds the evaluation), unless every step does (then all are counted)."""

    def __init__(self, eval_every: int):
        self.eval_every, self.last = eval_every, time.perf_counter()
        self.clean, self.all = [0, 0.0], [0, 0.0]

    def __call__(self, step: int, record: dict) -> None:
        now, tokens = time.perf_counter(), int(record.get("tokens", 0))
        for acc, use in ((self.all, True), (self.clean, (step - 1) % self.eval_every != 0)):
            if use:
                acc[0] += tokens
                acc[1] += now - self.last
        self.last = now

    @property
    def tokens(self) -> int:
        return self.all[0]

    @property
    def tokens_per_s(self) -> Optional[float]:
        tokens, seconds = self.clean if self.clean[1] > 0 else self.all
        return tokens / seconds if seconds > 0 else None


def _crop(pieces, max_tokens: Optional[int]):
    """The first ``max_tokens - 1`` ids of each piece: with the EOS, ``max_tokens`` targets."""
    return list(pieces) if max_tokens is None else [p[: max(1, max_tokens - 1)] for p in pieces]


def _train_row(row: Row, model_cfg: DSMRConfig, cfg: StudyConfig, corpus: dict, folder: Path,
               progress: bool) -> dict:
    """Train one row (continuing from ``last.pt`` when there is one); its training record."""
    from .train import train

    S = model_cfg.segment_len
    steps = max(1, cfg.train_tokens // (cfg.batch_lanes * S))
    every = max(1, steps // max(1, cfg.evals))
    tcfg = TrainConfig(out_dir=str(folder), batch_lanes=cfg.batch_lanes, max_steps=steps, lr=cfg.lr,
                       min_lr=min(cfg.min_lr, cfg.lr), warmup_steps=min(cfg.warmup_steps, steps - 1),
                       seed=row.seed, device=cfg.device, eval_every=every, ckpt_every=every, log_every=1,
                       progress=progress, plot=False)
    clock = _StepClock(every)
    device = torch.device("cuda" if cfg.device.startswith("cuda") or
                          (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    with PeakMemory(device) as mem:
        summary = train(model_cfg, tcfg, corpus["train"], corpus["val"], vocab_size=corpus["vocab"].vocab_size,
                        pad_id=corpus["vocab"].pad_id, bos_id=corpus["vocab"].bos_id,
                        eos_id=corpus["vocab"].eos_id, tokenizer_config=corpus["tokenizer_config"],
                        resume=(folder / "last.pt").exists(), callback=clock)
    return {"steps": steps, "train_tokens": summary["tokens"], "tokens_per_s": clock.tokens_per_s,
            "peak_mib": mem.peak_mib, "best_val_ppl": summary["best_val_ppl"], "n_params": summary["n_params"],
            "train_time_s": summary["time_s"]}


def _measure_row(row: Row, model_cfg: DSMRConfig, cfg: StudyConfig, corpus: dict, folder: Path,
                 progress: bool) -> dict:
    """Validation perplexity, NLL per note and by position, and KRCU of the row's best checkpoint."""
    best = folder / "best.pt"
    model, info = load_model(best if best.exists() else folder / "last.pt", device=cfg.device)
    v = corpus["vocab"]
    ev = evaluate(model, corpus["val"], pad_id=v.pad_id, bos_id=v.bos_id, eos_id=v.eos_id,
                  batch_lanes=cfg.batch_lanes, notes=corpus["val_notes"], progress=progress)
    krcu = kv_reset_diagnostic_pieces(model, corpus["krcu"], names=corpus["krcu_names"], bos_id=v.bos_id,
                                      eos_id=v.eos_id, reset_at=cfg.krcu_reset_at, window=cfg.krcu_window,
                                      progress=progress)
    kv = schedules.budget(model_cfg.layer_horizons, piece_len=cfg.kv_piece_len,
                          n_kv_heads=model_cfg.n_kv_heads or model_cfg.n_heads, head_dim=model_cfg.head_dim,
                          bytes_per_elem=next(model.parameters()).element_size())
    return {
        "best_step": info["step"], "val_ppl": ev["ppl"], "val_nll": ev["nll"],
        "val_nll_per_note": ev["nll_per_note"], "val_tokens": ev["tokens"], "val_notes": ev["notes"],
        "val_pieces": ev["pieces"],
        "buckets": {k: b["nll"] for k, b in ev["buckets"].items() if b["tokens"]},
        "krcu_auc": krcu["auc"], "krcu_mean": krcu["mean_increase"], "krcu_pieces": len(krcu["pieces"]),
        "krcu_buckets": {k: b["mean_increase"] for k, b in krcu["buckets"].items()},
        "krcu_curve": krcu["increase"], "kv_slots": kv["slots"], "kv_mib": kv["bytes"] / 2 ** 20,
    }


def _model_config(cfg: StudyConfig, row: Row, vocab_size: int) -> DSMRConfig:
    base = load_settings(preset=cfg.preset, model=cfg.model).model_config(vocab_size)
    over = {"horizons": list(row.horizons)}
    if row.n_kv_heads is not None:
        over["n_kv_heads"] = row.n_kv_heads
    return replace(base, **over)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or cut short: the stage is redone


def run_row(row: Row, cfg: StudyConfig, corpus: dict, out_dir: Path, *, progress: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Train and measure one row under ``out_dir/rows/<key>/``; a finished row is read back, not redone."""
    folder = Path(out_dir) / "rows" / row.key
    done = _read_json(folder / "result.json")
    if done is not None:
        log(f"{row.key}: reused (finished {done['finished_at']})")
        return done
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = _model_config(cfg, row, corpus["vocab"].vocab_size)
    trained = _read_json(folder / "train.json")
    if trained is None:
        log(f"{row.key}: training {schedules.describe(row.horizons)}"
            + (" (continuing from last.pt)" if (folder / "last.pt").exists() else ""))
        trained = _train_row(row, model_cfg, cfg, corpus, folder, progress)
        atomic_write_text(folder / "train.json", json.dumps(trained, indent=2))
    result = {"schedule": row.name, "spec": row.spec, "seed": row.seed, "horizons": list(row.horizons),
              "horizons_text": schedules.describe(row.horizons), "n_kv_heads": model_cfg.n_kv_heads or
              model_cfg.n_heads, **trained, **_measure_row(row, model_cfg, cfg, corpus, folder, progress)}
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(folder / "result.json", json.dumps(result, indent=2))
    log(f"{row.key}: val ppl {result['val_ppl']:.3f}, NLL/note {result['val_nll_per_note'] or float('nan'):.4f}, "
        f"KRCU area {result['krcu_auc']:.2f}")
    return result


# ----------------------------------------------------------------------------------------------
# the study


def load_corpus(cfg: StudyConfig, data) -> dict:
    """Train/validation pieces, the KRCU pieces, note counts and ids of a ``TokenCache``-like ``data``."""
    from .notes import count_notes, notes_per_id
    from .stream import Vocab

    val = _crop(data.pieces("validation"), cfg.eval_max_tokens)[: cfg.eval_max_pieces]
    if not val:
        raise ValueError("the corpus has no validation pieces; the study picks checkpoints by validation perplexity")
    table = notes_per_id(data.tokenizer())
    krcu, names = [], []
    for split in cfg.krcu_splits:
        if split in data.splits:
            krcu += list(data.pieces(split))
            names += [f"{split}/{n}" for n in data.names(split)]
    return {"train": data.pieces("train"), "val": val, "val_notes": [count_notes(p, table) for p in val],
            "krcu": krcu[: cfg.krcu_max_pieces], "krcu_names": names[: cfg.krcu_max_pieces],
            "vocab": Vocab(data.vocab_size, data.pad_id, data.bos_id, data.eos_id),
            "tokenizer_config": data.tokenizer_config}


def run_study(out_dir, config: Optional[StudyConfig] = None, *, data=None, source: str = "demo",
              cache_dir=None, progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None,
              after_row: Optional[Callable[[dict], None]] = None) -> dict:
    """Train and measure every row of the study, then write ``study.csv``, ``study.md`` and ``study.png``.

    Args:
        out_dir: the study folder (rows under ``rows/``, the log in ``study.log``).
        config: a :class:`StudyConfig` (default: the default study; ``StudyConfig.quick()`` for
            ``--quick``).
        data: a ``TokenCache``-like corpus (``pieces(split)``, ``names(split)``, ``splits``,
            ``vocab_size``, ``pad_id``/``bos_id``/``eos_id``, ``tokenizer()``,
            ``tokenizer_config``); default: ``prepare_cache(source, cache_dir)``.
        progress: progress bars (default: when stderr is a terminal).
        log: one line per event (default: print to stderr and append to ``study.log``).
        after_row: called with each row's result (an exception stops the study like a kill).

    Returns ``{"rows": [...], "csv", "markdown", "plot", "config"}``. A rerun on the same folder
    reuses finished rows (see the module docstring).
    """
    import sys

    from tqdm.auto import tqdm

    from .study_report import write_report

    cfg = config or StudyConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    log = log or _file_log(out / "study.log")
    if data is None:
        from .data import prepare_cache

        data = prepare_cache(source, cache_dir=cache_dir, progress=show)
    corpus = load_corpus(cfg, data)
    probe = load_settings(preset=cfg.preset, model=cfg.model).model_config(data.vocab_size)
    rows = study_rows(cfg, probe.n_layers, probe.n_kv_heads or probe.n_heads)
    meta = _start_meta(out, cfg, data, source, rows)
    results = []
    for row in tqdm(rows, desc="study", unit="row", disable=not show, dynamic_ncols=True):
        results.append(run_row(row, cfg, corpus, out, progress=show, log=log))
        if after_row is not None:
            after_row(results[-1])
    meta["load_end"], meta["ended_at"] = _load(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    paths = write_report(out, results, meta)
    log(f"study written: {paths['csv']}, {paths['markdown']}, {paths['plot']}")
    return {"rows": results, "config": cfg.to_dict(), **paths}


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def _start_meta(out: Path, cfg: StudyConfig, data, source, rows: Sequence[Row]) -> dict:
    """The configuration block of the report; the start time and load survive a resume."""
    saved = _read_json(out / "meta.json") or {}
    mine = json.loads(json.dumps(cfg.to_dict()))
    if saved.get("config", mine) != mine:
        raise ValueError(f"{out} holds a study with a different configuration ({out / 'meta.json'}); "
                         "use another --out, or the same options to resume it")
    meta = {"config": cfg.to_dict(), "source": str(getattr(data, "path", source)),
            "pieces": {s: len(data.pieces(s)) for s in getattr(data, "splits", ())},
            "threads": torch.get_num_threads(), "rows": [r.key for r in rows],
            "started_at": saved.get("started_at", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
            "load_start": saved.get("load_start", _load()), "cpus": os.cpu_count()}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def _file_log(path: Path) -> Callable[[str], None]:
    import sys

    def log(line: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        print(f"study: {line}", file=sys.stderr, flush=True)
        with open(path, "a") as f:
            f.write(f"{stamp} {line}\n")

    return log


__all__ = ["StudyConfig", "Row", "study_rows", "run_row", "run_study", "load_corpus", "PeakMemory", "FAMILY_ROWS"]
