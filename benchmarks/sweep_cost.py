"""Wall time of a 4-SAE sweep (one pass of the model) against four single-SAE runs.

Every run is :func:`saelab.training.run.train_run`, as ``saelab train`` runs it, with the same
token budget per SAE: the sweep trains four SAEs on one activation stream, the separate runs each
load the model and run it over the text again. The model's share is measured apart: loading it,
and drawing the same number of batches from an :class:`ActivationStream` with no SAE attached
(forward passes plus shuffling); ``sae_train_s`` is what remains of the sweep. With
``--with-cache`` the activations are also written once with ``saelab cache``'s writer and the four
SAEs trained from it one by one. Prints one JSON line.

Example::

    python benchmarks/sweep_cost.py                       # default model, 50k tokens, ~minutes
    python benchmarks/sweep_cost.py --tokens 8192 --batch-size 1024 --expansion 4   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from saelab.config import DataConfig, ModelConfig, RunConfig, SAEConfig, TrainConfig
from saelab.data.cache import write_activation_cache
from saelab.models.loading import load_model
from saelab.saes.registry import sae_folder_name
from saelab.training.run import model_activation_stream, train_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--hook", default=SAEConfig().hook)
    p.add_argument("--tokens", type=int, default=50_000, help="training tokens per SAE")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--buffer-size", type=int, default=DataConfig().buffer_size)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--dataset", default="default")
    p.add_argument("--context", type=int, default=DataConfig().context)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-cache", action="store_true", help="also time cache + 4 cached runs")
    return p.parse_args(argv)


def sweep_saes(args: argparse.Namespace) -> tuple[SAEConfig, ...]:
    """Four SAEs a sweep would compare: two TopK k, two ReLU λ."""
    common = {"hook": args.hook, "expansion": args.expansion}
    return (
        SAEConfig(architecture="topk", k=16, **common),
        SAEConfig(architecture="topk", k=32, **common),
        SAEConfig(architecture="relu", l1_coefficient=2.0, **common),
        SAEConfig(architecture="relu", l1_coefficient=5.0, **common),
    )


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def model_share(cfg: RunConfig) -> tuple[float, float]:
    """Seconds to load ``cfg``'s model, and to draw the run's batches from its activation stream
    (forward passes plus shuffling) with no SAE attached."""
    load_s, (model, tokenizer) = timed(load_model, cfg.model.name, device=cfg.model.device)
    stream = model_activation_stream(cfg, model, tokenizer)

    def draw() -> None:
        for _, _batch in zip(range(cfg.train.steps), stream, strict=False):
            pass

    forward_s, _ = timed(draw)
    return load_s, forward_s


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run would bury the result
    saes = sweep_saes(args)
    cfg = RunConfig(
        model=ModelConfig(name=args.model, device=args.device),
        data=DataConfig(dataset=args.dataset, context=args.context, buffer_size=args.buffer_size),
        train=TrainConfig(tokens=args.tokens, batch_size=args.batch_size),
        saes=saes,
        seed=args.seed,
    )
    result: dict[str, Any] = {
        "model": args.model,
        "hook": args.hook,
        "tokens_per_sae": cfg.train.steps * cfg.train.batch_size,
        "batch_size": args.batch_size,
        "saes": [sae_folder_name(s).removeprefix(f"{args.hook}-") for s in saes],
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # First, so that one-time costs (imports, the model file entering the page cache) are
        # not charged to whichever run happens to go first.
        load_s, forward_s = model_share(cfg)
        sweep_s, _ = timed(train_run, cfg, root / "sweep", progress=False)
        separate = [
            timed(
                train_run, dataclasses.replace(cfg, saes=(s,)), root / f"single{i}", progress=False
            )[0]
            for i, s in enumerate(saes)
        ]
        result |= {
            "sweep_s": round(sweep_s, 3),
            "separate_s": round(sum(separate), 3),
            "separate_each_s": [round(t, 3) for t in separate],
            "ratio_separate_over_sweep": round(sum(separate) / sweep_s, 3),
            "model_load_s": round(load_s, 3),
            "forward_s": round(forward_s, 3),
            "sae_train_s": round(max(sweep_s - load_s - forward_s, 0.0), 3),
        }
        if args.with_cache:
            model, tokenizer = load_model(args.model, device=args.device)
            cache_s, _ = timed(
                write_activation_cache,
                model,
                tokenizer,
                cfg.hooks,
                root / "cache",
                tokens=cfg.train.steps * cfg.train.batch_size,
                model_name=args.model,
                dataset=args.dataset,
                context=args.context,
                seed=args.seed,
                progress=False,
            )
            cached = dataclasses.replace(
                cfg, data=dataclasses.replace(cfg.data, activations=str(root / "cache"))
            )
            cached_each = [
                timed(
                    train_run,
                    dataclasses.replace(cached, saes=(s,)),
                    root / f"cached{i}",
                    progress=False,
                )[0]
                for i, s in enumerate(saes)
            ]
            result |= {
                "cache_write_s": round(cache_s, 3),
                "cached_runs_s": round(sum(cached_each), 3),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
