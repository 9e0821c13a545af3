"""The long piece every model-level benchmark streams: a demo-corpus piece, or a synthetic stand-in.

The demo corpus (``dsmr.data.prepare_cache("demo")``) is ten MAESTRO performances tokenized with
the package's REMI tokenizer; the first run fetches MidiTok's sdist from PyPI into a cache, later
runs reuse it. When that is impossible (offline, or the data pipeline fails) we fall back to a
deterministic synthetic piece of the same length and say so in every table that uses it: the
timings do not depend on the token values, but a reader must know which one was measured.

Resolution runs in a child process with a timeout (``resolve``), so a hanging download cannot
stall the benchmark; the tokens are handed to the workers as an ``.npy`` file.

    python -m bench.piece --min-tokens 16385 --out /tmp/piece.npy   # prints the JSON description
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import REPO

SYNTHETIC_VOCAB = 255  # the demo tokenizer's vocabulary size, so models are the same size


def _from_demo(min_tokens: int):
    """(ids with BOS first, vocab_size, description) of the shortest demo piece long enough."""
    from dsmr.data import prepare_cache

    cache = prepare_cache("demo", progress=False)
    candidates = []
    for split in cache.splits:
        for name, piece in zip(cache.names(split), cache.pieces(split)):
            candidates.append((len(piece), name, split, piece))
    long_enough = sorted(c for c in candidates if c[0] + 1 >= min_tokens) if candidates else []
    if not long_enough:
        longest = max(c[0] for c in candidates) if candidates else 0
        raise RuntimeError(f"no demo piece has {min_tokens} tokens (longest: {longest})")
    length, name, split, piece = long_enough[0]
    ids = np.concatenate([[cache.bos_id], np.asarray(piece, dtype=np.int64)])
    desc = (
        f"demo corpus (MAESTRO via MidiTok's sdist, REMI, vocab {cache.vocab_size}): {name} "
        f"({split} split, {length:,} tokens + BOS)"
    )
    return ids, int(cache.vocab_size), desc


def synthetic_piece(n_tokens: int, vocab_size: int = SYNTHETIC_VOCAB, seed: int = 0) -> np.ndarray:
    """Deterministic stand-in: uniform random ids in [3, vocab) after a BOS-like id 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=n_tokens, dtype=np.int64)
    ids[0] = 1
    return ids


def resolve(min_tokens: int, out: Path, timeout_s: float = 600.0) -> dict:
    """Write the piece to ``out`` (.npy) and return ``{"vocab_size", "n_tokens", "source", "synthetic"}``.

    Tries the demo corpus in a child process; on any failure writes the synthetic piece instead
    and records why in ``source``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.piece", "--min-tokens", str(min_tokens), "--out", str(out)]
    reason = ""
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        reason = f"timed out after {timeout_s:.0f} s"
    ids = synthetic_piece(min_tokens)
    np.save(out, ids)
    return {
        "vocab_size": SYNTHETIC_VOCAB,
        "n_tokens": int(len(ids)),
        "synthetic": True,
        "source": (
            f"SYNTHETIC piece ({len(ids):,} deterministic random ids, vocab {SYNTHETIC_VOCAB}): the demo "
            f"corpus was unavailable ({reason[:160]})"
        ),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="resolve the benchmark piece (demo corpus) to an .npy file")
    p.add_argument("--min-tokens", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    ids, vocab, desc = _from_demo(args.min_tokens)
    np.save(args.out, ids)
    print(json.dumps({"vocab_size": vocab, "n_tokens": int(len(ids)), "source": desc, "synthetic": False}))


if __name__ == "__main__":
    main()
