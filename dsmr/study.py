"""The schedule study: which memory budget keeps the music, and does memory pay at all?

    from dsmr.study import StudyConfig, run_study
    result = run_study("runs/study", StudyConfig.quick())      # or StudyConfig() for the default
    result["rows"]        # one dict per schedule and seed; OUT/study.csv, study.md, study.png

Every schedule family trains from the same seed on the same corpus for the same number of
optimizer steps over the same batches (the lane batcher does not depend on the model, so every
row sees exactly the same training tokens):

=====================  =============================================================================
``full``               every layer keeps the whole piece
``none``               no layer keeps anything (horizons all 0): the no-memory control that every
                       memory schedule is measured against
``two_scale``          the preset's schedule (tiny: ``[1024, 128x3]``); its sum of horizons is the
                       study's *budget*
``reverse_two_scale``  ``uniform``  ``progressive_asc``  ``progressive_desc``  ``selective``
                       ``perceiver_ar_like``: each at two-scale's budget (``schedules.at_budget``)
``fhcr``               full horizon everywhere, fewer KV heads (GQA): fewer KV bytes per token
=====================  =============================================================================

``full``, ``two_scale`` and ``none`` train with two seeds (``noise_seeds``), so the table shows
which differences are noise. Per row: the best checkpoint by validation perplexity is measured for
validation perplexity, NLL per token by position bucket and by offset within the segment, NLL per
note, the same NLLs with the row's memory wiped at every segment start (what memory gives at
inference, and how the weights do without it), the learning curve (every validation during
training), and KRCU at two reset points (the KV-reset diagnostic with memory
wiped at R = 4096 and R = 8192 by default, each averaged over the validation and test pieces long
enough to reach R + window); training tokens/s and peak memory come from the training itself; KV
slots and MiB per lane at the end of a 16k-token piece from :func:`dsmr.schedules.budget`.

Three sizes: ``StudyConfig.quick()`` (minutes), ``StudyConfig()`` (the default, demo corpus, 40
minutes) and ``StudyConfig.long()`` (``dsmr study --long``: ASAP, ~30x the default's training
tokens per row, a reduced set of rows; see its docstring for the plan and wall time).
:func:`study_plan` lists the rows and token budget of a configuration without training.

Resumable: each row lives in ``OUT/rows/<name>-s<seed>/`` (the trainer's checkpoints, then
``train.json`` and ``result.json``, each written atomically). A rerun reuses every finished row
(measuring it again, without retraining, when its ``result.json`` predates a measure),
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
FAMILY_ROWS = ("full", "none", "two_scale") + AT_BUDGET + ("fhcr",)
# Version of the measurements in result.json; a row measured by an older dsmr is measured again
# (its training is reused). 2: NLL by segment offset and with memory wiped; 3: tokens per segment offset.
MEASURES = 3
# StudyConfig fields added after studies were run, with the value an older meta.json stands for.
_ADDED_FIELDS = {"rows": None}


@dataclass
class StudyConfig:
    """What the study trains and measures (``StudyConfig()`` is the default study).

    ``preset``/``model``: the model (a :data:`dsmr.config.PRESETS` name plus ``DSMRConfig``
    overrides); ``two_scale``: the reference schedule whose budget the other families match
    (default: the preset's). ``families``: the family rows to train (default: all of
    :data:`FAMILY_ROWS`). ``train_tokens``: the training budget of every row in lane slots
    (``steps = train_tokens // (batch_lanes * segment_len)``). ``noise_seeds`` seeds
    (``seed, seed + 1, ...``) for the rows in ``noise_rows``, one for the others.
    ``eval_max_pieces`` / ``eval_max_tokens``: validation on the first pieces / the first tokens of
    each (None: all); ``eval_min_tokens``: only validation pieces at least this long (0: all).
    KRCU: memory wiped at ``krcu_reset_at``, reported over ``krcu_window`` tokens, and again at
    ``krcu_long_reset_at`` (None: not measured) over ``krcu_long_window`` (a window of None is R
    itself: the distances 0..R-1 after the wipe), each on up to
    ``krcu_max_pieces`` pieces of ``krcu_splits`` that are long enough to reach R + window (the
    others are left out and counted). ``kv_piece_len``: the piece length of the KV columns.
    ``fhcr_kv_heads``: KV heads of the ``fhcr`` row (default: half the preset's, at least 1).
    ``schedules``: extra or replacing rows, ``"SPEC"`` or ``"NAME=SPEC"`` (see :func:`study_rows`).
    ``rows``: only the rows of these names, families or extra rows alike (default: all).
    """

    preset: str = "tiny"
    model: Dict = field(default_factory=dict)
    two_scale: Optional[str] = None
    families: Optional[Tuple[str, ...]] = None
    schedules: List[str] = field(default_factory=list)
    train_tokens: int = 307_200
    batch_lanes: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 40
    evals: int = 3
    seed: int = 0
    noise_seeds: int = 2
    noise_rows: Tuple[str, ...] = ("full", "two_scale", "none")
    eval_max_pieces: Optional[int] = None
    eval_max_tokens: Optional[int] = 16_384
    eval_min_tokens: int = 0
    krcu_reset_at: int = 4096
    krcu_window: Optional[int] = None
    krcu_long_reset_at: Optional[int] = 8192
    krcu_long_window: Optional[int] = None
    krcu_max_pieces: Optional[int] = None
    krcu_splits: Tuple[str, ...] = ("validation", "test")
    kv_piece_len: int = 16_384
    fhcr_kv_heads: Optional[int] = None
    device: str = "cpu"
    rows: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if self.rows is not None:
            self.rows = tuple(self.rows)
            if not self.rows:
                raise ValueError("rows must name at least one row")
        if self.families is not None:
            self.families = tuple(self.families)
            unknown = [f for f in self.families if f not in FAMILY_ROWS]
            if unknown or not self.families:
                raise ValueError(f"families must be a non-empty subset of {FAMILY_ROWS}, got {list(self.families)}")
        for name in ("train_tokens", "batch_lanes", "evals", "noise_seeds", "krcu_reset_at", "kv_piece_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("krcu_window", "krcu_long_reset_at", "krcu_long_window"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")

    @classmethod
    def quick(cls, **over) -> "StudyConfig":
        """The ``--quick`` study: every row, each trained on ~11% of the default's tokens."""
        base = dict(train_tokens=32_768, warmup_steps=4, evals=2, eval_max_pieces=2, eval_max_tokens=4096,
                    krcu_reset_at=1024, krcu_long_reset_at=2048, krcu_max_pieces=2)
        return cls(**{**base, **over})

    @classmethod
    def long(cls, **over) -> "StudyConfig":
        """The ``--long`` study: when does memory pay? Meant for ASAP (``dsmr study --long --source ASAP``).

        Rows: ``none`` and ``two_scale`` (the tiny preset's ``[1024, 128x3]``), two seeds each,
        and ``reach8k`` = ``[8192, 128x3]`` (one layer that reaches across R = 8192), one seed:
        5 rows. Each trains on 8,192,000 lane slots (8,000 steps of 4 lanes x 256 tokens: 0.75
        epochs of ASAP's 11.0M training tokens, 27x the default study's budget) with 10
        validations (the learning curve) on 12 validation pieces of at least 8,192 tokens (their
        first 16,384 tokens); KRCU at R = 4096 and 8192 on 16 validation/test pieces long enough
        to reach R + window (ASAP: 112 and 78 pieces qualify).

        ``full`` and ``fhcr`` are left out: at this model size they train at ~500 tokens/s on 2
        cores against ~10,000-12,000 for the budgeted rows (``bench/results/study.md``), so one
        full row would take ~4.5 h on these tokens, more than the whole study; ``--schedule full``
        adds it anyway.

        Measured wall time on 2 idle cores: 86 min on AMD EPYC Zen 4 (training none 12 min per
        seed, two_scale 15-17 min, reach8k 26 min, then 2-3 min of validation and KRCU per row),
        54 min on an Intel Xeon with AMX. Results: ``bench/results/study_long/``.
        """
        base = dict(families=("none", "two_scale"), noise_rows=("none", "two_scale"),
                    schedules=["reach8k=two_scale:long=8192,short=128,n_long=1"],
                    train_tokens=8_192_000, batch_lanes=4, lr=1e-3, min_lr=1e-4, warmup_steps=200, evals=10,
                    eval_max_pieces=12, eval_max_tokens=16_384, eval_min_tokens=8192,
                    krcu_reset_at=4096, krcu_long_reset_at=8192, krcu_max_pieces=16)
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
    rows = {"full": ("full", schedules.full(n), None), "none": ("none", schedules.none(n), None),
            "two_scale": ("two_scale", two_scale, None)}
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
    replaces ``fhcr``; ``none`` is the no-memory control; an explicit list names itself). A
    replaced ``two_scale`` also moves the budget of the families set at it. ``cfg.families``
    keeps only those family rows (the extra rows are always kept); ``cfg.rows`` then keeps only
    the rows of those names. Raises ``ValueError`` for a bad spec or a row name that is not there.
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
    if cfg.families is not None:
        table = {k: v for k, v in table.items() if k in cfg.families}
    for name, spec, horizons, kv in extra:
        table[name] = (spec, horizons, kv)
    if cfg.rows is not None:
        missing = [k for k in cfg.rows if k not in table]
        if missing:
            raise ValueError(f"no row named {', '.join(missing)}; this study's rows are {', '.join(table)}")
        table = {k: v for k, v in table.items() if k in cfg.rows}
    names = list(table)
    rows = [Row(k, table[k][0], table[k][1], table[k][2], cfg.seed) for k in names]
    for k in names:
        if k in cfg.noise_rows:
            rows += [Row(k, table[k][0], table[k][1], table[k][2], cfg.seed + s) for s in range(1, cfg.noise_seeds)]
    return rows


def row_steps(cfg: StudyConfig, segment_len: int) -> Tuple[int, int]:
    """``(optimizer steps, steps between validations)`` of every row: the token budget in steps."""
    steps = max(1, cfg.train_tokens // (cfg.batch_lanes * segment_len))
    return steps, max(1, steps // max(1, cfg.evals))


def study_plan(cfg: StudyConfig, vocab_size: int = 256) -> dict:
    """What a study will train, without training or reading data (``dsmr study --plan``).

    Returns ``{"rows": [{"key", "name", "spec", "horizons", "n_kv_heads", "seed"}], "steps",
    "eval_every", "lane_slots_per_row" (steps x lanes x segment length), "lane_slots" (all rows),
    "model": the preset's DSMRConfig as a dict, "krcu": [(R, window), ...]}``. ``vocab_size``
    only fills the model config (the corpus sets it in a real run).
    """
    probe = load_settings(preset=cfg.preset, model=cfg.model).model_config(vocab_size)
    rows = study_rows(cfg, probe.n_layers, probe.n_kv_heads or probe.n_heads)
    steps, every = row_steps(cfg, probe.segment_len)
    per_row = steps * cfg.batch_lanes * probe.segment_len
    return {"rows": [{"key": r.key, "name": r.name, "spec": r.spec, "horizons": list(r.horizons),
                      "n_kv_heads": r.n_kv_heads or probe.n_kv_heads or probe.n_heads, "seed": r.seed}
                     for r in rows],
            "steps": steps, "eval_every": every, "lane_slots_per_row": per_row, "lane_slots": per_row * len(rows),
            "model": probe.to_dict(),
            "krcu": [(R, W) for R, W in _krcu_points(cfg)]}


def _krcu_points(cfg: StudyConfig) -> List[Tuple[int, int]]:
    """The ``(R, window)`` pairs KRCU is measured at: the main one, then the long one (if any)."""
    pts = [(cfg.krcu_reset_at, cfg.krcu_window or cfg.krcu_reset_at)]
    if cfg.krcu_long_reset_at is not None:
        pts.append((cfg.krcu_long_reset_at, cfg.krcu_long_window or cfg.krcu_long_reset_at))
    return pts


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


def _spread(n: int, k: Optional[int]) -> List[int]:
    """``k`` indices of ``range(n)`` spread evenly from first to last (all when ``k`` is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 1:
        return [0][:k]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _crop(pieces, max_tokens: Optional[int]):
    """The first ``max_tokens - 1`` ids of each piece: with the EOS, ``max_tokens`` targets."""
    return list(pieces) if max_tokens is None else [p[: max(1, max_tokens - 1)] for p in pieces]


def _train_row(row: Row, model_cfg: DSMRConfig, cfg: StudyConfig, corpus: dict, folder: Path,
               progress: bool) -> dict:
    """Train one row (continuing from ``last.pt`` when there is one); its training record."""
    from .train import train

    steps, every = row_steps(cfg, model_cfg.segment_len)
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
    kv = schedules.budget(model_cfg.layer_horizons, piece_len=cfg.kv_piece_len,
                          n_kv_heads=model_cfg.n_kv_heads or model_cfg.n_heads, head_dim=model_cfg.head_dim,
                          bytes_per_elem=next(model.parameters()).element_size())
    out = {
        "measures": MEASURES, "best_step": info["step"], "val_ppl": ev["ppl"], "val_nll": ev["nll"],
        "val_nll_per_note": ev["nll_per_note"], "val_tokens": ev["tokens"], "val_notes": ev["notes"],
        "val_pieces": ev["pieces"],
        "buckets": {k: b["nll"] for k, b in ev["buckets"].items() if b["tokens"]},
        "offsets": {k: b["nll"] for k, b in ev["offsets"].items() if b["tokens"]},
        "offset_tokens": {k: b["tokens"] for k, b in ev["offsets"].items() if b["tokens"]},
        "kv_slots": kv["slots"], "kv_mib": kv["bytes"] / 2 ** 20,
    }
    # The same weights with every layer's memory wiped at each segment start: what the memory gives
    # at inference (this minus the above), and how the model does without it (against `none`).
    if any(h != 0 for h in model_cfg.layer_horizons):
        off = evaluate(model.with_horizons([0] * model_cfg.n_layers), corpus["val"], pad_id=v.pad_id,
                       bos_id=v.bos_id, eos_id=v.eos_id, batch_lanes=cfg.batch_lanes, progress=progress)
    else:
        off = ev
    out.update({"val_nll_nomem": off["nll"],
                "buckets_nomem": {k: b["nll"] for k, b in off["buckets"].items() if b["tokens"]},
                "offsets_nomem": {k: b["nll"] for k, b in off["offsets"].items() if b["tokens"]}})
    for prefix, (R, W) in zip(("krcu", "krcu_long"), _krcu_points(cfg)):
        out.update(_krcu_row(model, corpus["krcu"][(R, W)], prefix, R, W, v, progress))
    return out


def _krcu_row(model, chosen: dict, prefix: str, R: int, W: int, v, progress: bool) -> dict:
    """KRCU columns ``<prefix>_auc``, ``_mean``, ``_pieces``, ``_buckets``, ``_curve``, ``_reset_at``.

    ``chosen``: the pieces long enough for this R (from :func:`load_corpus`); none -> empty values.
    """
    out = {f"{prefix}_reset_at": R, f"{prefix}_window": W, f"{prefix}_pieces": len(chosen["pieces"]),
           f"{prefix}_candidates": chosen["candidates"]}
    if not chosen["pieces"]:
        return {**out, f"{prefix}_auc": None, f"{prefix}_mean": None, f"{prefix}_buckets": {}, f"{prefix}_curve": []}
    krcu = kv_reset_diagnostic_pieces(model, chosen["pieces"], names=chosen["names"], bos_id=v.bos_id,
                                      eos_id=v.eos_id, reset_at=R, window=W, progress=progress)
    return {**out, f"{prefix}_auc": krcu["auc"], f"{prefix}_mean": krcu["mean_increase"],
            f"{prefix}_pieces": len(krcu["pieces"]),
            f"{prefix}_buckets": {k: b["mean_increase"] for k, b in krcu["buckets"].items()},
            f"{prefix}_curve": krcu["increase"]}


def _val_curve(folder: Path, lane_slots_per_step: int) -> List[list]:
    """The learning curve of a row: ``[[step, lane slots trained, val ppl], ...]`` from its metrics."""
    from .metrics import read_metrics

    curve = {}
    for r in read_metrics(folder / "metrics.jsonl"):
        if r.get("type") == "val" and r.get("ppl") is not None:
            curve[int(r["step"])] = [int(r["step"]), int(r["step"]) * lane_slots_per_step, float(r["ppl"])]
    return [curve[k] for k in sorted(curve)]


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
    if done is not None and done.get("measures", 1) >= MEASURES:
        log(f"{row.key}: reused (finished {done['finished_at']})")
        return done
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = _model_config(cfg, row, corpus["vocab"].vocab_size)
    trained = _read_json(folder / "train.json")
    if done is not None and trained is not None:
        log(f"{row.key}: measuring again (results from an older dsmr lack some columns; training reused)")
    if trained is None:
        log(f"{row.key}: training {schedules.describe(row.horizons)}"
            + (" (continuing from last.pt)" if (folder / "last.pt").exists() else ""))
        trained = _train_row(row, model_cfg, cfg, corpus, folder, progress)
        atomic_write_text(folder / "train.json", json.dumps(trained, indent=2))
    result = {"schedule": row.name, "spec": row.spec, "seed": row.seed, "horizons": list(row.horizons),
              "horizons_text": schedules.describe(row.horizons), "n_kv_heads": model_cfg.n_kv_heads or
              model_cfg.n_heads, **trained, **_measure_row(row, model_cfg, cfg, corpus, folder, progress),
              "val_curve": _val_curve(folder, cfg.batch_lanes * model_cfg.segment_len)}
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(folder / "result.json", json.dumps(result, indent=2))
    krcu = ", ".join(f"KRCU@{result[p + '_reset_at']} area {result[p + '_auc']:.2f}" for p in ("krcu", "krcu_long")
                     if result.get(p + "_auc") is not None)
    log(f"{row.key}: val ppl {result['val_ppl']:.3f}, NLL/note {result['val_nll_per_note'] or float('nan'):.4f}"
        + (f", {krcu}" if krcu else ""))
    return result


# ----------------------------------------------------------------------------------------------
# the study


def load_corpus(cfg: StudyConfig, data) -> dict:
    """Train/validation pieces, KRCU pieces per reset point, note counts and ids of a ``TokenCache``-like ``data``.

    Validation: the pieces of at least ``eval_min_tokens`` tokens, ``eval_max_pieces`` of them
    spread evenly over the split's name order (a corpus sorted by composer is not cut to its first
    composers), each cut to its first ``eval_max_tokens`` targets. KRCU at each ``(R, W)``: the
    pieces of ``krcu_splits`` with at least ``R + W`` inputs (so every distance 0..W-1 averages the
    same pieces), ``krcu_max_pieces`` of them spread the same way; ``corpus["krcu"][(R, W)]`` holds
    ``pieces``, ``names`` and ``candidates`` (how many pieces were looked at).
    """
    from .notes import count_notes, notes_per_id
    from .stream import Vocab

    val = [p for p in data.pieces("validation") if len(p) >= cfg.eval_min_tokens]
    val = _crop([val[i] for i in _spread(len(val), cfg.eval_max_pieces)], cfg.eval_max_tokens)
    if not val:
        raise ValueError("the corpus has no validation pieces" + (
            f" of at least {cfg.eval_min_tokens} tokens" if cfg.eval_min_tokens else "")
            + "; the study picks checkpoints by validation perplexity")
    table = notes_per_id(data.tokenizer())
    cands, names = [], []
    for split in cfg.krcu_splits:
        if split in data.splits:
            cands += list(data.pieces(split))
            names += [f"{split}/{n}" for n in data.names(split)]
    krcu = {}
    for R, W in _krcu_points(cfg):
        # Inputs are [BOS] + ids: a piece of L ids has L + 1 inputs.
        long_enough = [i for i, p in enumerate(cands) if len(p) + 1 >= R + W]
        keep = [long_enough[j] for j in _spread(len(long_enough), cfg.krcu_max_pieces)]
        krcu[(R, W)] = {"pieces": [cands[i] for i in keep], "names": [names[i] for i in keep],
                        "candidates": len(cands)}
    if not any(k["pieces"] for k in krcu.values()):
        raise ValueError(f"no piece of {'/'.join(cfg.krcu_splits)} is long enough for KRCU (R + window = "
                         f"{min(R + W for R, W in krcu)} inputs); lower --reset-at or use longer pieces")
    return {"train": data.pieces("train"), "val": val, "val_notes": [count_notes(p, table) for p in val],
            "krcu": krcu, "vocab": Vocab(data.vocab_size, data.pad_id, data.bos_id, data.eos_id),
            "tokenizer_config": data.tokenizer_config}


def run_study(out_dir, config: Optional[StudyConfig] = None, *, data=None, source: str = "demo",
              cache_dir=None, progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None,
              after_row: Optional[Callable[[dict], None]] = None) -> dict:
    """Train and measure every row of the study, then write ``study.csv``, ``study.md`` and ``study.png``.

    Args:
        out_dir: the study folder (rows under ``rows/``, the log in ``study.log``).
        config: a :class:`StudyConfig` (default: the default study; ``StudyConfig.quick()`` for
            ``--quick``, ``StudyConfig.long()`` for ``--long``).
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
    meta["krcu"] = [{"reset_at": R, "window": W, "pieces": len(k["pieces"]), "candidates": k["candidates"]}
                    for (R, W), k in corpus["krcu"].items()]
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
    # A study folder from before a field existed holds that field's default.
    before = {**_ADDED_FIELDS, **saved.get("config", mine)}
    if before != mine:
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


__all__ = ["StudyConfig", "Row", "study_rows", "study_plan", "row_steps", "run_row", "run_study", "load_corpus",
           "PeakMemory", "FAMILY_ROWS"]
