"""dsmr benchmarks: the op, memory schedules at model level, a peer comparison and generation.

    python bench/run.py                 # everything, default sizes (under 30 min on 2 CPU cores)
    python bench/run.py --quick         # smaller sizes (under 5 min on 2 CPU cores)
    python bench/run.py --only op,peer  # a subset
    python bench/run.py --only study    # the schedule study (dsmr study; not part of the default run)

Tables are printed and written to ``bench/results/`` as markdown (``<section>.md``, and all of them
in ``README.md``), CSV (``<section>.csv``) and PNG plots. Every model-level configuration runs in
its own process so its peak memory is its own; every ratio compares configurations measured in
the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# `python bench/run.py` puts bench/ first on sys.path; the helpers are imported as `bench.*`.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("op", "schedules", "peer", "generation", "contention")
OPTIONAL = ("study",)  # run only when named in --only
TITLES = {
    "op": "1. Op: segment_memory_attention",
    "schedules": "2. Memory schedules at model level",
    "peer": "3. Peer: DSMR vs x-transformers",
    "generation": "4. Generation with bounded caches",
    "contention": "5. Training beside a busy process",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "sections:\n"
            "  op          forward and forward+backward time / GFLOP/s of segment_memory_attention per backend,\n"
            "              M in {0, 1024, 4096}, fp32 and bf16, against a same-run matmul ceiling\n"
            "  schedules   training tokens/s and peak memory of every schedule family on one long piece\n"
            "  peer        DSMR vs x-transformers (hidden-state memory, re-projected every segment)\n"
            "  generation  the decode engine: tokens/s of the tiny and small shapes at batch 1 and 8 on 1 and all\n"
            "              threads beside their arithmetic limit, time to first token after 4k/32k prompts,\n"
            "              per-token time to 64k tokens, peak RSS, x-transformers' cached generation\n"
            "  contention  dsmr.train.train tokens/s idle and beside one busy process, per thread policy\n"
            "  study       (only with --only study) dsmr study: every schedule family trained and compared; its\n"
            "              rows live in runs/study (resumable), study.csv/md/png are copied to the results folder\n"
        ),
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (< 5 min on 2 cores)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="folder for the markdown, CSV and PNG results (default: bench/results)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch intra-op threads in every measuring process (default: all logical CPUs)")
    p.add_argument("--generation-threads", type=int, default=1,
                   help="torch threads of the generation workers' process (each row then sets its own: 1 or all; "
                        "default 1: batch-1 decoding is a chain of "
                        "tiny ops where a second thread saves little and a busy core stalls every op)")
    p.add_argument("--rounds", type=int, default=None,
                   help="runs of every schedules/peer configuration; each segment keeps its fastest step (default: 2, quick: 1)")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="seconds one worker process may run before it is counted as failed (default 1200)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS + OPTIONAL]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS + OPTIONAL)}")
    args.sections = [s for s in SECTIONS if s in only]
    args.study = "study" in only
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    return args


#: Seconds per section when no earlier run of the same mode is on record (2-core CPUs).
FALLBACK_SECTION_S = {
    False: {"op": 90, "schedules": 330, "peer": 130, "generation": 520, "contention": 200},
    True: {"op": 30, "schedules": 60, "peer": 30, "generation": 90, "contention": 70},
}


def section_estimates(args) -> dict:
    """Expected seconds per section: the last run of the same mode (``run.json`` in the results
    folder) where it ran that section, else a fallback measured on 2-core CPUs."""
    est = dict(FALLBACK_SECTION_S[bool(args.quick)])
    try:
        last = json.loads((args.out / "run.json").read_text())
        if bool(last.get("quick")) == bool(args.quick):
            for name, meta in last.get("per_section", {}).items():
                est[name] = float(meta["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return est


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def run_workers(module: str, configs, args, bar, threads: int, rounds: int):
    """Run each configuration in its own process, ``rounds`` times, advancing the progress bar.

    Rounds alternate the order (forward, then backward, ...) so a slow stretch on a shared
    machine does not always hit the same configurations; ``merge_rounds`` keeps the best.
    """
    from bench.common import merge_rounds, run_worker

    runs = {i: [] for i in range(len(configs))}
    for r in range(rounds):
        order = list(range(len(configs)))
        for i in order if r % 2 == 0 else order[::-1]:
            cfg = configs[i]
            if r >= cfg.get("rounds", rounds):
                continue  # a configuration that asks for fewer rounds (the long `small` preset rows)
            tag = f" (round {r + 1}/{rounds})" if rounds > 1 else ""
            bar.set_postfix_str(f"{module.split('.')[-1]}: {cfg['label']}{tag}"[:80])
            res = run_worker(module, cfg, threads, args.timeout)
            if not res.ok:
                bar.write(f"  ! {cfg['label']}: {res.error}")
            runs[i].append(res)
            bar.update(1)
    return [(configs[i], merge_rounds(runs[i])) for i in range(len(configs))]


def write_index(out_dir: Path, machine_md: str, run_meta: dict) -> None:
    """README.md: every section's latest markdown, in order, under one header."""
    parts = [
        "# dsmr benchmark results",
        "",
        f"Latest run: `{run_meta['command']}` ({'quick' if run_meta['quick'] else 'default'} mode), "
        f"{run_meta['wall_s'] / 60:.1f} min wall, sections {', '.join(run_meta['sections'])}. "
        "Each section below carries the machine block of the run that produced it; "
        "the CSV files hold the same tables, the PNGs the plots.",
        "",
    ]
    for name in SECTIONS:
        path = out_dir / f"{name}.md"
        if path.exists():
            body = path.read_text()
            # Demote the section's headings by one level under the index's title.
            body = "\n".join("#" + ln if ln.startswith("#") else ln for ln in body.splitlines())
            parts += [body, ""]
    (out_dir / "README.md").write_text("\n".join(parts))


