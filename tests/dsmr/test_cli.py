"""Every ``dsmr`` command end to end on a tiny generated MIDI corpus (offline, a few seconds)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("miditok")
pytest.importorskip("symusic")

import symusic  # noqa: E402

from dsmr.cli import main  # noqa: E402
from tests.dsmr.midi_fixtures import _corpus  # noqa: E402

TINY = ["--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--n-kv-heads", "1", "--segment-len", "32",
        "--batch-lanes", "2", "--eval-every", "0", "--ckpt-every", "0", "--log-every", "1", "--warmup-steps", "1",
        "--threads", "1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    midis = root / "midis"
    _corpus(midis, n=6)
    # A corrupt file in the source must be skipped and counted, not fatal.
    (midis / "broken.mid").write_bytes(b"MThd this is not midi")
    return root, midis


def _checkpoint_and_cache(workspace, ckpt):
    """The checkpoint's model and the token cache the CLI used, loaded here with the library."""
    from dsmr.checkpoint import load_model
    from dsmr.data import prepare_cache

    root, midis = workspace
    model, info = load_model(ckpt)
    cache = prepare_cache(midis, cache_dir=root / "cache", tokenizer_config=info.get("tokenizer_config"),
                          workers=1, progress=False)
    return model.eval(), info, cache


def _piece_nll(model, piece, bos, eos, start=0):
    """Per-target NLL of ``[BOS] + piece + [EOS]`` from input ``start`` on, segments of S from
    ``start`` with an empty state (start = 0: the whole piece; start = R: the memory wiped at R,
    which rotary attention makes the same as starting over)."""
    seq = torch.tensor(np.concatenate([[bos], piece, [eos]]), dtype=torch.long)
    S, state, out = model.config.segment_len, None, []
    with torch.no_grad():
        for s0 in range(start, len(seq) - 1, S):
            logits, state = model(seq[None, s0:min(s0 + S, len(seq) - 1)], state)
            out.append(torch.nn.functional.cross_entropy(logits[0].double(), seq[s0 + 1:s0 + 1 + logits.shape[1]],
                                                         reduction="none"))
    return torch.cat(out)


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(workspace):
    root, midis = workspace
    out = root / "run"
    code = main(["train", "--source", str(midis), "--cache-dir", str(root / "cache"), "--out", str(out),
                 "--max-steps", "4", "--schedule", "two_scale:long=48,short=8,n_long=1", "--workers", "1",
                 "--threads", "1", *TINY])
    assert code == 0
    return out


def test_data_prepare_stats_list(workspace, capsys):
    root, midis = workspace
    cache = ["--cache-dir", str(root / "cache")]
    code, out, _ = _run(["data", "prepare", str(midis), *cache, "--workers", "1"], capsys)
    assert code == 0 and "vocab size" in out and "skipped files: 1" in out
    code, out, _ = _run(["data", "stats", str(midis), *cache, "--pieces"], capsys)
    assert code == 0 and "piece_0" in out
    code, out, _ = _run(["data", "list", *cache], capsys)
    assert code == 0 and "folder-midis" in out


def test_schedules_table(capsys):
    code, out, _ = _run(["schedules", "--n-layers", "6", "--piece-len", "16384"], capsys)
    assert code == 0
    for fam in ("full", "uniform", "two_scale", "reverse_two_scale", "progressive", "selective", "perceiver_ar_like"):
        assert fam in out
    line = next(ln for ln in out.splitlines() if ln.startswith("two_scale"))
    assert "10,240" in line  # 2 x 4096 + 4 x 512 slots
    none = next(ln for ln in out.splitlines() if ln.startswith("none "))
    assert "[0x6]" in none and none.split()[-1] == "0.000"  # the no-memory control: no KV state
    code, out, _ = _run(["schedules", "--n-layers", "2", "--schedule", "64,none"], capsys)
    assert "16,448" in out


def test_schedules_bad_spec_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["schedules", "--n-layers", "3", "--schedule", "two_scale:long=8"])
    assert e.value.code == 2
    assert "two_scale" in capsys.readouterr().err


