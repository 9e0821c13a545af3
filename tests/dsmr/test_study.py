"""The schedule study end to end on a tiny generated corpus, its resume, its CSV, and its finding text."""
import csv
import json
import math

import pytest

pytest.importorskip("miditok")
pytest.importorskip("symusic")

from dsmr.study import FAMILY_ROWS, StudyConfig, run_study, study_plan, study_rows  # noqa: E402
from dsmr.study_report import CSV_COLUMNS, finding  # noqa: E402
from tests.dsmr.midi_fixtures import _corpus  # noqa: E402

TINY_MODEL = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, segment_len=32)
TWO = "two_scale:long=48,short=8,n_long=1"


def _tiny(**over):
    """The quick study scaled down to the generated corpus: a 2-layer model, 2 steps per row."""
    base = dict(model=TINY_MODEL, two_scale=TWO, train_tokens=128, batch_lanes=2, krcu_reset_at=32, krcu_window=64,
                krcu_long_reset_at=64, eval_max_tokens=None)
    return StudyConfig.quick(**{**base, **over})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from dsmr.data import prepare_cache

    root = tmp_path_factory.mktemp("study")
    _corpus(root / "midis", n=6)
    return prepare_cache(root / "midis", cache_dir=root / "cache", workers=1, progress=False)


def test_rows_cover_every_family_at_two_scales_budget():
    rows = study_rows(_tiny(), 4, 2)
    names = [r.key for r in rows]
    assert names[: len(FAMILY_ROWS)] == [f"{n}-s0" for n in FAMILY_ROWS]
    assert names[len(FAMILY_ROWS):] == ["full-s1", "none-s1", "two_scale-s1"]
    by = {r.name: r for r in rows}
    budget = sum(by["two_scale"].horizons)
    for name in ("reverse_two_scale", "uniform", "progressive_asc", "progressive_desc", "selective",
                 "perceiver_ar_like"):
        assert 0.9 * budget <= sum(by[name].horizons) <= budget, name
    assert by["progressive_asc"].horizons == by["progressive_desc"].horizons[::-1]
    assert by["progressive_asc"].horizons[0] < by["progressive_asc"].horizons[-1]
    assert by["fhcr"].horizons == [None] * 4 and by["fhcr"].n_kv_heads == 1 and by["full"].n_kv_heads is None
    assert by["none"].horizons == [0] * 4 and by["none"].spec == "none"  # the no-memory control
    # --schedule: a family name replaces its row, NAME=SPEC adds one.
    rows = study_rows(_tiny(schedules=["uniform:m=5", "mine=7,7,0,0", "fhcr:n_kv_heads=2"]), 4, 2)
    by = {r.name: r for r in rows}
    assert by["uniform"].horizons == [5] * 4 and by["mine"].horizons == [7, 7, 0, 0] and by["fhcr"].n_kv_heads == 2
    assert sum(r.name == "uniform" for r in rows) == 1
    with pytest.raises(ValueError, match="fhcr takes n_kv_heads"):
        study_rows(_tiny(schedules=["fhcr:heads=1"]), 4, 2)


def test_study_resumes_without_retraining_finished_rows(cache, tmp_path):
    out = tmp_path / "study"
    done = []

    def kill_after_first(row):
        done.append(row["schedule"])
        raise KeyboardInterrupt  # as if the run were killed right after its first row

    with pytest.raises(KeyboardInterrupt):
        run_study(out, _tiny(), data=cache, progress=False, after_row=kill_after_first)
    first = out / "rows" / "full-s0"
    stamp = (first / "result.json").stat().st_mtime_ns
    ckpt_stamp = (first / "best.pt").stat().st_mtime_ns
    assert done == ["full"] and not (out / "rows" / "two_scale-s0").exists()
    res = run_study(out, _tiny(), data=cache, progress=False)
    assert (first / "result.json").stat().st_mtime_ns == stamp and (first / "best.pt").stat().st_mtime_ns == ckpt_stamp
    log = [ln.split(" ", 1)[1] for ln in (out / "study.log").read_text().splitlines()]
    assert [ln for ln in log if ln.startswith("full-s0: ")][-1].startswith("full-s0: reused")
    assert sum(ln.startswith("full-s0: training") for ln in log) == 1
    assert sum(ln.startswith("two_scale-s0: training") for ln in log) == 1
    assert len(res["rows"]) == len(FAMILY_ROWS) + 3
    # A row measured by an older dsmr (no segment-offset or memory-wiped columns) is measured again,
    # not retrained.
    two = out / "rows" / "two_scale-s0"
    old = json.loads((two / "result.json").read_text())
    for k in ("measures", "offsets", "offsets_nomem", "val_nll_nomem", "buckets_nomem"):
        old.pop(k)
    (two / "result.json").write_text(json.dumps(old))
    ckpt_stamp = (two / "best.pt").stat().st_mtime_ns
    res = run_study(out, _tiny(), data=cache, progress=False)
    log = [ln.split(" ", 1)[1] for ln in (out / "study.log").read_text().splitlines()]
    assert log.count("two_scale-s0: measuring again (results from an older dsmr lack some columns; "
                     "training reused)") == 1
    assert sum(ln.startswith("two_scale-s0: training") for ln in log) == 1
    assert (two / "best.pt").stat().st_mtime_ns == ckpt_stamp
    again = next(r for r in res["rows"] if r["schedule"] == "two_scale" and r["seed"] == 0)
    assert again["measures"] >= 2 and again["val_nll_nomem"] is not None and "0-15" in again["offsets_nomem"]
    assert again["val_nll"] == pytest.approx(old["val_nll"], rel=1e-9)
    # Another configuration must not silently reuse these rows.
    with pytest.raises(ValueError, match="different configuration"):
        run_study(out, _tiny(train_tokens=256), data=cache, progress=False)


