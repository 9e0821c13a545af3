"""Splits pinned by name, and the same in every process whatever its hash salt.

A split that moves between runs silently leaks test pieces into training. The expected
assignments below were computed once from the sha1-based ``hash_split`` and are written out, so
any change of the rule (or a salted ``hash()``) fails here; a subprocess under other
``PYTHONHASHSEED`` values must agree with them too. The demo corpus (ten MAESTRO pieces, fetched
at run time; here a fake MidiTok sdist with the same layout) is pinned the same way.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("miditok")
pytest.importorskip("symusic")

from dsmr import sources  # noqa: E402
from tests.dsmr.test_data import _fake_sdist  # noqa: E402

NOT_TRAIN = {
    "piece_7.mid": "validation", "piece_11.mid": "validation", "piece_16.mid": "test",
    "piece_20.mid": "validation", "piece_30.mid": "test", "piece_35.mid": "validation",
    "piece_37.mid": "test", "piece_38.mid": "validation",
}
NAMES = [f"piece_{i}.mid" for i in range(40)] + [
    "set0/Piece 0.MID", "2004/MIDI-Unprocessed_XP_01.midi", "Bach/BWV 846 Präludium.mid"]
EXPECTED = {n: NOT_TRAIN.get(n, "train") for n in NAMES}
# Four files: hashing puts all four in train, so the train files with the smallest sha1 fill the
# empty splits: c.mid (u = 0.335) validation, then b.mid test.
SMALL = {"a.mid": "train", "b.mid": "test", "c.mid": "validation", "d.mid": "train"}
DEMO = {**{f"Maestro_{i}.mid": "train" for i in range(1, 9)},
        "Maestro_9.mid": "validation", "Maestro_10.mid": "test"}

# Run in a fresh interpreter: prints every split this test pins, as JSON.
PROBE = r"""
import json, sys
from pathlib import Path
from dsmr import sources
from dsmr.data import prepare_cache
names, big, small, demo_cache = json.loads(sys.argv[1])
out = {
    "hash": {n: sources.hash_split(n) for n in names},
    "folder": {f.name: f.split for f in sources.folder_source(big).files},
    "small": {f.name: f.split for f in sources.folder_source(small).files},
    "demo": {f.name: f.split for f in sources.demo_source(demo_cache).files},
}
cache = prepare_cache("demo", cache_dir=demo_cache, workers=1, progress=False)
out["demo_cache"] = {s: cache.names(s) for s in cache.splits}
print(json.dumps(out))
"""


def _folder(root, names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")  # listing only; nothing is read
    return root


def test_hash_split_is_pinned_by_name():
    assert {n: sources.hash_split(n) for n in NAMES} == EXPECTED
    # the fractions move the thresholds, not the hash: u(c.mid) = 0.335
    assert [sources.hash_split("c.mid", v, t) for v, t in ((0.1, 0.1), (0.3, 0.2), (0.0, 0.5), (0.3, 0.0))] == [
        "train", "validation", "test", "train"]


def test_folder_source_splits_are_pinned(tmp_path):
    big = {f.name: f.split for f in sources.folder_source(_folder(tmp_path / "big", NAMES)).files}
    assert big == EXPECTED
    small = {f.name: f.split for f in sources.folder_source(_folder(tmp_path / "small", SMALL)).files}
    assert small == SMALL


def test_demo_corpus_split_is_pinned(tmp_path, monkeypatch):
    from dsmr.data import prepare_cache

    monkeypatch.setenv("DSMR_DEMO_SDIST", str(_fake_sdist(tmp_path / "sd" / "miditok-3.1.0.tar.gz")))
    src = sources.demo_source(tmp_path / "cache")
    assert {f.name: f.split for f in src.files} == DEMO
    cache = prepare_cache("demo", cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert {s: cache.names(s) for s in cache.splits} == {
        "train": [f"Maestro_{i}.mid" for i in range(1, 9)], "validation": ["Maestro_9.mid"],
        "test": ["Maestro_10.mid"]}


@pytest.mark.parametrize("hashseed", ["0", "4242"])
def test_splits_agree_in_a_process_with_another_hash_seed(tmp_path, hashseed):
    big, small = _folder(tmp_path / "big", NAMES), _folder(tmp_path / "small", SMALL)
    sdist = _fake_sdist(tmp_path / "sd" / "miditok-3.1.0.tar.gz")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "DSMR_DEMO_SDIST": str(sdist),
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    arg = json.dumps([NAMES, str(big), str(small), str(tmp_path / "cache")])
    res = subprocess.run([sys.executable, "-c", PROBE, arg], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["hash"] == EXPECTED and got["folder"] == EXPECTED
    assert got["small"] == SMALL and got["demo"] == DEMO
    assert got["demo_cache"]["validation"] == ["Maestro_9.mid"] and got["demo_cache"]["test"] == ["Maestro_10.mid"]