def test_train_writes_checkpoints_metrics_and_plot(trained):
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "model_config.json", "train_config.json"):
        assert (trained / name).exists(), name
    cfg = json.loads((trained / "model_config.json").read_text())
    assert cfg["horizons"] == [48, 8] and cfg["d_model"] == 32
    assert json.loads((trained / "train_config.json").read_text())["threads"] == "1"


@pytest.mark.parametrize("cmd", ["train", "eval", "generate"])
def test_bad_threads_is_a_clear_error(workspace, trained, capsys, cmd):
    root, midis = workspace
    common = ["--source", str(midis), "--cache-dir", str(root / "cache"), "--workers", "1"]
    argv = {"train": ["train", *common, "--out", str(root / "bad"), "--max-steps", "1", *TINY],
            "eval": ["eval", "--checkpoint", str(trained / "last.pt"), *common],
            "generate": ["generate", "--checkpoint", str(trained / "last.pt"), "--out", str(root / "x.mid")]}[cmd]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--threads", "zero"])
    assert e.value.code == 2 and "threads must be 'auto', a positive int or None, got 'zero'" in capsys.readouterr().err


def test_train_resume_continues(workspace, trained, capsys):
    root, midis = workspace
    code, out, _ = _run(["train", "--source", str(midis), "--cache-dir", str(root / "cache"), "--out", str(trained),
                         "--max-steps", "6", "--schedule", "two_scale:long=48,short=8,n_long=1", "--resume",
                         "--workers", "1", *TINY], capsys)
    assert code == 0 and json.loads(out[out.index("{\n"):])["step"] == 6


def test_train_from_toml_config(workspace, tmp_path, capsys):
    root, midis = workspace
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        '[model]\nn_layers = 1\nd_model = 16\nn_heads = 2\nsegment_len = 16\nschedule = "uniform:m=16"\n'
        "[train]\nmax_steps = 2\nbatch_lanes = 2\neval_every = 0\nwarmup_steps = 1\n"
        f'[data]\nsource = "{midis}"\n'
    )
    code, out, err = _run(["train", "--config", str(cfg), "--cache-dir", str(tmp_path / "cache"), "--out",
                           str(tmp_path / "r"), "--workers", "1"], capsys)
    assert code == 0
    # The file's [data] source is used, not the "demo" default (which would fetch from PyPI).
    assert "folder-midis" in err and not (tmp_path / "cache" / "demo").exists()
    saved = json.loads((tmp_path / "r" / "model_config.json").read_text())
    assert saved["n_layers"] == 1 and saved["horizons"] == [16]