def test_cli_study_quick_end_to_end(cache, tmp_path, capsys):
    from dsmr.cli import main

    conf = tmp_path / "tiny.toml"
    conf.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in TINY_MODEL.items()) + f'schedule = "{TWO}"\n')
    out = tmp_path / "quick"
    code = main(["study", "--quick", "--source", str(cache.path.parent.parent.parent / "midis"),
                 "--cache-dir", str(cache.path.parent.parent), "--workers", "1", "--config", str(conf),
                 "--train-tokens", "128", "--batch-lanes", "2", "--reset-at", "32", "--long-reset-at", "64",
                 "--out", str(out),
                 "--threads", "1", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "Finding" in text and "Seed noise" in text
    with open(out / "study.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert {"schedule", "horizons", "kv_slots", "kv_mib", "val_ppl", "val_nll_per_note", "krcu_auc",
            "tokens_per_s", "peak_mib"} <= set(reader.fieldnames)
    assert [r["schedule"] for r in rows] == list(FAMILY_ROWS) + ["full", "none", "two_scale"]
    assert [r["seed"] for r in rows][-3:] == ["1", "1", "1"]
    for r in rows:
        assert float(r["val_ppl"]) > 1 and float(r["val_nll_per_note"]) > 0 and r["krcu_auc"] != ""
        assert float(r["tokens_per_s"]) > 0 and r["peak_mib"] != ""
        assert r["krcu_reset_at"] == "32" and r["krcu_long_reset_at"] == "64" and r["krcu_long_auc"] != ""
        assert int(r["krcu_long_pieces"]) >= 1 and int(r["krcu_pieces"]) >= int(r["krcu_long_pieces"])
    # No memory: wiping it changes nothing, so both KRCU areas are exactly 0, and so is the change
    # from wiping it at every segment.
    for r in rows:
        if r["schedule"] == "none":
            assert float(r["krcu_auc"]) == 0.0 and float(r["krcu_long_auc"]) == 0.0 and float(r["kv_mib"]) == 0.0
            assert r["val_nll_nomem"] == r["val_nll"] and r["nll_offset_0-15_nomem"] == r["nll_offset_0-15"]
        else:
            assert float(r["val_nll_nomem"]) > 0 and float(r["nll_offset_0-15_nomem"]) > 0
        # Segments of 32 tokens have no offset 64 or later: the column is empty, not a made-up number.
        assert r["nll_offset_64+"] == "" and r["nll_offset_64+_nomem"] == ""
    # two_scale's later segments attend to its memory, so wiping it changes the NLL.
    two = json.loads((out / "rows" / "two_scale-s0" / "result.json").read_text())
    assert two["val_nll_nomem"] != two["val_nll"]
    # Tokens per segment offset: 0-15 and 16-31 of each 32-token segment, adding up to the validation tokens.
    assert set(two["offset_tokens"]) == {"0-15", "16-63"} and sum(two["offset_tokens"].values()) == two["val_tokens"]
    kv = {r["schedule"]: float(r["kv_mib"]) for r in rows}
    assert kv["fhcr"] == pytest.approx(kv["full"] / 2) and kv["two_scale"] < kv["full"]
    assert kv["uniform"] <= kv["two_scale"]
    # Same seed, same batches: every seed-0 row trained on exactly the same tokens.
    assert len({r["train_tokens"] for r in rows if r["seed"] == "0"}) == 1
    md = (out / "study.md").read_text()
    assert "| fhcr |" in md and "load average" in md and (out / "study.png").stat().st_size > 1000
    assert "KRCU@32 mean" in md and "KRCU@64 mean" in md and "Learning curves" in md
    assert "Against no memory (none, perplexity" in md
    assert "Memory at inference" in md and "| 0-15 on | 0-15 off |" in md
    assert "What the memory gives at inference" in md and "(weights) - (" in md
    res = json.loads((out / "rows" / "two_scale-s0" / "result.json").read_text())
    # A window left out is R itself: distances 0..R-1 after the wipe.
    assert res["krcu_pieces"] >= 1 and len(res["krcu_curve"]) == 32 and res["val_notes"] > 0
    assert len(res["krcu_long_curve"]) == 64 and res["krcu_long_candidates"] >= res["krcu_long_pieces"]
    # The learning curve: every validation of the run (the steps, lane slots and perplexity).
    assert [pt[0] for pt in res["val_curve"]][-1] == res["steps"] and all(pt[2] > 1 for pt in res["val_curve"])


# ----------------------------------------------------------------------------------------------
# the finding, from synthetic numbers


def _row(name, ppl, kv, seed=0, krcu=0.001, auc=0.5):
    return {"schedule": name, "seed": seed, "val_ppl": ppl, "kv_mib": kv, "krcu_mean": krcu, "krcu_auc": auc}


def test_finding_says_memory_does_not_pay_when_full_is_within_noise():
    rows = [_row("full", 10.0, 16.0), _row("full", 10.2, 16.0, 1), _row("two_scale", 10.1, 1.4),
            _row("two_scale", 10.15, 1.4, 1), _row("uniform", 10.25, 1.0), _row("perceiver_ar_like", 11.0, 1.4),
            _row("fhcr", 9.8, 8.0)]
    text = finding(rows)
    assert text[0].startswith("Best validation perplexity (mean over seeds): fhcr (9.800); worst: perceiver_ar_like")
    assert "full's 2 seeds differ by 0.200" in text[1] and "differences up to 0.200 are within" in text[1]
    versus = next(s for s in text if s.startswith("Against full memory"))
    assert "within the noise: two_scale (+0.025), uniform (+0.150)" in versus
    assert "worse beyond the noise: perceiver_ar_like (+0.900)" in versus
    assert "better beyond the noise: fhcr (-0.300)" in versus
    memory = next(s for s in text if "pay" in s)
    assert memory.startswith("Memory does not pay at this scale") and "uniform (1.00 MiB)" in memory
    assert "within the seed noise (0.200)" in memory
    assert any("FHCR keeps the full horizon in 50% of full memory's KV bytes" in s for s in text)
    assert any("no schedule makes measurable use of the context before R" in s for s in text)


def test_finding_says_memory_pays_when_full_beats_the_noise():
    rows = [_row("full", 9.0, 16.0, krcu=0.2, auc=80.0), _row("full", 9.1, 16.0, 1, krcu=0.2, auc=82.0),
            _row("two_scale", 10.0, 1.4, auc=10.0), _row("two_scale", 10.05, 1.4, 1, auc=11.0),
            _row("uniform", 10.2, 1.4)]
    text = finding(rows)
    memory = next(s for s in text if "pay" in s)
    assert memory.startswith("Memory pays at this scale") and "vs two_scale (1.40 MiB)" in memory and "a gain of 0.975" in memory
    assert "worse beyond the noise: two_scale (+0.975), uniform (+1.150)" in next(
        s for s in text if s.startswith("Against full"))
    krcu = next(s for s in text if s.startswith("KRCU"))
    assert "largest NLL increase after R is full's" in krcu and "minus two_scale's is +70.50, beyond that noise" in krcu
    for r in rows[:2]:  # full's area far below two_scale's is beyond the noise too
        r["krcu_auc"] = -r["krcu_auc"]
    assert "minus two_scale's is -91.50, beyond that noise" in next(s for s in finding(rows) if s.startswith("KRCU"))
    assert "no schedule makes measurable use" not in krcu
    rows[0]["buckets"], rows[1]["buckets"] = {"1-1k": 4.0, "1k-4k": 3.0}, {"1-1k": 4.2, "1k-4k": 3.0}
    rows[2]["buckets"], rows[3]["buckets"] = {"1-1k": 4.1, "1k-4k": 3.5}, {"1-1k": 4.1, "1k-4k": 3.7}
    position = next(s for s in finding(rows) if s.startswith("By position"))
    assert "two_scale's NLL per token minus full's is +0.0000 at 1-1k, +0.6000 at 1k-4k" in position
    single = finding([_row("full", 9.0, 16.0), _row("uniform", 9.5, 1.0)])
    assert "one seed only" in single[1]


def test_finding_states_every_comparison_against_no_memory():
    rows = [_row("none", 10.0, 0.0, auc=0.0), _row("none", 10.1, 0.0, 1, auc=0.0),
            _row("two_scale", 9.5, 1.4, auc=30.0), _row("two_scale", 9.55, 1.4, 1, auc=31.0),
            _row("uniform", 10.05, 1.4, auc=0.4), _row("full", 10.6, 16.0, auc=5.0)]
    text = finding(rows)
    assert "none's 2 seeds differ by 0.100" in text[1]  # none's seeds count towards the noise
    versus = next(s for s in text if s.startswith("Against no memory (none, perplexity 10.050)"))
    assert "within the noise: uniform (+0.000)" in versus and "better beyond the noise: two_scale (-0.525)" in versus
    assert "worse beyond the noise: full (+0.550)" in versus
    pays = next(s for s in text if s.startswith("Memory pays"))
    assert "two_scale (0.525 better) beats the no-memory control (none, perplexity 10.050)" in pays
    more = next(s for s in text if s.startswith("More memory"))  # full vs the least memory, none aside
    assert more.startswith("More memory does not pay") and "vs two_scale (1.40 MiB)" in more
    krcu = next(s for s in text if s.startswith("KRCU"))
    assert ("Against no memory (none, area +0.00: nothing to wipe), beyond that noise: two_scale (+30.50), "
            "full (+5.00)") in krcu
    # When no memory schedule beats none beyond the noise, the headline says so.
    rows[2]["val_ppl"], rows[3]["val_ppl"] = 10.02, 10.04
    assert next(s for s in finding(rows) if "pay at this scale: no schedule" in s).startswith(
        "Memory does not pay at this scale: no schedule with memory beats the no-memory control")


def test_finding_splits_the_distance_to_none_into_weights_and_memory():
    def row(name, seed, nll, off, on0, off0):
        return {"schedule": name, "seed": seed, "val_ppl": math.exp(nll), "kv_mib": 0.0 if name == "none" else 1.4,
                "val_nll": nll, "val_nll_nomem": off, "offsets": {"0-15": on0, "64+": nll},
                "offsets_nomem": {"0-15": off0, "64+": off}}

    rows = [row("none", 0, 3.00, 3.00, 3.5, 3.5), row("none", 1, 3.02, 3.02, 3.5, 3.5),
            row("two_scale", 0, 3.10, 3.20, 3.3, 3.9), row("two_scale", 1, 3.12, 3.22, 3.3, 3.9),
            row("uniform", 0, 3.02, 3.025, 3.5, 3.5)]
    text = finding(rows)
    use = next(s for s in text if s.startswith("What the memory gives at inference"))
    assert "two_scale +0.1000 (+0.6000 at segment offsets 0-15, +0.1000 at segment offsets 64+)" in use
    assert "none" not in use.split(":", 1)[1].split("(")[0] and "uniform +0.0050" in use
    split = next(s for s in text if s.startswith("Each schedule's NLL per token minus none's"))
    # 3.11 - 3.01 = (3.21 - 3.01) - (3.21 - 3.11)
    assert "two_scale +0.1000 = +0.2000 (weights) - (+0.1000) (memory)" in split
    assert "the seeds' NLL spread (noise) is 0.0200" in split
    worse = next(s for s in text if s.startswith("Training with memory left worse weights"))
    assert "without its memory, two_scale is worse than the no-memory control" in worse
    # Far into a segment (64+): two_scale's weights without memory (3.21) against none's (3.01).
    assert "its weights without memory against none's: two_scale +0.2000 nats/token" in worse
    # By segment offset, with memory: two_scale 3.3 vs none 3.5 at 0-15, 3.11 vs 3.01 at 64+.
    for r in rows:
        r["offset_tokens"] = {"0-15": 16, "64+": 48}
    offs = next(s for s in finding(rows) if s.startswith("By offset in the segment (memory on), two_scale's"))
    assert "-0.2000 at 0-15 (25% of tokens), +0.1000 at 64+ (75% of tokens)" in offs
    assert any(s.startswith("By offset in the segment (memory on), uniform's") for s in finding(rows))
    assert next(s for s in text if s.startswith("Memory that gives nothing")) == \
        "Memory that gives nothing at inference (within the noise): uniform."
    # The learning curves' distance to none, at the first, middle and last shared evaluation.
    for r in rows:
        gap = {"none": 0.0, "two_scale": 1.0, "uniform": 0.5}[r["schedule"]]
        r["val_curve"] = [[s, s * 10 ** 6, 20.0 - s + gap * (4 - s) / 4] for s in range(5)]
    curves = next(s for s in finding(rows) if s.startswith("Learning curves"))
    assert "two_scale +0.750 at 1.00M, +0.250 at 3.00M, +0.000 at 4.00M; uniform +0.375 at 1.00M" in curves
    rows[2]["val_curve"] = rows[2]["val_curve"][:3]  # a seed that stopped early: shared evaluations only
    assert "two_scale +0.750 at 1.00M, +0.500 at 2.00M;" in next(
        s for s in finding(rows) if s.startswith("Learning curves"))
    # Rows from before these columns: no such sentences, no error.
    assert not any("(weights)" in s for s in finding([_row("none", 10.0, 0.0), _row("two_scale", 9.0, 1.4)]))


def test_long_study_plan_without_training(capsys):
    from dsmr.cli import main

    cfg = StudyConfig.long()
    plan = study_plan(cfg)
    assert [r["key"] for r in plan["rows"]] == ["none-s0", "two_scale-s0", "reach8k-s0", "none-s1", "two_scale-s1"]
    horizons = {r["name"]: r["horizons"] for r in plan["rows"]}
    assert horizons == {"none": [0] * 4, "two_scale": [1024, 128, 128, 128], "reach8k": [8192, 128, 128, 128]}
    # full is left out (about 20x slower per token at this size); the token budget is the same for every row.
    assert "full" not in horizons and plan["model"]["segment_len"] == 256
    assert plan["steps"] == cfg.train_tokens // (4 * 256) == 8000 and plan["eval_every"] == 800
    assert plan["lane_slots"] == 5 * 8000 * 4 * 256 and plan["krcu"] == [(4096, 4096), (8192, 8192)]
    assert main(["study", "--long", "--plan", "--schedule", "full"]) == 0
    out = capsys.readouterr().out
    assert "8,000 steps of 4 lanes" in out and "reach8k-s0" in out and "full-s0" in out and "6 rows" in out
    # --rows keeps rows by name, --long's own reach8k included.
    assert main(["study", "--long", "--plan", "--rows", "none,two_scale"]) == 0
    out = capsys.readouterr().out
    assert "4 rows" in out and "reach8k" not in out and "none-s1" in out and "two_scale-s1" in out
    assert [r["key"] for r in study_plan(StudyConfig.long(rows=["reach8k"]))["rows"]] == ["reach8k-s0"]
    with pytest.raises(SystemExit) as e:
        main(["study", "--long", "--plan", "--rows", "none,nope"])
    assert e.value.code == 2 and "no row named nope; this study's rows are none, two_scale, reach8k" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no training without a long-piece corpus
        main(["study", "--long", "--out", "unused"])
    assert e.value.code == 2 and "ASAP" in capsys.readouterr().err


def test_long_study_smoke_two_steps_per_row(cache, tmp_path):
    """--long's rows, learning curves and both KRCU points, at 2 steps per row on the generated corpus."""
    cfg = StudyConfig.long(model=TINY_MODEL, two_scale=TWO, train_tokens=128, batch_lanes=2, evals=2,
                           eval_min_tokens=64, eval_max_tokens=None, krcu_reset_at=32, krcu_long_reset_at=64)
    res = run_study(tmp_path / "long", cfg, data=cache, progress=False, log=lambda line: None)
    assert [(r["schedule"], r["seed"]) for r in res["rows"]] == [
        ("none", 0), ("two_scale", 0), ("reach8k", 0), ("none", 1), ("two_scale", 1)]
    assert all([pt[0] for pt in r["val_curve"]] == [0, 1, 2] and r["steps"] == 2 for r in res["rows"])
    assert all(r["krcu_long_reset_at"] == 64 and r["krcu_long_auc"] is not None for r in res["rows"])
    md = (tmp_path / "long" / "study.md").read_text()
    assert "the families none, two_scale" in md and "of at least 64 tokens" in md
