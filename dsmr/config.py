"""Run settings: the training hyper-parameters, model presets, and config files.

    from dsmr.config import TrainConfig, load_settings
    s = load_settings("run.toml", preset="tiny", train={"max_steps": 300})
    model_cfg = s.model_config(vocab_size=cache.vocab_size)   # a DSMRConfig
    train_cfg = s.train_config()                               # a TrainConfig

A config file is JSON or TOML with up to three tables: ``[model]`` (``DSMRConfig`` fields and
``schedule``, a spec such as ``"two_scale:long=4096,short=512,n_long=2"`` or a list of horizons),
``[train]`` (``TrainConfig`` fields) and ``[data]`` (``source``, ``tokenizer_config``). Later
layers win: preset < file < explicit overrides (the command line's flags).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Union

from . import schedules
from .checks import check_int
from .model import DSMRConfig
from .threads import parse_policy


@dataclass
class TrainConfig:
    """Training hyper-parameters (a plain dataclass with a JSON round-trip).

    Length of the run: ``max_steps`` optimizer steps and/or ``epochs`` passes over the training
    pieces, whichever ends first (at least one must be given). One optimizer step consumes
    ``grad_accum`` consecutive segment batches of ``batch_lanes`` lanes. ``eval_every`` /
    ``ckpt_every`` / ``log_every`` count optimizer steps; 0 disables the periodic action (a final
    evaluation and checkpoint are always made). ``grad_clip`` 0 disables clipping.
    ``progress=None`` shows a tqdm bar only when stderr is a terminal. ``threads``: CPU threads
    (``"auto"``: the cores other processes leave free, re-decided every second, see
    :mod:`dsmr.threads`; an int: that many; ``"none"``: torch's setting as it is).
    """

    out_dir: str = "runs/dsmr"
    batch_lanes: int = 8
    grad_accum: int = 1
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    lr_decay_steps: Optional[int] = None  # cosine reaches min_lr here; default: the run's last step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    shuffle: bool = True
    autocast: bool = False
    autocast_dtype: str = "bfloat16"
    device: str = "auto"
    eval_every: int = 500
    eval_batch_lanes: Optional[int] = None
    eval_max_pieces: Optional[int] = None
    ckpt_every: int = 500
    log_every: int = 10
    progress: Optional[bool] = None
    plot: bool = True
    train_split: str = "train"
    val_split: Optional[str] = "validation"
    dist_backend: Optional[str] = None  # default: nccl on CUDA, gloo on CPU
    threads: str = field(default="auto", metadata={"help": (
        "CPU threads: auto uses the cores other processes leave free, re-decided every second, so a busy "
        "core does not stall the run; N fixes the count; none leaves torch's setting ($DSMR_THREADS sets "
        "what auto means)")})

    def __post_init__(self):
        for name in ("batch_lanes", "grad_accum"):
            check_int(name, getattr(self, name), 1)
        for name in ("max_steps", "epochs", "lr_decay_steps", "eval_batch_lanes", "eval_max_pieces"):
            check_int(name, getattr(self, name), 1, allow_none=True)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "log_every", "seed"):
            check_int(name, getattr(self, name), 0)
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps and/or epochs: the run needs a length")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 (grad_clip 0 disables clipping)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        parse_policy(self.threads)  # kept as given (a flag's text or an int), checked here
        if self.autocast_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be 'bfloat16' or 'float16', got {self.autocast_dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))


# Model presets: "tiny" trains in minutes on a 2-core CPU; "paper" is the DSMR paper's scale.
PRESETS: Dict[str, dict] = {
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, segment_len=256,
                 schedule="two_scale:long=1024,short=128,n_long=1"),
    "small": dict(n_layers=6, d_model=256, n_heads=8, n_kv_heads=4, segment_len=512,
                  schedule="two_scale:long=4096,short=512,n_long=2"),
    "paper": dict(n_layers=12, d_model=512, n_heads=8, n_kv_heads=8, segment_len=512,
                  schedule="two_scale:long=8192,short=512,n_long=2"),
}

TABLES = ("model", "train", "data")


def read_config_file(path: Union[str, Path]) -> Dict[str, dict]:
    """A JSON or TOML file -> its tables (``model``, ``train``, ``data``). ValueError if unusable."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ValueError("reading TOML on Python 3.10 needs `pip install tomli` (or use a .json config)")
        try:
            cfg = tomllib.loads(text)
        except Exception as e:  # noqa: BLE001 - report any parse error the same way
            raise ValueError(f"{p} is not valid TOML: {e}") from e
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e
    unknown = set(cfg) - set(TABLES)
    if unknown:
        raise ValueError(f"{p}: unknown tables {sorted(unknown)}; use [model], [train] and [data]")
    return cfg


@dataclass
class Settings:
    """Merged settings of a run: model fields, its schedule, train fields and data options."""

    model: Dict[str, Any] = field(default_factory=dict)
    schedule: Union[str, list, None] = None
    train: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)

    def horizons(self) -> Optional[list]:
        """The schedule as one horizon per layer (None: full memory everywhere)."""
        n = self.model["n_layers"]
        if self.schedule is None:
            return None
        if isinstance(self.schedule, str):
            return schedules.parse(self.schedule, n)
        return schedules.validate(self.schedule, n)

    def model_config(self, vocab_size: int) -> DSMRConfig:
        """The :class:`DSMRConfig` for a corpus of ``vocab_size`` ids."""
        return DSMRConfig(vocab_size=vocab_size, horizons=self.horizons(), **self.model)

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig`; a run without ``max_steps`` or ``epochs`` trains one epoch."""
        kw = dict(self.train)
        if "max_steps" not in kw and "epochs" not in kw:
            kw["epochs"] = 1
        return TrainConfig(**kw)


def load_settings(path: Union[str, Path, None] = None, *, preset: str = "tiny",
                  model: Optional[dict] = None, schedule: Union[str, list, None] = None,
                  train: Optional[dict] = None, data: Optional[dict] = None) -> Settings:
    """Preset, then the config file at ``path``, then the given overrides (None values are skipped).

    Raises ``ValueError`` for an unknown preset or an unusable file.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    file_cfg = read_config_file(path) if path else {}
    base = dict(PRESETS[preset])
    s = Settings(schedule=base.pop("schedule"), model=base)
    file_model = dict(file_cfg.get("model", {}))
    s.schedule = file_model.pop("schedule", s.schedule)
    s.model.update(file_model)
    s.train.update(file_cfg.get("train", {}))
    s.data.update(file_cfg.get("data", {}))
    for table, over in ((s.model, model), (s.train, train), (s.data, data)):
        table.update({k: v for k, v in (over or {}).items() if v is not None})
    if schedule is not None:
        s.schedule = schedule
    return s
