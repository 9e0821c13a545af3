"""``dsmr generate``: continue a MIDI prompt (or ids, or BOS) and write MIDI file(s)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_checkpoint_args, add_threads_arg, die, load_checkpoint, write_json


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a MIDI prompt and write a MIDI file")
    add_checkpoint_args(p)
    add_threads_arg(p)
    p.add_argument("--prompt", help="a .mid/.midi file to continue (default: start from BOS)")
    p.add_argument("--prompt-ids", help="or token ids, comma-separated")
    p.add_argument("--prompt-bars", default=None, metavar="A:B",
                   help="use bars A to B of the prompt MIDI (numbered from 1; A: or :B leave an end open)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="use only the first N tokens of the prompt MIDI (after --prompt-bars)")
    p.add_argument("--out", required=True, help="output .mid path")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ids-out", help="also write the token ids as JSON (a list of lists with --num-samples)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="continuations of the prompt, decoded together as a batch; files OUT_1.mid, OUT_2.mid, ...")
    p.add_argument("--grammar", action=argparse.BooleanOptionalAction, default=True,
                   help="mask every token that would break the tokenizer's grammar, so the MIDI decodes "
                        "without MidiTok tokens_errors (default: on; --no-grammar samples freely)")
    p.set_defaults(func=run)


def _prompt(args, tokenizer, bos) -> list:
    """The prompt ids: BOS + the MIDI file's ids, the given ids, or BOS alone."""
    from ..tokenizer import midi_to_ids, parse_bar_range, slice_bars

    if args.prompt_bars and not args.prompt:
        die("--prompt-bars needs a MIDI --prompt")
    if args.prompt:
        try:
            ids = midi_to_ids(args.prompt, tokenizer)
        except Exception as e:  # noqa: BLE001 - any unreadable MIDI gets the same clear message
            die(f"cannot read prompt {args.prompt}: {e}")
        if args.prompt_bars:
            try:
                ids = slice_bars(ids, tokenizer, *parse_bar_range(args.prompt_bars))
            except ValueError as e:
                die(f"--prompt-bars: {e}")
        if args.prompt_tokens is not None:
            if args.prompt_tokens < 1:
                die("--prompt-tokens must be >= 1")
            ids = ids[: args.prompt_tokens]
        return [bos] + [int(t) for t in ids]
    if args.prompt_ids:
        try:
            return [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            die("--prompt-ids must be integers separated by commas")
    return [bos]


def run(args) -> int:
    from ..generate import generate, generate_samples
    from ..tokenizer import build_tokenizer

    model, info = load_checkpoint(args)
    vocab = info.get("vocab") or {}
    if not info.get("tokenizer_config"):
        die(f"{args.checkpoint} carries no tokenizer config, so ids cannot be turned into MIDI")
    tokenizer = build_tokenizer(info["tokenizer_config"])
    prompt = _prompt(args, tokenizer, vocab.get("bos_id"))
    if args.num_samples < 1:
        die(f"--num-samples must be >= 1, got {args.num_samples}")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    eos_id=vocab.get("eos_id"), progress=True, grammar=_grammar(args, tokenizer),
                    threads=args.threads or "auto")
    try:
        if args.num_samples == 1:
            samples = [generate(model, prompt, args.max_new_tokens, **sampling)]
        else:
            samples = generate_samples(model, prompt, args.max_new_tokens, args.num_samples, **sampling)
    except ValueError as e:
        die(str(e))
    _write(args, tokenizer, prompt, samples)
    return 0


def _grammar(args, tokenizer):
    """The tokenizer's grammar for sampling, or None with ``--no-grammar``."""
    if not args.grammar:
        return None
    from ..grammar import TokenGrammar

    try:
        return TokenGrammar(tokenizer)
    except ValueError as e:
        die(f"{e.args[0].split('; ')[0]}; rerun with --no-grammar")


def _write(args, tokenizer, prompt, samples) -> None:
    """One MIDI file per sample (``OUT`` alone, or ``OUT_1.mid``, ``OUT_2.mid``, ...) and the ids."""
    import numpy as np

    from ..grammar import grammar_error_ratio
    from ..tokenizer import ids_to_midi

    base = Path(args.out)
    width = len(str(len(samples)))
    for i, res in enumerate(samples, 1):
        path = base if len(samples) == 1 else base.with_name(f"{base.stem}_{i:0{width}d}{base.suffix or '.mid'}")
        out = ids_to_midi(np.asarray(res["tokens"]), tokenizer, path)
        label = "" if len(samples) == 1 else f"sample {i}: "
        errors = grammar_error_ratio(res["tokens"], tokenizer)
        print(f"{label}prompt {len(prompt):,} tokens + {len(res['new_tokens']):,} new -> {out}"
              + (" (stopped at EOS)" if res["stopped_at_eos"] else "") + f"; MidiTok tokens_errors {errors:.3f}")
    if args.ids_out:
        write_json(args.ids_out, samples[0]["tokens"] if len(samples) == 1 else [r["tokens"] for r in samples])
