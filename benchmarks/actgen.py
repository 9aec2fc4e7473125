"""Activation generation against its bound: saelab's stream beside a bare early-stopped forward.

For each size (activation rows the stream must deliver), in the same run and on the same token
batches:

* **bare**: the base model with its blocks cut after the deepest hook's block (``layers[:L+1]``,
  no hooks, no LM head) on already-tokenised batches: the model's own speed, the bound;
* **stream**: a fresh :class:`~saelab.data.activations.ActivationStream` (fresh text iterator,
  as ``saelab train`` builds it) serving ``size`` rows in training batches: tokenising, packing,
  masking, the hooked forward pass that stops after the hook, scaling and shuffling — what
  training from the model waits for.

Both count model input tokens (``model_batch_size × context`` per forward). Rounds alternate the
two, so machine load hits both alike; medians over rounds are printed, one JSON line per size,
with ``ratio = stream tok/s ÷ bare tok/s``. ``--profile`` adds the stream's top functions by
cumulative time (cProfile) for the largest size.

Example::

    python benchmarks/actgen.py                                # default model, 2 sizes, ~minutes
    python benchmarks/actgen.py --sizes 4096 16384 --rounds 2  # quicker
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

from _model_bench import default_batches, load, parser
from saelab.config import DataConfig, RunConfig, SAEConfig, TrainConfig
from saelab.models.hookpoints import decoder_blocks, hook_layer
from saelab.training.run import model_activation_stream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768], help="rows per stream")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch (rows)")
    p.add_argument("--model-batch-size", type=int, default=DataConfig().model_batch_size)
    p.add_argument("--context", type=int, default=DataConfig().context)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print the stream's cProfile top 15")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, size: int) -> RunConfig:
    return RunConfig(
        data=DataConfig(
            context=args.context, model_batch_size=args.model_batch_size, buffer_size=size
        ),
        train=TrainConfig(tokens=size, batch_size=args.batch_size),
        saes=(SAEConfig(hook=args.hook),),
    )


def stream_rows(model, tokenizer, cfg: RunConfig, size: int) -> tuple[float, int]:
    """Seconds for a fresh stream to serve ``size`` rows, and the forward passes it ran."""
    stream = model_activation_stream(cfg, model, tokenizer)
    started, served = time.perf_counter(), 0
    for batch in stream:
        served += next(iter(batch.values())).shape[0]
        if served >= size:
            break
    return time.perf_counter() - started, stream.token_batches.batches_yielded


@torch.no_grad()
def bare_forward(model, layer: int, batches: list[torch.Tensor]) -> float:
    """Seconds for the base model cut after block ``layer`` over ``batches``."""
    blocks = decoder_blocks(model)
    parent = model.base_model
    name = next(n for n, m in parent.named_children() if m is blocks)
    started = time.perf_counter()
    setattr(parent, name, blocks[: layer + 1])
    try:
        for tokens_NP in batches:
            parent(tokens_NP, use_cache=False)
    finally:
        setattr(parent, name, blocks)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load(args)
    layer = hook_layer(model, args.hook)
    tokens_per_forward = args.model_batch_size * args.context
    for size in args.sizes:
        cfg = run_config(args, size)
        _, n_forwards = stream_rows(model, tokenizer, cfg, size)  # warm-up; counts the passes
        batches = default_batches(
            tokenizer, n_forwards, context=args.context, batch_size=args.model_batch_size, seed=0
        )
        stream_s, bare_s = [], []
        for _ in range(args.rounds):
            bare_s.append(bare_forward(model, layer, batches))
            stream_s.append(stream_rows(model, tokenizer, cfg, size)[0])
        tokens = n_forwards * tokens_per_forward
        bare, stream = tokens / statistics.median(bare_s), tokens / statistics.median(stream_s)
        ratios = [b / s for b, s in zip(bare_s, stream_s, strict=True)]
        print(
            json.dumps(
                {
                    "rows": size,
                    "model_tokens": tokens,
                    "forwards": n_forwards,
                    "bare_tok_s": round(bare),
                    "stream_tok_s": round(stream),
                    "ratio": round(stream / bare, 3),
                    "ratio_per_round": [round(r, 3) for r in ratios],
                    "threads": args.threads,
                }
            ),
            flush=True,
        )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        stream_rows(model, tokenizer, run_config(args, args.sizes[-1]), args.sizes[-1])
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(15)
        print(out.getvalue())


if __name__ == "__main__":
    main()
