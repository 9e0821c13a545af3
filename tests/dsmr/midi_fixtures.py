"""Small MIDI files generated with symusic for tests (no third-party fixtures are committed)."""
from pathlib import Path

import numpy as np
import symusic

TPQ = 480


def _track(name, notes, program=0, is_drum=False, pedal=None):
    t = symusic.Track(name=name, program=program, is_drum=is_drum)
    for time, dur, pitch, vel in notes:
        t.notes.append(symusic.Note(time=time, duration=dur, pitch=pitch, velocity=vel))
    if pedal is not None:  # symusic writes pedals only as CC64 messages
        t.controls.append(symusic.ControlChange(time=pedal[0], number=64, value=127))
        t.controls.append(symusic.ControlChange(time=pedal[1], number=64, value=0))
    return t


def _melody(seed, n=40, low=48, high=84):
    """Notes on a 1/8-beat grid with durations REMI can represent exactly; no repeated (onset, pitch)."""
    rng = np.random.default_rng(seed)
    notes, seen = [], set()
    for i in range(n):
        time = int(i * TPQ // 2 + rng.integers(0, 4) * TPQ // 8)
        pitch = int(rng.integers(low, high))
        if (time, pitch) in seen:
            continue
        seen.add((time, pitch))
        notes.append((time, int(rng.choice([TPQ // 4, TPQ // 2, TPQ])), pitch, int(rng.integers(30, 120))))
    return notes


def _write(path, tracks, tempo=100.0):
    score = symusic.Score(TPQ)
    for t in tracks:
        score.tracks.append(t)
    score.tempos.append(symusic.Tempo(time=0, qpm=tempo))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


def _piano_file(path, seed=0, n=40):
    return _write(path, [_track("piano", _melody(seed, n), pedal=(0, 4 * TPQ))])


def _pitches(score):
    return sorted(n.pitch for t in score.tracks for n in t.notes)


def _corpus(folder, n=5, seed=0):
    return [_piano_file(Path(folder) / f"piece_{i}.mid", seed=seed + i, n=20 + 7 * i) for i in range(n)]


# General MIDI programs of the multitrack fixtures: piano, fingered bass, string ensemble, trumpet.
MULTI_PROGRAMS = (0, 33, 48, 56)
DRUM_KEYS = (36, 38, 42, 46, 49)  # kick, snare, closed/open hi-hat, crash


def _drums(seed, n=32):
    rng = np.random.default_rng(seed)
    notes, seen = [], set()
    for i in range(n):
        time, pitch = int(i * TPQ // 2), int(rng.choice(DRUM_KEYS))
        if (time, pitch) not in seen:
            seen.add((time, pitch))
            notes.append((time, TPQ // 4, pitch, int(rng.integers(40, 120))))
    return notes


def _multitrack_file(path, seed=0, n=24, time_sig=None):
    """Several programs and a drum track; every instrument also plays pitch 60 at beat 0 (overlapping
    same-pitch notes in different instruments, which a merged piano stream would collapse)."""
    tracks = []
    for k, program in enumerate(MULTI_PROGRAMS):
        notes = _melody(seed * 10 + k, n, low=40 + 4 * k, high=76 + 4 * k)
        notes = [x for x in notes if not (x[0] == 0 and x[2] == 60)] + [(0, TPQ, 60, 80)]
        tracks.append(_track(f"inst{program}", notes, program=program))
    tracks.append(_track("drums", _drums(seed), is_drum=True))
    score = symusic.Score(TPQ)
    for t in tracks:
        score.tracks.append(t)
    score.tempos.append(symusic.Tempo(time=0, qpm=120.0))
    if time_sig is not None:
        score.time_signatures.append(symusic.TimeSignature(time=0, numerator=time_sig[0], denominator=time_sig[1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


def _multitrack_corpus(folder, n=5, seed=0):
    return [_multitrack_file(Path(folder) / f"song_{i}.mid", seed=seed + i, n=16 + 4 * i) for i in range(n)]
