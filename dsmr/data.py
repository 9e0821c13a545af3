"""The token cache: every piece of a corpus tokenized once, stored compactly, reloaded in a blink.

    >>> cache = prepare_cache("demo")     # or "music21", a MAESTRO or ASAP folder, or any folder of MIDI files
    >>> cache.splits
    ('train', 'validation', 'test')
    >>> pieces = cache.pieces("train")            # list of (T_i,) int32 arrays, whole pieces, no BOS/EOS
    >>> cache.vocab_size, cache.pad_id, cache.bos_id, cache.eos_id

On disk, one folder per (tokenizer, file list) pair, ``<cache root>/tokens/<kind>-<key>/``:

| file | content |
|---|---|
| ``ids.npy`` | all pieces' token ids concatenated, int16 (int32 if the vocabulary needs it) |
| ``offsets.npy`` | int64, ``(n_pieces + 1,)``: piece ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` |
| ``index.json`` | piece names, splits and lengths (in storage order), skipped files with reasons, build info |
| ``tokenizer.json`` | the full MidiTok tokenizer (config + BPE model if any); :meth:`TokenCache.tokenizer` rebuilds it |

The key hashes the tokenizer dict (with MidiTok/symusic versions) and the file list (name, split,
size, mtime), so changing either builds a new cache and an unchanged pair is reused, not rebuilt.
A build is written into a hidden temporary folder and renamed into place only when complete; an
interrupted build leaves nothing a later run would load. Files that cannot be read, or hold no
notes, are skipped with a :class:`MidiSkipWarning` naming them and recorded in the index.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .sources import SPLITS, Source, default_cache_root, resolve_source
from .tokenizer import (
    TOKENIZER_FILE,
    build_tokenizer,
    default_tokenizer_config,
    ids_to_midi,
    ids_to_score,
    load_score,
    load_tokenizer,
    midi_to_ids,
    save_tokenizer_config,
    special_ids,
    tokenizer_dict,
)

__all__ = [
    "TokenCache", "CacheError", "MidiSkipWarning", "warning_line", "prepare_cache", "cache_key",
    "build_tokenizer", "default_tokenizer_config", "load_tokenizer", "save_tokenizer_config",
    "midi_to_ids", "ids_to_score", "ids_to_midi",
]

PathLike = Union[str, os.PathLike]

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
IDS_FILE = "ids.npy"
OFFSETS_FILE = "offsets.npy"
# Sets in MidiTok's config serialize in hash order; sort them so the key is stable.
_SET_FIELDS = ("programs", "use_note_duration_programs", "control_change_numbers")


class MidiSkipWarning(UserWarning):
    """A source file was skipped (unreadable, empty, no notes, or missing).

    ``name`` (the file's name in its source) and ``reason`` are kept apart from the message, so
    a front end can print its own line (the CLI: ``skipped NAME: reason``, see :func:`warning_line`).
    """

    def __init__(self, message: str, name: Optional[str] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.name, self.reason = name, reason


def warning_line(message) -> str:
    """One line for a warning on the command line, without the Python source line.

    A :class:`MidiSkipWarning` gives ``skipped NAME: reason``; any other ``dsmr: warning: ...``.
    """
    if isinstance(message, MidiSkipWarning) and message.name is not None:
        return f"skipped {message.name}: {message.reason}"
    return f"dsmr: warning: {message}"


class CacheError(ValueError):
    """A cache folder is incomplete or inconsistent; delete it and prepare the cache again."""


# ---------------------------------------------------------------------------------------------
# The cache


class TokenCache:
    """A built token cache (see the module docstring for the layout). Use :meth:`load` or :func:`prepare_cache`.

    Pieces are stored whole and in split order (train, validation, test; by name within a split).
    """

    def __init__(self, path: Path, index: dict, ids: np.ndarray, offsets: np.ndarray, tokenizer_params: dict):
        self.path = Path(path)
        self.index = index
        self._ids = ids  # (N,) int16/int32, memory-mapped
        self._offsets = offsets  # (n_pieces + 1,) int64
        self._tokenizer_params = tokenizer_params
        self._tokenizer = None
        self._rows = {s: [] for s in SPLITS}
        for i, piece in enumerate(index["pieces"]):
            self._rows.setdefault(piece["split"], []).append(i)

    @classmethod
    def load(cls, path: PathLike) -> "TokenCache":
        """Open a cache folder; raises :class:`CacheError` if it is incomplete or inconsistent."""
        path = Path(path)
        try:
            with (path / INDEX_FILE).open() as f:
                index = json.load(f)
            with (path / TOKENIZER_FILE).open() as f:
                params = json.load(f)
            ids = np.load(path / IDS_FILE, mmap_mode="r")
            offsets = np.load(path / OFFSETS_FILE)
        except (OSError, ValueError) as e:
            raise CacheError(f"{path} is not a complete dsmr token cache: {e}") from e
        if index.get("format") != CACHE_FORMAT or not index.get("complete"):
            raise CacheError(f"{path}: cache format {index.get('format')} (complete="
                             f"{index.get('complete')}), this dsmr reads format {CACHE_FORMAT}")
        lengths = np.asarray([p["length"] for p in index["pieces"]], dtype=np.int64)
        if (ids.ndim != 1 or offsets.shape != (len(lengths) + 1,) or offsets[0] != 0
                or offsets[-1] != ids.shape[0] or not np.array_equal(np.diff(offsets), lengths)):
            raise CacheError(f"{path}: ids/offsets/index disagree; delete the folder and rebuild")
        return cls(path, index, ids, offsets, params)

    # -- identity
    @property
    def key(self) -> str:
        """The hash this cache was built for (see :func:`cache_key`)."""
        return self.index["key"]

    @property
    def splits(self) -> tuple:
        """Names of the splits that hold at least one piece, in the order train, validation, test."""
        return tuple(s for s in self._rows if self._rows[s])

    @property
    def vocab_size(self) -> int:
        """Number of token ids (BPE tokens included); every id lies in ``[0, vocab_size)``."""
        return int(self.index["vocab_size"])

    @property
    def pad_id(self) -> int:
        """Always 0."""
        return int(self.index["special_ids"]["pad"])

    @property
    def bos_id(self) -> int:
        return int(self.index["special_ids"]["bos"])

    @property
    def eos_id(self) -> int:
        return int(self.index["special_ids"]["eos"])

    @property
    def tokenizer_config(self) -> dict:
        """The tokenizer as a JSON-able dict (MidiTok's ``tokenizer.json``: full config, BPE model if any).

        Store it in checkpoints; ``dsmr.tokenizer.build_tokenizer(d)`` rebuilds the same tokenizer.
        """
        return json.loads(json.dumps(self._tokenizer_params))

    def tokenizer(self):
        """The MidiTok tokenizer that made these ids (built once, then reused)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path / TOKENIZER_FILE)
        return self._tokenizer

    # -- data
    def _check_split(self, split: str) -> list:
        if split not in self._rows:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        return self._rows[split]

    def pieces(self, split: str) -> list:
        """Whole pieces of ``split``: a list of ``(T_i,)`` int32 arrays of raw token ids, no BOS/EOS.

        Fresh arrays each call (the trainer may keep or modify them). An empty split gives ``[]``.
        """
        o = self._offsets
        return [np.array(self._ids[o[i]:o[i + 1]], dtype=np.int32) for i in self._check_split(split)]

    def names(self, split: str) -> list:
        """Piece names of ``split`` (relative file paths), aligned with :meth:`pieces`."""
        return [self.index["pieces"][i]["name"] for i in self._check_split(split)]

    def lengths(self, split: str) -> np.ndarray:
        """Token counts of the pieces of ``split``, ``(n,)`` int64, aligned with :meth:`pieces`."""
        return np.asarray([self.index["pieces"][i]["length"] for i in self._check_split(split)], dtype=np.int64)

    @property
    def skipped(self) -> list:
        """Files left out of the cache: ``[{"name": ..., "reason": ...}]``."""
        return list(self.index["skipped"])

    @property
    def demo_overlap(self) -> dict:
        """ASAP caches: the pieces the demo corpus also holds (see :func:`dsmr.sources.asap_source`).

        ``{"pieces": [[composer, title, demo file]], "recordings": [...], "files": [...], "dropped":
        bool}``: ``files`` are this cache's piece names of the same music as a demo file; leave them
        out of any split compared with the demo corpus (or build with ``drop_demo_overlap=True``).
        ``{}`` for other sources.
        """
        return dict(self.index.get("demo_overlap") or {})

    def stats(self) -> dict:
        """Per split: pieces, tokens, min/median/max piece length; plus the skipped count.

        ``{"train": {"pieces": 8, "tokens": 339000, "min": 9956, "median": 45627.0, "max": 77364},
        ..., "skipped": 0}``; an empty split has zeros.
        """
        out = {}
        for s in self._rows:
            n = self.lengths(s)
            out[s] = {"pieces": int(n.size), "tokens": int(n.sum()),
                      "min": int(n.min()) if n.size else 0,
                      "median": float(np.median(n)) if n.size else 0.0,
                      "max": int(n.max()) if n.size else 0}
        out["skipped"] = len(self.index["skipped"])
        return out

    def __len__(self) -> int:
        return len(self.index["pieces"])

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={len(self._rows[s])}" for s in self.splits)
        return f"TokenCache({str(self.path)!r}, {parts}, vocab_size={self.vocab_size}, skipped={len(self.skipped)})"


# ---------------------------------------------------------------------------------------------
# Building


def cache_key(tokenizer_params: dict, source: Source) -> str:
    """sha256 over the format version, the tokenizer dict and each file's (name, split, size, mtime)."""
    tok = json.loads(json.dumps(tokenizer_params))
    for k in _SET_FIELDS:
        if isinstance(tok.get("config", {}).get(k), list):
            tok["config"][k] = sorted(tok["config"][k])
    files = []
    for f in source.files:
        try:
            st = f.path.stat()
            files.append([f.name, f.split, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([f.name, f.split, -1, -1])
    payload = {"format": CACHE_FORMAT, "tokenizer": tok, "files": files, "missing": sorted(source.missing)}
    if source.skipped:  # only when there are some, so the keys of existing caches stay as they were
        payload["skipped"] = sorted(item["name"] for item in source.skipped)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


_WORKER_TOKENIZER = None


def _init_worker(params: dict) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(params)


def _tokenize_job(job):
    """``(i, path) -> (i, ids or None, reason or None)``; never raises, so one bad file cannot stop a build."""
    i, path = job
    try:
        score = load_score(path, _WORKER_TOKENIZER)
        if score.note_num() == 0:
            return i, None, "no notes"
        ids = midi_to_ids(score, _WORKER_TOKENIZER)
    except Exception as e:  # noqa: BLE001 - symusic raises RuntimeError for bad MIDI, others can leak
        return i, None, f"unreadable ({type(e).__name__}: {str(e).strip()[:200]})"
    if ids.size == 0:
        return i, None, "no tokens (notes outside the pitch range?)"
    return i, ids, None


def _tokenize_all(files: list, params: dict, workers: int, progress: bool, desc: str) -> list:
    """Tokenize ``files`` (list of MidiFile) -> list aligned with it of ``(ids or None, reason or None)``."""
    from tqdm.auto import tqdm

    # Largest first, so no worker is left alone with the longest piece at the end.
    order = sorted(range(len(files)), key=lambda i: -_size(files[i].path))
    jobs = [(i, str(files[i].path)) for i in order]
    results = [None] * len(files)
    workers = max(1, min(int(workers), len(files)))
    if workers == 1:
        _init_worker(params)
        with tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress) as bar:
            for job in jobs:
                i, ids, reason = _tokenize_job(job)
                results[i] = (ids, reason)
                bar.update()
        return results
    # fork on Linux: children inherit the imports (spawn would re-import torch in each worker).
    # The pool is made before the progress bar so no tqdm monitor thread exists at fork time.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(params,)) as pool:
        with tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress) as bar:
            for i, ids, reason in pool.imap_unordered(_tokenize_job, jobs, chunksize=1):
                results[i] = (ids, reason)
                bar.update()
    return results


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_prefix(name: str) -> str:
    # Host and pid in the name: a later build can tell a dead build's leftovers from a live one's
    # (the cache root may be shared between machines).
    host = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname())[:40] or "host"
    return f".tmp-{name}-{host}-{os.getpid()}-"


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete temp folders of earlier builds of ``name`` on this host whose process is gone."""
    mine = _tmp_prefix(name)
    host_prefix = mine[: mine.rstrip("-").rfind("-") + 1]  # ".tmp-<name>-<host>-"
    for d in root.glob(f"{host_prefix}*"):
        m = re.match(r"(\d+)-", d.name[len(host_prefix):])
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _save_arrays(folder: Path, ids: np.ndarray, offsets: np.ndarray) -> None:
    np.save(folder / IDS_FILE, ids)
    np.save(folder / OFFSETS_FILE, offsets)


def _write_json(path: Path, obj) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _build(source: Source, tokenizer, params: dict, key: str, final: Path, workers: int, progress: bool) -> None:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root, final.name)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=_tmp_prefix(final.name)))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished cache is an ordinary folder
        t0 = time.perf_counter()
        files = sorted(source.files, key=lambda f: (SPLITS.index(f.split), f.name))
        results = _tokenize_all(files, params, workers, progress, desc=f"tokenizing {source.kind}")
        seconds = time.perf_counter() - t0

        pieces, arrays, skipped = [], [], []
        for f, (ids, reason) in zip(files, results):
            if ids is None:
                warnings.warn(MidiSkipWarning(f"skipping {f.path}: {reason}", f.name, reason), stacklevel=3)
                skipped.append({"name": f.name, "reason": reason})
            else:
                pieces.append({"name": f.name, "split": f.split, "length": int(ids.size)})
                arrays.append(ids)
        listing = {"maestro": "the MAESTRO CSV", "asap": "ASAP's metadata.csv"}.get(source.kind, "the source's listing")
        skipped += [{"name": n, "reason": f"listed in {listing} but missing on disk"} for n in source.missing]
        for item in source.skipped:  # e.g. music21 works that could not be made into MIDI
            warnings.warn(MidiSkipWarning(f"skipping {item['name']}: {item['reason']}", item["name"], item["reason"]),
                          stacklevel=3)
            skipped.append(dict(item))

        vocab = len(tokenizer)
        dtype = np.int16 if vocab <= np.iinfo(np.int16).max + 1 else np.int32
        ids = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        _save_arrays(tmp, ids, offsets)
        save_tokenizer_config(tokenizer, tmp / TOKENIZER_FILE)

        split_totals = {s: {"pieces": 0, "tokens": 0} for s in SPLITS}
        for p in pieces:
            split_totals[p["split"]]["pieces"] += 1
            split_totals[p["split"]]["tokens"] += p["length"]
        index = {
            "format": CACHE_FORMAT,
            "key": key,
            "source": {"kind": source.kind, "root": str(source.root)},
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab,
            "special_ids": special_ids(tokenizer),
            "splits": split_totals,
            "pieces": pieces,
            "skipped": skipped,
            "demo_overlap": source.demo_overlap,
            "build": {"seconds": round(seconds, 3), "workers": workers,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            # Written last, inside a folder nobody reads until the rename below.
            "complete": True,
        }
        _write_json(tmp / INDEX_FILE, index)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same cache first: keep theirs if it loads.
            TokenCache.load(final)
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            per = ", ".join(f"{s} {v['pieces']}" for s, v in split_totals.items())
            print(f"dsmr: tokenized {len(pieces)} pieces ({per}; {int(ids.size):,} tokens) in "
                  f"{seconds:.1f} s with {workers} worker(s); skipped {len(skipped)} -> {final}",
                  file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _slug(source: Source) -> str:
    if source.kind in ("demo", "maestro", "asap", "music21"):
        return source.kind
    return f"{source.kind}-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", source.root.name)[:40] or "root")


def prepare_cache(source: PathLike, cache_dir: Optional[PathLike] = None, tokenizer_config=None,
                  workers: int = 2, progress: bool = True, *, valid_fraction: float = 0.1,
                  test_fraction: float = 0.1, drop_demo_overlap: bool = False) -> TokenCache:
    """Tokenize a corpus once and return its :class:`TokenCache` (reused when nothing changed).

    source
        ``"demo"`` (fetched on first use, see :func:`dsmr.sources.fetch_demo`); ``"music21"`` or
        ``"music21:NAME,..."`` (music21's bundled corpus, works joined from their movements and
        converted once, in parallel and resumably, see :mod:`dsmr.music21_corpus`; needs
        ``pip install 'dsmr[music21]'``); a MAESTRO v3 folder (the root or a parent; recognised by
        ``maestro-v3.0.0.csv``); an ASAP folder (recognised by its ``metadata.csv``; split by
        (composer, title), see :func:`dsmr.sources.asap_source`); or any folder of
        ``.mid``/``.midi`` files (split by file-name hash with ``valid_fraction``/``test_fraction``).
    cache_dir
        Cache root: token caches go to ``<root>/tokens/``, the demo corpus to ``<root>/demo/``.
        Default ``$DSMR_CACHE`` or ``~/.cache/dsmr``.
    tokenizer_config
        Anything :func:`dsmr.tokenizer.build_tokenizer` accepts: ``None`` (the default piano REMI),
        a dict of ``TokenizerConfig`` overrides, a full tokenizer dict (e.g. a checkpoint's), a
        ``tokenizer.json`` path, or a (BPE-trained) MidiTok tokenizer.
    workers
        Tokenizing processes (1 = in this process).
    progress
        Show a progress bar and print a one-line build summary to stderr.
    drop_demo_overlap
        ASAP only: leave out every performance of the pieces the demo corpus also holds (for
        comparisons with the demo corpus); without it they are kept and listed in
        :attr:`TokenCache.demo_overlap`.

    Unreadable, empty and note-less files are skipped with a :class:`MidiSkipWarning` and listed
    in ``cache.skipped``; a build never stops for one file.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    src = resolve_source(source, root, valid_fraction, test_fraction, drop_demo_overlap=drop_demo_overlap,
                         workers=workers, progress=progress)
    tokenizer = build_tokenizer(tokenizer_config)
    params = tokenizer_dict(tokenizer)
    key = cache_key(params, src)
    final = root / "tokens" / f"{_slug(src)}-{key[:16]}"
    if final.exists():
        try:
            cache = TokenCache.load(final)
            if cache.key == key:
                return cache
            reason = "its key differs"
        except CacheError as e:
            reason = str(e)
        warnings.warn(f"rebuilding token cache {final}: {reason}", stacklevel=2)
        # Move aside first so the folder name is free even if the delete is slow or partial.
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    _build(src, tokenizer, params, key, final, workers, progress)
    return TokenCache.load(final)
