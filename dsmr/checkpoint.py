"""Checkpoints: atomic writes, ``weights_only`` loads, and a model loader for eval/generate/CLI.

A checkpoint is one ``dict`` of tensors, dicts, lists, str/int/float/bool/None (so it loads with
``torch.load(weights_only=True)``, which never runs pickled code)::

    format, version
    model            state_dict                      model_config     DSMRConfig.to_dict()
    optimizer        AdamW state_dict                train_config     TrainConfig.to_dict()
    scheduler        LambdaLR state_dict             tokenizer_config any JSON-able dict or None
    scaler           GradScaler state_dict ({} unless float16 autocast)
    step, epoch      optimizer steps done            vocab            {vocab_size, pad_id, bos_id, eos_id}
    best_val_ppl     float or None                   val              last evaluation dict or None
    world_size       processes that wrote it
    data   [rank]    LaneBatcher.state_dict(): epoch, order, next piece, each lane's piece/offset
    memory [rank]    ModelState.to_dict(): each layer's KV memory, mem_len and positions
    rng    [rank]    torch / CUDA / numpy / python RNG states encoded as tensors and lists
    cpu_paths [rank] the CPU attention paths this process calibrated (dsmr_kernels.cpu_dispatch),
                     so a resumed run rounds as the run it continues

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then
``os.replace``'d over the target (atomic on POSIX), and the directory is fsync'ed: a crash at any
moment leaves either the old or the new file, never a torn one. A file truncated or damaged some
other way is refused with :class:`CheckpointError`.
"""
from __future__ import annotations

import os
import random
import secrets
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

from dsmr_kernels.cpu_dispatch import load_calibration

from .model import DSMRConfig, DSMRModel, ModelState

FORMAT = "dsmr-checkpoint"
VERSION = 1
_TMP_MARK = ".tmp-"

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used (truncated, corrupt, or not a dsmr checkpoint)."""


# ----------------------------------------------------------------------------------------------
# RNG states as weights_only-safe values


def rng_state() -> dict:
    """torch (+ CUDA), numpy and python RNG states as tensors / ints / lists."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(d: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(d["torch"].cpu().to(torch.uint8))
    n = d["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = d["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in d and torch.cuda.is_available():
        states = d["cuda"]
        for i in range(min(len(states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(states[i].cpu().to(torch.uint8), i)


# ----------------------------------------------------------------------------------------------
# build / save / load


def make_checkpoint(*, model, optimizer, scheduler, step: int, epoch: int, model_config, train_config,
                    tokenizer_config: Optional[dict], vocab: dict, data: list, memory: list, rng: list,
                    world_size: int = 1, best_val_ppl: Optional[float] = None,
                    val: Optional[dict] = None, scaler=None, cpu_paths: Optional[list] = None) -> dict:
    """Assemble the checkpoint dict (see the module docstring)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": int(step),
        "epoch": int(epoch),
        "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict() if train_config is not None else None,
        "tokenizer_config": tokenizer_config,
        "vocab": vocab,
        "data": data,
        "memory": memory,
        "rng": rng,
        "cpu_paths": cpu_paths if cpu_paths is not None else [[] for _ in rng],
        "world_size": int(world_size),
        "best_val_ppl": best_val_ppl,
        "val": val,
    }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, mode: str, write) -> Path:
    """``write(f)`` into a temp file in the same dir, fsync, ``os.replace`` over ``path``, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory: os.replace is only atomic within one filesystem.
    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(obj: dict, path: PathLike) -> Path:
    """Write ``obj`` to ``path`` atomically (temp file in the same dir + fsync + ``os.replace``)."""
    return _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a text file atomically (temp file in the same dir + fsync + ``os.replace``)."""
    return _atomic_write(path, "w", lambda f: f.write(text))


def remove_stale_temps(directory: PathLike) -> int:
    """Delete temp files that crashed writers left behind in ``directory``; returns how many."""
    n = 0
    for p in Path(directory).glob(f".*{_TMP_MARK}*"):
        if p.is_file():
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` if unusable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch reports truncation as RuntimeError/EOFError/UnpicklingError
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"use another checkpoint (e.g. last.pt / best.pt from the same run)"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dsmr checkpoint (no format={FORMAT!r} marker)")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj['version']}; this dsmr reads <= {VERSION}")
    missing = [k for k in ("model", "model_config", "step") if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is truncated or corrupt: missing entries {missing}")
    return obj


def load_model(path: PathLike, device: Any = "cpu") -> Tuple["torch.nn.Module", dict]:
    """Rebuild the model of a checkpoint, in eval mode on ``device``.

    Returns ``(model, info)``; ``info`` has ``step``, ``epoch``, ``model_config``,
    ``train_config``, ``tokenizer_config``, ``vocab`` (``{vocab_size, pad_id, bos_id, eos_id}``),
    ``best_val_ppl``, ``val`` and ``path``.
    """
    ck = load_checkpoint(path, map_location="cpu")
    config = DSMRConfig.from_dict(dict(ck["model_config"]))
    model = DSMRModel(config)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its model config: {e}") from e
    model.to(device).eval()
    info = {k: ck.get(k) for k in ("step", "epoch", "model_config", "train_config", "tokenizer_config",
                                   "vocab", "best_val_ppl", "val")}
    info["path"] = str(path)
    return model, info


def restore_training(path: PathLike, *, model, optimizer, scheduler, scaler, batcher, model_config,
                     rank: int = 0, world_size: int = 1, device: Any = "cpu") -> dict:
    """Load a training checkpoint into a freshly set-up run, in place; the exact-resume half of it.

    ``model`` (unwrapped), ``optimizer``, ``scheduler``, ``scaler`` (a ``GradScaler``) and
    ``batcher`` (a :class:`dsmr.stream.LaneBatcher`) take their states; the RNG states are set to
    this rank's, and so are the calibrated CPU attention paths (checkpoints written before they
    were saved have none: the resumed run calibrates anew). The checkpoint must come from the
    same model config and number of processes.

    Returns ``{"step", "state" (this rank's ModelState on device), "best_val_ppl", "val"}``.
    """
    ck = load_checkpoint(path, map_location="cpu")  # RNG states must stay on CPU
    if ck["model_config"] != model_config.to_dict():
        raise ValueError(f"{path} was trained with model config {ck['model_config']}, "
                         f"not {model_config.to_dict()}; resume with the same model config")
    if ck.get("world_size", 1) != world_size:
        raise ValueError(f"{path} was written by {ck.get('world_size', 1)} processes; "
                         f"resume with the same number (now {world_size})")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    batcher.load_state_dict(ck["data"][rank])
    memory = {k: v.to(device).contiguous() for k, v in ck["memory"][rank].items()}
    set_rng_state(ck["rng"][rank])
    paths = ck.get("cpu_paths")
    if paths:
        load_calibration(paths[rank])
    return {
        "step": int(ck["step"]),
        "state": ModelState.from_dict(memory, model_config.n_layers),
        "best_val_ppl": ck.get("best_val_ppl"),
        "val": ck.get("val"),
    }
