"""Wall time of each ``saelab bench`` suite on the default model for the demo SAE, with the share
spent in the model's forward passes (the part shared by every SAE on a hook) measured inside the
same run, and the synthetic generator's rows/s against a TopK training step's.

The SAE folder is copied to a temporary folder first (``bench core`` writes ``metrics.json``
beside the SAE). Each suite prints one JSON line: ``wall_s``, ``forward_s`` (time inside the
shared forward passes), ``per_sae_s`` (the rest: probes, k-sparse probing, scoring; what each
further SAE on the hook adds) and the sizes it ran at, so how the cost grows can be read off:
absorption's forward cost grows with ``words`` × prompt length, its per-SAE cost with
``words`` × ``d_sae``; probing's with tasks × ``examples`` × ``context``.

Example::

    python benchmarks/bench_suite.py --sae runs/demo/blocks.6.hook_resid_post-topk-x16-k32
    python benchmarks/bench_suite.py --suites absorption probing --words 600 --examples 200
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import saelab.evaluation.bench.passes as passes

DEMO = "runs/demo/blocks.6.hook_resid_post-topk-x16-k32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", default=DEMO, help="SAE folder (default: the demo SAE)")
    p.add_argument("--suites", nargs="+", default=["core", "absorption", "probing", "synth"])
    p.add_argument("--words", type=int, default=1500, help="absorption --words")
    p.add_argument("--examples", type=int, default=400, help="probing --examples")
    p.add_argument("--context", type=int, default=64, help="probing --context")
    p.add_argument("--core-tokens", type=int, default=8192, help="core --tokens")
    p.add_argument("--synth-size", default="576x4608", help="DxN of the generator measurement")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    return p.parse_args(argv)


def timed_forwards() -> list[float]:
    """Wrap the shared forward passes so their time inside a suite is recorded."""
    spent: list[float] = []
    real = passes.sequence_features

    def timing(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    passes.sequence_features = timing
    return spent


def run_suite(name: str, sae_dir: Path, args: argparse.Namespace) -> dict:
    from saelab.evaluation.bench.absorption import AbsorptionConfig
    from saelab.evaluation.bench.core import CoreBenchConfig
    from saelab.evaluation.bench.probing import ProbingConfig
    from saelab.evaluation.bench.registry import load_suites
    from saelab.models.loading import load_model

    suite = load_suites().lookup(name)
    opts = {
        "core": CoreBenchConfig(tokens=args.core_tokens),
        "absorption": AbsorptionConfig(words=args.words),
        "probing": ProbingConfig(examples=args.examples, context=args.context),
    }[name]
    load_model("default")  # cached by the loader's files: the suite's own load is then warm
    spent = timed_forwards()
    start = time.perf_counter()
    suite.run([sae_dir], opts, progress=False)
    wall = time.perf_counter() - start
    forward = sum(spent)
    sizes = {
        "core": {"tokens": args.core_tokens},
        "absorption": {"words": args.words},
        "probing": {"examples": args.examples, "context": args.context, "tasks": 3},
    }[name]
    row = {"suite": name, "wall_s": round(wall, 1), **sizes}
    if name != "core":  # core's passes are eval's own (clean, ablated, spliced per SAE)
        row |= {"forward_s": round(forward, 1), "per_sae_s": round(wall - forward, 1)}
        row["forward_share"] = round(forward / wall, 3)
    return row


def synth_rows(args: argparse.Namespace) -> dict:
    """The synthetic generator's benchmark (benchmarks/synth_generator.py) at one size."""
    path = Path(__file__).with_name("synth_generator.py")
    spec = importlib.util.spec_from_file_location("synth_generator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d, n = (int(v) for v in args.synth_size.lower().split("x"))
    sub = module.parse_args(["--steps", "3", "--threads", str(args.threads)])
    return {"suite": "synth generator", **module.measure(d, n, sub)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = Path(tmp) / Path(args.sae).name
        shutil.copytree(args.sae, sae_dir)
        for name in args.suites:
            row = synth_rows(args) if name == "synth" else run_suite(name, sae_dir, args)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
