"""music21's bundled corpus as a dsmr source: whole works, joined from their movements, made MIDI once.

    dsmr data prepare music21                         # the art-music corpus (parallel, resumable)
    dsmr data prepare music21:beethoven,mozart        # some composers, or works: music21:bach/bwv66.6
    dsmr data prepare music21 --tokenizer multitrack  # each part as its instrument (GM program)

The corpus ships inside the ``music21`` package (``pip install 'dsmr[music21]'``; code BSD-3, the
encodings under their own terms, some non-commercial: see ``music21/corpus/license.txt``). Nothing
of it is copied anywhere but the user's cache.

**Works.** A piece is a whole work, because memory matters across movements:

- a folder below a composer (``beethoven/opus18no1/movement1..4``) is one work, its files in
  natural order (``movement2`` before ``movement10``);
- Palestrina's masses are files named ``<Section>[_I|_II|_III]_<NN>[_x].krn``; the sections of
  mass ``NN`` become one work, ``palestrina/mass_NN``, in liturgical order (Kyrie, Gloria, Credo,
  Sanctus, Benedictus, Agnus);
- every other file is a work of its own (``bach/bwv66.6``).

A movement encoded in several formats is read once (``.mxl`` first, then ``.musicxml``, ``.xml``,
``.krn``, ``.abc``). An ``.abc`` file holding several tunes with one title (Josquin's voices) is
one score of several parts; one with many titles is a sequence of movements. Folk-tune
collections and test files (:data:`LEFT_OUT`: short melodies, not pieces) are left out unless
named in ``select``.

**Conversion.** music21 parses each file; its own MIDI writer (and ``expandRepeats``) takes
minutes per string quartet, so the parsed notes are written straight into a ``symusic.Score``
(measured 0.15 s for a Bach chorale, 0.5 s per Palestrina section, 2.5 s per quartet
movement): every part is a track whose program is the part's instrument (its
``midiProgram``, else one matched from the part's name, else piano), tied notes are merged,
velocities follow the dynamics marks (80 before the first), grace notes last 1/8 beat, tempo
marks and time signatures are kept, repeats are not unfolded. Movement ``k + 1`` starts where
movement ``k``'s last measure ends (a last measure cut short is completed to its meter). Each
work is written once, atomically, to
``<cache root>/music21/<music21 version>-c<converter version>/<work>.mid``; a work that fails
to parse or holds no notes is recorded beside it (``<work>.skip.json``; delete it to try again)
and reported as one ``skipped WORK: reason`` line. A rerun converts only what is missing, so an interrupted
conversion resumes where it stopped. Splits are drawn per work (:func:`dsmr.sources.group_splits`).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
import time
from bisect import bisect_right
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Union

from .sources import MidiFile, Source, default_cache_root, group_splits

PathLike = Union[str, os.PathLike]

CONVERTER_VERSION = 1  # bump when the MIDI written for a work changes: old conversions are then redone
TPQ = 480
DEFAULT_VELOCITY = 80
DEFAULT_QPM = 120.0
FORMATS = (".mxl", ".musicxml", ".xml", ".krn", ".abc")  # read in this order of preference
# Collections of short folk melodies and the package's test/demo files: not pieces to learn
# long-range structure from. Named in `select`, they are read like the rest.
LEFT_OUT = ("airdsAirs", "demos", "essenFolksong", "leadSheet", "miscFolk", "nottingham-dataset", "oneills1850",
            "ryansMammoth", "theoryExercises")
MASS_SECTIONS = ("Kyrie", "Gloria", "Credo", "Sanctus", "Benedictus", "Agnus")
_MASS = re.compile(r"^(Kyrie|Gloria|Credo|Sanctus|Benedictus|Agnus)(?:_(I{1,3}))?_(\d+)(?:_([a-z]))?$")
_INSTALL = "music21 is not installed: pip install 'dsmr[music21]' (or pip install music21)"


def _music21():
    try:
        import music21
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return music21


def corpus_root() -> Path:
    """The folder of music21's bundled corpus (ImportError naming the install command without music21)."""
    return Path(_music21().common.getCorpusFilePath())


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _work_of(rel: PurePosixPath) -> tuple:
    """``(work name, sort key of this movement within the work)`` of a corpus file."""
    stem = rel.with_suffix("").as_posix()
    m = _MASS.match(rel.stem) if rel.parts[0] == "palestrina" and len(rel.parts) == 2 else None
    if m:
        section, roman, number, letter = m.groups()
        return f"palestrina/mass_{int(number):03d}", (MASS_SECTIONS.index(section), len(roman or ""), letter or "")
    if len(rel.parts) >= 3:  # composer/work/movement...; the format's suffix is no part of the order
        return "/".join(rel.parts[:2]), tuple(_natural(stem.split("/", 2)[2]))
    return stem, ()


