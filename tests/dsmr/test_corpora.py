"""ASAP folders (split by piece, demo overlap) and music21's corpus (works, conversion, resume, skips).

The ASAP tests build an ASAP-like folder (a ``metadata.csv`` and tiny MIDI files written with
symusic); no file of the dataset is committed. One more test reads a real ASAP clone's
``metadata.csv`` when ``$DSMR_ASAP_DIR`` names one (the README says where to get it). The music21
tests convert a few small works of the real bundled corpus and a corpus made in the test.
"""
import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("miditok")
symusic = pytest.importorskip("symusic")

from dsmr import sources  # noqa: E402
from dsmr.cli import main  # noqa: E402
from dsmr.data import MidiSkipWarning, prepare_cache  # noqa: E402
from tests.dsmr.midi_fixtures import _piano_file  # noqa: E402

ASAP_COLUMNS = ["composer", "title", "folder", "xml_score", "midi_score", "midi_performance",
                "performance_annotations", "midi_score_annotations", "maestro_midi_performance",
                "maestro_audio_performance", "start", "end", "audio_performance"]
MAESTRO_9 = "{maestro}/" + sources.DEMO_MAESTRO_MIDI["Maestro_9.mid"]
# (composer, title, folder, performer, MAESTRO file or ""): 12 pieces, 21 performances. Sonata 28-1
# is the demo's Maestro_9 (by its MAESTRO name); 11-2's MaximovI04 is Maestro_8 with no MAESTRO name
# in the metadata; 21-1 lives in two folders (with and without repeats), one piece all the same.
ASAP_ROWS = (
    [("Bach", f"Fugue_bwv_{846 + i}", f"Bach/Fugue/bwv_{846 + i}", p, "") for i in range(6) for p in ("A01", "B02")]
    + [("Beethoven", "Piano_Sonatas_28-1", "Beethoven/Piano_Sonatas/28-1", "KyykhynenT06M", MAESTRO_9),
       ("Beethoven", "Piano_Sonatas_28-1", "Beethoven/Piano_Sonatas/28-1", "Zhdanov01", ""),
       ("Beethoven", "Piano_Sonatas_11-2", "Beethoven/Piano_Sonatas/11-2", "MaximovI04", ""),
       ("Beethoven", "Piano_Sonatas_21-1", "Beethoven/Piano_Sonatas/21-1", "HAGINO02", ""),
       ("Beethoven", "Piano_Sonatas_21-1", "Beethoven/Piano_Sonatas/21-1_no_repeat", "Dulu01", ""),
       ("Chopin", "Ballade_1", "Chopin/Ballades/1", "C01", ""),
       ("Liszt", "Sonata", "Liszt/Sonata", "L01", ""),
       ("Mozart", "Piano_Sonatas_11-3", "Mozart/Piano_Sonatas/11-3", "M01", ""),
       ("Schubert", "Impromptu_1", "Schubert/Impromptu/1", "S01", "")])


