"""An oracle for the training loop, independent of the trainer's batcher, loss and state handling.

The test trains a tiny model for several optimizer steps and recomputes every step by hand from
the model's own logits: which segment of which piece each lane holds (simulated here from the
documented rule: lanes take the next piece of the stream of epoch orders when free, lowest lane
first, crossing epoch boundaries), the segment's inputs and targets cut out of
``[BOS] + ids + [EOS]`` (BOS only at a piece's start, EOS only at its end, nothing for padding),
and the memory each segment sees, rebuilt from the piece's start (so a lane that starts a piece
has an empty memory) with the parameters that were current when each earlier segment ran.

What ``train(...)`` did is read from its public outputs: ``metrics.jsonl`` (loss and token count
of every step) and the checkpoints (``ckpt_every=1``; a callback keeps a copy of each). With
``beta1 = 0`` and no clipping, AdamW's first moment after step k *is* the gradient of step k, so
the checkpoint's optimizer state gives what was backpropagated, compared with autograd of the
hand-computed loss. The parameters before step 1 follow from step 1's update (constant lr, no
weight decay): ``p0 = p1 + lr * m / (sqrt(v / (1 - beta2)) + eps)``.
"""
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsmr import DSMRConfig, DSMRModel
from dsmr.train import TrainConfig, train

PAD, BOS, EOS = 0, 1, 2
V = 23
LR, BETA2, EPS = 1e-2, 0.95, 1e-8
# Raw piece lengths (ids, without BOS/EOS). With S = 4 a piece has ceil((L + 1) / 4) segments;
# 3 and 7 fill their last segment exactly (no padding), 1 is a single short segment.
LENGTHS = [6, 1, 9, 3, 7, 10]


def _pieces(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, V, size=n) for n in LENGTHS]


def _schedule(lengths, B, S, n_batches):
    """Per batch, per lane: ``(epoch, piece, segment index)``, from the documented rule.

    Independent of ``LaneBatcher``: the pieces form one stream, epoch 0's order then epoch 1's
    and so on (corpus order, shuffle off); a free lane (its piece ended, or the run just began)
    takes the next piece of the stream, lanes in index order, also across an epoch boundary, so
    no lane idles.
    """
    n_seg = [-(-(L + 1) // S) for L in lengths]
    stream = ((e, p) for e in itertools.count() for p in range(len(lengths)))
    out, lanes = [], [None] * B
    while len(out) < n_batches:
        row = []
        for b in range(B):
            if lanes[b] is None or lanes[b][2] == n_seg[lanes[b][1]]:
                lanes[b] = next(stream) + (0,)
            row.append(lanes[b])
            lanes[b] = lanes[b][:2] + (lanes[b][2] + 1,)
        out.append(row)
    return out


def _segment(piece, j, S):
    """Inputs and targets of segment j of ``[BOS] + piece + [EOS]`` (real positions only)."""
    seq = torch.tensor(np.concatenate([[BOS], piece, [EOS]]), dtype=torch.long)
    inputs, targets = seq[:-1], seq[1:]
    return inputs[j * S:(j + 1) * S], targets[j * S:(j + 1) * S]


def _model_at(config, state_dict):
    m = DSMRModel(config)
    m.load_state_dict(state_dict)
    return m.train()


def _run(tmp_path, config, B, grad_accum, max_steps):
    """Train; return (per-step train records, checkpoints [p_1 .. p_N] as state dicts)."""
    out = tmp_path / "run"
    copies = {}

    def keep(step, record):
        # At callback(k) (k >= 2) last.pt holds the checkpoint written before step k: p_{k-1}.
        if step >= 2:
            dst = tmp_path / f"ck{step - 1}.pt"
            shutil.copy(out / "last.pt", dst)
            copies[step - 1] = dst

    cfg = TrainConfig(out_dir=str(out), batch_lanes=B, grad_accum=grad_accum, max_steps=max_steps,
                      lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.0, beta1=0.0, beta2=BETA2,
                      grad_clip=0.0, shuffle=False, seed=5, eval_every=0, ckpt_every=1, log_every=1,
                      plot=False, progress=False, device="cpu")
    train(config, cfg, _pieces(), pad_id=PAD, bos_id=BOS, eos_id=EOS, callback=keep)
    copies[max_steps] = out / "last.pt"
    cks = [torch.load(copies[k], map_location="cpu", weights_only=True) for k in range(1, max_steps + 1)]
    assert [c["step"] for c in cks] == list(range(1, max_steps + 1))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("type") == "train"]
    assert [r["step"] for r in recs] == list(range(1, max_steps + 1))
    return recs, cks


def _first_moments(model, ck):
    """The optimizer's exp_avg per parameter of ``model`` (beta1 = 0: the step's gradient).

    The trainer's AdamW holds two groups, matrices (decayed) then vectors, each in
    ``model.parameters()`` order; the shapes are checked so a regrouping fails loudly here.
    """
    params = list(model.parameters())
    order = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]
    idx = [i for g in ck["optimizer"]["param_groups"] for i in g["params"]]
    assert len(idx) == len(order), "optimizer does not hold every parameter"
    state = ck["optimizer"]["state"]
    out = {}
    for i, p in zip(idx, order):
        m = state[i]["exp_avg"]
        assert m.shape == p.shape, "optimizer groups no longer (matrices, vectors) in parameter order"
        out[p] = (m, state[i]["exp_avg_sq"])
    return out