def list_works(root: Optional[PathLike] = None, select: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """``{work name: [corpus-relative file paths, in playing order]}`` of the corpus under ``root``.

    ``root``: default :func:`corpus_root`. ``select``: work names or prefixes (``"bach"``,
    ``"beethoven/opus18no1"``, ``"palestrina/mass_036"``); None: every work outside :data:`LEFT_OUT`.
    Works come sorted by name. A movement in several formats is listed once (see :data:`FORMATS`).
    """
    root = Path(root) if root is not None else corpus_root()
    chosen = [s.strip().strip("/") for s in select] if select else None
    best: Dict[tuple, PurePosixPath] = {}
    for path in root.rglob("*"):
        if path.suffix.lower() not in FORMATS or not path.is_file():
            continue
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if any(p.startswith((".", "_")) for p in rel.parts):  # _metadataCache, __pycache__, hidden
            continue
        work, order = _work_of(rel)
        if chosen is None and rel.parts[0] in LEFT_OUT:
            continue
        if chosen is not None and not any(work == s or work.startswith(s + "/") for s in chosen):
            continue
        key = (work, order, rel.with_suffix("").as_posix())
        prev = best.get(key)
        if prev is None or FORMATS.index(rel.suffix.lower()) < FORMATS.index(prev.suffix.lower()):
            best[key] = rel
    works: Dict[str, List[str]] = {}
    for (work, order, stem) in sorted(best, key=lambda k: (k[0], k[1], _natural(k[2]))):
        works.setdefault(work, []).append(best[(work, order, stem)].as_posix())
    return dict(sorted(works.items()))


# ---------------------------------------------------------------------------------------------
# one work -> a symusic Score


def _program(part) -> int:
    """The GM program of a music21 part: its instrument's, else one matched from its name, else piano (0)."""
    from music21 import instrument

    inst = part.getInstrument(returnDefault=False)
    prog = getattr(inst, "midiProgram", None)
    if prog is None:
        for name in (part.partName, getattr(inst, "instrumentName", None), getattr(inst, "partName", None)):
            if not name:
                continue
            try:
                prog = instrument.fromString(str(name)).midiProgram
            except Exception:  # noqa: BLE001 - music21 raises its own error for unknown names
                prog = None
            if prog is not None:
                break
    return int(prog) if prog is not None and 0 <= int(prog) <= 127 else 0


def _scores(parsed) -> list:
    """The movements of a parsed file: one Score, or an Opus's scores (merged as parts when they share a title)."""
    from music21 import stream

    if isinstance(parsed, stream.Opus):
        scores = list(parsed.scores)
        titles = {(s.metadata.title if s.metadata is not None else None) for s in scores}
        if len(scores) > 1 and len(titles) == 1 and None not in titles:
            return [parsed.mergeScores()]  # the voices of one piece, each encoded as a tune
        return scores
    return [parsed]


def _velocity(dynamic) -> Optional[int]:
    scalar = getattr(dynamic, "volumeScalar", None)
    return None if scalar is None else max(1, min(127, int(round(float(scalar) * 127))))


def _movement(parsed_score, shift: float, tracks: dict, tempos: list, sigs: list) -> float:
    """Add one movement's notes (shifted by ``shift`` quarter notes) to ``tracks``; returns its length."""
    from music21 import harmony

    parts = list(parsed_score.parts) or [parsed_score]
    for i, part in enumerate(parts):
        flat = part.flatten()
        program = _program(part)
        notes = tracks.setdefault((i, program), {"name": part.partName or f"part {i + 1}", "notes": []})["notes"]
        dyn = sorted((float(d.offset), v) for d in flat.getElementsByClass("Dynamic")
                     if (v := _velocity(d)) is not None)
        dyn_at, dyn_vel = [o for o, _ in dyn], [v for _, v in dyn]
        open_ties: Dict[int, int] = {}  # MIDI pitch -> index in notes of the note its tie continues
        for el in flat.notes:
            if isinstance(el, harmony.Harmony):  # chord symbols are labels, not notes
                continue
            start = shift + float(el.offset)
            length = float(el.duration.quarterLength)
            k = bisect_right(dyn_at, float(el.offset))
            vel = dyn_vel[k - 1] if k else DEFAULT_VELOCITY
            for n in (el.notes if el.isChord else [el]):
                pitch = getattr(n, "pitch", None)  # unpitched percussion has none
                if pitch is None or not 0 <= pitch.midi <= 127:
                    continue
                midi, tie = pitch.midi, n.tie if n.tie is not None else getattr(el, "tie", None)
                t0, dur = round(start * TPQ), max(round(length * TPQ), TPQ // 8)  # grace notes: 1/8 beat
                kind = getattr(tie, "type", None)
                if kind in ("continue", "stop") and midi in open_ties:
                    held = notes[open_ties[midi]]
                    held[1] = max(held[1], t0 + dur - held[0])
                    if kind == "stop":
                        del open_ties[midi]
                    continue
                notes.append([t0, dur, midi, vel])
                if kind in ("start", "continue"):
                    open_ties[midi] = len(notes) - 1
                else:
                    open_ties.pop(midi, None)
    head = parts[0].flatten()
    for mm in head.getElementsByClass("MetronomeMark"):
        qpm = mm.getQuarterBPM()
        if qpm:
            tempos.append((round((shift + float(mm.offset)) * TPQ), float(qpm)))
    for ts in head.getElementsByClass("TimeSignature"):
        try:
            sigs.append((round((shift + float(ts.offset)) * TPQ), int(ts.numerator), int(ts.denominator)))
        except (TypeError, ValueError):  # an unmeasured passage: no meter to write, the notes stay
            pass
    # The next movement starts on a bar line: a last measure cut short (music21 writes no rest to
    # fill it) is completed to its time signature's length, so bars stay on the meter's grid.
    length = float(parsed_score.highestTime)
    measures = parts[0].getElementsByClass("Measure")
    if len(measures):
        last = measures[-1]
        try:
            length = max(length, float(last.offset) + float(last.barDuration.quarterLength))
        except Exception:  # noqa: BLE001 - a measure without a time signature in its context
            pass
    return length


def work_to_score(paths: Sequence[PathLike]):
    """Parse a work's files with music21 and join them into one ``symusic.Score`` (ticks, 480 per quarter).

    ``paths``: the movements in playing order. Raises ``ValueError`` when the work holds no notes;
    music21's own errors for a file it cannot read propagate.
    """
    import symusic
    from music21 import converter

    tracks: dict = {}
    tempos, sigs, shift = [], [], 0.0
    for path in paths:
        for sc in _scores(converter.parse(str(path))):
            shift += _movement(sc, shift, tracks, tempos, sigs)
    score = symusic.Score(TPQ)
    for (_, program), tr in tracks.items():
        if not tr["notes"]:
            continue
        track = symusic.Track(name=str(tr["name"]), program=program, is_drum=False)
        for t0, dur, pitch, vel in sorted(tr["notes"]):
            track.notes.append(symusic.Note(time=t0, duration=dur, pitch=pitch, velocity=vel))
        score.tracks.append(track)
    if not score.tracks:
        raise ValueError("no notes")
    for t, qpm in sorted(set(tempos)) or [(0, DEFAULT_QPM)]:
        score.tempos.append(symusic.Tempo(time=t, qpm=qpm))
    last = None
    for t, num, den in sorted(set(sigs)):
        if (num, den) != last:  # every movement restates its meter; keep the changes only
            score.time_signatures.append(symusic.TimeSignature(time=t, numerator=num, denominator=den))
            last = (num, den)
    return score


# ---------------------------------------------------------------------------------------------
# the whole corpus -> a Source


def _convert_job(job):
    """``(work, [paths], out) -> (work, reason or None)``; never raises, so one bad work cannot stop the rest."""
    import warnings

    work, paths, out = job
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # music21 warns about every overfull measure it repairs; a work's outcome is what counts.
            warnings.simplefilter("ignore")
            score = work_to_score(paths)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        score.dump_midi(str(tmp))
        os.replace(tmp, out)  # atomic: a killed conversion leaves no half-written work
        return work, None
    except Exception as e:  # noqa: BLE001 - music21 raises many kinds of errors on odd encodings
        reason = f"{type(e).__name__}: {str(e).strip()[:200]}" if str(e).strip() != "no notes" else "no notes"
        skip = out.with_name(out.name[: -len(".mid")] + ".skip.json")
        tmp = skip.with_name(f".{skip.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"work": work, "reason": reason}))
        os.replace(tmp, skip)
        return work, reason


def _output_dir(cache_dir: Optional[PathLike]) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "music21" / f"{_music21().__version__}-c{CONVERTER_VERSION}"


def music21_source(cache_dir: Optional[PathLike] = None, *, select: Optional[Sequence[str]] = None,
                   corpus: Optional[PathLike] = None, valid_fraction: float = 0.1, test_fraction: float = 0.1,
                   workers: int = 2, progress: bool = True) -> Source:
    """music21's corpus as a :class:`dsmr.sources.Source`, converting the works not converted yet.

    Args:
        cache_dir: the cache root (default ``$DSMR_CACHE`` or ``~/.cache/dsmr``); the MIDI files go
            under ``music21/<version>-c<converter version>/``.
        select: work names or prefixes (see :func:`list_works`); default every work outside
            :data:`LEFT_OUT`.
        corpus: another folder laid out like music21's corpus (tests); default :func:`corpus_root`.
        valid_fraction, test_fraction: the split, drawn per work by hash.
        workers: converting processes (1 = in this process).
        progress: a tqdm bar over the works still to convert.

    Returns a Source of kind ``"music21"`` whose files are the converted works (named by work) and
    whose ``skipped`` lists the works that could not be converted, with the reason.
    """
    from tqdm.auto import tqdm

    root = Path(corpus) if corpus is not None else corpus_root()
    if corpus is not None:
        _music21()
    works = list_works(root, select)
    if not works:
        raise FileNotFoundError(f"no music21 works under {root}" + (f" match {list(select)}" if select else "")
                                + "; names are composer folders or works, e.g. music21:bach,beethoven/opus18no1")
    out = _output_dir(cache_dir)
    target = {w: out / PurePosixPath(w + ".mid") for w in works}
    skip_file = {w: out / PurePosixPath(w + ".skip.json") for w in works}
    todo = [w for w in works if not target[w].is_file() and not skip_file[w].is_file()]
    if todo:
        # Largest first, so no worker is left alone with the longest work at the end.
        size = {w: sum((root / p).stat().st_size for p in works[w]) for w in todo}
        jobs = [(w, [str(root / p) for p in works[w]], str(target[w])) for w in sorted(todo, key=lambda w: -size[w])]
        t0 = time.perf_counter()
        workers = max(1, min(int(workers), len(jobs)))
        with tqdm(total=len(jobs), desc="music21 -> MIDI", unit="work", disable=not progress) as bar:
            if workers == 1:
                for job in jobs:
                    _convert_job(job)
                    bar.update()
            else:
                # fork on Linux: children inherit music21's import (seconds) instead of redoing it.
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with ctx.Pool(workers) as pool:
                    for _ in pool.imap_unordered(_convert_job, jobs, chunksize=1):
                        bar.update()
        if progress:
            print(f"dsmr: converted {len(jobs)} music21 works in {time.perf_counter() - t0:.1f} s with "
                  f"{workers} worker(s) -> {out}", file=sys.stderr)
    split = group_splits(list(works), valid_fraction, test_fraction)
    files, skipped = [], []
    for w in works:
        if target[w].is_file():
            files.append(MidiFile(target[w].resolve(), w, split[w]))
        else:
            try:
                reason = json.loads(skip_file[w].read_text())["reason"]
            except (OSError, ValueError, KeyError):
                reason = "conversion failed (its record is unreadable)"
            skipped.append({"name": w, "reason": reason})
    return Source("music21", out.resolve(), files, [], skipped=skipped)


__all__ = ["list_works", "work_to_score", "music21_source", "corpus_root", "LEFT_OUT", "CONVERTER_VERSION"]
