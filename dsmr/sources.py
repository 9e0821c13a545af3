"""Where pieces come from: a MAESTRO v3 folder, an ASAP folder, music21's corpus, any folder of MIDI
files, or the demo corpus.

Each source resolves to a :class:`Source`: a sorted list of :class:`MidiFile` (absolute path,
stable piece name, split) plus the names of files a listing promised but the disk lacks. Splits
are always ``"train"``, ``"validation"``, ``"test"``.

- **MAESTRO v3** (:func:`maestro_source`): splits come from the ``split`` column of
  ``maestro-v3.0.0.csv``; ``midi_filename`` (``2004/MIDI-Unprocessed_XP_01.midi``) is relative to
  the CSV's folder. The folder passed may be the dataset root or a parent of it.
- **A folder of ``.mid``/``.midi`` files** (:func:`folder_source`): recursive; each file's split
  is fixed by a hash of its relative path, so adding files never moves existing ones.
- **ASAP** (:func:`asap_source`): the aligned scores and performances dataset (a clone of
  ``fosfrancesco/asap-dataset``), recognized by its ``metadata.csv``. Its 1,067 performances are the
  pieces (score MIDIs are left out); splits are drawn per (composer, title), never per file, since
  several performances share one score. Performances of the pieces the demo corpus also holds are
  recorded (``Source.demo_overlap``) and can be left out (``drop_demo_overlap=True``).
- **music21** (:mod:`dsmr.music21_corpus`): the corpus bundled with the music21 package, works
  joined from their movements and written once to MIDI under the cache root.
- **The demo corpus** (:func:`demo_source`): ten MAESTRO performances that ship inside MidiTok's
  source distribution on PyPI, fetched on first use with pip; no manual download.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi")
MAESTRO_CSV = "maestro-v3.0.0.csv"
MAESTRO_URL = "https://magenta.tensorflow.org/datasets/maestro"

ASAP_CSV = "metadata.csv"
ASAP_URL = "https://github.com/fosfrancesco/asap-dataset"
ASAP_LICENSE = "CC BY-NC-SA 4.0"
ASAP_CITATION = ("Foscarin, McLeod, Rigaux, Jacquemard and Sakai, \"ASAP: a dataset of aligned scores and "
                 "performances for piano transcription\", ISMIR 2020, pp. 534-541")
_ASAP_COLUMNS = {"composer", "title", "midi_performance"}

DEMO_MIDITOK_VERSION = "3.1.0"
DEMO_LICENSE = "CC BY-NC-SA 4.0"
# Fixed demo split (8 / 1 / 1): one mid-length performance to validate on, one to test on.
DEMO_SPLITS = {"Maestro_9.mid": "validation", "Maestro_10.mid": "test"}
_DEMO_MEMBER = re.compile(r"Maestro_\d+\.mid")
# The MAESTRO recordings three demo files were cut from, found by matching note onsets, pitches and
# velocities (MidiTok renamed the files, so nothing else records it). ASAP names the MAESTRO file of
# most of its performances (column maestro_midi_performance); that is how its overlap is found.
DEMO_MAESTRO_MIDI = {
    "Maestro_5.mid": "2009/MIDI-Unprocessed_11_R1_2009_01-05_ORIG_MID--AUDIO_11_R1_2009_11_R1_2009_01_WAV.midi",
    "Maestro_8.mid": "2014/MIDI-UNPROCESSED_16-18_R1_2014_MID--AUDIO_16_R1_2014_wav--2.midi",
    "Maestro_9.mid": "2014/MIDI-UNPROCESSED_16-18_R1_2014_MID--AUDIO_18_R1_2014_wav--2.midi",
}
# ASAP performances cut from those recordings whose metadata row leaves the MAESTRO file blank
# (found the same way); with the four rows that name it, seven performances of seven pieces.
ASAP_DEMO_PERFORMANCES = {
    "Beethoven/Piano_Sonatas/11-2/MaximovI04.mid": "Maestro_8.mid",
    "Beethoven/Piano_Sonatas/11-3/MaximovI05.mid": "Maestro_8.mid",
    "Beethoven/Piano_Sonatas/21-2/Sekino05.mid": "Maestro_5.mid",
}
_DEMO_MARKER = "README.txt"


@dataclass(frozen=True)
class MidiFile:
    """One piece: its file, its stable name (relative POSIX path) and its split."""

    path: Path
    name: str
    split: str


@dataclass
class Source:
    """A resolved corpus: ``kind`` ("maestro", "folder", "demo"), its ``root`` and its files."""

    kind: str
    root: Path
    files: list = field(default_factory=list)  # list[MidiFile], sorted by name
    missing: list = field(default_factory=list)  # names listed (MAESTRO/ASAP CSV) but not on disk
    # Files that could not be made into MIDI (music21 works that fail to parse): [{"name", "reason"}].
    skipped: list = field(default_factory=list)
    # ASAP: what the demo corpus also holds: {"pieces": [[composer, title, demo file]], "recordings":
    # [names of performances cut from a demo recording], "files": [every performance of those pieces],
    # "dropped": bool}; empty for other sources.
    demo_overlap: dict = field(default_factory=dict)

    def counts(self) -> dict:
        """Number of files per split."""
        out = {s: 0 for s in SPLITS}
        for f in self.files:
            out[f.split] = out.get(f.split, 0) + 1
        return out


def default_cache_root() -> Path:
    """``$DSMR_CACHE`` if set, else ``~/.cache/dsmr``: demo MIDI under ``demo/``, token caches under ``tokens/``."""
    env = os.environ.get("DSMR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsmr"


# ---------------------------------------------------------------------------------------------
# MAESTRO


def find_maestro_csv(root: PathLike) -> Optional[Path]:
    """The MAESTRO metadata CSV in ``root`` or one or two folder levels below it, else ``None``.

    ``maestro-v3.0.0.csv`` is preferred; another ``maestro-v*.csv`` (same columns) is accepted.
    """
    root = Path(root)
    for pattern in (MAESTRO_CSV, "maestro-v*.csv"):
        for depth in range(3):
            hits = sorted(root.glob("/".join(["*"] * depth + [pattern])))
            hits = [h for h in hits if h.is_file()]
            if len(hits) > 1:
                warnings.warn(f"several MAESTRO CSVs under {root}; using {hits[0]}", stacklevel=2)
            if hits:
                return hits[0]
    return None


def maestro_source(root: PathLike) -> Source:
    """Read a MAESTRO v3 folder (the dataset root or a parent of it).

    Raises ``FileNotFoundError`` when no ``maestro-v3.0.0.csv`` is found and ``ValueError`` for a
    CSV without the ``split``/``midi_filename`` columns or with an unknown split. Files the CSV
    lists but the disk lacks (e.g. a partial download) are left out with one warning that counts
    them; their names are in ``Source.missing``.
    """
    root = Path(root)
    csv_path = find_maestro_csv(root)
    if csv_path is None:
        raise FileNotFoundError(
            f"no {MAESTRO_CSV} in {root} or one/two folder levels below it. Download MAESTRO v3 "
            f"(the MIDI-only zip) from {MAESTRO_URL}, unzip it and pass its folder; or pass "
            f"any folder of .mid files, or 'demo'."
        )
    base = csv_path.parent
    files, missing = [], []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = {"split", "midi_filename"} - set(reader.fieldnames or ())
        if absent:
            raise ValueError(f"{csv_path} lacks column(s) {sorted(absent)}; is it MAESTRO's metadata CSV?")
        for row_no, row in enumerate(reader, start=2):
            split = (row["split"] or "").strip()
            name = (row["midi_filename"] or "").strip()
            if split not in SPLITS:
                raise ValueError(f"{csv_path}:{row_no}: split {split!r} is not one of {SPLITS}")
            path = base / PurePosixPath(name)
            if path.is_file():
                files.append(MidiFile(path.resolve(), name, split))
            else:
                missing.append(name)
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(files) + len(missing)} MIDI files listed in {csv_path} are "
            f"missing and will be skipped (first: {missing[0]})",
            stacklevel=2,
        )
    files.sort(key=lambda m: m.name)
    return Source("maestro", base.resolve(), files, missing)


# ---------------------------------------------------------------------------------------------
# Any folder of MIDI files


def hash_split(name: str, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """The split of a file named ``name`` (relative POSIX path): a pure function of the name.

    The first 8 bytes of ``sha1(name)`` as a fraction ``u`` in [0, 1): ``u < test_fraction`` is
    test, the next ``valid_fraction`` is validation, the rest train.
    """
    u = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "validation"
    return "train"


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= valid_fraction, test_fraction and a sum < 1, got "
                         f"{valid_fraction}, {test_fraction}")


def group_splits(keys, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> dict:
    """``{key: split}`` for distinct keys (file names, or pieces that group several files): :func:`hash_split`.

    A small set may hash nothing into validation or test; then, with at least three keys, the
    train keys with the smallest hashes fill the empty split(s), so a trainer always has
    something to validate on.
    """
    keys = sorted(set(keys))
    split = {k: hash_split(k, valid_fraction, test_fraction) for k in keys}
    if len(keys) >= 3:
        by_hash = sorted(keys, key=lambda k: hashlib.sha1(k.encode("utf-8")).digest())
        for want, frac in (("validation", valid_fraction), ("test", test_fraction)):
            if frac > 0 and want not in split.values():
                donor = next(k for k in by_hash if split[k] == "train")
                split[donor] = want
    return split


def folder_source(root: PathLike, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Source:
    """Every ``.mid``/``.midi`` file under ``root`` (recursive; hidden files and folders skipped).

    Splits come from :func:`hash_split`, so they do not depend on the machine, the file order or
    the other files. A small folder may hash nothing into validation or test; then, with at
    least three files, the train files with the smallest hashes fill the empty split(s), so a
    trainer always has something to validate on.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    _check_fractions(valid_fraction, test_fraction)
    names = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in MIDI_SUFFIXES and p.is_file() and not any(s.startswith(".") for s in rel.parts):
            names.append(rel.as_posix())
    if not names:
        raise FileNotFoundError(f"no .mid/.midi files under {root}")
    names.sort()
    split = group_splits(names, valid_fraction, test_fraction)
    base = root.resolve()
    return Source("folder", base, [MidiFile(base / n, n, split[n]) for n in names], [])


