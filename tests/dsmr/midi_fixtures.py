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
