"""Streaming trainer: lane batcher layout, learning, exact kill-and-resume, checkpoints, bad input."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmr import DSMRConfig, DSMRModel
from dsmr.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from dsmr.stream import IGNORE_INDEX, LaneBatcher, seq_slice
from dsmr.train import TrainConfig, lr_at, train

PAD, BOS, EOS = 0, 1, 2


def motif_corpus(n_pieces, seed, vocab=19, n_motifs=4, motif_len=6, reps=(8, 30)):
    """Pieces made of a few fixed motifs: after a motif's first token the rest is predictable."""
    rng = np.random.default_rng(1234)
    motifs = [rng.integers(3, vocab, size=motif_len) for _ in range(n_motifs)]
    rng = np.random.default_rng(seed)
    return [np.concatenate([motifs[i] for i in rng.integers(0, n_motifs, size=int(rng.integers(*reps)))])
            for _ in range(n_pieces)]


def tiny_config(**kw):
    base = dict(vocab_size=19, n_layers=2, d_model=32, n_heads=2, segment_len=32)
    base.update(kw)
    return DSMRConfig(**base)


# ---------------------------------------------------------------------------------------------
# the lane batcher


def _full_seq(p):
    return np.concatenate([[BOS], p, [EOS]])


def test_seq_slice_matches_concatenation():
    ids = np.arange(10, 17)
    full = _full_seq(ids)
    for a in range(len(full)):
        for b in range(a, len(full) + 2):
            assert np.array_equal(seq_slice(ids, a, b, BOS, EOS), full[a:b]), (a, b)


def test_batcher_bos_eos_padding_and_resets():
    pieces = [np.arange(10, 10 + n) for n in (5, 11, 2, 7, 3)]
    S, B = 4, 2
    bt = LaneBatcher(pieces, B, S, pad_id=PAD, bos_id=BOS, eos_id=EOS, shuffle=False, max_epochs=1)
    n_batches = bt.epoch_len(0)
    rebuilt = {i: ([], []) for i in range(len(pieces))}
    expected_offset = {}
    for k in range(n_batches):
        b = bt.next_batch()
        assert b.epoch == 0
        assert b.inputs.shape == b.targets.shape == (B, S)
        for lane in range(B):
            p = int(b.piece[lane])
            inp, tgt, m = b.inputs[lane].numpy(), b.targets[lane].numpy(), b.mask[lane].numpy()
            if p < 0:  # idle lane: all padding, no loss, reset
                assert (inp == PAD).all() and not m.any() and bool(b.reset[lane])
                continue
            start = int(b.start[lane])
            assert start == expected_offset.get((lane, p), 0)
            assert bool(b.reset[lane]) == (start == 0), "reset exactly at a piece's first segment"
            n = int(m.sum())
            # mask is a prefix; padding is pad_id / IGNORE_INDEX after it
            assert m[:n].all() and not m[n:].any()
            assert (inp[n:] == PAD).all() and (tgt[n:] == IGNORE_INDEX).all()
            assert (tgt[:n] == _full_seq(pieces[p])[start + 1:start + 1 + n]).all()
            rebuilt[p][0].extend(inp[:n].tolist())
            rebuilt[p][1].extend(tgt[:n].tolist())
            expected_offset[(lane, p)] = start + n
    for i, p in enumerate(pieces):
        inp, tgt = rebuilt[i]
        # BOS only at the start of the inputs and never a target; EOS only as the last target.
        assert inp == [BOS] + p.tolist()
        assert tgt == p.tolist() + [EOS]
        assert BOS not in tgt and EOS not in inp
    # the one-epoch stream is over: every lane idles (reset, no loss) from here on
    b = bt.next_batch()
    assert bt.exhausted and b.n_tokens == 0 and bool(b.reset.all()) and (b.piece < 0).all()