# ---------------------------------------------------------------------------------------------
# ASAP


def find_asap_csv(root: PathLike) -> Optional[Path]:
    """ASAP's ``metadata.csv`` (one with ``composer``, ``title`` and ``midi_performance`` columns) in
    ``root`` or one or two folder levels below it, else ``None``."""
    root = Path(root)
    for depth in range(3):
        for hit in sorted(root.glob("/".join(["*"] * depth + [ASAP_CSV]))):
            try:
                with hit.open(newline="", encoding="utf-8") as f:
                    header = next(csv.reader(f), [])
            except (OSError, UnicodeDecodeError):
                continue
            if _ASAP_COLUMNS <= {h.strip() for h in header}:
                return hit
    return None


def _maestro_name(cell: str) -> str:
    """``{maestro}/2014/x.midi`` -> ``2014/x.midi`` (ASAP writes MAESTRO paths under a placeholder)."""
    cell = (cell or "").strip()
    return cell.split("}/", 1)[1] if cell.startswith("{") and "}/" in cell else cell


def asap_source(root: PathLike, valid_fraction: float = 0.1, test_fraction: float = 0.1, *,
                drop_demo_overlap: bool = False) -> Source:
    """Read an ASAP folder (a clone of ``fosfrancesco/asap-dataset``; the root or a parent of it).

    Every performance MIDI listed in ``metadata.csv`` (column ``midi_performance``) is a piece,
    named by that relative path; the score MIDIs (``midi_score.mid``) are left out. The split is
    drawn per piece of music, the pair (composer, title), with :func:`group_splits` over
    ``"composer/title"``: all performances of one piece land in one split, including those that
    ASAP keeps in two folders (e.g. a sonata movement with and without repeats).

    Demo corpus overlap: a performance cut from one of the MAESTRO recordings in the demo corpus
    (:data:`DEMO_MAESTRO_MIDI`, matched by the MAESTRO file name ASAP records, or listed in
    :data:`ASAP_DEMO_PERFORMANCES` where ASAP records none) marks its piece; every performance of
    such a piece is listed in ``Source.demo_overlap["files"]`` (the same music as a demo file) and,
    with ``drop_demo_overlap=True``, left out, so that numbers on ASAP can be set beside numbers on
    the demo corpus. Raises ``FileNotFoundError`` without a ``metadata.csv`` and ``ValueError`` for
    one without ASAP's columns. Files listed but absent are left out with one warning that counts them.
    """
    root = Path(root)
    _check_fractions(valid_fraction, test_fraction)
    csv_path = find_asap_csv(root)
    if csv_path is None:
        raise FileNotFoundError(f"no ASAP {ASAP_CSV} (with composer, title and midi_performance columns) in {root} "
                                f"or one/two folder levels below it; clone {ASAP_URL} and pass its folder")
    base = csv_path.parent
    rows, seen = [], set()
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row_no, row in enumerate(reader, start=2):
            name = (row.get("midi_performance") or "").strip()
            composer, title = (row.get("composer") or "").strip(), (row.get("title") or "").strip()
            if not name or not composer or not title:
                raise ValueError(f"{csv_path}:{row_no}: a row needs composer, title and midi_performance")
            if name in seen:  # one file listed twice: one piece
                continue
            seen.add(name)
            rows.append((name, composer, title, _maestro_name(row.get("maestro_midi_performance", ""))))
    demo_of_recording = {m: demo for demo, m in DEMO_MAESTRO_MIDI.items()}
    recordings, pieces = [], {}
    for name, composer, title, maestro in rows:
        demo = demo_of_recording.get(maestro) or ASAP_DEMO_PERFORMANCES.get(name)
        if demo is not None:
            recordings.append(name)
            pieces.setdefault((composer, title), demo)
    overlap_files = [name for name, composer, title, _ in rows if (composer, title) in pieces]
    split = group_splits([f"{c}/{t}" for _, c, t, _ in rows], valid_fraction, test_fraction)
    files, missing = [], []
    drop = set(overlap_files) if drop_demo_overlap else set()
    for name, composer, title, _ in rows:
        if name in drop:
            continue
        path = base / PurePosixPath(name)
        if path.is_file():
            files.append(MidiFile(path.resolve(), name, split[f"{composer}/{title}"]))
        else:
            missing.append(name)
    if missing:
        warnings.warn(f"{len(missing)} of {len(files) + len(missing)} performance MIDIs listed in {csv_path} are "
                      f"missing and will be skipped (first: {missing[0]})", stacklevel=2)
    files.sort(key=lambda m: m.name)
    overlap = {"pieces": sorted([c, t, d] for (c, t), d in pieces.items()), "recordings": sorted(recordings),
               "files": sorted(overlap_files), "dropped": bool(drop_demo_overlap)}
    return Source("asap", base.resolve(), files, missing, demo_overlap=overlap)