def test_eval_prints_perplexity_and_buckets(workspace, trained, capsys, tmp_path):
    root, midis = workspace
    js = tmp_path / "e.json"
    code, out, _ = _run(["eval", "--checkpoint", str(trained / "best.pt"), "--source", str(midis),
                         "--cache-dir", str(root / "cache"), "--split", "test", "--json", str(js)], capsys)
    assert code == 0 and "perplexity" in out
    assert all(label in out for label in ("1-1k", "1k-4k", "32k+"))
    res = json.loads(js.read_text())
    assert res["tokens"] == sum(b["tokens"] for b in res["buckets"].values())
    # the printed perplexity is the checkpoint's, over the test pieces, computed here by brute force
    model, info, cache = _checkpoint_and_cache(workspace, trained / "best.pt")
    pieces = cache.pieces("test")
    total, n = 0.0, 0
    for piece in pieces:
        nll = _piece_nll(model, piece, cache.bos_id, cache.eos_id)
        total, n = total + float(nll.sum()), n + len(nll)
    assert res["tokens"] == n == sum(len(p) + 1 for p in pieces) and res["pieces"] == len(pieces)
    assert res["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert f"perplexity {math.exp(total / n):.3f}" in out
    # NLL per note: the same total over the notes of the test files, counted in the MIDI files themselves
    notes = sum(len(t.notes) for name in cache.names("test") for t in symusic.Score(str(midis / name)).tracks)
    assert res["notes"] == notes and f"NLL per note {total / notes:.4f}" in out


def test_eval_with_other_horizons_wipes_memory_at_every_segment(workspace, trained, capsys, tmp_path):
    root, midis = workspace
    js = tmp_path / "none.json"
    code, out, _ = _run(["eval", "--checkpoint", str(trained / "best.pt"), "--source", str(midis),
                         "--cache-dir", str(root / "cache"), "--split", "test", "--schedule", "none",
                         "--json", str(js)], capsys)
    assert code == 0 and "memory: [0x2] (trained with [48, 8])" in out and "segment offset" in out
    res = json.loads(js.read_text())
    assert sum(b["tokens"] for b in res["offsets"].values()) == res["tokens"]
    # By brute force: every segment starts from an empty state.
    model, _, cache = _checkpoint_and_cache(workspace, trained / "best.pt")
    S, total, n = model.config.segment_len, 0.0, 0
    for piece in cache.pieces("test"):
        L = len(piece) + 1
        nll = torch.cat([_piece_nll(model, piece, cache.bos_id, cache.eos_id, start=s0)[:S] for s0 in range(0, L, S)])
        total, n = total + float(nll.sum()), n + len(nll)
    assert res["tokens"] == n and res["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(trained / "best.pt"), "--source", str(midis),
              "--cache-dir", str(root / "cache"), "--schedule", "1,2,3"])
    assert e.value.code == 2 and "--schedule: schedule has 3 horizons but the model has 2 layers" in \
        capsys.readouterr().err