def test_freed_lanes_take_the_next_epochs_pieces():
    """No lane idles at an epoch boundary: a freed lane takes the next epoch's first piece."""
    pieces = [np.arange(10, 10 + n) for n in (5, 40, 2, 7, 3, 9)]
    B, S, E = 3, 4, 3
    bt = LaneBatcher(pieces, B, S, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=1, max_epochs=E)
    n = bt.total_batches(E)
    starts, idle_before_last_deal, straddled, last_deal = [], 0, False, None
    for k in range(n):
        b = bt.next_batch()
        starts += [(int(e), int(p)) for p, s, e in zip(b.piece, b.start, bt.lane_epoch) if p >= 0 and s == 0]
        live = bt.lane_epoch[bt.lane_epoch >= 0]
        straddled |= len(set(live.tolist())) > 1
        if bt.epoch == E - 1 and bt.next_idx == len(bt.shard) and last_deal is None:
            last_deal = k
        if last_deal is None:
            idle_before_last_deal += int((b.piece < 0).sum())
    assert idle_before_last_deal == 0, "a lane idled while the stream still had pieces"
    assert straddled, "lanes held pieces of two epochs at once"
    for e in range(E):  # every piece exactly once per epoch, in that epoch's order
        assert [p for ep, p in starts if ep == e] == bt.epoch_order(e).tolist()
    assert bt.next_batch().n_tokens == 0 and bt.exhausted
    # the run is shorter than epochs that each wait for their longest piece
    per_epoch = [LaneBatcher(pieces, B, S, pad_id=PAD, bos_id=BOS, eos_id=EOS)._lanes_end(bt.epoch_order(e))
                 for e in range(E)]
    assert n < sum(per_epoch), (n, per_epoch)


def test_batcher_epoch_length_matches_simulation_and_shards():
    rng = np.random.default_rng(0)
    pieces = [rng.integers(3, 10, size=int(n)) for n in rng.integers(1, 50, size=13)]
    for world in (1, 2, 3):
        lens = []
        seen = []
        for rank in range(world):
            bt = LaneBatcher(pieces, 3, 8, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=5, rank=rank,
                             world_size=world, max_epochs=1)
            n = bt.epoch_len(0)
            lens.append(n)
            last_real = 0
            for k in range(n):
                b = bt.next_batch()
                seen.extend(int(p) for p, s in zip(b.piece, b.start) if p >= 0 and s == 0)
                if b.n_tokens:
                    last_real = k + 1
            assert last_real <= n
            assert bt.next_batch().n_tokens == 0 and bt.exhausted  # max_epochs reached: idle
        assert len(set(lens)) == 1, "every rank agrees on the epoch length"
        assert sorted(seen) == list(range(len(pieces))), "every piece exactly once per epoch"


def test_batcher_order_is_seeded_and_state_round_trips():
    pieces = [np.arange(3, 3 + n) for n in range(1, 20)]
    a = LaneBatcher(pieces, 3, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=7)
    b = LaneBatcher(pieces, 3, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=7)
    c = LaneBatcher(pieces, 3, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=8)
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    for _ in range(a.epoch_len(0) + 3):  # into epoch 1
        a.next_batch()
    d = LaneBatcher(pieces, 3, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=7)
    d.load_state_dict(a.state_dict())
    for _ in range(40):
        x, y = a.next_batch(), d.next_batch()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.reset, y.reset) and x.epoch == y.epoch


def test_lr_schedule():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(1 / 11)
    assert lr_at(9, cfg, 100) == pytest.approx(10 / 11)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


def test_train_config_json_round_trip():
    cfg = TrainConfig(out_dir="x", batch_lanes=4, max_steps=7, epochs=3, autocast=True, eval_every=0)
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ---------------------------------------------------------------------------------------------
# training


def test_loss_drops_below_unigram_entropy(tmp_path):
    train_p, val_p = motif_corpus(40, seed=1), motif_corpus(8, seed=2)
    counts = np.bincount(np.concatenate(train_p), minlength=19)[3:]
    probs = counts[counts > 0] / counts.sum()
    unigram = float(-(probs * np.log(probs)).sum())
    cfg = TrainConfig(out_dir=str(tmp_path), batch_lanes=8, max_steps=150, lr=3e-3, min_lr=3e-4,
                      warmup_steps=10, weight_decay=0.0, eval_every=0, ckpt_every=0, log_every=10)
    s = train(tiny_config(), cfg, train_p, val_p, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first = next(r["loss"] for r in recs if r["type"] == "train")
    assert s["step"] == 150
    assert s["train_loss"] < 0.35 * unigram < first, (s["train_loss"], unigram, first)
    assert s["val"]["nll"] < 0.35 * unigram
    assert s["best_val_ppl"] == pytest.approx(s["val"]["ppl"])
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "train_config.json"):
        assert (tmp_path / name).exists(), name
    model, info = load_model(tmp_path / "best.pt")
    assert info["step"] == 150 and info["vocab"] == {"vocab_size": 19, "pad_id": 0, "bos_id": 1, "eos_id": 2}
    # A trained full-memory model uses its memory: wiping it costs NLL right after the wipe (the
    # motif in progress is lost). Motif order is random, so far from R the increase is noise.
    from dsmr.diagnostics import kv_reset_diagnostic

    early = [np.mean(kv_reset_diagnostic(model, p, bos_id=BOS, eos_id=EOS)["increase"][:8]) for p in val_p]
    assert np.mean(early) > 0.1, early