def _initial_params(config, ck1):
    """p_0 from p_1 and AdamW's first update (beta1 = 0, constant lr, no weight decay)."""
    m1 = _model_at(config, ck1["model"])
    with torch.no_grad():
        for p, (m, v) in _first_moments(m1, ck1).items():
            p.add_(LR * m / ((v / (1 - BETA2)).sqrt() + EPS))
    return m1.state_dict()


def _oracle_step(models, step_of, sched, batches, pieces, S, train_model):
    """Hand-computed loss of one optimizer step and its token count.

    ``batches``: indices of the segment batches of this step; ``models[t]``: the model whose
    parameters were current at batch t; ``step_of[(epoch, piece, j)]``: the batch in which that
    segment ran (its memory is rebuilt with the parameters of that time).
    """
    nll, count = 0.0, 0
    for t in batches:
        for lane in sched[t]:
            if lane is None:
                continue
            e, p, j = lane
            state = None  # a lane that starts a piece starts from nothing
            with torch.no_grad():  # memory is detached state: built, never differentiated
                for k in range(j):
                    x, _ = _segment(pieces[p], k, S)
                    _, state = models[step_of[(e, p, k)]](x[None], state)
            x, y = _segment(pieces[p], j, S)
            logits, _ = train_model(x[None], state)
            nll = nll + F.cross_entropy(logits[0].double(), y, reduction="sum")
            count += len(y)
    return nll / count, count


@pytest.mark.parametrize(
    "n_kv_heads,horizons,B,grad_accum,steps",
    [
        (1, [None, 3, 0], 2, 1, 9),  # GQA 4:1, whole history / short / none; epoch 1 starts at step 6
        (2, [5, None, 2], 3, 2, 4),  # GQA 2:1, three lanes, two batches per optimizer step
    ],
)
def test_every_step_loss_and_gradient_match_a_hand_computed_loss(tmp_path, n_kv_heads, horizons, B,
                                                                 grad_accum, steps):
    S = 4
    config = DSMRConfig(vocab_size=V, n_layers=3, d_model=32, n_heads=4, n_kv_heads=n_kv_heads,
                        segment_len=S, horizons=horizons)
    pieces = _pieces()
    recs, cks = _run(tmp_path, config, B, grad_accum, steps)
    sched = _schedule(LENGTHS, B, S, steps * grad_accum)
    if B == 2:  # the layout this case is meant to cover, spelled out
        assert sched[:3] == [[(0, 0, 0), (0, 1, 0)], [(0, 0, 1), (0, 2, 0)], [(0, 3, 0), (0, 2, 1)]]
        # lane 0 takes epoch 1's first piece while lane 1 finishes epoch 0: no idle lane
        assert sched[5:8] == [[(1, 0, 0), (0, 5, 1)], [(1, 0, 1), (0, 5, 2)], [(1, 1, 0), (1, 2, 0)]]
    step_of = {lane: t for t, row in enumerate(sched) for lane in row if lane is not None}
    states = [_initial_params(config, cks[0])] + [c["model"] for c in cks]  # p_0 .. p_N
    models = {t: _model_at(config, states[t // grad_accum]) for t in range(len(sched))}

    for k in range(steps):  # optimizer step k + 1 runs with p_k
        batches = list(range(k * grad_accum, (k + 1) * grad_accum))
        train_model = _model_at(config, states[k])
        loss, count = _oracle_step(models, step_of, sched, batches, pieces, S, train_model)
        rec = recs[k]
        assert rec["tokens"] == count, f"step {k + 1}: {rec['tokens']} loss tokens, expected {count}"
        assert rec["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6), f"step {k + 1} loss"

        grads = torch.autograd.grad(loss, list(train_model.parameters()))
        logged = _first_moments(train_model, cks[k])
        # fp32 summation error scales with the largest gradient anywhere (later steps' gradients
        # are small sums of larger per-token terms), so the bound has a per-tensor and a global part.
        top = max(float(g.abs().max()) for g in grads)
        for (name, p), g in zip(train_model.named_parameters(), grads):
            err = float((logged[p][0].double() - g).abs().max())
            scale = float(g.abs().max())
            assert err <= 2e-4 * scale + 2e-6 * top, (
                f"step {k + 1}: gradient of {name} differs from the hand-computed loss's by {err:.3e} "
                f"(max |grad| {scale:.3e})")