def test_diagnose_writes_plot(workspace, trained, capsys, tmp_path):
    root, midis = workspace
    png = tmp_path / "kv.png"
    code, out, _ = _run(["diagnose", "--checkpoint", str(trained / "best.pt"), "--source", str(midis),
                         "--cache-dir", str(root / "cache"), "--split", "train", "--reset-at", "64",
                         "--plot", str(png)], capsys)
    assert code == 0 and "area under the increase" in out
    # a real 840x480 figure with something drawn on it (not a blank canvas)
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (480, 840) and float(img[..., :3].std()) > 0.05
    # the printed area is the diagnostic's on the first train piece, recomputed here by brute force
    model, _, cache = _checkpoint_and_cache(workspace, trained / "best.pt")
    piece = cache.pieces("train")[0]
    S = model.config.segment_len
    normal = _piece_nll(model, piece, cache.bos_id, cache.eos_id)
    wiped = _piece_nll(model, piece, cache.bos_id, cache.eos_id, start=64 // S * S)
    auc = float((wiped - normal[64 // S * S:]).sum())
    assert f"area under the increase {auc:.2f} " in out


def test_diagnose_over_several_pieces(workspace, trained, capsys, tmp_path):
    root, midis = workspace
    js = tmp_path / "kv.json"
    code, out, _ = _run(["diagnose", "--checkpoint", str(trained / "best.pt"), "--source", str(midis),
                         "--cache-dir", str(root / "cache"), "--split", "train", "--reset-at", "64",
                         "--pieces", "all", "--plot", str(tmp_path / "kv.png"), "--json", str(js)], capsys)
    assert code == 0 and "piece(s) diagnosed" in out and "pooled over every token after R" in out
    res = json.loads(js.read_text())
    assert len(res["pieces"]) + len(res["skipped"]) >= 2 and len(res["per_piece"]) == len(res["pieces"])
    with pytest.raises(SystemExit):
        main(["diagnose", "--checkpoint", str(trained / "best.pt"), "--source", str(midis),
              "--cache-dir", str(root / "cache"), "--pieces", "zero"])
    assert "--pieces must be a positive int or 'all'" in capsys.readouterr().err


def test_generate_midi_from_prompt(workspace, trained, capsys, tmp_path):
    _, midis = workspace
    out_mid = tmp_path / "gen.mid"
    ids = tmp_path / "ids.json"
    code, out, _ = _run(["generate", "--checkpoint", str(trained / "best.pt"), "--prompt", str(midis / "piece_0.mid"),
                         "--prompt-tokens", "40", "--out", str(out_mid), "--max-new-tokens", "50", "--seed", "1",
                         "--ids-out", str(ids)], capsys)
    assert code == 0 and out_mid.exists()
    toks = json.loads(ids.read_text())
    assert 41 <= len(toks) <= 91
    symusic.Score(str(out_mid))  # a readable MIDI file


def test_generate_several_samples(workspace, trained, capsys, tmp_path):
    _, midis = workspace
    ids = tmp_path / "ids.json"
    code, out, _ = _run(["generate", "--checkpoint", str(trained / "best.pt"), "--prompt", str(midis / "piece_0.mid"),
                         "--prompt-tokens", "30", "--out", str(tmp_path / "gen.mid"), "--max-new-tokens", "20",
                         "--seed", "2", "--num-samples", "3", "--ids-out", str(ids)], capsys)
    assert code == 0 and out.count("sample ") == 3
    toks = json.loads(ids.read_text())
    assert len(toks) == 3 and all(t[:31] == toks[0][:31] for t in toks)  # BOS + the same 30-token prompt
    for i in (1, 2, 3):
        symusic.Score(str(tmp_path / f"gen_{i}.mid"))  # readable MIDI files


def test_generate_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.mid")])
    assert "nope.pt" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,options", [
    ("data", ["prepare", "stats", "list"]),
    ("schedules", ["--n-layers", "--piece-len"]),
    ("train", ["--source", "--tokenizer", "--max-steps", "--schedule", "--resume", "--out"]),
    ("eval", ["--checkpoint", "--split", "--json"]),
    ("diagnose", ["--checkpoint", "--reset-at", "--pieces", "--plot"]),
    ("generate", ["--checkpoint", "--prompt", "--max-new-tokens", "--num-samples", "--seed", "--no-grammar"]),
])
def test_every_command_has_help(cmd, options):
    res = subprocess.run([sys.executable, "-m", "dsmr", cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith(f"usage: dsmr {cmd}")
    missing = [o for o in options if o not in res.stdout]
    assert not missing, f"`dsmr {cmd} --help` does not list {missing}"


# ---------------------------------------------------------------------------------------------
# multitrack end to end: --tokenizer multitrack, clean skip lines, grammar, --prompt-bars


@pytest.fixture(scope="module")
def multi_workspace(tmp_path_factory):
    from tests.dsmr.midi_fixtures import _multitrack_corpus

    root = tmp_path_factory.mktemp("cli_multi")
    midis = root / "songs"
    _multitrack_corpus(midis, n=6)
    (midis / "broken.mid").write_bytes(b"MThd not midi at all")
    (midis / "empty.mid").write_bytes(b"")
    return root, midis


@pytest.fixture(scope="module")
def multi_trained(multi_workspace):
    root, midis = multi_workspace
    run = root / "run"
    code = main(["train", "--source", str(midis), "--cache-dir", str(root / "cache"), "--tokenizer", "multitrack",
                 "--out", str(run), "--max-steps", "2", "--schedule", "two_scale:long=48,short=8,n_long=1",
                 "--workers", "1", *TINY])
    assert code == 0
    return run / "last.pt"


def test_multitrack_data_prepare_prints_one_line_per_skipped_file(multi_workspace, capsys):
    from dsmr.tokenizer import build_tokenizer

    root, midis = multi_workspace
    cache = ["--cache-dir", str(root / "cache_prep")]
    code, out, err = _run(["data", "prepare", str(midis), *cache, "--workers", "1", "--tokenizer", "multitrack"],
                          capsys)
    assert code == 0 and "skipped files: 2" in out
    assert f"vocab size {len(build_tokenizer('multitrack'))}" in out
    skip_lines = [ln for ln in err.splitlines() if ln.startswith("skipped ")]
    assert sorted(ln.split(":")[0] for ln in skip_lines) == ["skipped broken.mid", "skipped empty.mid"]
    assert "warnings.warn" not in err and "Warning" not in err  # no Python source lines or class names
    # Asked again: the cache is reused, and its skips are listed from the index instead.
    code, out, err = _run(["data", "stats", str(midis), *cache, "--tokenizer", "multitrack"], capsys)
    assert code == 0 and "skipped broken.mid:" in out and "skipped" not in err


def test_multitrack_generate_continues_bars_of_a_song(multi_workspace, multi_trained, capsys, tmp_path):
    from dsmr.grammar import grammar_error_ratio
    from dsmr.tokenizer import build_tokenizer
    from tests.dsmr.midi_fixtures import MULTI_PROGRAMS

    _, midis = multi_workspace
    ids_out = tmp_path / "ids.json"
    # No --tokenizer: the checkpoint carries it.
    code, out, _ = _run(["generate", "--checkpoint", str(multi_trained), "--prompt", str(midis / "song_3.mid"),
                         "--prompt-bars", "2:3", "--max-new-tokens", "150", "--seed", "0",
                         "--out", str(tmp_path / "cont.mid"), "--ids-out", str(ids_out)], capsys)
    assert code == 0 and "tokens_errors 0.000" in out
    tok = build_tokenizer("multitrack")
    ids = json.loads(ids_out.read_text())
    assert grammar_error_ratio(ids, tok) == 0.0 and tok[ids[1]] == "Bar_None"
    score = symusic.Score(str(tmp_path / "cont.mid"))
    programs = {-1 if t.is_drum else t.program for t in score.tracks if len(t.notes)}
    assert programs >= set(MULTI_PROGRAMS) | {-1}  # the prompt's instruments; drums read back as drums
    code, out, _ = _run(["generate", "--checkpoint", str(multi_trained), "--no-grammar", "--max-new-tokens", "60",
                         "--seed", "0", "--out", str(tmp_path / "free.mid")], capsys)
    assert code == 0 and "tokens_errors" in out


@pytest.mark.parametrize("bars,msg", [("90:99", "lie outside the piece"), ("3:1", "must not come before")])
def test_generate_bad_prompt_bars_is_a_clear_error(multi_workspace, multi_trained, capsys, tmp_path, bars, msg):
    _, midis = multi_workspace
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(multi_trained), "--prompt", str(midis / "song_0.mid"),
              "--prompt-bars", bars, "--out", str(tmp_path / "x.mid")])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_multitrack_eval_needs_no_tokenizer_flag(multi_workspace, multi_trained, capsys):
    from dsmr.tokenizer import build_tokenizer

    root, midis = multi_workspace
    code, out, _ = _run(["eval", "--checkpoint", str(multi_trained), "--source", str(midis),
                         "--cache-dir", str(root / "cache"), "--split", "validation"], capsys)
    assert code == 0 and "perplexity" in out
    # The checkpoint's multitrack tokenizer picked the multitrack cache, not a piano one.
    caches = [p for p in (root / "cache" / "tokens").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1
    vocab = json.loads((caches[0] / "index.json").read_text())["vocab_size"]
    assert vocab == len(build_tokenizer("multitrack"))


def test_config_file_names_the_tokenizer(multi_workspace, tmp_path, capsys):
    from dsmr.checkpoint import load_model
    from dsmr.tokenizer import build_tokenizer, is_multitrack

    _, midis = multi_workspace
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nn_layers = 1\nd_model = 16\nn_heads = 2\nsegment_len = 16\nschedule = "uniform:m=16"\n'
                   "[train]\nmax_steps = 1\nbatch_lanes = 2\neval_every = 0\nwarmup_steps = 1\n"
                   f'[data]\nsource = "{midis}"\ntokenizer = "multitrack"\n')
    code, _, _ = _run(["train", "--config", str(cfg), "--cache-dir", str(tmp_path / "cache"), "--out",
                       str(tmp_path / "r"), "--workers", "1"], capsys)
    assert code == 0
    _, info = load_model(tmp_path / "r" / "last.pt")
    assert is_multitrack(build_tokenizer(info["tokenizer_config"]))
    assert info["vocab"]["vocab_size"] == len(build_tokenizer("multitrack"))