# ---------------------------------------------------------------------------------------------
# Demo corpus


def extract_demo_midis(sdist: PathLike, dest: PathLike) -> list:
    """Copy the MAESTRO performances (``tests/MIDIs_one_track/Maestro_<n>.mid``) out of a MidiTok sdist.

    Only those members are read, written under their base name (so a hostile archive cannot
    write elsewhere) with the archive's mtime (so the token cache key does not change when the
    corpus is fetched again). Returns the written paths, sorted.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not (member.isfile() and len(parts) >= 3 and parts[-3:-1] == ("tests", "MIDIs_one_track")
                    and _DEMO_MEMBER.fullmatch(parts[-1])):
                continue
            target = dest / parts[-1]
            src = tar.extractfile(member)
            with src, target.open("wb") as f:
                shutil.copyfileobj(src, f)
            os.utime(target, (member.mtime, member.mtime))
            out.append(target)
    return sorted(out)


def _download_sdist(dest: Path) -> Path:
    """``pip download`` MidiTok's source distribution into ``dest``; returns the archive."""
    # "--no-binary miditok", not ":all:": the latter also builds pip's isolated build backend
    # (hatchling and its dependencies) from source, about 4 minutes instead of 6 seconds cold.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "miditok",
           f"miditok=={DEMO_MIDITOK_VERSION}", "-d", str(dest), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    hits = sorted(dest.glob(f"miditok-{DEMO_MIDITOK_VERSION}.tar.gz")) or sorted(dest.glob("miditok-*.tar*"))
    if proc.returncode != 0 or not hits:
        tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
        raise RuntimeError(
            f"could not fetch the demo corpus ({' '.join(cmd[2:])} exited {proc.returncode}).\n{tail}\n"
            f"Offline? Download miditok-{DEMO_MIDITOK_VERSION}.tar.gz from "
            f"https://pypi.org/project/miditok/{DEMO_MIDITOK_VERSION}/#files and point "
            f"DSMR_DEMO_SDIST at it (or pass sdist= to fetch_demo)."
        )
    return hits[0]