def _asap(root: Path, *, missing=(), corrupt=()) -> Path:
    """An ASAP-like folder: metadata.csv, one tiny MIDI per performance and a score MIDI per folder."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(ASAP_COLUMNS)
        for i, (composer, title, folder, perf, maestro) in enumerate(ASAP_ROWS):
            name = f"{folder}/{perf}.mid"
            w.writerow([composer, title, folder, f"{folder}/xml_score.musicxml", f"{folder}/midi_score.mid", name,
                        f"{folder}/{perf}_annotations.txt", f"{folder}/midi_score_annotations.txt", maestro,
                        maestro.replace(".midi", ".wav"), "", "", ""])
            if name in missing:
                continue
            if name in corrupt:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(np.random.default_rng(i).bytes(500))
            else:
                _piano_file(root / name, seed=i, n=12)
            _piano_file(root / folder / "midi_score.mid", seed=100 + i, n=8)  # scores are not pieces
    return root


def _piece_of(name: str) -> tuple:
    return next((c, t) for c, t, folder, perf, _ in ASAP_ROWS if f"{folder}/{perf}.mid" == name)


def test_asap_folder_splits_by_composer_and_title_never_by_file(tmp_path):
    missing, corrupt = "Liszt/Sonata/L01.mid", "Chopin/Ballades/1/C01.mid"
    root = _asap(tmp_path / "asap-dataset", missing={missing}, corrupt={corrupt})
    with pytest.warns(UserWarning, match="1 of 21 performance MIDIs listed"):
        src = sources.resolve_source(tmp_path)  # a parent of the dataset folder
    assert src.kind == "asap" and src.root == root.resolve() and src.missing == [missing]
    names = {f.name for f in src.files}
    assert len(names) == 20 and not any(n.endswith("midi_score.mid") for n in names)
    by_piece = {}
    for f in src.files:
        by_piece.setdefault(_piece_of(f.name), set()).add(f.split)
    assert all(len(s) == 1 for s in by_piece.values())  # every performance of a piece in one split
    assert by_piece[("Beethoven", "Piano_Sonatas_21-1")] == by_piece[("Beethoven", "Piano_Sonatas_21-1")]
    # Mozart's and Beethoven's "Piano_Sonatas_11-3"-like titles are told apart by the composer.
    splits = {f.split for f in src.files}
    assert splits == {"train", "validation", "test"}
    assert all(f.split == sources.group_splits(["/".join(p) for p in by_piece])["/".join(_piece_of(f.name))]
               for f in src.files)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = prepare_cache(root, cache_dir=tmp_path / "c", workers=1, progress=False)
    skipped = {s["name"]: s["reason"] for s in cache.skipped}
    assert skipped[missing] == "listed in ASAP's metadata.csv but missing on disk"
    assert skipped[corrupt].startswith("unreadable") and len(cache) == 19
    assert {w.message.name for w in caught if issubclass(w.category, MidiSkipWarning)} == {corrupt}
    assert cache.path.name.startswith("asap-")


def test_asap_demo_overlap_is_recorded_and_can_be_left_out(tmp_path, capsys):
    root = _asap(tmp_path / "asap")
    src = sources.asap_source(root)
    ov = src.demo_overlap
    assert ov["pieces"] == [["Beethoven", "Piano_Sonatas_11-2", "Maestro_8.mid"],
                            ["Beethoven", "Piano_Sonatas_28-1", "Maestro_9.mid"]]
    assert ov["recordings"] == ["Beethoven/Piano_Sonatas/11-2/MaximovI04.mid",
                                "Beethoven/Piano_Sonatas/28-1/KyykhynenT06M.mid"]
    # Another pianist's performance of the same sonata is the same music: it is listed too.
    assert "Beethoven/Piano_Sonatas/28-1/Zhdanov01.mid" in ov["files"] and len(ov["files"]) == 3
    assert not ov["dropped"] and len(src.files) == 21
    dropped = sources.asap_source(root, drop_demo_overlap=True)
    assert dropped.demo_overlap["dropped"] and {f.name for f in dropped.files} == {f.name for f in src.files} - set(
        ov["files"])
    cache = prepare_cache(root, cache_dir=tmp_path / "c", workers=1, progress=False, drop_demo_overlap=True)
    assert cache.demo_overlap["files"] == ov["files"] and len(cache) == 18
    assert not set(ov["files"]) & {n for s in cache.splits for n in cache.names(s)}
    assert main(["data", "prepare", str(root), "--cache-dir", str(tmp_path / "c"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "demo corpus overlap: 3 performances of 2 pieces are the music of Maestro_8.mid, Maestro_9.mid" in out
    assert "kept; leave them out of comparisons with the demo corpus (--drop-demo-overlap)" in out


def test_a_metadata_csv_that_is_not_asaps_is_a_plain_folder(tmp_path):
    (tmp_path / "metadata.csv").write_text("id,label\n1,x\n")
    _piano_file(tmp_path / "a.mid")
    assert sources.resolve_source(tmp_path).kind == "folder"
    with pytest.raises(FileNotFoundError, match="clone https://github.com/fosfrancesco/asap-dataset"):
        sources.asap_source(tmp_path)


REAL_ASAP = Path(os.environ.get("DSMR_ASAP_DIR", "/nonexistent"))


@pytest.mark.skipif(not (REAL_ASAP / "metadata.csv").is_file(), reason="DSMR_ASAP_DIR names no ASAP clone")
def test_real_asap_metadata_listing():
    """The real dataset's layout (listing only, nothing tokenized): 1,067 performances of 222 pieces,
    seven of them cut from the three demo recordings."""
    src = sources.asap_source(REAL_ASAP)
    assert len(src.files) + len(src.missing) == 1067
    pieces = {}
    with open(REAL_ASAP / "metadata.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            pieces.setdefault((row["composer"], row["title"]), set()).add(row["midi_performance"])
    assert len(pieces) == 222
    split = {f.name: f.split for f in src.files}
    assert all(len({split[n] for n in names if n in split}) <= 1 for names in pieces.values())
    if not src.missing:  # pinned: a change of the split rule would move pieces between splits
        assert src.counts() == {"train": 872, "validation": 79, "test": 116}
    ov = src.demo_overlap
    assert len(ov["recordings"]) == 7 and len(ov["pieces"]) == 7 and len(ov["files"]) == 47
    assert {p[2] for p in ov["pieces"]} == {"Maestro_5.mid", "Maestro_8.mid", "Maestro_9.mid"}


# ---------------------------------------------------------------------------------------------
# music21


def test_music21_works_join_movements_and_read_each_movement_once():
    pytest.importorskip("music21")
    from dsmr.music21_corpus import LEFT_OUT, list_works

    works = list_works()
    assert works["beethoven/opus18no1"] == [f"beethoven/opus18no1/movement{i}.mxl" for i in range(1, 5)]  # not .krn
    assert works["palestrina/mass_036"] == [
        "palestrina/Kyrie_36.krn", "palestrina/Gloria_36.krn", "palestrina/Credo_36.krn", "palestrina/Sanctus_36.krn",
        "palestrina/Benedictus_36_a.krn", "palestrina/Benedictus_36_b.krn", "palestrina/Agnus_I_36.krn",
        "palestrina/Agnus_II_36.krn"]
    assert sum(w.startswith("palestrina/mass_") for w in works) >= 100
    assert not any(w.split("/")[0] in LEFT_OUT for w in works)
    assert list(list_works(select=["essenFolksong/altdeu10"])) == ["essenFolksong/altdeu10"]  # named: read
    assert list(list_works(select=["haydn", "bach/bwv66.6"])) == ["bach/bwv66.6", "haydn/opus1no1", "haydn/opus74no1"]


def test_music21_real_works_keep_parts_and_instruments():
    pytest.importorskip("music21")
    from dsmr.music21_corpus import corpus_root, list_works, work_to_score

    root, works = corpus_root(), list_works(select=["bach/bwv66.6", "schoenberg/opus19"])
    chorale = work_to_score([root / p for p in works["bach/bwv66.6"]])
    assert [(t.name, t.program) for t in chorale.tracks] == [("Soprano", 53), ("Alto", 53), ("Tenor", 53),
                                                             ("Bass", 53)]  # matched from the part names
    two = work_to_score([root / p for p in works["schoenberg/opus19"]])
    one = work_to_score([root / works["schoenberg/opus19"][0]])
    assert two.note_num() > one.note_num() and two.end() > one.end()  # movement 2 follows movement 1


def _movement(path: Path, pitches, tempo_qpm=None):
    """A tiny two-part MusicXML movement (violin, cello) in 3/4; its last violin note crosses the bar (a tie)."""
    from music21 import dynamics, instrument, meter, note, stream, tempo

    score = stream.Score()
    for inst, shift in ((instrument.Violin(), 12), (instrument.Violoncello(), -12)):
        part = stream.Part()
        part.insert(0, inst)
        part.append(meter.TimeSignature("3/4"))
        if tempo_qpm:
            part.append(tempo.MetronomeMark(number=tempo_qpm))
        part.append(dynamics.Dynamic("ff"))
        for p in pitches:
            part.append(note.Note(p + shift, quarterLength=1))
        part.append(note.Note(pitches[0] + shift, quarterLength=2))  # beats 3-4 of 3/4: tied over the bar
        score.insert(0, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.write("musicxml", fp=str(path))
    return path


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory):
    pytest.importorskip("music21")
    root = tmp_path_factory.mktemp("m21corpus")
    _movement(root / "comp" / "quartet" / "movement1.musicxml", [60, 62, 64, 65, 67], tempo_qpm=90)
    _movement(root / "comp" / "quartet" / "movement2.musicxml", [67, 65, 64, 62, 60])
    _movement(root / "comp" / "song.musicxml", [60, 64, 67, 72, 67])
    _movement(root / "other" / "air.musicxml", [62, 66, 69, 74, 69])
    (root / "comp" / "broken.xml").write_text("<score-partwise><part id='P1'><measure>")  # cut short
    return root


def test_music21_source_converts_once_resumes_and_skips_bad_works(toy_corpus, tmp_path):
    from dsmr.music21_corpus import TPQ, music21_source

    src = music21_source(tmp_path, corpus=toy_corpus, workers=1, progress=False)
    assert src.kind == "music21" and [f.name for f in src.files] == ["comp/quartet", "comp/song", "other/air"]
    assert [s["name"] for s in src.skipped] == ["comp/broken"] and src.skipped[0]["reason"]
    quartet = symusic.Score(str(src.files[0].path))
    assert sorted(t.program for t in quartet.tracks) == [40, 42]  # violin, cello: each part as its instrument
    violin = next(t for t in quartet.tracks if t.program == 40)
    starts = [n.time for n in violin.notes]
    # Movement 1 fills 7 beats of three 3/4 bars; movement 2 starts on the next bar line (beat 9). The
    # half note on beats 6-7 is tied over the bar in the MusicXML: one note of 2 beats again.
    assert starts == [i * TPQ for i in range(6)] + [(9 + i) * TPQ for i in range(6)]
    assert violin.notes[5].duration == 2 * TPQ and violin.notes[0].velocity > 100  # ff
    assert quartet.tempos[0].qpm == pytest.approx(90) and quartet.time_signatures[0].numerator == 3
    # Resumable: a second call converts nothing; a work deleted (as if killed before it) is redone alone.
    stamps = {f.name: f.path.stat().st_mtime_ns for f in src.files}
    os.remove(src.files[1].path)
    again = music21_source(tmp_path, corpus=toy_corpus, workers=1, progress=False)
    after = {f.name: f.path.stat().st_mtime_ns for f in again.files}
    assert after["comp/quartet"] == stamps["comp/quartet"] and after["other/air"] == stamps["other/air"]
    assert (Path(src.root) / "comp" / "song.mid").is_file() and [s["name"] for s in again.skipped] == ["comp/broken"]
    assert json.loads((Path(src.root) / "comp" / "broken.skip.json").read_text())["work"] == "comp/broken"


def test_prepare_music21_multitrack_cache_in_parallel_with_one_line_per_skipped_work(toy_corpus, tmp_path,
                                                                                     monkeypatch, capsys):
    from dsmr import music21_corpus
    from dsmr.tokenizer import build_tokenizer

    monkeypatch.setattr(music21_corpus, "corpus_root", lambda: toy_corpus)
    cache_dir = tmp_path / "c"
    assert main(["data", "prepare", "music21", "--cache-dir", str(cache_dir), "--workers", "2",
                 "--tokenizer", "multitrack"]) == 0
    captured = capsys.readouterr()
    assert "skipped comp/broken: " in captured.err and "skipped files: 1" in captured.out
    with pytest.warns(MidiSkipWarning, match="comp/broken"):  # another selection: another cache, built now
        cache = prepare_cache("music21:comp", cache_dir=cache_dir, tokenizer_config="multitrack", workers=1,
                              progress=False)
    assert sorted(n for s in cache.splits for n in cache.names(s)) == ["comp/quartet", "comp/song"]
    tok = build_tokenizer(cache.tokenizer_config)
    ids = next(p for s in cache.splits for p, n in zip(cache.pieces(s), cache.names(s)) if n == "comp/quartet")
    programs = {tok[int(i)] for i in ids if tok[int(i)].startswith("Program_")}
    assert programs == {"Program_40", "Program_42"}
    with pytest.raises(FileNotFoundError, match="no music21 works"):
        prepare_cache("music21:nobody", cache_dir=cache_dir, workers=1, progress=False)
