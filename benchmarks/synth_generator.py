"""Is the synthetic generator ever the bottleneck? Rows/s of drawing synthetic batches vs rows/s
of a TopK training step at the same d and width, measured in the same process.

For each size (d, n_features; the SAE has width = n_features, as ``saelab bench synth`` trains
it) it times ``SyntheticActivations.batch`` (rows and their truth, what the trainer's stream
draws per step) and ``Trainer._train_step`` of a TopK SAE on those rows, both on the same batch
size and thread count, and prints one JSON line per size with ``ratio`` = generator rows/s ÷
train-step rows/s (> 1: the generator keeps up), and the time of each per row, so how each grows
with size can be read off.

Example::

    python benchmarks/synth_generator.py --sizes 256x4096 768x16384 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.data.synthetic import SYNTHETIC_HOOK, SyntheticActivations, SyntheticConfig
from saelab.saes import architecture_class
from saelab.training.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["64x1024", "256x4096", "768x16384"],
        help="DxN pairs: activation width d and true features N (= SAE width)",
    )
    p.add_argument("--mean-active", type=float, default=25.0, help="true L0 (also the SAE's k)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    return p.parse_args(argv)


def _median_time(fn, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn(i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(d: int, n: int, args: argparse.Namespace) -> dict:
    parents = min(64, n // 24)
    world = SyntheticConfig(d=d, n_features=n, mean_active=args.mean_active, n_parents=parents)
    stream = SyntheticActivations(world, args.batch_size, seed=0)
    gen_s = _median_time(stream.batch, args.steps, args.warmup)

    cfg = SAEConfig(hook=SYNTHETIC_HOOK, architecture="topk", width=n, k=round(args.mean_active))
    sae = architecture_class("topk")(cfg, d, seed=0)
    train = TrainConfig(tokens=args.batch_size * 10_000, batch_size=args.batch_size)
    trainer = Trainer([sae], train, None, progress=False, tensorboard=False)
    batches = [stream.batch(i).x_BD * stream.scale for i in range(2)]
    trainer._init_from_first_batch({SYNTHETIC_HOOK: batches[0]}, stream)
    trainer.step = 1_000  # on the flat part of the learning-rate schedule
    state = trainer.states[0]

    def step(i: int) -> None:
        trainer._train_step(state, batches[i % 2])
        trainer.step += 1

    step_s = _median_time(step, args.steps, args.warmup)
    rows = args.batch_size
    return {
        "d": d,
        "n_features": n,
        "sae_width": n,
        "batch_size": rows,
        "threads": torch.get_num_threads(),
        "generator_rows_per_s": round(rows / gen_s),
        "topk_step_rows_per_s": round(rows / step_s),
        "ratio": round(step_s / gen_s, 2),
        "generator_us_per_row": round(gen_s / rows * 1e6, 2),
        "topk_step_us_per_row": round(step_s / rows * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        d, n = (int(v) for v in size.lower().split("x"))
        print(json.dumps(measure(d, n, args)), flush=True)


if __name__ == "__main__":
    main()