def _demo_ready(folder: Path) -> bool:
    return (folder / _DEMO_MARKER).is_file() and any(folder.glob("Maestro_*.mid"))


def fetch_demo(cache_dir: Optional[PathLike] = None, sdist: Optional[PathLike] = None) -> Path:
    """The demo corpus folder, fetched on first use; returns ``<cache root>/demo``.

    The ten MAESTRO performances (``Maestro_1.mid`` .. ``Maestro_10.mid``, 9k-77k REMI tokens
    each) are taken from MidiTok's source distribution: ``python -m pip download --no-deps
    --no-binary miditok miditok==3.1.0`` (4 MB, seconds, PyPI only), or from the archive
    given as ``sdist`` / ``$DSMR_DEMO_SDIST`` for offline use. The cache root is ``cache_dir``,
    else ``$DSMR_CACHE``, else ``~/.cache/dsmr``. Never commit these files.

    **License:** the MAESTRO performances are CC BY-NC-SA 4.0 (Hawthorne et al., "Enabling
    Factorized Piano Music Modeling and Generation with the MAESTRO Dataset", ICLR 2019):
    non-commercial use, attribution, share-alike.

    The folder appears atomically (staged, then renamed), so an interrupted fetch leaves
    nothing that a later call would take for a finished corpus.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    dest = root / "demo"
    if _demo_ready(dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    sdist = sdist or os.environ.get("DSMR_DEMO_SDIST")
    with tempfile.TemporaryDirectory(dir=root, prefix=".demo-fetch-") as tmp:
        tmp = Path(tmp)
        archive = Path(sdist) if sdist else _download_sdist(tmp / "sdist")
        staging = tmp / "demo"
        found = extract_demo_midis(archive, staging)
        if not found:
            raise RuntimeError(f"{archive} holds no tests/MIDIs_one_track/Maestro_*.mid; "
                               f"the demo corpus needs miditok=={DEMO_MIDITOK_VERSION}'s sdist")
        (staging / _DEMO_MARKER).write_text(
            f"{len(found)} MAESTRO v2/v3 piano performances from MidiTok {DEMO_MIDITOK_VERSION}'s "
            f"source distribution (tests/MIDIs_one_track).\nLicense: {DEMO_LICENSE} "
            f"(https://creativecommons.org/licenses/by-nc-sa/4.0/), MAESTRO dataset, "
            f"{MAESTRO_URL}.\nFetched by dsmr for its demo corpus; do not redistribute commercially.\n"
        )
        if dest.exists():  # a half-written folder from an older layout or a crash
            shutil.rmtree(dest)
        try:
            os.replace(staging, dest)
        except OSError:
            if not _demo_ready(dest):  # lost a race to another process only if it finished
                raise
    return dest


def demo_source(cache_dir: Optional[PathLike] = None, sdist: Optional[PathLike] = None) -> Source:
    """The demo corpus as a :class:`Source`: 8 train, 1 validation, 1 test (fixed, see ``DEMO_SPLITS``)."""
    folder = fetch_demo(cache_dir, sdist)
    paths = sorted(folder.glob("Maestro_*.mid"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    files = [MidiFile(p.resolve(), p.name, DEMO_SPLITS.get(p.name, "train")) for p in paths]
    return Source("demo", folder.resolve(), files, [])


# ---------------------------------------------------------------------------------------------


def resolve_source(source: PathLike, cache_dir: Optional[PathLike] = None,
                   valid_fraction: float = 0.1, test_fraction: float = 0.1, *, drop_demo_overlap: bool = False,
                   workers: int = 2, progress: bool = False) -> Source:
    """``"demo"``, ``"music21"`` (or ``"music21:NAME,..."``), a MAESTRO folder (detected by its CSV),
    an ASAP folder (its ``metadata.csv``) or any folder of MIDI files -> :class:`Source`.

    The exact strings ``"demo"`` and ``"music21..."`` name those corpora; write ``./demo`` for a folder
    of that name. ``drop_demo_overlap`` applies to ASAP (see :func:`asap_source`); ``workers`` and
    ``progress`` to music21's one-time conversion (see :func:`dsmr.music21_corpus.music21_source`).
    """
    if isinstance(source, str) and source == "demo":
        return demo_source(cache_dir)
    if isinstance(source, str) and (source == "music21" or source.startswith("music21:")):
        from .music21_corpus import music21_source

        select = source.partition(":")[2]
        return music21_source(cache_dir, select=[t for t in select.split(",") if t.strip()] or None,
                              valid_fraction=valid_fraction, test_fraction=test_fraction, workers=workers,
                              progress=progress)
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data source {root} does not exist (want 'demo', 'music21', a MAESTRO or ASAP "
                                f"folder, or a folder of .mid files)")
    if not root.is_dir():
        raise NotADirectoryError(f"data source {root} is a file; pass the folder that holds the MIDI files")
    if find_maestro_csv(root) is not None:
        return maestro_source(root)
    if find_asap_csv(root) is not None:
        return asap_source(root, valid_fraction, test_fraction, drop_demo_overlap=drop_demo_overlap)
    return folder_source(root, valid_fraction, test_fraction)