def run_study_section(args) -> None:
    """``dsmr study`` (``--quick`` with --quick) in runs/study[-quick], its three files copied to ``args.out``."""
    import torch

    from dsmr.study import StudyConfig, run_study

    torch.set_num_threads(args.threads)
    work = REPO / "runs" / ("study-quick" if args.quick else "study")
    res = run_study(work, StudyConfig.quick() if args.quick else StudyConfig(), progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for key in ("csv", "markdown", "plot"):
        if res[key]:
            shutil.copy(res[key], args.out / Path(res[key]).name)
    print(f"study: {work} -> {args.out}/study.csv, study.md, study.png", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.study:
        run_study_section(args)
        if not args.sections:
            return 0
    from tqdm.auto import tqdm

    from bench import common

    common.set_threads(args.threads)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    info = common.machine_info(args.threads)
    info["torch threads"] = f"{args.threads} (generation section: {args.generation_threads})"
    info["mode"] = "quick" if args.quick else "default"
    machine_md = common.machine_markdown(info)
    print("Machine:\n" + machine_md + "\n", flush=True)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: 1-min load average is {busy:.2f} on {os.cpu_count()} CPUs: other processes are "
              "running and will distort the timings (see the load columns).\n", flush=True)

    t_start = time.perf_counter()
    # The piece travels to the workers as a temporary .npy file, outside the results folder.
    tmp_dir = tempfile.mkdtemp(prefix="dsmr-bench-")
    plans, piece, piece_path = {}, None, os.path.join(tmp_dir, "piece.npy")
    if set(args.sections) & {"schedules", "peer", "generation", "contention"}:
        from bench import model_level, piece as piece_mod

        s = model_level.setting(args.quick)
        need = s["n_segments"] * model_level.MODEL["segment_len"] + 1
        print(f"Resolving the benchmark piece (>= {need:,} tokens) ...", flush=True)
        piece = piece_mod.resolve(need, Path(piece_path))
        print(("NOTE: " if piece["synthetic"] else "") + f"piece: {piece['source']}\n", flush=True)

    from bench import contention, generation, model_level, op, peer

    modules = {"schedules": model_level, "peer": peer, "generation": generation, "contention": contention}
    for name in args.sections:
        if name == "op":
            plans[name] = op.plan(args.quick)
        elif name == "contention":
            plans[name] = contention.plan(args.quick, piece, piece_path, args.threads)
        else:
            plans[name] = modules[name].plan(args.quick, piece, piece_path)
    once = ("op", "generation", "contention")  # one round: contention's busy rows are slow by design
    total = sum(min(c.get("rounds", args.rounds) if isinstance(c, dict) else 1, 1 if k in once else args.rounds)
                for k, v in plans.items() for c in v)

    section_meta = {}
    est = section_estimates(args)
    left = sum(est.get(n, 60.0) for n in args.sections)
    print(f"Estimated wall time: {left / 60:.0f} min ({', '.join(f'{n} ~{est.get(n, 60.0) / 60:.1f}' for n in args.sections)}"
          " min; from the last run of this mode in run.json, else 2-core defaults: another CPU may differ)\n", flush=True)
    with tqdm(total=total, desc="bench", unit="config", dynamic_ncols=True) as bar:
        for name in args.sections:
            t0 = time.perf_counter()
            load0 = _load()
            bar.write(f"-- {name}: expected ~{est.get(name, 60.0) / 60:.1f} min; about {left / 60:.0f} min left in all")
            if name == "op":
                sec = op.section(args.quick, args.threads, bar, out_dir)
            else:
                gen = name == "generation"
                threads = args.generation_threads if gen else args.threads
                results = run_workers(modules[name].__name__, plans[name], args, bar, threads,
                                      1 if name in once else args.rounds)
                if name == "schedules":
                    sec = model_level.render(results, args.quick, piece, out_dir, args.rounds)
                elif name == "peer":
                    sec = peer.render(results, args.quick, piece, args.rounds)
                elif name == "contention":
                    sec = contention.render(results, args.quick, piece, args.threads)
                else:
                    sec = generation.render(results, args.quick, piece, out_dir, threads)
            wall = time.perf_counter() - t0
            left = max(0.0, left - est.get(name, 60.0))
            sec.markdown += (f"\n\n_Section wall time {wall:.0f} s; load average (1/5/15 min) "
                             f"{load0} at its start, {_load()} at its end._\n")
            path = common.write_section(sec, out_dir, machine_md)
            section_meta[name] = {"wall_s": round(wall, 1), "load_start": load0, "load_end": _load()}
            bar.write(f"\n=== {TITLES[name]} ===\n\n{sec.markdown}\n\n(written to {path})\n")

    wall = time.perf_counter() - t_start
    run_meta = {
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "sections": args.sections,
        "threads": args.threads,
        "generation_threads": args.generation_threads,
        "rounds": args.rounds,
        "wall_s": round(wall, 1),
        "per_section": section_meta,
        "machine": info,
        "piece": piece,
    }
    # Sections this run skipped keep their last timing (same mode): the ETA of the next full run
    # and the record of how long each committed table took stay complete.
    try:
        last = json.loads((out_dir / "run.json").read_text())
        if bool(last.get("quick")) == bool(args.quick):
            for name, meta in last.get("per_section", {}).items():
                if name not in section_meta:
                    section_meta[name] = {**meta, "from_run": meta.get("from_run", last.get("command"))}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    (out_dir / "run.json").write_text(json.dumps(run_meta, indent=2) + "\n")
    write_index(out_dir, machine_md, run_meta)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"Done in {wall / 60:.1f} min; results in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
