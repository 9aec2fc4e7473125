"""Speed of ``torchrun --nproc-per-node N -m saelab train`` (data-parallel) against one process
on the same cores.

Runs the real command twice on the default model (SmolLM2-135M, ``blocks.6.hook_resid_post``,
TopK x16 k=32) over the same text and token budget: once as one process with N threads
(``OMP_NUM_THREADS=N``), once as N torchrun processes (gloo) with one thread each, so both use
the same N cores. Reports each run's training throughput (the last ``tokens_per_s`` of its
``train_log.jsonl``: tokens over the time since training started, model forward passes and the
first buffer fill included, model loading not) and wall time, the speed-up of the data-parallel
run, and the load average of the machine around the runs (a shared machine slows both). With
``--one-thread`` it also times one process with one thread (the single-core baseline).

Prints one JSON line.

Example::

    python benchmarks/distributed_speedup.py                    # 49k tokens, ~minutes on 2 cores
    python benchmarks/distributed_speedup.py --tokens 8192 --batch-size 1024   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2, help="torchrun processes = cores used")
    p.add_argument("--tokens", type=int, default=49_152, help="training tokens (12 steps)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--buffer-size", type=int, default=16_384, help="shuffle buffer (global)")
    p.add_argument("--model", default="default")
    p.add_argument("--one-thread", action="store_true", help="also time 1 process, 1 thread")
    p.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    return p.parse_args(argv)


def train_args(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        "-q",
        "train",
        "--model",
        args.model,
        "--tokens",
        str(args.tokens),
        "--batch-size",
        str(args.batch_size),
        "--set",
        f"data.buffer_size={args.buffer_size}",
        "--set",
        "train.log_every_steps=1000000",  # one log line: the last step's
        "--out",
        str(out),
    ]


def timed(command: list[str], threads: int, out: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    return {"tokens_per_s": round(last["tokens_per_s"], 1), "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        saelab = [sys.executable, "-m", "saelab"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        torchrun += [f"--nproc-per-node={n}", "-m", "saelab"]
        load_before = os.getloadavg()
        runs = {}
        if args.one_thread:
            out = root / "one_process_1_thread"
            runs["one_process_1_thread"] = timed([*saelab, *train_args(args, out)], 1, out)
        out = root / f"one_process_{n}_threads"
        runs[f"one_process_{n}_threads"] = timed([*saelab, *train_args(args, out)], n, out)
        out = root / f"ddp_{n}_processes"
        runs[f"ddp_{n}_processes_1_thread"] = timed([*torchrun, *train_args(args, out)], 1, out)
        load_after = os.getloadavg()
    ddp = runs[f"ddp_{n}_processes_1_thread"]["tokens_per_s"]
    result = {
        "benchmark": "distributed_speedup",
        "model": args.model,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "cores": n,
        "runs": runs,
        "speedup_vs_one_process_same_cores": round(
            ddp / runs[f"one_process_{n}_threads"]["tokens_per_s"], 3
        ),
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "cpu_count": os.cpu_count(),
    }
    if args.one_thread:
        single = runs["one_process_1_thread"]["tokens_per_s"]
        result["speedup_vs_one_core"] = round(ddp / single, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
