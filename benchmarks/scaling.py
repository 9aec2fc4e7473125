"""Scaling of the SAE training step: vectors/s and peak memory over width and k, with the peer.

For every (expansion, k) of the grid (expansion 8/16/32/64 at k 32, k 16/32/64/128 at x16) a
fresh subprocess times saelab's TopK step exactly as ``benchmarks/train_step.py`` does (its
``time_saelab``: a real ``Trainer`` on random batches with E‖x‖ = √d_in), records the peak
resident memory after it, then times SAELens' TopK step (``train_step.time_saelens``) on the same
batches and records the peak again. Prints one JSON line per point and a Markdown table.

Peak memory is ``ru_maxrss`` of the subprocess (torch, the batches and the SAE included); the
SAELens peak is the process's peak after both, so it is at least saelab's.

Example::

    python benchmarks/scaling.py --threads 2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

GRID = [(8, 32), (16, 32), (32, 32), (64, 32), (16, 16), (16, 64), (16, 128)]
"""(expansion, k): widths at k 32, then ks at x16."""


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_step  # the step timing and the SAELens peer live there

    step_args = train_step.parse_args(
        [
            "--arch",
            "topk",
            "--expansion",
            str(args.expansion),
            "--k",
            str(args.k),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
    )
    torch.set_num_threads(step_args.threads)
    torch.manual_seed(step_args.seed)
    batches = train_step.make_batches(step_args)
    ours = train_step.time_saelab(step_args, batches)
    row = {
        "expansion": args.expansion,
        "d_sae": step_args.d_in * args.expansion,
        "k": args.k,
        "batch_size": args.batch_size,
        "threads": step_args.threads,
        "saelab_vectors_per_s": round(ours["vectors_per_s"], 1),
        "saelab_peak_mib": round(_peak_mib()),
    }
    if not args.no_peer:
        peer_s = train_step.time_saelens(step_args, batches)
        if isinstance(peer_s, str):
            row["saelens_skipped"] = peer_s
        else:
            row["saelens_vectors_per_s"] = round(args.batch_size / peer_s, 1)
            row["ratio_vs_saelens"] = round(
                row["saelab_vectors_per_s"] * peer_s / args.batch_size, 2
            )
            row["peak_after_saelens_mib"] = round(_peak_mib())
    print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip SAELens")
    p.add_argument("--grid", default=None, help="points EXPANSIONxK,... (default: the full grid)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--expansion", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    grid = GRID
    if args.grid:
        grid = [tuple(int(v) for v in point.split("x")) for point in args.grid.split(",")]
    rows = []
    for expansion, k in grid:
        cmd = [sys.executable, __file__, "--child", "--expansion", str(expansion), "--k", str(k)]
        cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
        cmd += ["--no-peer"] if args.no_peer else []
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"x{expansion} k{k} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| expansion | d_sae | k | saelab vectors/s | peak MiB | SAELens vectors/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peer = r.get("saelens_vectors_per_s", "—")
        ratio = f"{r['ratio_vs_saelens']}×" if "ratio_vs_saelens" in r else "—"
        print(
            f"| x{r['expansion']} | {r['d_sae']} | {r['k']} | {r['saelab_vectors_per_s']:,.0f} | "
            f"{r['saelab_peak_mib']:,} | {peer} | {ratio} |"
        )


if __name__ == "__main__":
    main()