def _losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if r["type"] == "train"]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("grad_accum,horizons", [(1, [None, 5]), (2, [12, 0])])
def test_kill_and_resume_matches_uninterrupted(tmp_path, grad_accum, horizons):
    pieces = motif_corpus(9, seed=3, reps=(2, 9))
    mc = tiny_config(segment_len=8, horizons=horizons, dropout=0.1)  # dropout: RNG must be restored
    common = dict(batch_lanes=3, max_steps=14, lr=2e-3, warmup_steps=3, grad_accum=grad_accum,
                  eval_every=0, ckpt_every=5, log_every=1, seed=11, plot=False)
    straight = TrainConfig(out_dir=str(tmp_path / "a"), **common)
    train(mc, straight, pieces, pieces[:2], pad_id=PAD, bos_id=BOS, eos_id=EOS)

    cut = TrainConfig(out_dir=str(tmp_path / "b"), **common)

    def kill(step, rec):
        if step == 8:  # last checkpoint was at step 5; steps 6-8 are lost, as in a real kill
            raise _Killed()

    with pytest.raises(_Killed):
        train(mc, cut, pieces, pieces[:2], pad_id=PAD, bos_id=BOS, eos_id=EOS, callback=kill)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 5
    s = train(mc, cut, pieces, pieces[:2], pad_id=PAD, bos_id=BOS, eos_id=EOS, resume=True)
    assert s["step"] == 14
    a, b = _losses(tmp_path / "a" / "metrics.jsonl"), _losses(tmp_path / "b" / "metrics.jsonl")
    assert [st for st, _ in a] == list(range(1, 15))
    assert a == b  # exact equality, step by step
    ma, _ = load_model(tmp_path / "a" / "last.pt")
    mb, _ = load_model(tmp_path / "b" / "last.pt")
    for (n, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(p, q), n


def test_kill_and_resume_across_an_epoch_boundary(tmp_path):
    """The checkpoint is taken while the lanes stream pieces of two epochs; the resumed run matches."""
    pieces = motif_corpus(5, seed=8, reps=(2, 9))
    probe = LaneBatcher(pieces, 2, 8, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=11)
    k = 0
    while len(set(probe.lane_epoch.tolist())) < 2:  # batches until two epochs share the lanes
        probe.next_batch()
        k += 1
    mc = tiny_config(segment_len=8, horizons=[None, 5], dropout=0.1)
    common = dict(batch_lanes=2, max_steps=k + 4, lr=2e-3, warmup_steps=2, eval_every=0, ckpt_every=k,
                  log_every=1, seed=11, plot=False)
    train(mc, TrainConfig(out_dir=str(tmp_path / "a"), **common), pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS)

    def kill(step, rec):
        if step == k + 2:
            raise _Killed()

    cut = TrainConfig(out_dir=str(tmp_path / "b"), **common)
    with pytest.raises(_Killed):
        train(mc, cut, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS, callback=kill)
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ck["step"] == k and len(set(ck["data"][0]["lane_epoch"].tolist())) == 2
    s = train(mc, cut, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS, resume=True)
    assert s["step"] == k + 4 and s["lane_util"] > 0
    assert _losses(tmp_path / "a" / "metrics.jsonl") == _losses(tmp_path / "b" / "metrics.jsonl")
    recs = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert all(0 < r["lane_util"] <= 1 for r in recs if r["type"] == "train")


def test_epochs_mode_and_grad_accum(tmp_path):
    pieces = motif_corpus(5, seed=4, reps=(2, 6))
    cfg = TrainConfig(out_dir=str(tmp_path), batch_lanes=2, epochs=2, grad_accum=3, eval_every=0,
                      ckpt_every=0, log_every=1, plot=False)
    from dsmr.stream import LaneBatcher as LB

    lb = LB(pieces, 2, 16, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=cfg.seed, max_epochs=2)
    expected = math.ceil(lb.total_batches(2) / 3)
    s = train(tiny_config(segment_len=16), cfg, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert s["step"] == expected
    total_targets = sum(len(p) + 1 for p in pieces) * 2
    assert s["tokens"] == total_targets, "every real target of both epochs seen exactly once"


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_truncated_checkpoint_refused_and_last_survives(tmp_path, monkeypatch):
    pieces = motif_corpus(4, seed=5, reps=(2, 5))
    cfg = TrainConfig(out_dir=str(tmp_path), batch_lanes=2, max_steps=3, eval_every=0, ckpt_every=0,
                      log_every=1, plot=False)
    train(tiny_config(), cfg, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    last = tmp_path / "last.pt"
    good = load_checkpoint(last)
    raw = last.read_bytes()

    # 1. a truncated copy is refused with a clear error
    bad = tmp_path / "bad.pt"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(bad)

    # 2. a crash in the middle of writing: the old last.pt stays intact, no temp file remains
    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("dsmr.checkpoint.torch.save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format": "x"}, last)
    monkeypatch.undo()
    assert last.read_bytes() == raw
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

    # 3. a process killed mid-write leaves its temp file: last.pt still loads, resume cleans up
    (tmp_path / ".last.pt.tmp-999-deadbeef").write_bytes(raw[:100])
    again = load_checkpoint(last)
    assert again["step"] == good["step"] == 3
    cfg2 = TrainConfig(**{**cfg.to_dict(), "max_steps": 4})
    s = train(tiny_config(), cfg2, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS, resume=True)
    assert s["step"] == 4
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_checkpoint_contents_load_weights_only(tmp_path):
    pieces = motif_corpus(4, seed=6, reps=(2, 5))
    cfg = TrainConfig(out_dir=str(tmp_path), batch_lanes=2, max_steps=2, eval_every=0, log_every=1, plot=False)
    tok_cfg = {"name": "REMI", "beat_res": {"0_4": 8}, "use_velocities": True}
    train(tiny_config(horizons=[4, None]), cfg, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS,
          tokenizer_config=tok_cfg)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "rng", "data", "memory", "model_config",
                "train_config", "tokenizer_config", "step"):
        assert key in ck, key
    assert ck["tokenizer_config"] == tok_cfg
    assert ck["model_config"]["horizons"] == [4, None]
    assert TrainConfig.from_dict(ck["train_config"]) == cfg
    assert set(ck["rng"][0]) >= {"torch", "numpy", "python"}
    assert {"epoch", "order", "lane_piece", "lane_off", "next_idx"} <= set(ck["data"][0])
    assert "0.mem_len" in ck["memory"][0] and "1.mem_k" in ck["memory"][0]


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=1, plot=False)
    good = [np.array([3, 4, 5])]
    kw = dict(pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="train piece 1 is empty"):
        train(tiny_config(), cfg, [good[0], np.array([], dtype=np.int64)], None, **kw)
    with pytest.raises(ValueError, match=r"train piece 0 has token ids in \[3, 19\] outside the model's vocab"):
        train(tiny_config(), cfg, [np.array([3, 19])], None, **kw)
    with pytest.raises(ValueError, match="vocab_size is 19"):
        train(tiny_config(), cfg, good, None, vocab_size=30, **kw)
    with pytest.raises(ValueError, match="eos_id=25 lies outside"):
        train(tiny_config(), cfg, good, None, pad_id=PAD, bos_id=BOS, eos_id=25)
    with pytest.raises(ValueError, match="special ids"):
        train(tiny_config(), cfg, good, None)
    with pytest.raises(ValueError, match="segment_len must be a positive int"):
        tiny_config(segment_len=0)
    with pytest.raises(ValueError, match="segment_len must be a positive int"):
        LaneBatcher(good, 2, -1, **kw)
    with pytest.raises(ValueError, match="schedule has 3 horizons but the model has 2 layers"):
        tiny_config(horizons=[4, 4, 4])
    with pytest.raises(ValueError, match="horizon of layer 1"):
        tiny_config(horizons=[4, -2])
    with pytest.raises(ValueError, match="max_steps and/or epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="batch_lanes"):
        TrainConfig(max_steps=1, batch_lanes=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(max_steps=1, lr=1e-3, min_lr=1e-2)


def test_data_object_duck_type(tmp_path):
    class Cache:
        vocab_size, pad_id, bos_id, eos_id = 19, PAD, BOS, EOS
        tokenizer_config = {"kind": "test"}

        def pieces(self, split):
            return motif_corpus(3 if split == "train" else 2, seed=len(split), reps=(2, 4))

    cfg = TrainConfig(out_dir=str(tmp_path), batch_lanes=2, max_steps=2, eval_every=0, log_every=1, plot=False)
    s = train(tiny_config(), cfg, data=Cache())
    assert s["val"] is not None and s["val"]["tokens"] > 0
    assert load_checkpoint(tmp_path / "last.pt")["tokenizer_config"] == {"kind": "test"}


def test_autocast_bf16_runs(tmp_path):
    pieces = motif_corpus(3, seed=7, reps=(2, 5))
    cfg = TrainConfig(out_dir=str(tmp_path), batch_lanes=2, max_steps=3, autocast=True, eval_every=0,
                      log_every=1, plot=False)
    s = train(tiny_config(horizons=[8, None]), cfg, pieces, pieces[:1], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    # bf16 tracks fp32: the same run without autocast logs the same losses up to bf16 rounding
    cfg32 = TrainConfig(**{**cfg.to_dict(), "autocast": False, "out_dir": str(tmp_path / "fp32")})
    s32 = train(tiny_config(horizons=[8, None]), cfg32, pieces, pieces[:1], pad_id=PAD, bos_id=BOS, eos_id=EOS)

    def losses(summary):
        recs = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
        return [r["loss"] for r in recs if r.get("type") == "train"]

    bf16, fp32 = losses(s), losses(s32)
    assert len(bf16) == len(fp32) == 3
    assert bf16 == pytest.approx(fp32, rel=2e-3) and bf16 != fp32  # close, and really in bf16
    assert s["val"]["nll"] == pytest.approx(s32["val"]["nll"], rel=2e-3)
    # resumable from a bf16 memory state
    cfg2 = TrainConfig(**{**cfg.to_dict(), "max_steps": 4})
    assert train(tiny_config(horizons=[8, None]), cfg2, pieces, pieces[:1], pad_id=PAD, bos_id=BOS,
                 eos_id=EOS, resume=True)["step"] == 4
    assert Path(s["metrics"]).exists()


def test_cpu_optimizer_is_the_fused_adamw_and_matches_the_foreach_step():
    from dsmr.train import configure_optimizer

    torch.manual_seed(0)
    model = DSMRModel(tiny_config())
    twin = DSMRModel(tiny_config())
    twin.load_state_dict(model.state_dict())
    cfg = TrainConfig(max_steps=1, lr=1e-2)
    fused = configure_optimizer(model, cfg, torch.device("cpu"))
    assert fused.defaults.get("fused") is True
    plain = torch.optim.AdamW([{"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        for m in (model, twin):
            for p in m.parameters():
                p.grad = torch.ones_like(p) * 0.5 + p.detach() * 0.1
        fused.step()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_resume_adopts_the_calibrated_cpu_paths_of_the_run_it_continues(tmp_path, monkeypatch):
    """Timings differ between processes: a resumed run that calibrated anew could take another
    CPU attention path (and round differently). The checkpoint carries the choices instead."""
    from dsmr_kernels import cpu_dispatch as cd

    monkeypatch.setattr(cd, "_CALIBRATED", {})
    # Every timed run takes one tick, so calibrating anew would pick the first candidate, flash:
    # only the restored choice can make it tiled.
    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(cd, "_clock", lambda: next(ticks))
    chosen = [["bwd", "fp32", f"segment/{b}", torch.get_num_threads(), "tiled"]
              for b in sorted({cd.memory_bucket(m) for m in (0, 1, 2048, 8192)})]
    cd.load_calibration(chosen)
    assert cd.calibration_state() == chosen
    pieces = motif_corpus(4, seed=1, reps=(2, 5))
    cfg = TrainConfig(out_dir=str(tmp_path), batch_lanes=2, max_steps=2, eval_every=0, ckpt_every=2,
                      log_every=1, seed=0, plot=False)
    train(tiny_config(), cfg, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    saved = load_checkpoint(tmp_path / "last.pt")["cpu_paths"]
    assert saved == [chosen]
    cd.clear_calibration()  # a new process knows nothing
    cfg2 = TrainConfig(**{**cfg.to_dict(), "max_steps": 3})
    train(tiny_config(), cfg2, pieces, None, pad_id=PAD, bos_id=BOS, eos_id=EOS, resume=True)
    assert cd.calibration_state() == chosen
